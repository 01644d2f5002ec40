package transport

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"regexp"
)

// TLSFiles names the PEM files of one side of a mutually authenticated
// replication link: its own certificate and key, and the CA that signs its
// peers' certificates.
type TLSFiles struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
	CA   string `json:"ca"`
	// ServerName, if set, is the identity (certificate CommonName) the
	// primary requires of the backup, on top of its accept callback.
	// The peer's host name or address plays no part: peers are known by
	// identity, not by where they are reached.
	ServerName string `json:"server_name,omitempty"`
}

// Enabled reports whether TLS is configured.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// Validate checks that all three files are named and readable.
func (f TLSFiles) Validate() error {
	var errs []error
	for _, p := range []struct{ field, path string }{{"cert", f.Cert}, {"key", f.Key}, {"ca", f.CA}} {
		if p.path == "" {
			errs = append(errs, fmt.Errorf("tls.%s: must be set when TLS is configured", p.field))
			continue
		}
		if _, err := os.Stat(p.path); err != nil {
			errs = append(errs, fmt.Errorf("tls.%s: %w", p.field, err))
		}
	}
	return errors.Join(errs...)
}

func (f TLSFiles) load() (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("tls: load certificate %s / key %s: %w", f.Cert, f.Key, err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("tls: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return tls.Certificate{}, nil, fmt.Errorf("tls: CA file %s holds no PEM certificate", f.CA)
	}
	return cert, pool, nil
}

// hostNameRE is what a host name, and so a peer identity, may look like:
// the same rule as hypervisor.ValidateVMName, because an identity ends up
// in file names, log fields and metric labels just as a VM name does.
var hostNameRE = regexp.MustCompile(`^` + HostNamePattern + `$`)

// HostNamePattern is the pattern ValidateHostName enforces, for error
// texts and documentation.
const HostNamePattern = `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`

// ValidateHostName checks that name is a valid host name, i.e. a valid
// identity in a certificate of the replication link.
func ValidateHostName(name string) error {
	if !hostNameRE.MatchString(name) {
		return fmt.Errorf("host name %q is not valid: it must match %s (letters, digits, '.', '_', '-'; at most 64 characters; no leading '.', '_' or '-')", name, HostNamePattern)
	}
	return nil
}

// identityOf returns the identity a certificate names: its Subject
// CommonName, which must be a valid host name.
func identityOf(cert *x509.Certificate) (string, error) {
	id := cert.Subject.CommonName
	if id == "" {
		return "", errors.New("tls: peer certificate has no CommonName (identity)")
	}
	if err := ValidateHostName(id); err != nil {
		return "", fmt.Errorf("tls: peer certificate identity: %w", err)
	}
	return id, nil
}

// PeerIdentity returns the identity of the peer of a completed (or
// verifying) handshake: the CommonName of the leaf of its verified
// certificate chain. It fails if the chain was not verified or the name
// is empty or not a valid host name.
//
// Only a server (the backup) gets verified chains from crypto/tls; the
// primary verifies the backup itself in ClientConfig, so on its side the
// identity is what the accept callback is given.
func PeerIdentity(cs tls.ConnectionState) (string, error) {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", errors.New("tls: no verified peer certificate chain")
	}
	return identityOf(cs.VerifiedChains[0][0])
}

// acceptAny accepts every valid identity signed by the CA.
func acceptAny(string) error { return nil }

// ServerConfig is the backup's side: it presents its certificate and
// requires a client certificate signed by the CA that names a valid
// identity; which identities may do what is left to the caller (see
// PeerIdentity and ServerConfigAccept).
func (f TLSFiles) ServerConfig() (*tls.Config, error) {
	return f.serverConfig(acceptAny)
}

// ServerConfigAccept is ServerConfig that also asks accept about the
// client's identity during the handshake: a client whose identity accept
// refuses fails the handshake, so a stranger holding a certificate from
// the same CA never gets to send a frame.
func (f TLSFiles) ServerConfigAccept(accept func(identity string) error) (*tls.Config, error) {
	if accept == nil {
		return nil, errors.New("tls: server config: accept callback is nil")
	}
	return f.serverConfig(accept)
}

func (f TLSFiles) serverConfig(accept func(identity string) error) (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		// Runs after crypto/tls has verified the client's chain against
		// ClientCAs (for client auth), so VerifiedChains is set.
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := PeerIdentity(cs)
			if err != nil {
				return err
			}
			if err := accept(id); err != nil {
				return fmt.Errorf("tls: peer %q refused: %w", id, err)
			}
			return nil
		},
	}, nil
}

// ClientConfig is the primary's side: it presents its certificate and
// verifies the backup's chain against the CA, then its identity: if
// ServerName is set the identity must equal it, and accept must not
// refuse it. The backup's host name or address is not checked.
func (f TLSFiles) ClientConfig(accept func(identity string) error) (*tls.Config, error) {
	if accept == nil {
		return nil, errors.New("tls: client config: accept callback is nil")
	}
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	want := f.ServerName
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		// crypto/tls can verify a server only against a host name
		// (ServerName, DNS or IP SANs). Peers are known by identity, not
		// by address, so the standard check is switched off here and
		// VerifyConnection below does the whole verification instead:
		// the chain against our CA for server auth, then the identity.
		// The handshake fails if it returns an error, so nothing is
		// skipped.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("tls: peer presented no certificate")
			}
			opts := x509.VerifyOptions{
				Roots:         pool,
				Intermediates: x509.NewCertPool(),
				KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			}
			for _, c := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(opts); err != nil {
				return fmt.Errorf("tls: verify peer certificate: %w", err)
			}
			id, err := identityOf(leaf)
			if err != nil {
				return err
			}
			if want != "" && id != want {
				return fmt.Errorf("tls: peer identity %q is not the expected %q (tls.server_name)", id, want)
			}
			if err := accept(id); err != nil {
				return fmt.Errorf("tls: peer %q refused: %w", id, err)
			}
			return nil
		},
	}, nil
}
