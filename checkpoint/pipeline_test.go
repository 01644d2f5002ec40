package checkpoint

import (
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

func smallGuest(workload string, seed uint64) sim.Config {
	return sim.Config{MemoryBytes: 1 << 20, Workload: workload, Rate: 50000, Seed: seed, OutputEvery: 16}
}

// TestPipelineEndToEnd runs the whole primary→backup pipeline over an
// in-memory link for every workload and checks invariants 1, 2 and 4.
func TestPipelineEndToEnd(t *testing.T) {
	for _, wl := range []string{"uniform", "hotset", "sequential", "sparse"} {
		t.Run(wl, func(t *testing.T) {
			p := newPair(t, smallGuest(wl, 7), PrimaryConfig{Interval: 5 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second})
			stop := p.run()
			p.waitAcked(20, 20*time.Second)
			stop()
			p.checkReplica()
			if released, _, _ := p.check.counts(); released == 0 {
				t.Fatal("no output was ever released")
			}
			st := p.primary.Stats()
			if st.PagesSent == 0 || st.EpochWireBytes == 0 || st.RawBytes == 0 {
				t.Fatalf("stats not counted: %+v", st)
			}
			// Every link byte is counted: Hello and heartbeats beside the
			// epochs; an epoch costs at least its four frame prefixes.
			if st.WireBytesSent <= st.EpochWireBytes || st.EpochWireBytes < 4*transport.FramePrefixSize*st.EpochsCommitted {
				t.Errorf("wire bytes %d, epoch wire bytes %d for %d epochs", st.WireBytesSent, st.EpochWireBytes, st.EpochsCommitted)
			}
			if got := p.backup.Stats().WireBytesReceived; got == 0 || got > st.WireBytesSent {
				t.Errorf("backup received %d wire bytes, primary sent %d", got, st.WireBytesSent)
			}
		})
	}
}

// TestPipelinedInflight allows several unacknowledged epochs.
func TestPipelinedInflight(t *testing.T) {
	p := newPair(t, smallGuest("uniform", 3), PrimaryConfig{Interval: 2 * time.Millisecond, MaxInflight: 4, AckTimeout: 5 * time.Second})
	// Slow acks down so that epochs pile up in flight.
	delay := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k == transport.KindAck {
			return transport.Fault{Action: transport.Delay, Delay: 3 * time.Millisecond}
		}
		return transport.Fault{}
	}
	p.backHook.Store(&delay)
	stop := p.run()
	p.waitAcked(30, 20*time.Second)
	stop()
	p.checkReplica()
}

// linkClasses are the link-fault trial classes: output buffer × ack-timeout
// policy, and two with a disk model (the sim guest writes its op count to
// page 0 and to its disk in the same step, plus writes, trims, zeroes and
// flushes): torn, corrupted and dropped records, kills and reconnects
// must never leave the replica's disk and memory at different epochs,
// nor miss an acknowledged write (checkReplica compares both with the
// primary's replayed state at the committed epoch).
var linkClasses = []struct {
	name                  string
	plug, unprotect, disk bool
}{
	{"link/memory/hold", false, false, false},
	{"link/plug/hold", true, false, false},
	{"link/memory/unprotect", false, true, false},
	{"link/plug/unprotect", true, true, false},
	{"disk/memory/hold", false, false, true},
	{"disk/plug/unprotect", true, true, true},
}

// TestFaultsRandomized kills links at random points (mid-epoch included),
// truncates, corrupts and drops frames in both directions and stalls acks,
// for each output buffer (memory; plug's real Buffer over a model of
// sch_plug, max_inflight 1) and each ack-timeout policy (hold; unprotect).
// After each trial the replica must be exactly the primary's state at a
// committed epoch no older than the last ack, and every message the
// buffer released must have been legitimate when it left: its true epoch
// committed, or protection off (between ReleaseAll and the next Hold, no
// ack since). A Run that ends with an error fails the trial.
func TestFaultsRandomized(t *testing.T) {
	per := trials(3, 2)
	for ci, class := range linkClasses {
		t.Run(strings.ReplaceAll(class.name, "/", "-"), func(t *testing.T) {
			var sum linkSummary
			for trial := 0; trial < per; trial++ {
				faultTrial(t, class.plug, class.unprotect, class.disk, uint64(ci)<<32|uint64(trial+1), per <= 10, &sum)
				if t.Failed() {
					return
				}
			}
			reportTrials(t, class.name, per, "links %d, torn epochs discarded %d, rejected %d, unprotected episodes %d, messages released %d (%d while unprotected)",
				sum.links, sum.torn, sum.rejected, sum.windows, sum.released, sum.passed)
		})
	}
}

type linkSummary struct{ links, torn, rejected, windows, released, passed int }

// faultTrial runs one link-fault trial. Link 1 carries no primary-side
// fault but its acks stop at a random point, so that the ack-timeout
// policy acts in every trial; links 2..8 get random faults in both
// directions; later links none, so that the pair converges.
func faultTrial(t *testing.T, usePlug, unprotect, withDisk bool, seed uint64, verbose bool, sum *linkSummary) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 99))
	var rmu sync.Mutex // hooks run on the links' goroutines
	intn := func(n int) int {
		rmu.Lock()
		defer rmu.Unlock()
		return rng.IntN(n)
	}
	wl := []string{"uniform", "hotset", "sequential", "sparse"}[intn(4)]
	rate := []int{5000, 15000, 40000}[intn(3)]
	if raceEnabled {
		rate = min(rate, 15000)
	}
	cfg := sim.Config{MemoryBytes: 1 << 20, Workload: wl, Rate: rate, Seed: seed, OutputEvery: []int{2, 4, 16}[intn(3)]}
	if withDisk {
		cfg.DiskBytes = 256 << 10
	}
	pc := PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1 + intn(3), AckTimeout: 150 * time.Millisecond, UnprotectOnAckTimeout: unprotect}
	p := newPairWith(t, cfg, pc, pairOptions{plug: usePlug})
	defer p.close()

	type plan struct {
		at    int              // frame index of the primary-side fault (-1: none)
		fault transport.Action // its kind
		stall int              // backup frame index from which acks are dropped (-1: never)
		ackAt int              // backup frame index of a single fault on an ack (-1: none)
		ackDo transport.Action
	}
	var pmu sync.Mutex
	plans := map[int]*plan{}
	planFor := func(link int) *plan {
		pmu.Lock()
		defer pmu.Unlock()
		if pl, ok := plans[link]; ok {
			return pl
		}
		pl := &plan{at: -1, stall: -1, ackAt: -1}
		kinds := []transport.Action{transport.Truncate, transport.Corrupt, transport.Cut, transport.Drop}
		switch {
		case link == 1:
			pl.stall = 3 + intn(30)
		case link <= 8:
			if intn(2) == 0 {
				pl.at, pl.fault = 3+intn(40), kinds[intn(len(kinds))]
			}
			switch intn(6) {
			case 0:
				pl.stall = 3 + intn(20)
			case 1:
				pl.ackAt, pl.ackDo = 2+intn(20), kinds[intn(len(kinds))]
			}
		}
		plans[link] = pl
		return pl
	}
	fault := func(a transport.Action, b []byte) transport.Fault {
		switch a {
		case transport.Truncate:
			return transport.Fault{Action: a, N: intn(len(b))}
		case transport.Corrupt:
			// Past the length prefix and kind: the frame stays framed.
			return transport.Fault{Action: a, N: 9 + intn(max(1, len(b)-9))}
		}
		return transport.Fault{Action: a}
	}
	var faults atomic.Int64
	hook := func(link, i int, b []byte) transport.Fault {
		pl := planFor(link)
		if i == pl.at {
			faults.Add(1)
			return fault(pl.fault, b)
		}
		if link <= 8 && intn(30) == 0 {
			return transport.Fault{Action: transport.Delay, Delay: time.Duration(intn(3)) * time.Millisecond}
		}
		return transport.Fault{}
	}
	backHook := func(link, i int, b []byte) transport.Fault {
		pl := planFor(link)
		if k, ok := transport.FrameKind(b); !ok || k != transport.KindAck {
			return transport.Fault{}
		}
		if pl.stall >= 0 && i >= pl.stall {
			faults.Add(1)
			return transport.Fault{Action: transport.Drop}
		}
		pmu.Lock()
		hit := pl.ackAt >= 0 && i >= pl.ackAt
		if hit {
			pl.ackAt = -1 // only the first ack from there
		}
		pmu.Unlock()
		if hit {
			faults.Add(1)
			return fault(pl.ackDo, b)
		}
		return transport.Fault{}
	}
	p.hook.Store(&hook)
	p.backHook.Store(&backHook)
	stop := p.run()
	p.waitAcked(40, 60*time.Second)
	// Carry on past the faults: output after recovery is checked too.
	p.mu.Lock()
	next := p.acked + 10
	p.mu.Unlock()
	p.waitAcked(next, 60*time.Second)
	stop()
	p.checkReplica()
	released, passed, windows := p.check.counts()
	st := p.backup.Stats()
	switch {
	case p.links < 2:
		t.Fatalf("seed %d: the ack stall on link 1 did not make the primary drop it", seed)
	case unprotect && windows == 0:
		t.Fatalf("seed %d: policy unprotect but the primary never ran unprotected", seed)
	case !unprotect && windows > 0:
		t.Fatalf("seed %d: policy hold but the primary released everything", seed)
	case released == 0:
		t.Fatalf("seed %d: no output released", seed)
	}
	sum.links += p.links
	sum.torn += int(st.TornEpochsDiscarded)
	sum.rejected += int(st.Rejected)
	sum.windows += windows
	sum.released += released
	sum.passed += passed
	if verbose {
		t.Logf("seed %x (%s, rate %d, max_inflight %d): links %d, faults %d, committed %d, torn %d, rejected %d, unprotected %d times, released %d (%d unprotected)",
			seed, wl, rate, p.primary.o.Core.MaxInflight, p.links, faults.Load(), p.backup.Committed(), st.TornEpochsDiscarded, st.Rejected, windows, released, passed)
	}
}

// TestKillMidEpoch stops the primary at random instants (as a crash would,
// without goodbye) and checks the backup holds exactly a committed state.
func TestKillMidEpoch(t *testing.T) {
	for trial := 0; trial < 8; trial++ {
		p := newPair(t, smallGuest("sequential", uint64(trial+10)), PrimaryConfig{Interval: 2 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
		// Cut the link at a random frame of the 6th link-frame window: a
		// crash in the middle of sending an epoch.
		cutAt := 20 + trial*7
		hook := func(link, i int, b []byte) transport.Fault {
			if i == cutAt {
				return transport.Fault{Action: transport.Truncate, N: len(b) / 2}
			}
			return transport.Fault{}
		}
		p.hook.Store(&hook)
		stop := p.run()
		p.waitAcked(5, 20*time.Second)
		stop()
		p.checkReplica()
	}
}

// TestBackupActivation fails over to the replica and checks that the
// activated guest continues from the committed state.
func TestBackupActivation(t *testing.T) {
	p := newPair(t, smallGuest("hotset", 5), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second})
	stop := p.run()
	p.waitAcked(10, 20*time.Second)
	stop()
	p.checkReplica()
	committed := p.backup.Committed()
	g, err := p.backup.Activate(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	sg := g.(*sim.Guest)
	p.mu.Lock()
	ops := p.captured[committed]
	p.mu.Unlock()
	if sg.Ops() < ops {
		t.Fatalf("activated guest at ops %d, committed state had %d", sg.Ops(), ops)
	}
	if _, err := p.backup.Activate(t.Context()); err == nil {
		t.Fatal("second activation succeeded")
	}
}

// TestReconnectResyncsWithoutFullSync cuts the link once and checks that
// the primary resumes from the backup's committed epoch with one resync
// epoch (base > 0, not full) instead of resending all memory.
func TestReconnectResyncsWithoutFullSync(t *testing.T) {
	p := newPair(t, smallGuest("uniform", 11), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
	var caps []CaptureInfo
	var mu sync.Mutex
	p.primary.o.OnCapture = chain(p.primary.o.OnCapture, func(ci CaptureInfo) {
		mu.Lock()
		caps = append(caps, CaptureInfo{Epoch: ci.Epoch, Base: ci.Base, Full: ci.Full, Pages: ci.Pages})
		mu.Unlock()
	})
	cut := func(link, i int, b []byte) transport.Fault {
		if link == 1 && i == 60 {
			return transport.Fault{Action: transport.Truncate, N: len(b) / 3}
		}
		return transport.Fault{}
	}
	p.hook.Store(&cut)
	stop := p.run()
	p.waitAcked(40, 20*time.Second)
	stop()
	p.checkReplica()
	if p.links < 2 {
		t.Fatalf("link was never cut (links %d)", p.links)
	}
	mu.Lock()
	defer mu.Unlock()
	full, resync := 0, 0
	for i, c := range caps {
		if c.Full {
			full++
		}
		if i > 0 && !c.Full && c.Base != caps[i-1].Epoch {
			resync++
		}
	}
	if full != 1 {
		t.Fatalf("%d full epochs, want only the initial one", full)
	}
	if resync == 0 {
		t.Fatalf("no resync epoch after the cut: %+v", caps)
	}
}

// TestAckStallHoldsOutput drops the backup's acks for a while: the primary
// must keep the output held (ack-timeout policy hold), drop the link, and
// converge after the stall without releasing anything unacknowledged.
func TestAckStallHoldsOutput(t *testing.T) {
	p := newPair(t, smallGuest("sparse", 12), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 150 * time.Millisecond})
	stall := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k == transport.KindAck && link <= 2 && i > 5 {
			return transport.Fault{Action: transport.Drop}
		}
		return transport.Fault{}
	}
	p.backHook.Store(&stall)
	stop := p.run()
	p.waitAcked(30, 30*time.Second)
	stop()
	p.checkReplica()
	if p.links < 3 {
		t.Fatalf("ack stall did not make the primary drop the link (links %d)", p.links)
	}
	if s := p.out.Stats(); s.HeldPackets == 0 && s.ReleasedPackets == 0 {
		t.Fatalf("no output at all: %+v", s)
	}
}

func chain(a, b func(CaptureInfo)) func(CaptureInfo) {
	return func(ci CaptureInfo) {
		if a != nil {
			a(ci)
		}
		b(ci)
	}
}

// TestStalledPrimaryReleasesNothingOnOldAcks: a primary that sent its
// backup nothing for longer than the heartbeat timeout (its daemon was
// stopped, say by SIGSTOP) may have been declared lost and replaced
// meanwhile; acks that were waiting for it on the old link must not
// release its output. It re-handshakes first (found by the partition
// trials, class sigstop-primary, seed 1028).
func TestStalledPrimaryReleasesNothingOnOldAcks(t *testing.T) {
	p := newPair(t, smallGuest("hotset", 5), PrimaryConfig{Interval: 5 * time.Millisecond, MaxInflight: 1, AckTimeout: 30 * time.Second})
	// The primary's clock, which the test moves forward to make a stall.
	var offset atomic.Int64
	p.primary.o.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	// Every ack the primary acts on after the stall, with the link it
	// came on (an ack acted on releases that epoch's output).
	var jumped atomic.Bool
	var staleAcks []uint64
	linkAtJump := 0
	onAck := p.primary.o.OnAck
	p.primary.o.OnAck = func(e uint64) {
		onAck(e)
		if jumped.Load() {
			p.mu.Lock()
			if p.links == linkAtJump {
				staleAcks = append(staleAcks, e)
			}
			p.mu.Unlock()
		}
	}
	stop := p.run()
	defer stop()
	p.waitAcked(5, 20*time.Second)
	// Acks from here on reach the primary 300 ms late: they wait for it
	// while it "stalls".
	delay := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k == transport.KindAck {
			return transport.Fault{Action: transport.Delay, Delay: 300 * time.Millisecond}
		}
		return transport.Fault{}
	}
	p.backHook.Store(&delay)
	time.Sleep(50 * time.Millisecond)
	p.mu.Lock()
	linkAtJump, ackedAtJump := p.links, p.acked
	p.mu.Unlock()
	// The stall: 3 s (the heartbeat timeout is 2 s) pass for the primary
	// at once, as for a daemon stopped and continued.
	offset.Store(int64(3 * time.Second))
	jumped.Store(true)
	p.backHook.Store(nil)
	p.waitAcked(ackedAtJump+5, 20*time.Second)
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(staleAcks) > 0 {
		t.Fatalf("acted on acks %v (releasing their output) on the link that went silent beyond the heartbeat timeout", staleAcks)
	}
	if p.links == linkAtJump {
		t.Fatalf("no new link after the stall (links %d)", p.links)
	}
}

// TestBackupCommittedGeneration: the backup records the witness
// generation of the link that committed its newest epoch apart from the
// newest link's. A link of a newer generation that commits nothing (its
// primary ran unprotected meanwhile, so the replica may lack what it
// released) must leave the committed generation where it was: the daemon
// refuses to take over from an unprotected record the replica does not
// cover (partition trials, flap class, seed 5000026).
func TestBackupCommittedGeneration(t *testing.T) {
	p := newPair(t, smallGuest("uniform", 12), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 2, AckTimeout: 5 * time.Second})
	var gen atomic.Uint64
	gen.Store(1)
	p.primary.o.Generation = gen.Load
	stop := p.run()
	defer stop()
	p.waitAcked(5, 20*time.Second)
	if st := p.backup.Stats(); st.Generation != 1 || st.CommittedGeneration != 1 {
		t.Fatalf("after commits at generation 1: generation %d, committed generation %d", st.Generation, st.CommittedGeneration)
	}
	// Generation 2: cut link 1; later links pass their Hello and nothing else.
	gen.Store(2)
	cut := func(link, i int, b []byte) transport.Fault {
		if link == 1 || i >= 1 {
			return transport.Fault{Action: transport.Truncate, N: len(b) / 2}
		}
		return transport.Fault{}
	}
	p.hook.Store(&cut)
	deadline := time.Now().Add(20 * time.Second)
	for p.backup.Stats().Generation != 2 {
		if time.Now().After(deadline) {
			t.Fatal("no link of generation 2 reached the backup")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if st := p.backup.Stats(); st.CommittedGeneration != 1 {
		t.Fatalf("a generation-2 link that committed nothing moved the committed generation to %d", st.CommittedGeneration)
	}
	p.hook.Store(nil)
	acked := p.backup.Committed()
	p.waitAcked(acked+3, 20*time.Second)
	if st := p.backup.Stats(); st.Generation != 2 || st.CommittedGeneration != 2 {
		t.Fatalf("after commits at generation 2: generation %d, committed generation %d", st.Generation, st.CommittedGeneration)
	}
}
