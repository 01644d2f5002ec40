package checkpoint

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/remusd/remusd/outbuf"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

func diskGuest(workload string, seed uint64) sim.Config {
	c := smallGuest(workload, seed)
	c.Rate = 20000
	if raceEnabled {
		c.Rate = 5000
	}
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
	if p.guest.Disks()[0].Journal.Copies() != 1 || ps.DiskChangesSent == 0 || ps.DiskBytesSent == 0 || ps.DiskWireBytes == 0 {
		t.Fatalf("primary disk stats not counted: %+v", ps)
	}
	if bs.DiskChangesApplied == 0 || bs.DiskFlushes == 0 || bs.DiskFlushes > bs.EpochsCommitted+1 {
		t.Fatalf("backup disk stats: %+v", bs)
	}
	if f := p.replica.Disk().Flushes(); uint64(f) != bs.DiskFlushes {
		t.Fatalf("replica disk flushed %d times, stats say %d", f, bs.DiskFlushes)
	}
	if size := uint64(p.guest.Disks()[0].Image.Size()); ps.DiskCopying || ps.DiskCopyTotal != size || ps.DiskCopyDone != size {
		t.Fatalf("copy progress after the copy: copying %v, %d of %d (image %d bytes)", ps.DiskCopying, ps.DiskCopyDone, ps.DiskCopyTotal, size)
	}
}

// TestDiskJournalFreeAfterRun: once the engine stopped (unprotect, a
// fence, a restart), nothing cuts or releases the journals: the guest's
// writes must still never wait (the journal tracks dirty blocks).
func TestDiskJournalFreeAfterRun(t *testing.T) {
	p := newPairWith(t, diskGuest("uniform", 5), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second},
		pairOptions{journal: &disk.JournalConfig{Limit: 1 << 20, MaxWrite: 4096, Tracking: true}})
	stop := p.run()
	p.waitAcked(10, 20*time.Second)
	stop()
	j := p.guest.Disks()[0].Journal
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	data := make([]byte, 4096)
	for i := range 2000 { // 8 MiB: far past the 1 MiB limit
		if err := j.Observe(ctx, disk.Change{Kind: disk.KindWrite, Offset: int64(i%64) * 4096, Length: 4096, Data: data}); err != nil {
			t.Fatalf("write %d after the engine stopped: %v (journal %+v)", i, err, j.Stats())
		}
	}
	if st := j.Stats(); !st.Tracking {
		t.Fatalf("journal after Run: %+v, want tracking", st)
	}
}

// TestDiskResyncCarriesUnackedEpochs: acks stop on the first link, so
// that epochs pile up unacknowledged until the ack timeout drops it; the
// resync epoch on the next link must carry those epochs' disk changes, in
// order, followed by its own, from the journal (no re-read, no new copy):
// the replica's disk ends equal to the primary's.
func TestDiskResyncCarriesUnackedEpochs(t *testing.T) {
	cfg := diskGuest("hotset", 21)
	cfg.Rate = 5000
	p := newPairWith(t, cfg, PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 3, AckTimeout: 200 * time.Millisecond},
		pairOptions{journal: &disk.JournalConfig{Limit: 64 << 20, MaxWrite: 4096, Tracking: true}})
	var mu sync.Mutex
	var caps []CaptureInfo
	p.primary.o.OnCapture = chain(p.primary.o.OnCapture, func(ci CaptureInfo) {
		mu.Lock()
		caps = append(caps, CaptureInfo{Epoch: ci.Epoch, Base: ci.Base, Full: ci.Full})
		mu.Unlock()
	})
	// From some frame on, the first link loses every epoch record (the
	// backup waits inside a torn epoch, heartbeats still flow): epochs
	// pile up unacknowledged until the ack timeout drops the link.
	stall := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k.IsEpochRecord() && link == 1 && p.ackedAtLeast(3) {
			return transport.Fault{Action: transport.Drop}
		}
		return transport.Fault{}
	}
	p.hook.Store(&stall)
	stop := p.run()
	p.waitAcked(30, 20*time.Second)
	j := p.guest.Disks()[0].Journal
	// Read before stop: a stopped engine puts its journals in tracking
	// mode for good (TestDiskJournalFreeAfterRun).
	copies, tracks := j.Copies(), j.Stats().Tracks
	stop()
	p.checkReplica()
	if p.links < 2 {
		t.Fatalf("links %d: the stall did not drop the first link", p.links)
	}
	if copies != 1 || tracks != 0 {
		t.Fatalf("journal copied %d times, switched to tracking %d times: the resync did not come from the journal", copies, tracks)
	}
	mu.Lock()
	defer mu.Unlock()
	resync := 0
	for i, c := range caps {
		if i > 0 && !c.Full && c.Base != c.Epoch-1 && c.Epoch-c.Base > 1 {
			resync++
		}
	}
	if resync == 0 {
		t.Fatalf("no resync epoch over unacked epochs: %+v", caps)
	}
}

// TestDiskUnprotectedTracksAndResyncs: running unprotected (as the
// witness path does) the journal switches to tracking dirty blocks (it
// does not hold data no ack will release); when the backup is back, the
// full epoch reads the dirty blocks while the guest is paused: no new
// copy of the disk.
func TestDiskUnprotectedTracksAndResyncs(t *testing.T) {
	p := newPair(t, diskGuest("uniform", 22), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
	stop := p.run()
	p.waitAcked(5, 20*time.Second)
	if !p.primary.Unprotect(t.Context()) {
		t.Fatal("runner not running")
	}
	p.mu.Lock()
	next := p.acked + 20
	p.mu.Unlock()
	p.waitAcked(next, 20*time.Second)
	stop()
	p.checkReplica()
	j := p.guest.Disks()[0].Journal
	if _, _, windows := p.check.counts(); windows == 0 {
		t.Fatal("never ran unprotected")
	}
	if j.Stats().Tracks == 0 || j.Copies() != 1 {
		t.Fatalf("journal: %+v, copies %d", j.Stats(), j.Copies())
	}
}

// TestDiskLongAbsenceCopiesAgain: while the backup is away the guest
// dirties more distinct blocks than one epoch may carry
// (MaxEpochDiskBytes): rather than an epoch the backup must refuse, the
// primary copies the disk again on a new link (with passes over the
// blocks dirtied during the copy), and the pair converges.
func TestDiskLongAbsenceCopiesAgain(t *testing.T) {
	cfg := diskGuest("uniform", 24)
	cfg.DiskBytes = 8 << 20
	cfg.Rate = 1000 // 250 writes a second to random 64 KiB blocks
	lim := transport.DefaultLimits()
	lim.MaxEpochDiskBytes = 1 << 20
	p := newPairWith(t, cfg, PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second},
		pairOptions{limits: &lim, journal: &disk.JournalConfig{Limit: 64 << 10, MaxWrite: 4096, InFlight: 2, Tracking: true}})
	var away atomic.Bool
	refuse := func(link, i int, b []byte) transport.Fault {
		if link >= 2 && away.Load() {
			return transport.Fault{Action: transport.Cut}
		}
		return transport.Fault{}
	}
	p.hook.Store(&refuse)
	stop := p.run()
	p.waitAcked(5, 20*time.Second)
	away.Store(true)
	if !p.primary.Unprotect(t.Context()) {
		t.Fatal("runner not running")
	}
	j := p.guest.Disks()[0].Journal
	for j.Stats().DirtyBlocks*disk.TrackBlock <= int(lim.MaxEpochDiskBytes) {
		if err := p.runFailed(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	away.Store(false)
	p.mu.Lock()
	next := p.acked + 10
	p.mu.Unlock()
	p.waitAcked(next, 20*time.Second)
	stop()
	p.checkReplica()
	if c := j.Copies(); c < 2 || c > 4 {
		t.Fatalf("disk copied %d times, want 2 (a few more if the guest dirtied much during a copy)", c)
	}
	if st := p.backup.Stats(); st.Rejected != 0 {
		t.Fatalf("the backup rejected %d links: %s", st.Rejected, st.LastError)
	}
}

// TestDiskBackpressure: a guest writing faster than acks come is
// throttled: its writes wait in the journal, which never holds more than
// its limit plus the pause overdraft (asserted on Journal.Stats, sampled
// at every capture and while acks are held back).
func TestDiskBackpressure(t *testing.T) {
	jc := disk.JournalConfig{Limit: 32 << 10, MaxWrite: 4096, InFlight: 2, Tracking: true}
	cfg := diskGuest("uniform", 23)
	cfg.Rate = 50000
	p := newPairWith(t, cfg, PrimaryConfig{Interval: 2 * time.Millisecond, MaxInflight: 1, AckTimeout: 10 * time.Second}, pairOptions{journal: &jc})
	j := p.guest.Disks()[0].Journal
	var over atomic.Int64
	check := func() {
		if s := j.Stats(); s.Used > s.Limit+s.Overdraft {
			over.Store(s.Used)
		}
	}
	p.primary.o.OnCapture = chain(p.primary.o.OnCapture, func(CaptureInfo) { check() })
	// Acks wait (the backup's writer blocks) until the guest is throttled.
	gate := make(chan struct{})
	var once sync.Once
	hold := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k == transport.KindAck && i > 5 {
			<-gate
		}
		return transport.Fault{}
	}
	p.backHook.Store(&hold)
	stop := p.run()
	defer stop()
	defer once.Do(func() { close(gate) })
	for j.Stats().Blocked == 0 {
		if err := p.runFailed(); err != nil {
			t.Fatal(err)
		}
		check()
		time.Sleep(time.Millisecond)
	}
	check()
	once.Do(func() { close(gate) })
	p.waitAcked(20, 20*time.Second)
	stop()
	p.checkReplica()
	if v := over.Load(); v != 0 {
		t.Fatalf("journal held %d bytes, beyond limit %d + overdraft %d", v, jc.Limit, j.Stats().Overdraft)
	}
	if s := j.Stats(); s.Blocked == 0 {
		t.Fatalf("journal %+v: the guest was not throttled", s)
	}
}

// TestDiskFullSyncKeepsHoles: the initial copy of a sparse raw image
// (disk.File) skips what reads as zeroes and sends it as zero changes, so
// the replica's image (a fresh sparse file) stays sparse, with the same
// content.
func TestDiskFullSyncKeepsHoles(t *testing.T) {
	const size = 64 << 20
	dir := t.TempDir()
	mk := func(name string) *disk.File {
		path := filepath.Join(dir, name)
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		img, err := disk.OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { img.Close() })
		return img
	}
	src, dst := mk("primary.raw"), mk("replica.raw")
	ctx := context.Background()
	for i, off := range []int64{0, 5 << 20, 40<<20 + 12345, size - 70000} {
		b := bytes.Repeat([]byte{byte(i + 1), 0xa5}, 35000)
		if err := src.WriteAt(ctx, b, off); err != nil {
			t.Fatal(err)
		}
	}
	cfg := sim.Config{MemoryBytes: 256 << 10, Workload: "idle", Rate: sim.Disabled, Seed: 9, OutputEvery: sim.Disabled, DiskBytes: size}
	p := newPairWith(t, cfg, PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second},
		pairOptions{guestDisk: src, replicaDisk: dst})
	stop := p.run()
	p.waitAcked(3, 20*time.Second)
	stop()
	a, b := make([]byte, size), make([]byte, size)
	if err := src.ReadAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	if err := dst.ReadAt(ctx, b, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("replica image differs from the primary's")
	}
	blocks := func(f *disk.File, name string) int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, name), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	sb, db := blocks(src, "primary.raw"), blocks(dst, "replica.raw")
	t.Logf("allocated: primary %d bytes, replica %d bytes of %d; copied %d bytes", sb, db, size, p.primary.Stats().DiskBytesCopied)
	if db > sb+1<<20 || db > 4<<20 {
		t.Fatalf("replica image allocates %d bytes (primary %d): holes were filled", db, sb)
	}
	if c := p.primary.Stats().DiskBytesCopied; c > 1<<20 {
		t.Fatalf("copied %d bytes of data for 140 KB written: zero ranges were sent as data", c)
	}
	// disk.File finds its data by SEEK_DATA: the copy skips the holes.
	var _ disk.DataFinder = src
	if st, ok, _ := firstData(src); ok && st != 0 {
		t.Fatalf("first data at %d", st)
	}
}

// TestDiskFailoverAgrees: the primary is killed mid-epoch at random
// frames; the replica's memory and disk are of the same epoch (the op
// count in page 0 and on the disk agree with the device state), and the
// activated guest runs on from there with that disk.
func TestDiskFailoverAgrees(t *testing.T) {
	for trial := 0; trial < trials(4, 3); trial++ {
		p := newPair(t, diskGuest("sequential", uint64(40+trial)), PrimaryConfig{Interval: 2 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
		cutAt := 15 + trial*11
		hook := func(link, i int, b []byte) transport.Fault {
			if i == cutAt && link <= 3 {
				return transport.Fault{Action: transport.Truncate, N: len(b) / 2}
			}
			return transport.Fault{}
		}
		p.hook.Store(&hook)
		stop := p.run()
		p.waitAcked(5, 20*time.Second)
		stop()
		p.close()
		p.checkReplica()
		g, err := p.backup.Activate(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		sg := g.(*sim.Guest)
		for sg.Ops() < 50 {
			time.Sleep(time.Millisecond)
		}
		if err := sg.Pause(t.Context()); err != nil {
			t.Fatal(err)
		}
		mem := binary.LittleEndian.Uint64(sg.Memory()[16:])
		rec := make([]byte, 8)
		if err := sg.Disks()[0].Image.ReadAt(t.Context(), rec, 0); err != nil {
			t.Fatal(err)
		}
		if d := binary.LittleEndian.Uint64(rec); d != mem || mem != sg.Ops() {
			t.Fatalf("activated guest: ops %d, %d in memory, %d on disk", sg.Ops(), mem, d)
		}
		sg.Close()
	}
}

// ackedAtLeast reports whether the primary saw an ack of epoch n or later.
func (p *pair) ackedAtLeast(n uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acked >= n
}

func firstData(f *disk.File) (int64, bool, error) {
	st, _, ok, err := f.NextData(context.Background(), 0)
	return st, ok, err
}

// TestDiskResumedProtectionCopiesDisks: a primary that resumes a
// protection (its daemon restarted while the guest ran on) has no record
// of what the disk did meanwhile: it copies the disk again (the replica is
// not activatable during the copy) and the rebuild epoch makes replica
// memory and disk whole again.
func TestDiskResumedProtectionCopiesDisks(t *testing.T) {
	p := newPair(t, diskGuest("hotset", 25), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second})
	stop := p.run()
	p.waitAcked(10, 20*time.Second)
	// Stop at an acknowledged epoch (the output buffer then holds no
	// captured, unacknowledged epoch the resumed engine would number
	// again), and let the guest run on while no engine runs.
	if _, err := p.primary.Drain(t.Context()); err != nil {
		t.Fatal(err)
	}
	p.primary.StopForRestart()
	stop()
	if err := p.guest.Resume(t.Context()); err != nil {
		t.Fatal(err)
	}
	for ops := p.guest.Ops(); p.guest.Ops() < ops+50; {
		time.Sleep(time.Millisecond)
	}
	o := p.primary.o
	o.Core.Resume = true
	pr, err := NewPrimary(o)
	if err != nil {
		t.Fatal(err)
	}
	p.primary = pr
	p.mu.Lock()
	next := p.acked + 10
	p.mu.Unlock()
	stop = p.run()
	p.waitAcked(next, 20*time.Second)
	stop()
	p.checkReplica()
	if c := p.guest.Disks()[0].Journal.Copies(); c != 2 {
		t.Fatalf("disk copied %d times, want 2 (once per protection run)", c)
	}
	if st := p.backup.Stats(); st.DiskTorn || st.Rejected != 0 {
		t.Fatalf("backup %+v", st)
	}
}

// flakyGuest fails the fail-th SaveDeviceState (counting down), after the
// journals were cut.
type flakyGuest struct {
	*sim.Guest
	fail atomic.Int32
}

func (g *flakyGuest) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	if g.fail.Add(-1) == 0 {
		return dst, errInjected
	}
	return g.Guest.SaveDeviceState(ctx, dst)
}

// TestDiskFailedCaptureCarriesItsCut: a capture that fails after the
// journals were cut (here: the device state cannot be saved) ends Run;
// run again, the next epoch carries that cut before its own: no write is
// lost.
func TestDiskFailedCaptureCarriesItsCut(t *testing.T) {
	p := newPair(t, diskGuest("uniform", 26), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second})
	fg := &flakyGuest{Guest: p.guest}
	fg.fail.Store(8)
	o := p.primary.o
	o.Guest = fg
	pr, err := NewPrimary(o)
	if err != nil {
		t.Fatal(err)
	}
	p.primary = pr
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- pr.Run(ctx) }()
	select {
	case err := <-errc:
		if !errors.Is(err, errInjected) {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the injected failure did not end Run")
	}
	p.wg.Wait()
	p.mu.Lock()
	next := p.acked + 10
	p.mu.Unlock()
	stop := p.run()
	p.waitAcked(next, 20*time.Second)
	stop()
	p.checkReplica()
}

// TestDiskJournalsBoundedInChanges: a journal holds at most
// (Limit+overdraft)/disk.ChangeOverhead changes; journals that could hold
// more than one epoch may carry (MaxEpochDiskChanges) are refused up
// front, so a guest issuing many small trims cannot build an epoch the
// backup would refuse on every link.
func TestDiskJournalsBoundedInChanges(t *testing.T) {
	cfg := diskGuest("uniform", 9).WithDefaults()
	jc := disk.JournalConfig{Limit: 1 << 20, MaxWrite: 4096, Tracking: true}
	g, err := sim.New("vm", cfg, nil, sim.WithJournal(jc))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	st := g.Disks()[0].Journal.Stats()
	fits := int((st.Limit + st.Overdraft) / disk.ChangeOverhead)
	mk := func(maxChanges int) error {
		lim := transport.DefaultLimits()
		lim.MaxEpochDiskChanges = maxChanges
		_, err := NewPrimary(PrimaryOptions{Guest: g, Out: outbuf.NewMemory(0, nil), ProtectionID: "x",
			Dial:   func(context.Context) (net.Conn, error) { return nil, errors.New("no") },
			Limits: lim, Core: PrimaryConfig{Interval: time.Millisecond, MaxInflight: 1}})
		return err
	}
	if err := mk(fits); err != nil {
		t.Fatalf("journals of %d changes at a limit of %d: %v", fits, fits, err)
	}
	if err := mk(fits - 1); err == nil || !strings.Contains(err.Error(), "changes") {
		t.Fatalf("journals of %d changes at a limit of %d: %v, want refused", fits, fits-1, err)
	}
}
