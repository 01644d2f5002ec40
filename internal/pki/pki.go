// Package pki creates the certificates of the replication link's mutual
// TLS: a certificate authority (CA) and, signed by it, one certificate per
// host whose CommonName is the host's identity (see
// transport.PeerIdentity). It works in memory (NewCA, for tests across the
// tree) and on disk (InitCA, IssueHost, for `remusd certs`).
//
// Keys are ECDSA P-256; serials are random 128-bit numbers; certificates
// start being valid a few minutes in the past, to tolerate clock skew
// between the host that issues them and the hosts that check them.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"time"
	"unicode"

	"github.com/remusd/remusd/transport"
)

// Default validities: ten years for a CA, five for a host certificate.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultHostValidity = 5 * 365 * 24 * time.Hour
)

// File names inside a CA directory (CACertFile, CAKeyFile) and a host
// bundle (CACertFile, HostCertFile, HostKeyFile).
const (
	CACertFile   = "ca.crt"
	CAKeyFile    = "ca.key"
	HostCertFile = "host.crt"
	HostKeyFile  = "host.key"
)

// backdate is how far in the past a new certificate starts being valid.
const backdate = 5 * time.Minute

// HostOptions are the choices of a host certificate beyond its name.
type HostOptions struct {
	// DNS and IPs are subject alternative names added to the host name
	// (which is always the first DNS name). remusd identifies peers by
	// CommonName, not by these; they serve other TLS clients.
	DNS []string
	IPs []net.IP
	// Validity is how long the certificate is valid (0 = 5 years). It
	// never outlives the CA: a longer validity is cut to the CA's end.
	Validity time.Duration
	// Force overwrites existing files.
	Force bool
}

// CA is a certificate authority: its certificate and signing key.
type CA struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
}

// NewCA makes a CA named name, valid for DefaultCAValidity, in memory.
func NewCA(name string) (*CA, error) {
	return newCA(name, DefaultCAValidity, time.Now())
}

func newCA(name string, validity time.Duration, now time.Time) (*CA, error) {
	if err := ValidateCAName(name); err != nil {
		return nil, err
	}
	if validity < 0 {
		return nil, fmt.Errorf("CA validity %v is negative", validity)
	}
	if validity == 0 {
		validity = DefaultCAValidity
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := randSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		// It signs host certificates only, never another CA.
		MaxPathLen:     0,
		MaxPathLenZero: true,
		KeyUsage:       x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	return &CA{cert: cert, key: key, certPEM: pemCert(der)}, nil
}

// Certificate returns the CA's certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// CertPEM returns the CA's certificate in PEM.
func (ca *CA) CertPEM() []byte { return slices.Clone(ca.certPEM) }

// Issue makes a key and a certificate for host name signed by the CA and
// returns both in PEM. The certificate's CommonName is name (the host's
// identity) and its first DNS name too; it is valid for server and
// client authentication.
func (ca *CA) Issue(name string, opts HostOptions) (certPEM, keyPEM []byte, err error) {
	return ca.issue(name, opts, time.Now())
}

func (ca *CA) issue(name string, opts HostOptions, now time.Time) (certPEM, keyPEM []byte, err error) {
	if err := transport.ValidateHostName(name); err != nil {
		return nil, nil, err
	}
	dns := []string{name}
	for _, d := range opts.DNS {
		if err := ValidateDNSName(d); err != nil {
			return nil, nil, err
		}
		if !slices.Contains(dns, d) {
			dns = append(dns, d)
		}
	}
	var ips []net.IP
	for _, ip := range opts.IPs {
		if len(ip) != net.IPv4len && len(ip) != net.IPv6len {
			return nil, nil, fmt.Errorf("IP address %v is not valid", ip)
		}
		if !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	}
	validity := opts.Validity
	if validity < 0 {
		return nil, nil, fmt.Errorf("host certificate validity %v is negative", validity)
	}
	if validity == 0 {
		validity = DefaultHostValidity
	}
	notAfter := now.Add(validity)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, nil, fmt.Errorf("CA %q expired on %s", ca.cert.Subject.CommonName, ca.cert.NotAfter.Format(time.RFC3339))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate host key: %w", err)
	}
	serial, err := randSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              dns,
		IPAddresses:           ips,
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate for %q: %w", name, err)
	}
	keyPEM, err = pemKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pemCert(der), keyPEM, nil
}

// IssueFiles issues a certificate for host name (see Issue) and writes the
// bundle that host needs into dir (created 0700): CACertFile and
// HostCertFile (0644), HostKeyFile (0600). Existing files are refused
// unless opts.Force.
func (ca *CA) IssueFiles(dir, name string, opts HostOptions) (transport.TLSFiles, error) {
	certPEM, keyPEM, err := ca.Issue(name, opts)
	if err != nil {
		return transport.TLSFiles{}, err
	}
	err = writeFiles(dir, []outFile{
		{CACertFile, ca.certPEM, 0o644},
		{HostCertFile, certPEM, 0o644},
		{HostKeyFile, keyPEM, 0o600},
	}, opts.Force)
	if err != nil {
		return transport.TLSFiles{}, err
	}
	return BundleFiles(dir), nil
}

// BundleFiles names the files of a host bundle in dir.
func BundleFiles(dir string) transport.TLSFiles {
	return transport.TLSFiles{
		Cert: filepath.Join(dir, HostCertFile),
		Key:  filepath.Join(dir, HostKeyFile),
		CA:   filepath.Join(dir, CACertFile),
	}
}

// InitCA creates a CA named name valid for validity (0 = 10 years) and
// writes it into dir (created 0700): CACertFile (0644) and CAKeyFile
// (0600). Existing files are refused unless force.
func InitCA(dir, name string, validity time.Duration, force bool) error {
	ca, err := newCA(name, validity, time.Now())
	if err != nil {
		return err
	}
	keyPEM, err := pemKey(ca.key)
	if err != nil {
		return err
	}
	return writeFiles(dir, []outFile{
		{CACertFile, ca.certPEM, 0o644},
		{CAKeyFile, keyPEM, 0o600},
	}, force)
}

// LoadCA reads the CA that InitCA wrote into dir.
func LoadCA(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	cert, err := ReadCertificate(certPath)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s is not a CA certificate", certPath)
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, err
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s is not the key of %s", keyPath, certPath)
	}
	return &CA{cert: cert, key: key, certPEM: pemCert(cert.Raw)}, nil
}

// IssueHost loads the CA in caDir and writes a bundle for host name into
// outDir (see CA.IssueFiles): everything that host needs as its TLS
// directory.
func IssueHost(caDir, name, outDir string, opts HostOptions) (transport.TLSFiles, error) {
	// Check the name before touching the CA, so a typo is reported as such.
	if err := transport.ValidateHostName(name); err != nil {
		return transport.TLSFiles{}, err
	}
	ca, err := LoadCA(caDir)
	if err != nil {
		return transport.TLSFiles{}, err
	}
	return ca.IssueFiles(outDir, name, opts)
}

// ReadCertificate reads the first certificate of a PEM file.
func ReadCertificate(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s holds no PEM certificate", path)
		}
		if blk.Type == "CERTIFICATE" {
			cert, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			return cert, nil
		}
	}
}

func readKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s holds no PEM private key", path)
		}
		var key any
		switch blk.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		s, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: %T cannot sign", path, key)
		}
		return s, nil
	}
}

// dnsNameRE is a loose check of an extra DNS name (optionally a wildcard):
// ASCII, no spaces, at most 253 characters.
var dnsNameRE = regexp.MustCompile(`^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9._-]{0,251})$`)

// ValidateDNSName checks an extra DNS name of a host certificate (loosely:
// ASCII letters, digits, '.', '_', '-', an optional leading "*.", at most
// 253 characters).
func ValidateDNSName(name string) error {
	if !dnsNameRE.MatchString(name) {
		return fmt.Errorf("DNS name %q is not valid: it must match %s", name, dnsNameRE)
	}
	return nil
}

// ValidateCAName checks a CA's name (its CommonName): 1–64 bytes of
// printable characters.
func ValidateCAName(name string) error {
	if name == "" {
		return errors.New("CA name is empty")
	}
	if len(name) > 64 {
		return fmt.Errorf("CA name %q is longer than 64 bytes", name)
	}
	for _, r := range name {
		if !unicode.IsPrint(r) {
			return fmt.Errorf("CA name %q holds a non-printable character", name)
		}
	}
	return nil
}

// randSerial returns a random positive 128-bit serial number.
func randSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("serial number: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func pemKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// Mesh creates a throw-away CA and a bundle for each host name under
// dir/NAME (for demos and tests: every host trusts the CA, and so each
// other). It returns each host's TLS files.
func Mesh(dir string, names ...string) (map[string]transport.TLSFiles, error) {
	ca, err := NewCA("remusd-mesh-ca")
	if err != nil {
		return nil, err
	}
	out := make(map[string]transport.TLSFiles, len(names))
	for _, n := range names {
		f, err := ca.IssueFiles(filepath.Join(dir, n), n, HostOptions{Force: true})
		if err != nil {
			return nil, err
		}
		out[n] = f
	}
	return out, nil
}
