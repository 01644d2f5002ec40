package transport_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/internal/pki"
	"github.com/remusd/remusd/transport"
)

type TLSFiles = transport.TLSFiles

// issue writes a bundle for host name, signed by ca, into dir/name.
func issue(t *testing.T, ca *pki.CA, dir, name string) TLSFiles {
	t.Helper()
	f, err := ca.IssueFiles(filepath.Join(dir, name), name, pki.HostOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func newCA(t *testing.T, name string) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// result is one side's outcome of a handshake.
type result struct {
	err error
	cs  tls.ConnectionState
}

// handshake runs one TLS handshake between a server and a client config
// over loopback TCP, then one byte of application data from the server,
// and returns both sides' outcomes. In TLS 1.3 the client's handshake
// completes before the server has checked the client's certificate, so
// the client reads to learn of a refusal.
func handshake(t *testing.T, srv, cli *tls.Config) (client, server result) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	sres := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			sres <- result{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		tc := c.(*tls.Conn)
		err = tc.Handshake()
		if err == nil {
			_, err = c.Write([]byte("ok"))
		}
		sres <- result{err: err, cs: tc.ConnectionState()}
	}()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cli)
	if err == nil {
		buf := make([]byte, 2)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(buf)
		client = result{err: err, cs: c.ConnectionState()}
		c.Close()
	} else {
		client = result{err: err}
	}
	return client, <-sres
}

// only accepts exactly one identity and records what it was asked.
func only(want string, asked *[]string) func(string) error {
	return func(id string) error {
		*asked = append(*asked, id)
		if id != want {
			return fmt.Errorf("identity %q is not %q", id, want)
		}
		return nil
	}
}

func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	primary := issue(t, ca, dir, "primary")

	var srvAsked, cliAsked []string
	srv, err := backup.ServerConfigAccept(only("primary", &srvAsked))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := primary.ClientConfig(only("backup", &cliAsked))
	if err != nil {
		t.Fatal(err)
	}
	c, s := handshake(t, srv, cli)
	if c.err != nil || s.err != nil {
		t.Fatalf("good pair refused: client %v, server %v", c.err, s.err)
	}
	if fmt.Sprint(srvAsked) != "[primary]" || fmt.Sprint(cliAsked) != "[backup]" {
		t.Fatalf("accept callbacks asked: server %v, client %v", srvAsked, cliAsked)
	}
	if id, err := transport.PeerIdentity(s.cs); err != nil || id != "primary" {
		t.Fatalf("server's PeerIdentity = %q, %v; want primary", id, err)
	}
	// The primary verifies the backup itself: crypto/tls records no
	// verified chain on its side, and PeerIdentity says so.
	if id, err := transport.PeerIdentity(c.cs); err == nil {
		t.Fatalf("client's PeerIdentity = %q without a verified chain", id)
	}

	// The plain ServerConfig accepts any identity the CA signed.
	plain, err := backup.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	if c, s := handshake(t, plain, cli); c.err != nil || s.err != nil {
		t.Fatalf("ServerConfig refused a CA-signed primary: client %v, server %v", c.err, s.err)
	}
}

func TestTLSRefusesUnacceptedIdentity(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	stranger := issue(t, ca, dir, "stranger") // signed by the same CA, unknown identity

	// The backup refuses a client whose identity it does not accept.
	var asked []string
	srv, err := backup.ServerConfigAccept(only("primary", &asked))
	if err != nil {
		t.Fatal(err)
	}
	cli, err := stranger.ClientConfig(func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	c, s := handshake(t, srv, cli)
	if s.err == nil || !strings.Contains(s.err.Error(), `peer "stranger" refused`) {
		t.Fatalf("backup accepted an unaccepted identity: server error %v", s.err)
	}
	if c.err == nil {
		t.Fatal("client read application data from a backup that refused it")
	}

	// The primary refuses a backup whose identity it does not accept.
	strangerSrv, err := stranger.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	primary := issue(t, ca, dir, "primary")
	refuse := errors.New("not my backup")
	pcli, err := primary.ClientConfig(func(id string) error {
		if id != "backup" {
			return refuse
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	c, _ = handshake(t, strangerSrv, pcli)
	if !errors.Is(c.err, refuse) || !strings.Contains(c.err.Error(), `peer "stranger" refused`) {
		t.Fatalf("primary accepted an unaccepted backup: %v", c.err)
	}
}

func TestTLSRefusesForeignCA(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	primary := issue(t, ca, dir, "primary")
	acceptAll := func(string) error { return nil }
	srv, err := backup.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}

	// A primary with a certificate from another CA is refused by the backup.
	rogue := issue(t, newCA(t, "rogue-ca"), dir, "primary") // even under a known name
	rogue.CA = backup.CA                                    // it trusts the real CA, but its own cert is foreign
	rcli, err := rogue.ClientConfig(acceptAll)
	if err != nil {
		t.Fatal(err)
	}
	if _, s := handshake(t, srv, rcli); s.err == nil {
		t.Fatal("backup accepted a client certificate from a foreign CA")
	}

	// A backup with a certificate from another CA is refused by the primary.
	rogueBackup := issue(t, newCA(t, "rogue-ca"), dir, "backup")
	rsrv, err := rogueBackup.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := primary.ClientConfig(acceptAll)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := handshake(t, rsrv, cli); c.err == nil || !strings.Contains(c.err.Error(), "verify peer certificate") {
		t.Fatalf("primary accepted a backup certificate from a foreign CA: %v", c.err)
	}

	// A primary without any client certificate is refused.
	bare := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}
	if _, s := handshake(t, srv, bare); s.err == nil {
		t.Fatal("backup accepted a primary without a certificate")
	}
}

func TestTLSServerNamePinning(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	primary := issue(t, ca, dir, "primary")
	srv, err := backup.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		serverName string
		ok         bool
	}{{"", true}, {"backup", true}, {"somebody-else", false}} {
		p := primary
		p.ServerName = tc.serverName
		cli, err := p.ClientConfig(func(string) error { return nil })
		if err != nil {
			t.Fatal(err)
		}
		c, _ := handshake(t, srv, cli)
		if tc.ok && c.err != nil {
			t.Errorf("server_name %q: refused: %v", tc.serverName, c.err)
		}
		if !tc.ok && (c.err == nil || !strings.Contains(c.err.Error(), "tls.server_name")) {
			t.Errorf("server_name %q: got %v, want a refusal naming tls.server_name", tc.serverName, c.err)
		}
	}
}

// TestPeerIdentityOverPipe: the identity is known to the server during and
// after the handshake, over any stream (here net.Pipe).
func TestPeerIdentityOverPipe(t *testing.T) {
	dir := t.TempDir()
	ca := newCA(t, "remusd-ca")
	backup := issue(t, ca, dir, "backup")
	primary := issue(t, ca, dir, "primary.example.org")
	var during []string
	srv, err := backup.ServerConfigAccept(func(id string) error { during = append(during, id); return nil })
	if err != nil {
		t.Fatal(err)
	}
	cli, err := primary.ClientConfig(func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	sc, cc := tls.Server(a, srv), tls.Client(b, cli)
	// Close the pipe itself: a tls.Conn's Close would block sending
	// close_notify into a pipe nobody reads.
	defer a.Close()
	defer b.Close()
	done := make(chan error, 1)
	go func() { done <- cc.Handshake() }()
	if err := sc.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	id, err := transport.PeerIdentity(sc.ConnectionState())
	if err != nil || id != "primary.example.org" || fmt.Sprint(during) != "[primary.example.org]" {
		t.Fatalf("PeerIdentity = %q, %v; accept saw %v", id, err, during)
	}
	if _, err := transport.PeerIdentity(tls.ConnectionState{}); err == nil {
		t.Fatal("PeerIdentity of an unverified connection succeeded")
	}
}

func TestTLSNilAccept(t *testing.T) {
	f := issue(t, newCA(t, "ca"), t.TempDir(), "x")
	if _, err := f.ClientConfig(nil); err == nil {
		t.Error("ClientConfig(nil) succeeded")
	}
	if _, err := f.ServerConfigAccept(nil); err == nil {
		t.Error("ServerConfigAccept(nil) succeeded")
	}
}

func TestValidateHostName(t *testing.T) {
	for _, ok := range []string{"a", "backup", "host-1.example.org", "H_2", strings.Repeat("x", 64)} {
		if err := transport.ValidateHostName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "-x", ".x", "_x", "a b", "a/b", "../x", "x\n", "ü", strings.Repeat("x", 65)} {
		if err := transport.ValidateHostName(bad); err == nil || !strings.Contains(err.Error(), "is not valid") {
			t.Errorf("%q: got %v", bad, err)
		}
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
	f := issue(t, newCA(t, "ca"), dir, "x")
	f.CA = bad
	if _, err := f.ServerConfig(); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") {
		t.Fatalf("got %v", err)
	}
}
