package checkpoint

import (
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
)

func diskGuest(workload string, seed uint64) sim.Config {
	c := smallGuest(workload, seed)
	c.Rate = 20000
	c.DiskBytes = 1 << 20
	return c
}

// TestDiskEndToEnd: a guest with a disk is protected from boot: the link
// copies the disk while it runs, then every epoch carries its writes; the
// replica's disk is the primary's at the committed epoch, and every epoch
// that changed it was flushed before its ack.
func TestDiskEndToEnd(t *testing.T) {
	p := newPair(t, diskGuest("uniform", 3), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
	stop := p.run()
	p.waitAcked(30, 20*time.Second)
	stop()
	p.checkReplica()
	ps, bs := p.primary.Stats(), p.backup.Stats()
	if ps.DiskBytesCopied == 0 || ps.DiskChangesSent == 0 || ps.DiskBytesSent == 0 || ps.DiskWireBytes == 0 {
		t.Fatalf("primary disk stats not counted: %+v", ps)
	}
	if bs.DiskChangesApplied == 0 || bs.DiskFlushes == 0 || bs.DiskFlushes > bs.EpochsCommitted+1 {
		t.Fatalf("backup disk stats: %+v", bs)
	}
	if f := p.replica.Disk().Flushes(); uint64(f) != bs.DiskFlushes {
		t.Fatalf("replica disk flushed %d times, stats say %d", f, bs.DiskFlushes)
	}
}
