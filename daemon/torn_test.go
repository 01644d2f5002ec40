package daemon

import (
	"testing"
	"time"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover"
)

// TestTornDiskReplicaDoesNotRace: a replica whose disks are being copied
// again (DiskTorn) has nothing to activate, so the detector must not call
// its silent primary lost and race for the witness (the winner could not
// activate, and a living primary would fence itself for nothing).
func TestTornDiskReplicaDoesNotRace(t *testing.T) {
	now := time.Now()
	st := checkpoint.BackupStats{Committed: 40, LastHeard: now.Add(-time.Minute), DisconnectedAt: now.Add(-time.Minute), PeerClosed: true}
	det := &failover.Detector{Timeout: time.Second, Policy: failover.Witness}
	if d := det.Evaluate(observe(&vm{}, st), now); d.State != failover.Lost {
		t.Fatalf("a committed replica's silent primary: %v, want lost (the control case)", d.State)
	}
	st.DiskTorn = true
	det = &failover.Detector{Timeout: time.Second, Policy: failover.Witness}
	if d := det.Evaluate(observe(&vm{}, st), now); d.State != failover.Never {
		t.Fatalf("a torn replica's silent primary: %v, want never (nothing to take over with)", d.State)
	}
}
