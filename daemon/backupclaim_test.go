package daemon

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

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
	srv := etcdtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := witness.Dial(ctx, srv.WitnessConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	d := &Daemon{cfg: Config{Name: "hostB"}, log: zap.NewNop(), wit: w}
	i := 0

	for _, tc := range []struct {
		name   string
		writes func(vm string) // after {hostA, 1}
		won    bool
		holder string
		gen    uint64
	}{
		{"record still the primary's: claimed now", func(string) {}, true, "hostB", 2},
		{"our claim applied, answer lost", func(vm string) { claim(t, w, vm, "hostB") }, true, "hostB", 3}, // confirmed by a claim of its own
		{"the primary claimed first", func(vm string) { claim(t, w, vm, "hostA") }, false, "hostA", 2},
		{"ours, but a generation later (not our claim)", func(vm string) { claim(t, w, vm, "hostB"); claim(t, w, vm, "hostB") }, false, "hostB", 3},
	} {
		i++
		vm := fmt.Sprintf("vm%d", i)
		t.Run(tc.name, func(t *testing.T) {
			if _, err := w.Init(ctx, vm, "hostA"); err != nil {
				t.Fatal(err)
			}
			tc.writes(vm)
			won, rec, err := d.backupClaim(vm, "hostA", 1)
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cur, _, err := w.Get(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if _, won, err := w.Claim(ctx, vm, holder, cur); err != nil || !won {
		t.Fatalf("claim %s for %s: won %v, %v", vm, holder, won, err)
	}
}
