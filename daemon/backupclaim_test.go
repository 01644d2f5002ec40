package daemon

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/failover/witness/etcdtest"
)

// TestBackupClaimAdoptsItsAppliedClaim: the backup's claim of a lost
// primary's record was applied, but the witness failed before it
// answered, so the backup saw "unreachable". Its retry must recognise the
// record {itself, gen+1} as its own win, not as a living primary's newer
// record: otherwise it stays a standby forever while holding the record,
// and the VM runs nowhere. Found by the partition trials
// (kill-during-takeover, seed 880137: the witness killed 37 ms after the
// primary).
func TestBackupClaimAdoptsItsAppliedClaim(t *testing.T) {
	ctx, w, d := witnessDaemon(t, "hostB")
	i := 0

	for _, tc := range []struct {
		name   string
		writes func(vm string) // after {hostA, 1}
		basis  claimBasis      // the replica's: {link generation, committed generation}
		won    bool
		holder string
		gen    uint64
	}{
		{"record still the primary's: claimed now", func(string) {}, claimBasis{1, 1}, true, "hostB", 2},
		{"our claim applied, answer lost", func(vm string) { claim(t, w, vm, "hostB") }, claimBasis{1, 1}, true, "hostB", 3}, // confirmed by a claim of its own
		{"the primary claimed first", func(vm string) { claim(t, w, vm, "hostA") }, claimBasis{1, 1}, false, "hostA", 2},
		{"ours, but a generation later (not our claim)", func(vm string) { claim(t, w, vm, "hostB"); claim(t, w, vm, "hostB") }, claimBasis{1, 1}, false, "hostB", 3},
		// The partition trials' flap class (seed 5000026): the primary ran
		// unprotected at generation 2, re-protected (link at 2), and the
		// link broke before an epoch of generation 2 committed. The
		// replica lacks what the primary released meanwhile.
		{"primary ran unprotected, nothing committed since", func(vm string) { claimUnprotected(t, w, vm, "hostA") }, claimBasis{2, 1}, false, "hostA", 2},
		{"primary ran unprotected, an epoch of it committed", func(vm string) { claimUnprotected(t, w, vm, "hostA") }, claimBasis{2, 2}, true, "hostB", 3},
		{"primary held its output, relinked, nothing committed", func(vm string) { claim(t, w, vm, "hostA") }, claimBasis{2, 1}, true, "hostB", 3},
		{"primary held its output, not relinked", func(vm string) { claim(t, w, vm, "hostA") }, claimBasis{1, 1}, false, "hostA", 2},
	} {
		i++
		vm := fmt.Sprintf("vm%d", i)
		t.Run(tc.name, func(t *testing.T) {
			if _, err := w.Init(ctx, vm, "hostA"); err != nil {
				t.Fatal(err)
			}
			tc.writes(vm)
			won, rec, err := d.backupClaim(vm, "hostA", tc.basis)
			if err != nil {
				t.Fatal(err)
			}
			if won != tc.won || rec.Holder != tc.holder || rec.Generation != tc.gen {
				t.Fatalf("backupClaim = won %v, record %v; want won %v, %s at generation %d", won, rec, tc.won, tc.holder, tc.gen)
			}
		})
	}
}

// claim writes holder over VM vm's current record.
func claim(t *testing.T, w *witness.Witness, vm, holder string) {
	t.Helper()
	claimWith(t, w, w.Claim, vm, holder)
}

// claimUnprotected writes holder, running unprotected, over VM vm's
// current record.
func claimUnprotected(t *testing.T, w *witness.Witness, vm, holder string) {
	t.Helper()
	claimWith(t, w, w.ClaimUnprotected, vm, holder)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if cur, _, err := w.Get(ctx, vm); err != nil || !cur.Unprotected {
		t.Fatalf("record after ClaimUnprotected: %v, %v; want it marked unprotected", cur, err)
	}
}

func claimWith(t *testing.T, w *witness.Witness, claimFn func(context.Context, string, string, witness.Record) (witness.Record, bool, error), vm, holder string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cur, _, err := w.Get(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if _, won, err := claimFn(ctx, vm, holder, cur); err != nil || !won {
		t.Fatalf("claim %s for %s: won %v, %v", vm, holder, won, err)
	}
}

// TestRefreshViewAfterWitnessReturns: a primary whose last witness call
// failed while its link was down, and whose link is back, re-reads its
// record: still its own, status says holder again (it said "unreachable"
// for good before: partition trials' kill-witness notes, and
// TestWatchdogQEMUWatchdogRestarts waiting 60 s for it); another host's,
// the copy is fenced.
func TestRefreshViewAfterWitnessReturns(t *testing.T) {
	ctx, w, d := witnessDaemon(t, "hostA")
	for _, tc := range []struct {
		vm     string
		moved  bool
		want   string
		holder string
	}{
		{"vm-own", false, WitnessHolder, "hostA"},
		{"vm-moved", true, WitnessFenced, "hostB"},
	} {
		rec, err := w.Init(ctx, tc.vm, "hostA")
		if err != nil {
			t.Fatal(err)
		}
		if tc.moved {
			claim(t, w, tc.vm, "hostB")
		}
		v := &vm{name: tc.vm, role: RolePrimary, primary: &checkpoint.Primary{}, guest: &fenceGuest{}, stop: func() {}}
		v.w.rec, v.w.view, v.w.err = rec, WitnessUnreachable, "witness unreachable within 500ms"
		d.mu.Lock()
		d.vms[tc.vm] = v
		d.mu.Unlock()
		d.superviseWitness()
		deadline := time.Now().Add(5 * time.Second)
		for {
			d.mu.Lock()
			view, holder := v.w.view, v.w.rec.Holder
			d.mu.Unlock()
			if view == tc.want {
				if tc.want == WitnessHolder && holder != tc.holder {
					t.Fatalf("%s: holder %s, want %s", tc.vm, holder, tc.holder)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: view %q, want %q", tc.vm, view, tc.want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	d.wg.Wait()
}

// witnessDaemon starts an etcd member for the test and returns a context
// for it (10 s), a witness client on it, and a daemon named name using
// that witness (no VMs yet).
func witnessDaemon(t *testing.T, name string) (context.Context, *witness.Witness, *Daemon) {
	t.Helper()
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	w, err := witness.Dial(ctx, srv.WitnessConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return ctx, w, &Daemon{cfg: Config{Name: name}, log: zap.NewNop(), wit: w, vms: map[string]*vm{}}
}
