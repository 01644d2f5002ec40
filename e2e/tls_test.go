package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/internal/tlstest"
	"github.com/remusd/remusd/transport"
)

func tlsFiles(f tlstest.Files) transport.TLSFiles {
	return transport.TLSFiles{Cert: f.Cert, Key: f.Key, CA: f.CA}
}

// TestMutualTLSBetweenDaemons: daemons with certificates from the same CA
// replicate over TLS; a primary with a certificate from another CA never
// gets a replica created on the backup.
func TestMutualTLSBetweenDaemons(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	ca := tlstest.NewCA(t, "remusd-ca")

	bcfg := baseConfig(dir, "backup")
	bcfg.Listen = "127.0.0.1:0"
	bcfg.TLS = tlsFiles(ca.Issue(t, dir, "backup"))
	backup := startDaemon(t, dir, "backup", bcfg)
	addr := backup.listenAddr(t)

	good := baseConfig(dir, "primary")
	good.TLS = tlsFiles(ca.Issue(t, dir, "primary"))
	good.SimVMs = []daemon.SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}}
	startDaemon(t, dir, "primary", good)
	if r := runCLI(t, "protect", "vm", "--peer", addr, "--control", good.Control); r.code != 0 {
		t.Fatalf("protect: %v", r)
	}
	waitFor(t, 30*time.Second, "epochs acked over TLS", func() (bool, string) {
		s, _ := vmStatus(t, good.Control, "vm")
		return s.AckedEpoch > 3, s.Link + " " + s.LastError
	})

	rogueCA := tlstest.NewCA(t, "rogue-ca")
	rogue := baseConfig(dir, "rogue")
	rf := tlsFiles(rogueCA.Issue(t, dir, "rogue"))
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
