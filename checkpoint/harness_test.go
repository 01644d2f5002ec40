package checkpoint

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime/pprof"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/outbuf/plug"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// pair is a primary and a backup joined by in-memory links, with fault
// hooks and invariant bookkeeping. It is the fault-injection harness.
type pair struct {
	t       *testing.T
	cfg     sim.Config
	guest   *sim.Guest
	replica *sim.Replica
	backup  *Backup
	primary *Primary
	out     outbuf.Buffer
	// check sees every output message the buffer releases (invariant 1).
	check *outputCheck

	// hook, if set, decides the fault for each frame the primary writes.
	hook atomic.Pointer[func(link, i int, b []byte) transport.Fault]
	// backHook does the same for frames the backup writes (acks).
	backHook atomic.Pointer[func(link, i int, b []byte) transport.Fault]

	mu sync.Mutex
	// captured[epoch] = ops of the guest at that epoch's checkpoint;
	// captures and capturePages list every capture's epoch and page count.
	captured     map[uint64]uint64
	captures     []uint64
	capturePages []int
	acked        uint64
	links        int
	wg           sync.WaitGroup

	// close stops the guest (call it from the test's goroutine).
	close func()

	// runDone is closed when the primary's Run returned, with runErr.
	runDone chan struct{}
	runErr  error
}

// pairOptions vary the harness.
type pairOptions struct {
	// plug: the output buffer is the real plug.Buffer over a model of the
	// kernel's sch_plug (plug.SimKernel), and max_inflight is 1 as the
	// daemon forces for plug; otherwise outbuf.Memory.
	plug bool
	// liveStart: PrimaryOptions.LiveStart (output passes until the first
	// checkpoint; memory preloaded before it).
	liveStart bool
	// journal, if set, configures the sim guest's disk journal (the
	// guest has a disk when cfg.DiskBytes > 0).
	journal *disk.JournalConfig
	// backup adjusts the backup's options.
	backup func(o *BackupOptions)
	// guestDisk and replicaDisk, if set, replace the sim guest's and the
	// replica's disk images (e.g. disk.File on sparse files).
	guestDisk, replicaDisk disk.Backend
	// limits, if set, are both sides' transport limits.
	limits *transport.Limits
}

// replicaWithDisk is a sim replica whose disk is another image.
type replicaWithDisk struct {
	*sim.Replica
	img disk.Backend
}

func (r replicaWithDisk) ReplicaDisks() []hypervisor.ReplicaDisk {
	return []hypervisor.ReplicaDisk{{ID: sim.DiskID, Image: r.img}}
}

func newPair(t *testing.T, cfg sim.Config, pc PrimaryConfig) *pair {
	t.Helper()
	return newPairWith(t, cfg, pc, pairOptions{})
}

func newPairWith(t *testing.T, cfg sim.Config, pc PrimaryConfig, po pairOptions) *pair {
	t.Helper()
	cfg = cfg.WithDefaults()
	p := &pair{t: t, cfg: cfg, captured: map[uint64]uint64{}}
	// Invariant 1: the backup must hold a message's epoch before it leaves.
	p.check = newOutputCheck(func() uint64 { return p.backup.Committed() })
	var emit func(seq uint64, msg []byte)
	p.out, emit = newTrialBuffer(po.plug, 0, p.check)
	if po.plug {
		pc.MaxInflight = 1
	}
	gopts := []sim.Option{sim.WithOutput(emit)}
	if po.journal != nil {
		gopts = append(gopts, sim.WithJournal(*po.journal))
	}
	if po.guestDisk != nil {
		gopts = append(gopts, sim.WithDiskImage(po.guestDisk))
	}
	g, err := sim.New("vm", cfg, nil, gopts...)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := sim.NewReplica("vm", cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	p.guest, p.replica = g, rep
	var brep hypervisor.Replica = rep
	if po.replicaDisk != nil {
		brep = replicaWithDisk{rep, po.replicaDisk}
	}
	bo := BackupOptions{
		VMName: "vm", Replica: brep, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, Owner: "host-a",
		HeartbeatInterval: 20 * time.Millisecond, HeartbeatTimeout: 2 * time.Second,
	}
	if po.limits != nil {
		bo.Limits = *po.limits
	}
	if po.backup != nil {
		po.backup(&bo)
	}
	p.backup = NewBackup(bo)
	var plim transport.Limits
	if po.limits != nil {
		plim = *po.limits
	}
	pr, err := NewPrimary(PrimaryOptions{
		Guest: g, Out: spyBuffer{p.out, p.check}, Dial: p.dial, ProtectionID: "test", Limits: plim,
		Core:              pc,
		Encoder:           transport.EncoderConfig{CachePages: 64},
		HeartbeatInterval: 20 * time.Millisecond, HeartbeatTimeout: 2 * time.Second,
		ReconnectBackoff: 5 * time.Millisecond,
		LiveStart:        po.liveStart,
		OnCapture: func(ci CaptureInfo) {
			info, err := sim.DecodeDeviceState(ci.DeviceState)
			if err != nil {
				t.Errorf("capture %d: %v", ci.Epoch, err)
				return
			}
			p.check.capture(ci.Epoch, info.OutputSeq)
			p.mu.Lock()
			p.captured[ci.Epoch] = info.Ops
			p.captures = append(p.captures, ci.Epoch)
			p.capturePages = append(p.capturePages, ci.Pages)
			p.mu.Unlock()
		},
		OnAck: func(e uint64) {
			p.check.acked()
			p.mu.Lock()
			p.acked = e
			p.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.primary = pr
	// The guest is closed when the test ends, or earlier by close, which
	// lets go of it: trials make thousands of pairs in one test.
	held := &struct{ g *sim.Guest }{g}
	t.Cleanup(func() {
		if held.g != nil {
			held.g.Close()
		}
	})
	p.close = func() {
		g.Close()
		held.g = nil
	}
	return p
}

// newTrialBuffer returns the output buffer of a trial and the guest's
// output function feeding it: outbuf.Memory, or (plug) the real
// plug.Buffer over plug.SimKernel, whose packets are the messages' output
// sequence numbers. Every message either releases goes to check. limit
// bounds what it holds (bytes for memory, packets for plug; 0: default).
func newTrialBuffer(usePlug bool, limit int, check *outputCheck) (outbuf.Buffer, func(seq uint64, msg []byte)) {
	if usePlug {
		k := plug.NewSimKernel(limit, check.release)
		return plug.NewSimulated(k, nil), func(seq uint64, _ []byte) { k.Enqueue(seq) }
	}
	m := outbuf.NewMemory(limit, func(_ uint64, msg []byte) {
		check.release(binary.LittleEndian.Uint64(msg))
	})
	return m, func(_ uint64, msg []byte) { m.Emit(msg) }
}

// outputCheck checks each released output message against invariant 1 by
// the message's true epoch, derived from the guest's output sequence
// number at each capture (its device state), not from the buffer's own
// epoch labels. A message may leave only once the backup committed its
// epoch, or while protection is off: between a ReleaseAll (the ack-timeout
// policy unprotect) and the Hold that the next full epoch performs
// (Action.Hold), and never after an ack arrived (acks mean protection is
// back). Messages must leave in order, each at most once.
type outputCheck struct {
	mu        sync.Mutex
	committed func() uint64
	caps      []capSeq // ascending epochs
	window    bool     // unprotected: ReleaseAll performed, no Hold or ack since
	lastSeq   uint64

	windows    int // unprotected episodes
	released   int // messages released
	passed     int // of which while unprotected
	violations []string
	nviol      int
}

type capSeq struct{ epoch, seq uint64 }

func newOutputCheck(committed func() uint64) *outputCheck {
	return &outputCheck{committed: committed}
}

// capture records that epoch was captured after the guest emitted output
// up to seq.
func (c *outputCheck) capture(epoch, seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.caps); n > 0 && (epoch <= c.caps[n-1].epoch || seq < c.caps[n-1].seq) {
		c.violate("capture of epoch %d (output seq %d) after epoch %d (seq %d)", epoch, seq, c.caps[n-1].epoch, c.caps[n-1].seq)
	}
	c.caps = append(c.caps, capSeq{epoch, seq})
}

// epochOf is the epoch of output message seq: the first epoch captured
// after it was emitted; 0 if none was yet (the open epoch). c.mu held.
func (c *outputCheck) epochOf(seq uint64) uint64 {
	i := sort.Search(len(c.caps), func(i int) bool { return c.caps[i].seq >= seq })
	if i == len(c.caps) {
		return 0
	}
	return c.caps[i].epoch
}

// release is the buffer letting message seq out.
func (c *outputCheck) release(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released++
	if seq <= c.lastSeq {
		c.violate("output seq %d released after %d: reordered or duplicated", seq, c.lastSeq)
	}
	c.lastSeq = seq
	if c.window {
		c.passed++
		return
	}
	switch e, committed := c.epochOf(seq), c.committed(); {
	case e == 0:
		c.violate("output seq %d of the open epoch (not captured yet) released while protected (backup committed %d)", seq, committed)
	case e > committed:
		c.violate("output seq %d of epoch %d released while the backup committed %d", seq, e, committed)
	}
}

func (c *outputCheck) releaseAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.window {
		c.windows++
	}
	c.window = true
}

func (c *outputCheck) hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.window = false
}

// acked: the primary saw an ack; the buffer must hold by now.
func (c *outputCheck) acked() { c.hold() }

func (c *outputCheck) violate(format string, args ...any) {
	c.nviol++
	if len(c.violations) < 10 {
		c.violations = append(c.violations, fmt.Sprintf(format, args...))
	}
}

// counts returns how many messages were released, and of those how many
// while unprotected, and the number of unprotected episodes.
func (c *outputCheck) counts() (released, passed, windows int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.released, c.passed, c.windows
}

// err reports the violations seen, nil if none.
func (c *outputCheck) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nviol == 0 {
		return nil
	}
	return fmt.Errorf("output commit violated %d times, first: %v", c.nviol, c.violations)
}

// spyBuffer tells the check when the primary releases everything (running
// unprotected) and when it holds again, before the buffer acts.
type spyBuffer struct {
	outbuf.Buffer
	check *outputCheck
}

func (s spyBuffer) ReleaseAll() error {
	s.check.releaseAll()
	return s.Buffer.ReleaseAll()
}

func (s spyBuffer) Hold() error {
	s.check.hold()
	return s.Buffer.Hold()
}

// dial makes a new in-memory link and serves its far end as the backup's
// daemon would: read Hello, then Backup.Serve.
func (p *pair) dial(ctx context.Context) (net.Conn, error) {
	p.mu.Lock()
	p.links++
	link := p.links
	p.mu.Unlock()
	a, b := transport.Pipe()
	pc := transport.NewFaultConn(a, func(i int, buf []byte) transport.Fault {
		if h := p.hook.Load(); h != nil {
			return (*h)(link, i, buf)
		}
		return transport.Fault{}
	})
	bc := transport.NewFaultConn(b, func(i int, buf []byte) transport.Fault {
		if h := p.backHook.Load(); h != nil {
			return (*h)(link, i, buf)
		}
		return transport.Fault{}
	})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		r := transport.NewReader(bc, transport.DefaultLimits())
		w := transport.NewWriter(bc)
		f, err := r.ReadFrame()
		if err != nil {
			bc.Close()
			return
		}
		h, ok := f.Header.(*remuspb.Hello)
		if !ok {
			bc.Close()
			return
		}
		_ = p.backup.Serve(ctx, bc, r, w, h, "host-a")
	}()
	return pc, nil
}

// run starts the primary; the returned func stops it and waits. A Run
// that returns an error (e.g. a buffer refusing a checkpoint) fails the
// test.
func (p *pair) run() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	p.runDone = make(chan struct{})
	go func() {
		p.runErr = p.primary.Run(ctx)
		close(p.runDone)
	}()
	return func() {
		cancel()
		<-p.runDone
		if p.runErr != nil {
			p.t.Errorf("primary: %v", p.runErr)
		}
		p.wg.Wait()
	}
}

// runFailed reports whether Run already returned (it must not, before the
// test stops it).
func (p *pair) runFailed() error {
	select {
	case <-p.runDone:
		return fmt.Errorf("primary's Run returned early: %v", p.runErr)
	default:
		return nil
	}
}

// waitAcked waits until the primary saw an ack of an epoch >= n.
func (p *pair) waitAcked(n uint64, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		a := p.acked
		p.mu.Unlock()
		if a >= n {
			return
		}
		if err := p.runFailed(); err != nil {
			p.t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
	p.t.Fatalf("no ack of epoch %d within %v (acked %d, backup committed %d, stats %+v)\n%s", n, within, p.acked, p.backup.Committed(), p.primary.Stats(), buf.String())
}

// checkReplica verifies invariants 2 and 4 after the primary stopped: the
// replica is byte for byte the primary's state at the backup's committed
// epoch, which is no older than the last epoch the primary saw acked.
func (p *pair) checkReplica() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	committed := p.backup.Committed()
	if committed < p.acked {
		p.t.Fatalf("backup committed %d < last ack seen by primary %d", committed, p.acked)
	}
	ops, ok := p.captured[committed]
	if !ok {
		p.t.Fatalf("backup committed epoch %d the primary never captured", committed)
	}
	epoch, dev := p.replica.DeviceState()
	if epoch != committed {
		p.t.Fatalf("replica device state is of epoch %d, committed %d", epoch, committed)
	}
	info, err := sim.DecodeDeviceState(dev)
	if err != nil {
		p.t.Fatal(err)
	}
	if info.Ops != ops {
		p.t.Fatalf("replica at epoch %d has ops %d, primary captured %d", committed, info.Ops, ops)
	}
	mem, wantDev, err := sim.Replay(p.cfg, ops)
	if err != nil {
		p.t.Fatal(err)
	}
	if !bytes.Equal(mem, p.replica.Memory()) {
		p.t.Fatalf("replica memory at epoch %d differs from the primary's state (%d pages differ)", committed, diffPages(mem, p.replica.Memory()))
	}
	if !bytes.Equal(wantDev, dev) {
		p.t.Fatalf("replica device state at epoch %d differs", committed)
	}
	if p.cfg.DiskBytes > 0 {
		// The disk is the primary's at the same epoch: its op count agrees
		// with memory's, and no acknowledged write is missing.
		wantDisk, err := sim.ReplayDisk(p.cfg, ops)
		if err != nil {
			p.t.Fatal(err)
		}
		got := p.replica.Disk().Bytes()
		if !bytes.Equal(wantDisk, got) {
			p.t.Fatalf("replica disk at epoch %d (ops %d) differs from the primary's (disk op count %d, memory's %d)", committed, ops,
				binary.LittleEndian.Uint64(got), binary.LittleEndian.Uint64(p.replica.Memory()[16:]))
		}
		if mem, d := binary.LittleEndian.Uint64(p.replica.Memory()[16:]), binary.LittleEndian.Uint64(got); mem != ops || d != ops {
			p.t.Fatalf("replica at epoch %d: op count %d in memory, %d on disk, %d captured", committed, mem, d, ops)
		}
		if st := p.backup.Stats(); st.DiskTorn {
			p.t.Fatalf("replica's disks marked torn at a committed epoch: %+v", st)
		}
	}
	if err := p.check.err(); err != nil {
		p.t.Fatal(err)
	}
}

func diffPages(a, b []byte) int {
	n := 0
	for i := 0; i+4096 <= len(a) && i+4096 <= len(b); i += 4096 {
		if !bytes.Equal(a[i:i+4096], b[i:i+4096]) {
			n++
		}
	}
	return n
}

var errInjected = errors.New("injected")
