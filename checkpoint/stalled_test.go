package checkpoint

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// stallKind is how a stalled backup misbehaves.
type stallKind int

const (
	// stallNeverCommits accepts every link, reads every frame, sends
	// heartbeats, never commits: each link is a full sync that never ends.
	stallNeverCommits stallKind = iota
	// stallStuck acknowledges a few epochs on its first link, then none:
	// every later link is a resync on that epoch (issue 8, hole 7).
	stallStuck
	// stallMute is stuck after its first link, and then answers no Hello:
	// the primary redials with an epoch held.
	stallMute
	// stallAcksLost is a real Backup whose acks, after a few, never arrive:
	// it commits, the primary learns it only from the next Welcome.
	stallAcksLost
)

var stallKinds = []string{"never commits", "stuck after a few acks", "mute after a few acks", "acks lost"}

// TestStalledBackupTrials is the stalled backup class: a backup that
// accepts links and reads frames but never commits (or whose acks never
// arrive), with reconnects forced by a short ack timeout, over memory and
// plug, under both ack-timeout policies. Each trial runs for stallLinks
// links; the primary's retained state must stay within max_inflight + 1
// captured epochs (dirty maps and capture times alike; the staging pool is
// fixed at max_inflight + 1), its heap flat (see heapBound), its
// goroutines gone after Run, and its output legitimate.
func TestStalledBackupTrials(t *testing.T) {
	n := trials(8, 4)
	counts := map[string]int{}
	var links int64
	for trial := 0; trial < n; trial++ {
		// Every 16 trials cover kind × buffer × policy; every 4, each kind,
		// each buffer and each policy.
		k := trial % 4
		kind := stallKind(k)
		usePlug := (k+trial/4)%2 == 1
		unprotect := (k/2+k%2+trial/8)%2 == 1
		links += stalledTrial(t, uint64(trial+1), kind, usePlug, unprotect, n <= 10)
		if t.Failed() {
			return
		}
		counts[fmt.Sprintf("%s/%s/%s", stallKinds[kind], map[bool]string{false: "memory", true: "plug"}[usePlug], map[bool]string{false: "hold", true: "unprotect"}[unprotect])]++
	}
	reportTrials(t, "stalled", n, "%d links in all; %v", links, counts)
}

const (
	stallGuestBytes = 2 << 20
	stallLinks      = 30 // links per trial (mute: a third)
	stallWarmLinks  = 4  // links before the heap is first measured
)

// heapBound is how much HeapInuse (after GC) may grow between warm-up and
// the end of a trial: what may legitimately be live at one instant and not
// at another is the staging pool (max_inflight + 1 buffers of at most the
// guest's size, grown on demand), plus the link in flight at that instant
// (its pipe holds at most max_inflight + 1 encoded epochs, each at most
// guest size), plus 4 MiB for the encoder's 64-page cache, the output
// buffer (64 KiB of messages, 4096 packets) and allocator slack. A leak of
// one guest-sized buffer, or one link, per reconnect exceeds it after a
// few dozen links.
func heapBound(maxInflight int) uint64 {
	return uint64(2*(maxInflight+1)*stallGuestBytes) + 4<<20
}

// stalledTrial runs one trial and returns how many links it made.
func stalledTrial(t *testing.T, seed uint64, kind stallKind, usePlug, unprotect, verbose bool) int64 {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 5))
	goroutines := runtime.NumGoroutine()
	cfg := sim.Config{MemoryBytes: stallGuestBytes, Workload: []string{"uniform", "hotset", "sequential", "sparse"}[rng.IntN(4)],
		Rate: 10000, Seed: seed, OutputEvery: 4}.WithDefaults()
	pc := PrimaryConfig{Interval: 2 * time.Millisecond, MaxInflight: 1 + rng.IntN(3), AckTimeout: 30 * time.Millisecond, UnprotectOnAckTimeout: unprotect}
	if usePlug {
		pc.MaxInflight = 1
	}
	ackFirst := uint64(1 + rng.IntN(5))

	var (
		pr        *Primary
		check     *outputCheck
		dials     func() int64
		guest     *sim.Guest
		finish    func() // after Run returned: stop the backup side
		sampleErr atomic.Pointer[string]
	)
	// sample runs on the engine goroutine at every capture: the epoch just
	// captured is not yet in the core's count.
	var maxHeld, maxMaps int
	sample := func(CaptureInfo) {
		held, maps := pr.core.Held()+1, len(pr.epochDirty)+len(pr.freeMaps)
		maxHeld, maxMaps = max(maxHeld, held), max(maxMaps, maps)
		if held > pc.MaxInflight+1 || maps > pc.MaxInflight+2 || len(pr.captured) > pc.MaxInflight+1 {
			s := fmt.Sprintf("max_inflight %d: %d epochs held, %d dirty maps (%d in use), %d capture times, after %d links",
				pc.MaxInflight, held, maps, len(pr.epochDirty), len(pr.captured), dials())
			sampleErr.CompareAndSwap(nil, &s)
		}
	}
	if kind == stallAcksLost {
		p := newPairWith(t, cfg, pc, pairOptions{plug: usePlug})
		pr, check, guest = p.primary, p.check, p.guest
		defer p.close()
		pr.o.OnCapture = chain(pr.o.OnCapture, sample)
		var acks atomic.Uint64
		drop := func(link, i int, b []byte) transport.Fault {
			if k, ok := transport.FrameKind(b); ok && k == transport.KindAck && acks.Add(1) > ackFirst {
				return transport.Fault{Action: transport.Drop}
			}
			return transport.Fault{}
		}
		p.backHook.Store(&drop)
		dials = func() int64 { p.mu.Lock(); defer p.mu.Unlock(); return int64(p.links) }
		finish = p.wg.Wait
	} else {
		sb := &stallBackup{kind: kind, heartbeats: rng.IntN(2) == 0}
		if kind != stallNeverCommits {
			sb.ackFirst = ackFirst
		}
		check = newOutputCheck(sb.acked.Load)
		buf, emit := newTrialBuffer(usePlug, map[bool]int{false: 64 << 10, true: 4096}[usePlug], check)
		g, err := sim.New("vm", cfg, nil, sim.WithOutput(emit))
		if err != nil {
			t.Fatal(err)
		}
		guest = g
		pr, err = NewPrimary(PrimaryOptions{
			Guest: g, Out: spyBuffer{buf, check}, Dial: sb.dial, ProtectionID: "stalled",
			Core:              pc,
			Encoder:           transport.EncoderConfig{CachePages: 64},
			HeartbeatInterval: 10 * time.Millisecond, HeartbeatTimeout: 80 * time.Millisecond,
			// A mute backup never answers Hello: each link waits this long
			// for its Welcome (the default allows for a standby's start).
			WelcomeTimeout:   200 * time.Millisecond,
			ReconnectBackoff: 2 * time.Millisecond,
			OnCapture: func(ci CaptureInfo) {
				info, err := sim.DecodeDeviceState(ci.DeviceState)
				if err != nil {
					s := err.Error()
					sampleErr.CompareAndSwap(nil, &s)
					return
				}
				check.capture(ci.Epoch, info.OutputSeq)
				sample(ci)
			},
			OnAck: func(uint64) { check.acked() },
		})
		if err != nil {
			t.Fatal(err)
		}
		dials = sb.dials.Load
		finish = sb.wg.Wait
	}
	defer guest.Close()

	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	var runErr error
	go func() {
		runErr = pr.Run(ctx)
		close(runDone)
	}()
	target := int64(stallLinks)
	if kind == stallMute {
		target = stallLinks / 3
	}
	wait := func(links int64) error {
		// A hang guard, not a speed claim: generous for a loaded machine
		// under -race.
		deadline := time.Now().Add(2 * time.Minute)
		for dials() < links {
			select {
			case <-runDone:
				return fmt.Errorf("primary's Run returned early: %v", runErr)
			default:
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("only %d links within 2 min, want %d", dials(), links)
			}
			time.Sleep(2 * time.Millisecond)
		}
		return nil
	}
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapInuse
	}
	err := wait(stallWarmLinks)
	var warm, end uint64
	if err == nil {
		warm = heap()
		err = wait(target)
		end = heap()
	}
	cancel()
	<-runDone
	if err == nil && runErr != nil {
		err = fmt.Errorf("primary's Run: %v", runErr)
	}
	finish()
	name := fmt.Sprintf("seed %d (%s, plug %v, unprotect %v, max_inflight %d)", seed, stallKinds[kind], usePlug, unprotect, pc.MaxInflight)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if s := sampleErr.Load(); s != nil {
		t.Fatalf("%s: primary kept too much for a stalled backup: %s", name, *s)
	}
	if e, m := pr.Held(); e > pc.MaxInflight+1 || m > pc.MaxInflight+1 {
		t.Fatalf("%s: after %d links the primary holds %d epochs, %d dirty maps", name, dials(), e, m)
	}
	if cap(pr.pool) != pc.MaxInflight+1 {
		t.Fatalf("%s: staging pool of %d", name, cap(pr.pool))
	}
	if end > warm+heapBound(pc.MaxInflight) {
		t.Fatalf("%s: heap in use grew from %d to %d bytes over %d links (bound %d)", name, warm, end, dials()-stallWarmLinks, heapBound(pc.MaxInflight))
	}
	if err := check.err(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	guest.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > goroutines && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > goroutines {
		t.Fatalf("%s: %d goroutines before the trial, %d after", name, goroutines, g)
	}
	if verbose {
		released, passed, windows := check.counts()
		t.Logf("%s: %d links, epochs held at most %d, dirty maps %d, heap in use %d → %d KiB (bound +%d KiB), released %d (%d unprotected, %d episodes)",
			name, dials(), maxHeld, maxMaps, warm>>10, end>>10, heapBound(pc.MaxInflight)>>10, released, passed, windows)
	}
	return dials()
}

// stallBackup is the backup side of a stalled backup: it accepts links
// (Welcome with what it acknowledged so far) and reads what they carry.
type stallBackup struct {
	kind       stallKind
	ackFirst   uint64 // epochs it acknowledges on its first link
	heartbeats bool
	acked      atomic.Uint64
	dials      atomic.Int64
	wg         sync.WaitGroup
}

func (s *stallBackup) dial(ctx context.Context) (net.Conn, error) {
	link := s.dials.Add(1)
	a, b := transport.Pipe()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.serve(ctx, b, link)
	}()
	return a, nil
}

func (s *stallBackup) serve(ctx context.Context, conn net.Conn, link int64) {
	defer conn.Close()
	defer context.AfterFunc(ctx, func() { conn.Close() })()
	r := transport.NewReader(conn, transport.DefaultLimits())
	w := transport.NewWriter(conn)
	f, err := r.ReadFrame()
	if err != nil {
		return
	}
	h, ok := f.Header.(*remuspb.Hello)
	if !ok {
		return
	}
	drain := func() {
		for {
			if _, err := r.ReadFrame(); err != nil {
				return
			}
		}
	}
	if s.kind == stallMute && link > 1 {
		drain() // never answers; the primary gives up and closes
		return
	}
	wel := &remuspb.Welcome{ProtocolVersion: ProtocolVersion, CommittedEpoch: s.acked.Load(), ProtectionId: h.ProtectionId}
	if err := w.WriteFrame(transport.KindWelcome, wel, nil); err != nil {
		return
	}
	done := make(chan struct{})
	var hb sync.WaitGroup
	if s.heartbeats {
		hb.Add(1)
		go func() {
			defer hb.Done()
			_ = heartbeatLoop(ctx, done, w, 10*time.Millisecond, "backup", s.acked.Load)
		}()
	}
	defer func() { close(done); conn.Close(); hb.Wait() }()
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return
		}
		if end, ok := f.Header.(*remuspb.EpochEnd); ok && link == 1 && s.acked.Load() < s.ackFirst {
			// Acknowledged without applying: this backup only pretends.
			s.acked.Store(end.Epoch)
			if err := w.WriteFrame(transport.KindAck, &remuspb.Ack{Epoch: end.Epoch}, nil); err != nil {
				return
			}
		}
	}
}
