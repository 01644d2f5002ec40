package checkpoint

import (
	"math/rand/v2"
	"sync"
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
			if p.released == 0 {
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

// TestFaultsRandomized kills links at random points (mid-epoch included),
// truncates, corrupts and drops frames and stalls acks, over many trials,
// and checks after each trial that the replica is exactly the primary's
// state at a committed epoch no older than the last ack, and that no output
// left before its epoch was committed.
func TestFaultsRandomized(t *testing.T) {
	trials := 12
	if testing.Short() || raceEnabled {
		trials = 6
	}
	for trial := 0; trial < trials; trial++ {
		seed := uint64(trial + 1)
		rng := rand.New(rand.NewPCG(seed, 99))
		wl := []string{"uniform", "hotset", "sequential", "sparse"}[trial%4]
		// A short ack timeout: a dropped frame stalls the epoch until the
		// primary gives up on the link and resyncs.
		p := newPair(t, smallGuest(wl, seed), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1 + trial%3, AckTimeout: 300 * time.Millisecond})
		var faults int
		hook := func(link, i int, b []byte) transport.Fault {
			// Fault only some links, and only after the first frames, so
			// that the pair keeps making progress between faults.
			if link%2 == 0 || i < 3 || rng.IntN(40) != 0 {
				return transport.Fault{}
			}
			faults++
			switch rng.IntN(5) {
			case 0:
				return transport.Fault{Action: transport.Truncate, N: rng.IntN(len(b))}
			case 1:
				return transport.Fault{Action: transport.Corrupt, N: 9 + rng.IntN(max(1, len(b)-9))}
			case 2:
				return transport.Fault{Action: transport.Cut}
			case 3:
				return transport.Fault{Action: transport.Drop}
			default:
				return transport.Fault{Action: transport.Delay, Delay: time.Duration(rng.IntN(3)) * time.Millisecond}
			}
		}
		p.hook.Store(&hook)
		stop := p.run()
		p.waitAcked(40, 30*time.Second)
		stop()
		p.checkReplica()
		t.Logf("trial %d (%s): links %d, backup committed %d, torn discarded %d, rejected %d",
			trial, wl, p.links, p.backup.Committed(), p.backup.Stats().TornEpochsDiscarded, p.backup.Stats().Rejected)
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
