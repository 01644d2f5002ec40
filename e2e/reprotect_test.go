package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
)

// TestReprotectAfterFailover: after the primary host dies and the backup
// takes over, the VM is protected again, back towards a fresh daemon on
// the old primary host, and replicates there; a second failover brings it
// home.
func TestReprotectAfterFailover(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	mk := func(name string) daemon.Config {
		c := baseConfig(t, dir, name)
		c.Listen = "127.0.0.1:0"
		c.HeartbeatInterval = daemon.Duration(hbInterval)
		c.HeartbeatTimeout = daemon.Duration(hbTimeout)
		return c
	}
	acfg := mk("hostA")
	acfg.SimVMs = []daemon.SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}}
	bcfg := mk("hostB")
	a2cfg := mk("hostA2")
	trust(&acfg, &bcfg, &a2cfg)
	a := startDaemon(t, dir, "hostA", acfg)
	b := startDaemon(t, dir, "hostB", bcfg)
	baddr := b.listenAddr(t)

	ackedAbove := func(control string, n uint64) {
		t.Helper()
		waitFor(t, 30*time.Second, fmt.Sprintf("%s acked_epoch > %d", control, n), func() (bool, string) {
			s, ok := vmStatus(t, control, "vm")
			if !ok {
				return false, "vm missing"
			}
			return s.Role == daemon.RolePrimary && s.AckedEpoch > n, s.Role + " " + s.Link + " " + s.LastError
		})
	}
	if r := runCLI(t, "protect", "vm", "--peer", baddr, "--control", acfg.Control); r.code != 0 {
		t.Fatalf("protect A→B: %v", r)
	}
	ackedAbove(acfg.Control, 5)
	a.kill(t)
	if r := runCLI(t, "failover", "vm", "--control", bcfg.Control); r.code != 0 {
		t.Fatalf("failover to B: %v", r)
	}
	s, _ := vmStatus(t, bcfg.Control, "vm")
	if s.Role != daemon.RoleActive {
		t.Fatalf("B after failover: %+v", s)
	}
	opsAtTakeover := s.GuestOps

	// Host A comes back empty: a fresh daemon with no VM of its own.
	a2 := startDaemon(t, dir, "hostA2", a2cfg)
	a2addr := a2.listenAddr(t)
	if r := runCLI(t, "protect", "vm", "--peer", a2addr, "--control", bcfg.Control); r.code != 0 {
		t.Fatalf("re-protect B→A: %v", r)
	}
	ackedAbove(bcfg.Control, 5)
	rs, ok := vmStatus(t, a2cfg.Control, "vm")
	if !ok || rs.Role != daemon.RoleBackup || rs.Epoch == 0 {
		t.Fatalf("A after re-protection: %+v (found %v), want a backup with committed epochs", rs, ok)
	}

	// B dies in turn; the VM comes home to A with everything it did on B.
	b.kill(t)
	if r := runCLI(t, "failover", "vm", "--control", a2cfg.Control); r.code != 0 {
		t.Fatalf("failover back to A: %v", r)
	}
	home, _ := vmStatus(t, a2cfg.Control, "vm")
	if home.Role != daemon.RoleActive || home.GuestOps <= opsAtTakeover {
		t.Fatalf("VM at home: %+v; want active with more ops than the %d it had when B took over", home, opsAtTakeover)
	}
}
