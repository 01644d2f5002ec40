package transport

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/internal/tlstest"
)

func issue(t *testing.T, ca *tlstest.CA, dir, name string) TLSFiles {
	f := ca.Issue(t, dir, name)
	return TLSFiles{Cert: f.Cert, Key: f.Key, CA: f.CA}
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
	ca := tlstest.NewCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	primary := issue(t, ca, dir, "primary")
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
	rogue := issue(t, tlstest.NewCA(t, "rogue-ca"), dir, "rogue")
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
	f := issue(t, tlstest.NewCA(t, "ca"), dir, "x")
	f.CA = bad
	if _, err := f.ServerConfig(); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") {
		t.Fatalf("got %v", err)
	}
}
