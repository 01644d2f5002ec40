package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a leaf certificate for name, signed by ca, plus the CA, and
// returns the files.
func (ca *testCA) issue(t *testing.T, dir, name string) TLSFiles {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		DNSNames: []string{name}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	f := TLSFiles{Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"), CA: filepath.Join(dir, name+"-ca.crt")}
	write := func(p string, b []byte) {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(f.Cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	write(f.Key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}))
	write(f.CA, ca.pem)
	return f
}

// handshake runs one TLS handshake between a server and a client config and
// returns the client's and the server's errors.
func handshake(t *testing.T, srv, cli *tls.Config) (error, error) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	serr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			serr <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		err = c.(*tls.Conn).Handshake()
		if err == nil {
			_, err = c.Write([]byte("ok"))
		}
		serr <- err
	}()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cli)
	if err == nil {
		buf := make([]byte, 2)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(buf)
		c.Close()
	}
	return err, <-serr
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "remusd-ca")
	backup := ca.issue(t, dir, "backup")
	primary := ca.issue(t, dir, "primary")
	srv, err := backup.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := primary.ClientConfig("backup")
	if err != nil {
		t.Fatal(err)
	}
	if cerr, serr := handshake(t, srv, cli); cerr != nil || serr != nil {
		t.Fatalf("good pair refused: client %v, server %v", cerr, serr)
	}

	// A primary with a certificate from another CA is refused by the backup.
	rogue := newTestCA(t, "rogue-ca").issue(t, dir, "rogue")
	rogue.CA = backup.CA // it trusts the real CA, but its own cert is foreign
	rcli, err := rogue.ClientConfig("backup")
	if err != nil {
		t.Fatal(err)
	}
	if _, serr := handshake(t, srv, rcli); serr == nil {
		t.Fatal("backup accepted a client certificate from a foreign CA")
	}

	// A primary without any client certificate is refused.
	bare := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: cli.RootCAs, ServerName: "backup"}
	if _, serr := handshake(t, srv, bare); serr == nil {
		t.Fatal("backup accepted a primary without a certificate")
	}

	// A primary expecting another server name refuses the backup.
	wrong, err := primary.ClientConfig("somebody-else")
	if err != nil {
		t.Fatal(err)
	}
	if cerr, _ := handshake(t, srv, wrong); cerr == nil {
		t.Fatal("primary accepted a backup certificate for another name")
	}
}

func TestTLSFilesValidate(t *testing.T) {
	if (TLSFiles{}).Enabled() {
		t.Fatal("empty TLSFiles enabled")
	}
	err := TLSFiles{Cert: "/nonexistent/c.pem"}.Validate()
	if err == nil || !strings.Contains(err.Error(), "tls.cert") || !strings.Contains(err.Error(), "tls.key: must be set") {
		t.Fatalf("got %v", err)
	}
	dir := t.TempDir()
	bad := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(bad, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	f := newTestCA(t, "ca").issue(t, dir, "x")
	f.CA = bad
	if _, err := f.ServerConfig(); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") {
		t.Fatalf("got %v", err)
	}
}
