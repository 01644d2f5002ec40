package daemon

import (
	"testing"
)

// TestAdoptionExcludesTakeBack: a switchover on hostA writes the
// record over to hostB ({hostA, 1} → {hostB, 2}) and sends Activate; the
// link breaks before hostB activates. hostA's handoverFailed then reads
// {hostB, 2} and takes it back by compare-and-swap; hostB's backup, whose
// primary is lost, races with backupClaim(hostA, 1). Whatever the order,
// at most one of them may end up believing it holds the VM. With the
// adoption by read (a5f9746) hostB "wins" without writing, and hostA's
// take-back, from the unchanged record, wins too: two active copies.
func TestAdoptionExcludesTakeBack(t *testing.T) {
	ctx, w, b := witnessDaemon(t, "hostB")
	rec, err := w.Init(ctx, "vm", "hostA")
	if err != nil {
		t.Fatal(err)
	}
	// hostA's switchover writes the record over to hostB.
	if _, won, err := w.Claim(ctx, "vm", "hostB", rec); err != nil || !won {
		t.Fatalf("switchover claim: %v %v", won, err)
	}
	// hostB's race (its replica is of {hostA, 1}).
	bWon, bRec, err := b.backupClaim("vm", "hostA", claimBasis{rec.Generation, rec.Generation})
	if err != nil {
		t.Fatal(err)
	}
	// hostA's handoverFailed: the record still names hostB at the
	// switchover's generation? Take it back.
	cur, _, err := w.Get(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	aWon := false
	if cur.Holder == "hostB" && cur.Generation == rec.Generation+1 {
		_, aWon, err = w.Claim(ctx, "vm", "hostA", cur)
		if err != nil {
			t.Fatal(err)
		}
	}
	if bWon && aWon {
		t.Fatalf("both hosts won the VM: hostB adopted %v, hostA took back %v", bRec, cur)
	}
	if !bWon && !aWon {
		t.Fatalf("neither host holds the VM")
	}
}
