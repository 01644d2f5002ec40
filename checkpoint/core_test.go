package checkpoint

import (
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/outbuf/plug"
)

var t0 = time.Unix(1_000_000, 0)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func kinds(acts []Action) string {
	var s []string
	for _, a := range acts {
		s = append(s, a.String())
	}
	return strings.Join(s, " ")
}

func mustActs(t *testing.T, got []Action, err error, want string) {
	t.Helper()
	if err != nil {
		t.Fatalf("unexpected error %v (want %q)", err, want)
	}
	if k := kinds(got); k != want {
		t.Fatalf("actions %q, want %q", k, want)
	}
}

func TestPrimaryCoreSteadyState(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 25 * time.Millisecond, MaxInflight: 1, AckTimeout: time.Second}, at(0))
	if acts := c.Tick(at(1)); len(acts) != 0 {
		t.Fatalf("checkpoint before the link is up: %v", kinds(acts))
	}
	acts, err := c.LinkUp(0, at(2))
	mustActs(t, acts, err, "checkpoint(1 base=0 full)")
	acts, err = c.CheckpointDone(1, at(3))
	mustActs(t, acts, err, "send(1 base=0 full)")
	// Backpressure: one epoch in flight, no second checkpoint.
	if acts := c.Tick(at(100)); len(acts) != 0 {
		t.Fatalf("checkpoint beyond max inflight: %v", kinds(acts))
	}
	acts, err = c.Ack(1, at(101))
	mustActs(t, acts, err, "release(1) checkpoint(2 base=1)")
	acts, err = c.CheckpointDone(2, at(102))
	mustActs(t, acts, err, "send(2 base=1)")
	acts, err = c.Ack(2, at(103))
	// The interval since checkpoint 2 started (101) has not elapsed.
	mustActs(t, acts, err, "release(2)")
	if acts := c.Tick(at(120)); len(acts) != 0 {
		t.Fatalf("checkpoint before the interval: %v", kinds(acts))
	}
	if next, ok := c.NextCheckpoint(); !ok || !next.Equal(at(126)) {
		t.Fatalf("next checkpoint %v %v, want %v", next, ok, at(126))
	}
	if acts := c.Tick(at(126)); kinds(acts) != "checkpoint(3 base=2)" {
		t.Fatalf("got %q", kinds(acts))
	}
	// While it captures, and while backpressure holds, nothing is due.
	if _, ok := c.NextCheckpoint(); ok {
		t.Fatal("checkpoint due while capturing")
	}
	_, _ = c.CheckpointDone(3, at(127))
	if _, ok := c.NextCheckpoint(); ok {
		t.Fatal("checkpoint due beyond max inflight")
	}
}

func TestPrimaryCorePipelined(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 3, AckTimeout: time.Second}, at(0))
	acts, err := c.LinkUp(0, at(0))
	mustActs(t, acts, err, "checkpoint(1 base=0 full)")
	_, _ = c.CheckpointDone(1, at(1))
	for e, ms := uint64(2), 10; e <= 3; e, ms = e+1, ms+10 {
		acts := c.Tick(at(ms))
		if len(acts) != 1 || acts[0].Epoch != e {
			t.Fatalf("tick %d: %v", ms, kinds(acts))
		}
		_, _ = c.CheckpointDone(e, at(ms+1))
	}
	if acts := c.Tick(at(40)); len(acts) != 0 {
		t.Fatalf("fourth epoch in flight: %v", kinds(acts))
	}
	// An ack covers every earlier epoch.
	acts, err = c.Ack(2, at(41))
	mustActs(t, acts, err, "release(2) checkpoint(4 base=3)")
	if c.Unacked() != 1 {
		t.Fatalf("unacked %d, want 1 (epoch 3)", c.Unacked())
	}
}

func TestPrimaryCoreRejectsLyingBackup(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	if _, err := c.Ack(5, at(2)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("ack of an epoch never sent: %v", err)
	}
	if _, err := c.Ack(1, at(3)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Ack(1, at(4)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("duplicate ack: %v", err)
	}
	c.LinkDown(at(5))
	if _, err := c.LinkUp(9, at(6)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("backup claiming an epoch never captured: %v", err)
	}
}

func TestPrimaryCoreResyncAfterReconnect(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 2, AckTimeout: time.Second}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	_, _ = c.Ack(1, at(2))
	mustActs(t, c.Tick(at(10)), nil, "checkpoint(2 base=1)")
	_, _ = c.CheckpointDone(2, at(11))
	mustActs(t, c.Tick(at(20)), nil, "checkpoint(3 base=2)")
	_, _ = c.CheckpointDone(3, at(21))
	c.LinkDown(at(22))
	if acts := c.Tick(at(40)); len(acts) != 0 {
		t.Fatalf("checkpoint while the link is down: %v", kinds(acts))
	}
	// The backup committed 1; epochs 2 and 3 are resent as one epoch on base 1.
	acts, err := c.LinkUp(1, at(50))
	mustActs(t, acts, err, "checkpoint(4 base=1 resync=2..3)")
	acts, err = c.CheckpointDone(4, at(51))
	mustActs(t, acts, err, "send(4 base=1)")
	acts, err = c.Ack(4, at(52))
	mustActs(t, acts, err, "release(4)")
}

func TestPrimaryCoreLostAcks(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 2}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	_ = c.Tick(at(20))
	_, _ = c.CheckpointDone(2, at(21))
	c.LinkDown(at(22))
	// The backup had committed both; their acks were lost with the link.
	acts, err := c.LinkUp(2, at(30))
	mustActs(t, acts, err, "release(2) checkpoint(3 base=2)")
	if c.Acked() != 2 || c.Unacked() != 0 {
		t.Fatalf("acked %d unacked %d", c.Acked(), c.Unacked())
	}
}

func TestPrimaryCoreBackupLostReplica(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	_, _ = c.Ack(1, at(2))
	_ = c.Tick(at(12))
	_, _ = c.CheckpointDone(2, at(13))
	c.LinkDown(at(14))
	acts, err := c.LinkUp(0, at(15))
	mustActs(t, acts, err, "checkpoint(3 base=0 full)")
}

func TestPrimaryCoreLinkUpDuringCapture(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	_, _ = c.Ack(1, at(2))
	mustActs(t, c.Tick(at(10)), nil, "checkpoint(2 base=1)")
	c.LinkDown(at(11))
	acts, err := c.LinkUp(1, at(12))
	mustActs(t, acts, err, "") // capture of 2 still running
	// Epoch 2 is not sent alone (its base would be stale); the resync
	// epoch that covers it starts at once.
	acts, err = c.CheckpointDone(2, at(13))
	mustActs(t, acts, err, "checkpoint(3 base=1 resync=2..2)")
	acts, err = c.CheckpointDone(3, at(14))
	mustActs(t, acts, err, "send(3 base=1)")
}

func TestPrimaryCoreAckTimeoutHold(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1, AckTimeout: 100 * time.Millisecond}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	if acts := c.Tick(at(50)); len(acts) != 0 {
		t.Fatalf("%v", kinds(acts))
	}
	acts := c.Tick(at(102))
	if kinds(acts) != "drop-link(0 ack timeout: holding output)" {
		t.Fatalf("got %q", kinds(acts))
	}
	for _, a := range acts {
		if a.Kind == ActRelease || a.Kind == ActReleaseAll {
			t.Fatal("hold policy released output")
		}
	}
	if c.Connected() {
		t.Fatal("link still considered up")
	}
}

// A link that comes back after a long outage gets a whole ack timeout,
// even though its unacked epochs are older than that.
func TestPrimaryCoreAckTimeoutFreshLink(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1, AckTimeout: 100 * time.Millisecond}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	_, _ = c.Ack(1, at(2))
	_ = c.Tick(at(10))
	_, _ = c.CheckpointDone(2, at(11))
	c.LinkDown(at(12))
	acts, err := c.LinkUp(1, at(500))
	mustActs(t, acts, err, "checkpoint(3 base=1 resync=2..2)")
	_, _ = c.CheckpointDone(3, at(501))
	if acts := c.Tick(at(550)); len(acts) != 0 {
		t.Fatalf("fresh link dropped at once: %v", kinds(acts))
	}
	if acts := c.Tick(at(601)); kinds(acts) != "drop-link(0 ack timeout: holding output)" {
		t.Fatalf("got %q", kinds(acts))
	}
}

func TestPrimaryCoreAckTimeoutUnprotect(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1, AckTimeout: 100 * time.Millisecond, UnprotectOnAckTimeout: true}, at(0))
	_, _ = c.LinkUp(0, at(0))
	_, _ = c.CheckpointDone(1, at(1))
	acts := c.Tick(at(102))
	if !strings.HasPrefix(kinds(acts), "release-all(") {
		t.Fatalf("got %q", kinds(acts))
	}
	if !c.Unprotected() {
		t.Fatal("not unprotected")
	}
	c.LinkDown(at(103))
	acts, err := c.LinkUp(1, at(200))
	// The full epoch re-arms the output buffer: holding again starts at
	// its boundary, before anything the backup will commit.
	mustActs(t, acts, err, "checkpoint(2 base=0 full hold)")
	acts, err = c.CheckpointDone(2, at(201))
	mustActs(t, acts, err, "send(2 base=0 full)")
	acts, err = c.Ack(2, at(210))
	mustActs(t, acts, err, "release(2) checkpoint(3 base=2)")
	if c.Unprotected() {
		t.Fatal("still unprotected after the backup acked again")
	}
}

// TestPrimaryCoreResyncFolds is issue 8's hole 7: a backup that accepts
// links but never commits made the primary keep one epoch per reconnect.
func TestPrimaryCoreResyncFolds(t *testing.T) {
	for _, inflight := range []int{1, 3} {
		c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: inflight, AckTimeout: 50 * time.Millisecond}, at(0))
		now := 0
		acts, _ := c.LinkUp(0, at(now))
		var capturing uint64
		for _, a := range acts {
			if a.Kind == ActCheckpoint {
				capturing = a.Epoch
			}
		}
		// One full epoch acked, then the backup stalls at committed 1.
		_, _ = c.CheckpointDone(capturing, at(now))
		_, _ = c.Ack(1, at(now))
		capturing = 0
		for round := 0; round < 200; round++ {
			now += 7
			var acts []Action
			if capturing != 0 {
				a, err := c.CheckpointDone(capturing, at(now))
				if err != nil {
					t.Fatal(err)
				}
				acts, capturing = a, 0
			} else if round%5 == 4 {
				c.LinkDown(at(now))
				a, err := c.LinkUp(1, at(now))
				if err != nil {
					t.Fatal(err)
				}
				acts = a
			} else {
				acts = c.Tick(at(now))
			}
			for _, a := range acts {
				if a.Kind == ActCheckpoint {
					capturing = a.Epoch
				}
				if a.Kind == ActDropLink {
					c.LinkDown(at(now))
				}
			}
			if n := c.Unacked(); n > inflight+1 {
				t.Fatalf("max_inflight %d: %d epochs held after %d rounds (%d reconnects)", inflight, n, round, round/5)
			}
		}
		if c.LastCaptured() < 20 {
			t.Fatalf("only %d epochs captured: the test did not exercise reconnects", c.LastCaptured())
		}
	}
}

// TestPrimaryCoreResume: a protection resumed by a restarted daemon adopts
// the backup's committed epoch as the base of a rebuild epoch.
func TestPrimaryCoreResume(t *testing.T) {
	c := NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1, Resume: true}, at(0))
	acts, err := c.LinkUp(41, at(0))
	mustActs(t, acts, err, "checkpoint(42 base=41 rebuild)")
	acts, err = c.CheckpointDone(42, at(1))
	mustActs(t, acts, err, "send(42 base=41)")
	// The link breaks before the ack: a plain resync of 42 follows.
	c.LinkDown(at(2))
	acts, err = c.LinkUp(41, at(3))
	mustActs(t, acts, err, "checkpoint(43 base=41 resync=42..42)")

	// A backup that lost its replica: a full sync.
	c = NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1, Resume: true}, at(0))
	acts, err = c.LinkUp(0, at(0))
	mustActs(t, acts, err, "checkpoint(1 base=0 full)")
	// Without Resume, a committed epoch never captured is a lie.
	c = NewPrimaryCore(PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1}, at(0))
	if _, err := c.LinkUp(41, at(0)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("committed 41 without resume: %v", err)
	}
}

// modelBuffer is an output buffer model for the randomized core test:
// packets carry the epoch they were emitted in; plug mode follows
// sch_plug's rule (one closed epoch: a checkpoint while one is pending
// places no boundary, as outbuf/plug does). With real set, the packets go
// through the real plug.Buffer over plug.SimKernel instead.
type modelBuffer struct {
	plug     bool
	passThru bool
	open     []uint64 // tags of packets not yet behind a boundary
	closed   []modelEpoch
	released []uint64 // tags released, in order
	passed   int      // packets released in pass-through

	real *plug.Buffer
	kern *plug.SimKernel
}

type modelEpoch struct {
	epoch uint64
	pkts  []uint64
}

// newRealPlug is the real plug.Buffer over a model of sch_plug.
func newRealPlug() *modelBuffer {
	m := &modelBuffer{plug: true}
	m.kern = plug.NewSimKernel(0, func(tag uint64) {
		if m.passThru {
			m.passed++
			return
		}
		m.released = append(m.released, tag)
	})
	m.real = plug.NewSimulated(m.kern, nil)
	return m
}

func (m *modelBuffer) emit(tag uint64) {
	if m.real != nil {
		m.kern.Enqueue(tag)
		return
	}
	if m.passThru {
		m.passed++
		return
	}
	m.open = append(m.open, tag)
}

func (m *modelBuffer) checkpoint(epoch uint64) error {
	if m.real != nil {
		return m.real.Checkpoint(epoch)
	}
	if m.passThru {
		return nil
	}
	if m.plug && len(m.closed) > 0 {
		return nil // merged into the open part
	}
	m.closed = append(m.closed, modelEpoch{epoch, m.open})
	m.open = nil
	return nil
}

func (m *modelBuffer) release(epoch uint64) error {
	if m.real != nil {
		return m.real.Release(epoch)
	}
	i := 0
	for i < len(m.closed) && m.closed[i].epoch <= epoch {
		m.released = append(m.released, m.closed[i].pkts...)
		i++
	}
	m.closed = m.closed[i:]
	return nil
}

func (m *modelBuffer) releaseAll() error {
	if m.real != nil {
		m.passThru = true // what it lets out now is legitimate
		return m.real.ReleaseAll()
	}
	for _, e := range m.closed {
		m.released = append(m.released, e.pkts...)
	}
	m.released = append(m.released, m.open...)
	m.closed, m.open, m.passThru = nil, nil, true
	return nil
}

func (m *modelBuffer) hold() error {
	m.passThru = false
	if m.real != nil {
		return m.real.Hold()
	}
	return nil
}

// passing reports whether output leaves unheld.
func (m *modelBuffer) passing() bool {
	if m.real != nil {
		return m.kern.State().UnplugIndefinite
	}
	return m.passThru
}

// TestPrimaryCoreRandomized drives the core with random events against a
// model backup and an output buffer (a model of memory or of plug, or the
// real plug.Buffer over a model of sch_plug) and checks
// invariant 1 (no packet leaves before the backup committed its epoch),
// that the buffer never stays in pass-through once acks flow again, that
// the state kept for unacked epochs stays within max_inflight + 1, and
// that the backup's sequence is always valid.
func TestPrimaryCoreRandomized(t *testing.T) {
	n := max(trials(600, 600), 600)
	kinds := map[string]int{}
	for seed := uint64(1); seed <= uint64(n); seed++ {
		rng := rand.New(rand.NewPCG(seed, 7))
		cfg := PrimaryConfig{Interval: 10 * time.Millisecond, MaxInflight: 1 + rng.IntN(4), AckTimeout: 200 * time.Millisecond,
			UnprotectOnAckTimeout: rng.IntN(3) == 0}
		var buf *modelBuffer
		switch rng.IntN(3) {
		case 0:
			buf = &modelBuffer{}
			kinds["memory model"]++
		case 1:
			buf = &modelBuffer{plug: true}
			kinds["plug model"]++
		default:
			buf = newRealPlug()
			kinds["plug over SimKernel"]++
		}
		if buf.plug && buf.real == nil {
			// As the daemon forces for plug. The real plug.Buffer keeps
			// any max_inflight: it merges, so it never releases early.
			cfg.MaxInflight = 1
		}
		c := NewPrimaryCore(cfg, at(0))
		b := NewBackupCore(0)
		var wire []Action // sends on the link, in order
		var acks []uint64 // acks on the link, in order
		var capturing *Action
		now := 0
		linkUp := false
		checked := 0
		check := func() {
			for ; checked < len(buf.released); checked++ {
				if tag := buf.released[checked]; tag > b.Committed() {
					t.Fatalf("seed %d (plug %v, unprotect %v): packet of epoch %d released while the backup committed %d",
						seed, buf.plug, cfg.UnprotectOnAckTimeout, tag, b.Committed())
				}
			}
			if n := c.Unacked(); n > cfg.MaxInflight+1 {
				t.Fatalf("seed %d: %d unacked epochs kept, max_inflight %d", seed, n, cfg.MaxInflight)
			}
		}
		apply := func(acts []Action) {
			for _, a := range acts {
				switch a.Kind {
				case ActCheckpoint:
					if capturing != nil {
						t.Fatalf("seed %d: checkpoint %d while capturing %d", seed, a.Epoch, capturing.Epoch)
					}
					cp := a
					capturing = &cp
					// The runner does this while the guest is paused.
					if a.Hold {
						if err := buf.hold(); err != nil {
							t.Fatalf("seed %d: hold: %v", seed, err)
						}
					}
					if err := buf.checkpoint(a.Epoch); err != nil {
						t.Fatalf("seed %d: checkpoint %d: %v", seed, a.Epoch, err)
					}
				case ActSend:
					if !linkUp {
						t.Fatalf("seed %d: send while link down", seed)
					}
					wire = append(wire, a)
				case ActRelease:
					if a.Epoch > b.Committed() {
						t.Fatalf("seed %d: release of %d while backup committed %d", seed, a.Epoch, b.Committed())
					}
					if err := buf.release(a.Epoch); err != nil {
						t.Fatalf("seed %d: release %d: %v", seed, a.Epoch, err)
					}
				case ActReleaseAll:
					if !cfg.UnprotectOnAckTimeout {
						t.Fatalf("seed %d: release-all under hold policy", seed)
					}
					// Legitimate: the operator chose to run unprotected.
					if err := buf.releaseAll(); err != nil {
						t.Fatal(err)
					}
					checked = len(buf.released)
				case ActDropLink:
					linkUp = false
					wire, acks = nil, nil
					b.Discard()
					c.LinkDown(at(now))
				}
			}
			check()
		}
		for step := 0; step < 500; step++ {
			now += rng.IntN(8)
			if capturing == nil && rng.IntN(2) == 0 {
				buf.emit(c.LastCaptured() + 1) // the guest sends a packet
			}
			switch r := rng.IntN(10); {
			case r < 3:
				apply(c.Tick(at(now)))
			case r < 5 && capturing != nil:
				a := *capturing
				capturing = nil
				acts, err := c.CheckpointDone(a.Epoch, at(now))
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				apply(acts)
			case r < 7 && len(wire) > 0:
				// The backup receives and applies the next epoch.
				a := wire[0]
				wire = wire[1:]
				if err := b.Begin(a.Epoch, a.Base, 0, a.Full, 0); err != nil {
					t.Fatalf("seed %d: backup rejected %v: %v", seed, a, err)
				}
				_ = b.DeviceState(a.Epoch)
				if err := b.End(a.Epoch, 0, true); err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				acks = append(acks, b.Applied())
			case r < 9 && len(acks) > 0:
				e := acks[0]
				acks = acks[1:]
				acts, err := c.Ack(e, at(now))
				if err != nil {
					t.Fatalf("seed %d: ack %d: %v", seed, e, err)
				}
				if buf.passing() {
					t.Fatalf("seed %d: epoch %d acknowledged while the output buffer still passes output unheld (%d packets so far)", seed, e, buf.passed)
				}
				apply(acts)
			case r == 9:
				if linkUp && rng.IntN(3) == 0 {
					// The link breaks: in-flight epochs and acks are lost.
					linkUp = false
					wire, acks = nil, nil
					b.Discard()
					c.LinkDown(at(now))
				} else if !linkUp {
					linkUp = true
					acts, err := c.LinkUp(b.Committed(), at(now))
					if err != nil {
						t.Fatalf("seed %d: link up: %v", seed, err)
					}
					apply(acts)
				}
			}
		}
		check()
	}
	reportTrials(t, "core (model time)", n, "buffers %v", kinds)
}

func TestBackupCoreSequence(t *testing.T) {
	cases := []struct {
		name string
		run  func(b *BackupCore) error
		want string
	}{
		{"begin twice", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 1, false, 10)
			return b.Begin(3, 2, 1, false, 10)
		}, "while epoch 2 is incomplete"},
		{"old epoch", func(b *BackupCore) error { return b.Begin(1, 0, 1, false, 10) }, "already committed"},
		{"wrong base", func(b *BackupCore) error { return b.Begin(3, 2, 1, false, 10) }, "applies on base 2 but the replica holds 1"},
		{"too many pages", func(b *BackupCore) error { return b.Begin(2, 1, 11, false, 10) }, "announces 11 pages, guest has 10"},
		{"partial full epoch", func(b *BackupCore) error { return b.Begin(2, 0, 9, true, 10) }, "full epoch 2 announces 9 pages"},
		{"batch outside", func(b *BackupCore) error { return b.Batch(2, 0, 1) }, "outside an epoch"},
		{"batch gap", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 4, false, 10)
			return b.Batch(2, 1, 1)
		}, "starts at page 1, expected 0"},
		{"batch overflow", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 1, false, 10)
			return b.Batch(2, 0, 2)
		}, "more than the 1 pages announced"},
		{"end short", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 2, false, 10)
			_ = b.Batch(2, 0, 1)
			_ = b.DeviceState(2)
			return b.End(2, 2, true)
		}, "1 pages received, 2 announced"},
		{"end without device state", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 0, false, 10)
			return b.End(2, 0, true)
		}, "without device state"},
		{"digest mismatch", func(b *BackupCore) error {
			_ = b.Begin(2, 1, 0, false, 10)
			_ = b.DeviceState(2)
			return b.End(2, 0, false)
		}, "digest mismatch"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := NewBackupCore(1)
			err := tc.run(b)
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrProtocol containing %q", err, tc.want)
			}
			b.Discard()
			if b.Committed() != 1 {
				t.Fatalf("committed moved to %d", b.Committed())
			}
		})
	}
}

// TestBackupCoreFirstEpochFull: a replica that holds nothing of a
// protection accepts only a full epoch (a partial one on base 0 would
// commit another protection's memory plus a few pages).
func TestBackupCoreFirstEpochFull(t *testing.T) {
	b := NewBackupCore(0)
	if err := b.Begin(1, 0, 3, false, 10); !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "not full") {
		t.Fatalf("partial first epoch: %v", err)
	}
	if err := b.Begin(1, 0, 10, true, 10); err != nil {
		t.Fatalf("full first epoch: %v", err)
	}
}

func TestBackupCoreApply(t *testing.T) {
	b := NewBackupCore(0)
	if err := b.Begin(1, 0, 3, true, 3); err != nil {
		t.Fatal(err)
	}
	if err := b.Batch(1, 0, 2); err != nil {
		t.Fatal(err)
	}
	if err := b.Batch(1, 2, 1); err != nil {
		t.Fatal(err)
	}
	if err := b.DeviceState(1); err != nil {
		t.Fatal(err)
	}
	if err := b.End(1, 3, true); err != nil {
		t.Fatal(err)
	}
	if c := b.Applied(); c != 1 {
		t.Fatalf("committed %d", c)
	}
	// A torn epoch leaves it at 1.
	if err := b.Begin(2, 1, 2, false, 3); err != nil {
		t.Fatal(err)
	}
	if !b.Discard() || b.Committed() != 1 {
		t.Fatal("torn epoch not discarded cleanly")
	}
}
