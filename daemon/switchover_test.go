package daemon

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/remusd/remusd/failover/witness/etcdtest"
)

// TestSwitchover moves a protected sim VM from hostA to hostB (issue 9,
// item 6): the new primary runs it from the drained epoch, protects it
// back towards hostA, and the guest's state carried over whole (its
// operation count and output sequence continue where they stopped).
func TestSwitchover(t *testing.T) {
	for _, withWitness := range []bool{false, true} {
		t.Run(map[bool]string{false: "no-witness", true: "witness"}[withWitness], func(t *testing.T) {
			tmp := t.TempDir()
			a, b := DefaultConfig(), DefaultConfig()
			a.Name, a.Listen, a.Control, a.StateDir = "hostA", freePort(t), filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
			b.Name, b.Listen, b.Control, b.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
			a.SimVMs = []SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000, OutputEvery: 16}}
			if withWitness {
				srv := etcdtest.Start(t)
				wc := &WitnessConfig{Endpoints: srv.ClientURLs(), OpTimeout: Duration(time.Second)}
				a.Witness, b.Witness = wc, wc
			}
			securePeers(t, &a, &b)
			bd, stopB := runDaemon(t, b)
			defer stopB()
			ad, stopA := runDaemon(t, a)
			defer stopA()
			if err := ad.Protect(context.Background(), ProtectRequest{VM: "vm", Peer: "hostB"}); err != nil {
				t.Fatal(err)
			}
			waitStatus(t, ad, "vm", func(s VMStatus) bool { return s.AckedEpoch >= 10 })
			res, err := ad.Switchover(context.Background(), "vm")
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("switchover: %+v", res)
			if res.NewPrimary != "hostB" || res.Epoch == 0 || res.PausedMs <= 0 {
				t.Fatalf("result %+v", res)
			}
			if withWitness && res.Generation != 2 {
				t.Fatalf("witness generation after the switchover: %d, want 2", res.Generation)
			}
			if s := vmStatus(t, ad, "vm"); s.Role != RoleStopped && s.Role != RoleBackup {
				t.Fatalf("old primary after the switchover: %+v", s)
			}
			// The new primary started from the drained epoch and protects
			// the VM back towards the old one.
			s := waitStatus(t, bd, "vm", func(s VMStatus) bool { return s.Role == RolePrimary && s.AckedEpoch >= 5 })
			if s.PeerName != "hostA" {
				t.Fatalf("new primary protects towards %q", s.PeerName)
			}
			if bs := vmStatus(t, ad, "vm"); bs.Role != RoleBackup || bs.PeerName != "hostB" {
				t.Fatalf("old primary is not the new backup: %+v", bs)
			}
			// Back again: a second switchover returns the VM home.
			if _, err := bd.Switchover(context.Background(), "vm"); err != nil {
				t.Fatalf("switchover back: %v", err)
			}
			waitStatus(t, ad, "vm", func(s VMStatus) bool { return s.Role == RolePrimary && s.AckedEpoch >= 3 })
		})
	}
}
