package pki

import (
	"crypto/x509"
	"errors"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// verify checks that the certificate in certPath chains to the CA in
// caPath for both server and client authentication and returns it.
func verify(t *testing.T, caPath, certPath string) *x509.Certificate {
	t.Helper()
	ca, err := ReadCertificate(caPath)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ReadCertificate(certPath)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			t.Fatalf("%s does not verify against %s for %v: %v", certPath, caPath, u, err)
		}
	}
	return cert
}

func TestInitCAAndIssueHost(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	if err := InitCA(caDir, "remusd-ca", 0, false); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, caDir); m != 0o700 {
		t.Errorf("CA dir mode %v, want 0700", m)
	}
	if m := mode(t, filepath.Join(caDir, CACertFile)); m != 0o644 {
		t.Errorf("ca.crt mode %v, want 0644", m)
	}
	if m := mode(t, filepath.Join(caDir, CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %v, want 0600", m)
	}
	ca, err := LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	c := ca.Certificate()
	now := time.Now()
	if !c.IsCA || c.Subject.CommonName != "remusd-ca" || c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign ||
		!c.MaxPathLenZero || c.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("CA certificate: %+v", c)
	}
	if !c.NotBefore.Before(now.Add(-time.Minute)) || c.NotAfter.Sub(now) < DefaultCAValidity-time.Minute {
		t.Errorf("CA validity %v – %v", c.NotBefore, c.NotAfter)
	}
	if c.SerialNumber.BitLen() < 64 || c.SerialNumber.BitLen() > 128 {
		t.Errorf("CA serial %v has %d bits", c.SerialNumber, c.SerialNumber.BitLen())
	}

	out := filepath.Join(root, "backup-tls")
	files, err := IssueHost(caDir, "backup", out, HostOptions{
		DNS: []string{"backup.example.org", "backup"},
		IPs: []net.IP{net.ParseIP("192.0.2.7"), net.ParseIP("2001:db8::7")},
	})
	if err != nil {
		t.Fatal(err)
	}
	if files != BundleFiles(out) || files.CA != filepath.Join(out, "ca.crt") || files.Cert != filepath.Join(out, "host.crt") || files.Key != filepath.Join(out, "host.key") {
		t.Errorf("files %+v", files)
	}
	if err := files.Validate(); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]os.FileMode{out: 0o700, files.CA: 0o644, files.Cert: 0o644, files.Key: 0o600} {
		if m := mode(t, p); m != want {
			t.Errorf("%s mode %v, want %v", p, m, want)
		}
	}
	host := verify(t, files.CA, files.Cert)
	if host.Subject.CommonName != "backup" || strings.Join(host.DNSNames, ",") != "backup,backup.example.org" ||
		len(host.IPAddresses) != 2 || !host.IPAddresses[0].Equal(net.ParseIP("192.0.2.7")) || host.IsCA {
		t.Errorf("host certificate: CN %q DNS %v IPs %v CA %v", host.Subject.CommonName, host.DNSNames, host.IPAddresses, host.IsCA)
	}
	if d := host.NotAfter.Sub(now); d < DefaultHostValidity-time.Minute || d > DefaultHostValidity+time.Minute {
		t.Errorf("host certificate valid for %v, want %v", d, DefaultHostValidity)
	}
	if host.SerialNumber.Cmp(c.SerialNumber) == 0 {
		t.Error("host and CA share a serial")
	}
	// The bundle is a working TLS configuration.
	if _, err := files.ServerConfig(); err != nil {
		t.Fatal(err)
	}
	if _, err := files.ClientConfig(func(string) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

func TestRefuseOverwrite(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	if err := InitCA(caDir, "remusd-ca", time.Hour, false); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(caDir, CAKeyFile))
	err := InitCA(caDir, "remusd-ca", time.Hour, false)
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), filepath.Join(caDir, CACertFile)) {
		t.Fatalf("second InitCA: %v", err)
	}
	if after, _ := os.ReadFile(filepath.Join(caDir, CAKeyFile)); string(after) != string(before) {
		t.Fatal("refused InitCA changed the key")
	}
	// Only the key left: still refused, naming the key.
	os.Remove(filepath.Join(caDir, CACertFile))
	if err := InitCA(caDir, "remusd-ca", time.Hour, false); !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), CAKeyFile) {
		t.Fatalf("InitCA over a lone key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(caDir, CACertFile)); err == nil {
		t.Fatal("refused InitCA wrote ca.crt")
	}
	if err := InitCA(caDir, "remusd-ca-2", time.Hour, true); err != nil {
		t.Fatalf("forced InitCA: %v", err)
	}
	if after, _ := os.ReadFile(filepath.Join(caDir, CAKeyFile)); string(after) == string(before) {
		t.Fatal("forced InitCA kept the old key")
	}

	out := filepath.Join(root, "tls")
	if _, err := IssueHost(caDir, "h1", out, HostOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = IssueHost(caDir, "h1", out, HostOptions{})
	if !errors.Is(err, fs.ErrExist) || !strings.Contains(err.Error(), "refusing to overwrite "+filepath.Join(out, CACertFile)) {
		t.Fatalf("second IssueHost: %v", err)
	}
	if _, err := IssueHost(caDir, "h2", out, HostOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if c := verify(t, filepath.Join(out, CACertFile), filepath.Join(out, HostCertFile)); c.Subject.CommonName != "h2" {
		t.Fatalf("forced IssueHost left CN %q", c.Subject.CommonName)
	}
	// No temporary files are left behind.
	ents, _ := os.ReadDir(out)
	if len(ents) != 3 {
		t.Fatalf("out dir holds %d entries: %v", len(ents), ents)
	}
}

func TestBadNames(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	if err := InitCA(caDir, "remusd-ca", 0, false); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"", "-x", "../evil", "a b", "a/b", strings.Repeat("h", 65)} {
		out := filepath.Join(root, "out")
		_, err := IssueHost(caDir, name, out, HostOptions{})
		if err == nil || !strings.Contains(err.Error(), "host name") || !strings.Contains(err.Error(), "is not valid") {
			t.Errorf("%q: %v", name, err)
		}
		if _, err := os.Stat(out); err == nil {
			t.Errorf("%q: output dir created", name)
		}
	}
	ca, err := LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := ca.Issue("h", HostOptions{DNS: []string{"bad name"}}); err == nil || !strings.Contains(err.Error(), "DNS name") {
		t.Errorf("bad DNS: %v", err)
	}
	if _, _, err := ca.Issue("h", HostOptions{IPs: []net.IP{nil}}); err == nil {
		t.Error("nil IP accepted")
	}
	if _, _, err := ca.Issue("h", HostOptions{Validity: -time.Hour}); err == nil {
		t.Error("negative validity accepted")
	}
	for _, name := range []string{"", "x\ny", strings.Repeat("c", 65)} {
		if err := InitCA(filepath.Join(root, "ca2"), name, 0, false); err == nil {
			t.Errorf("CA name %q accepted", name)
		}
	}
	if err := InitCA(filepath.Join(root, "ca3"), "remusd-ca", -time.Hour, false); err == nil {
		t.Error("negative CA validity accepted")
	}
}

// TestHostNeverOutlivesCA: a host validity beyond the CA's end is cut to
// it, and an expired CA issues nothing.
func TestHostNeverOutlivesCA(t *testing.T) {
	now := time.Now()
	ca, err := newCA("short-ca", 2*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _, err := ca.issue("h", HostOptions{Validity: 24 * time.Hour}, now)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "h.crt"), certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := ReadCertificate(filepath.Join(dir, "h.crt"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.NotAfter.Equal(ca.Certificate().NotAfter) {
		t.Errorf("host NotAfter %v, CA NotAfter %v", c.NotAfter, ca.Certificate().NotAfter)
	}
	if _, _, err := ca.issue("h", HostOptions{}, now.Add(3*time.Hour)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired CA: %v", err)
	}
}

func TestLoadCAErrors(t *testing.T) {
	root := t.TempDir()
	if _, err := LoadCA(filepath.Join(root, "none")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing CA: %v", err)
	}
	a, b := filepath.Join(root, "a"), filepath.Join(root, "b")
	for _, d := range []string{a, b} {
		if err := InitCA(d, "ca", 0, false); err != nil {
			t.Fatal(err)
		}
	}
	// A CA whose key belongs to another CA is refused.
	key, _ := os.ReadFile(filepath.Join(b, CAKeyFile))
	if err := os.WriteFile(filepath.Join(a, CAKeyFile), key, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(a); err == nil || !strings.Contains(err.Error(), "is not the key of") {
		t.Errorf("mismatched key: %v", err)
	}
	// A host certificate is not a CA.
	out := filepath.Join(root, "out")
	if _, err := IssueHost(b, "h", out, HostOptions{}); err != nil {
		t.Fatal(err)
	}
	host, _ := os.ReadFile(filepath.Join(out, HostCertFile))
	hkey, _ := os.ReadFile(filepath.Join(out, HostKeyFile))
	os.WriteFile(filepath.Join(a, CACertFile), host, 0o644)
	os.WriteFile(filepath.Join(a, CAKeyFile), hkey, 0o600)
	if _, err := LoadCA(a); err == nil || !strings.Contains(err.Error(), "not a CA certificate") {
		t.Errorf("host cert as CA: %v", err)
	}
	os.WriteFile(filepath.Join(a, CACertFile), []byte("junk"), 0o644)
	if _, err := LoadCA(a); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") {
		t.Errorf("junk CA: %v", err)
	}
}

func TestInMemoryCA(t *testing.T) {
	ca, err := NewCA("test-ca")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	f, err := ca.IssueFiles(filepath.Join(dir, "primary"), "primary", HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c := verify(t, f.CA, f.Cert); c.Subject.CommonName != "primary" {
		t.Errorf("CN %q", c.Subject.CommonName)
	}
	if !strings.Contains(string(ca.CertPEM()), "BEGIN CERTIFICATE") {
		t.Error("CertPEM is not PEM")
	}
	// Serials differ between certificates.
	seen := map[string]bool{ca.Certificate().SerialNumber.String(): true}
	for range 20 {
		p, _, err := ca.Issue("x", HostOptions{})
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, "x.crt"), p, 0o600)
		c, _ := ReadCertificate(filepath.Join(dir, "x.crt"))
		s := c.SerialNumber.String()
		if seen[s] || c.SerialNumber.Cmp(new(big.Int).Lsh(big.NewInt(1), 128)) >= 0 {
			t.Fatalf("serial %s repeated or too large", s)
		}
		seen[s] = true
	}
}
