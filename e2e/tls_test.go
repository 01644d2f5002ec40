package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/internal/pki"
	"github.com/remusd/remusd/transport"
)

func newCA(t *testing.T, name string) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA(name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// issue writes a bundle for host name, signed by ca, into dir/name-tls.
func issue(t *testing.T, ca *pki.CA, dir, name string) transport.TLSFiles {
	t.Helper()
	f, err := ca.IssueFiles(filepath.Join(dir, name+"-tls"), name, pki.HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestMutualTLSBetweenDaemons: daemons with certificates from the same CA
// replicate over TLS; a primary with a certificate from another CA never
// gets a replica created on the backup.
func TestMutualTLSBetweenDaemons(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	ca := newCA(t, "remusd-ca")

	bcfg := baseConfig(dir, "backup")
	bcfg.Listen = "127.0.0.1:0"
	bcfg.TLS = issue(t, ca, dir, "backup")
	backup := startDaemon(t, dir, "backup", bcfg)
	addr := backup.listenAddr(t)

	good := baseConfig(dir, "primary")
	good.TLS = issue(t, ca, dir, "primary")
	good.SimVMs = []daemon.SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}}
	startDaemon(t, dir, "primary", good)
	if r := runCLI(t, "protect", "vm", "--peer", addr, "--control", good.Control); r.code != 0 {
		t.Fatalf("protect: %v", r)
	}
	waitFor(t, 30*time.Second, "epochs acked over TLS", func() (bool, string) {
		s, _ := vmStatus(t, good.Control, "vm")
		return s.AckedEpoch > 3, s.Link + " " + s.LastError
	})

	rogueCA := newCA(t, "rogue-ca")
	rogue := baseConfig(dir, "rogue")
	rf := issue(t, rogueCA, dir, "rogue")
	rf.CA = bcfg.TLS.CA // it trusts the backup, but its own certificate is foreign
	rogue.TLS = rf
	rogue.SimVMs = []daemon.SimVM{{Name: "intruder", MemoryBytes: 4 << 20, Rate: 20000}}
	startDaemon(t, dir, "rogue", rogue)
	if r := runCLI(t, "protect", "intruder", "--peer", addr, "--control", rogue.Control); r.code != 0 {
		t.Fatalf("protect (rogue): %v", r)
	}
	waitFor(t, 30*time.Second, "rogue primary reports a TLS failure", func() (bool, string) {
		s, _ := vmStatus(t, rogue.Control, "intruder")
		return s.LastError != "" && s.Link != "up", s.Link + " " + s.LastError
	})
	time.Sleep(300 * time.Millisecond) // several reconnect attempts
	if _, ok := vmStatus(t, bcfg.Control, "intruder"); ok {
		t.Fatal("backup created a replica for a primary with a foreign certificate")
	}
	s, _ := vmStatus(t, rogue.Control, "intruder")
	t.Logf("rogue primary: link %s, last error %q", s.Link, s.LastError)
	if s.AckedEpoch != 0 || !strings.Contains(s.LastError, "tls") {
		t.Fatalf("rogue status %+v, want no acks and a TLS error", s)
	}
}
