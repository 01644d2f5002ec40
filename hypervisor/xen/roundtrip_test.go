//go:build xen

package xen

import (
	"context"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/outbuf/plug"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
	"github.com/remusd/remusd/xentest"
)

// rtSnapshot is what the primary held at one capture: the hash of every
// mapped page as the engine copied it, and the dirtier's highest round.
type rtSnapshot struct {
	hashes []uint64
	round  int64
	hash   time.Duration // spent hashing inside the pause (not the backend's)
}

// recorder is the primary Guest as the engine sees it, recording, while
// the guest is paused, what each capture holds: the pages of every
// harvest are hashed after the engine copied them (all pages at the
// first, full, capture), so the replica can be compared with the exact
// state of the epoch it committed.
type recorder struct {
	*Guest
	mapped *dirtymap.Bitmap
	priv   *dirtymap.Bitmap
	hashes []uint64
	first  bool
	rounds []int64

	mu      sync.Mutex
	pending rtSnapshot
	snaps   map[uint64]rtSnapshot
}

func (r *recorder) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error {
	r.priv.Reset()
	if err := r.Guest.HarvestDirty(ctx, r.priv); err != nil {
		return err
	}
	dst.Union(r.priv)
	return nil
}

func (r *recorder) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	out, err := r.Guest.SaveDeviceState(ctx, dst)
	if err != nil {
		return out, err
	}
	t0 := time.Now()
	mem := r.Memory()
	set := r.priv
	if !r.first {
		set = r.mapped
		r.first = true
	}
	set.ForEach(func(p int) bool {
		if r.mapped.Test(p) {
			r.hashes[p] = xxhash.Sum64(mem[p*pageSize : (p+1)*pageSize])
		}
		return true
	})
	dirtierRounds(mem, r.mapped, r.rounds)
	snap := rtSnapshot{hashes: slices.Clone(r.hashes), round: slices.Max(r.rounds), hash: time.Since(t0)}
	r.mu.Lock()
	r.pending = snap
	r.mu.Unlock()
	return out, nil
}

// mapReadOnly maps domain domid's replicated range read-only through
// fresh handles: what Xen's frames hold, not what a mapping of ours
// cached.
func mapReadOnly(domid uint32) (*xc, error) {
	x, err := openXC(domid)
	if err != nil {
		return nil, err
	}
	g, err := x.maxGPFN()
	if err != nil {
		x.close()
		return nil, err
	}
	if _, err := x.mapAll(int(g)+1, false); err != nil {
		x.close()
		return nil, err
	}
	return x, nil
}

var roundLine = regexp.MustCompile(`dirtier: round (\d+)`)

// TestDom0RoundTrip protects a PVH guest running the dirtier into a
// standby domain on the same host through the real engine (Primary and
// Backup over an in-memory link), with a cooperative suspend per epoch;
// then the primary domain is destroyed, the standby activated, and the
// guest must carry on from the committed state: the standby's frames
// equal the primary's pages at the committed epoch (read through a fresh
// mapping), the dirtier's counter resumes from the committed round (no
// reboot, no going back), and it runs on.
func TestDom0RoundTrip(t *testing.T) {
	inDom0(t)
	epochs := uint64(30)
	if v, err := strconv.Atoi(os.Getenv("XEN_RT_EPOCHS")); err == nil && v > 0 {
		epochs = uint64(v)
	}
	roundTripWith(t, rtOptions{name: "rt", coop: true, epochs: epochs})
}

// TestDom0BareActivation is the same round trip with checkpoints taken by
// a bare pause (no cooperative suspend): it reports what the activated
// guest does (XEN_RT_BARE=1; not run by default).
func TestDom0BareActivation(t *testing.T) {
	inDom0(t)
	roundTripWith(t, rtOptions{name: "bare", coop: false, epochs: 10})
}

type rtOptions struct {
	name   string
	coop   bool // Options.Cooperative
	epochs uint64
	net    bool // a vif on a dom0 bridge, a TCP echo client
}

// rtInterval is the round trip's epoch interval.
const rtInterval = 50 * time.Millisecond

// rtResult is what a round trip measured (TestDom0Bench reports it).
type rtResult struct {
	standby    time.Duration // NewStandby: xl create -p and mapping
	acked      uint64
	pauses     []time.Duration // the engine's whole pause of each incremental epoch, the recorder's hashing excluded
	pages      []int
	activation time.Duration // Backup.Activate as the caller waits
	info       ActivationInfo
	progress   time.Duration // Activate began → the first round beyond the committed one in memory
	hundred    time.Duration // → 100 rounds beyond
}

// domainGone returns why g's domain no longer runs ("" if it does).
func domainGone(ctx context.Context, g *Guest) string {
	var why string
	err := g.call(ctx, "info", func() error {
		info, err := g.x.info()
		switch {
		case err != nil:
			why = err.Error()
		case info.dying:
			why = "dying"
		case info.shutdown && info.shutdownReason != shutdownSuspend:
			why = fmt.Sprintf("shut down, reason %d", info.shutdownReason)
		}
		return nil
	})
	if err != nil {
		return ""
	}
	return why
}

func roundTripWith(t *testing.T, o rtOptions) rtResult {
	var res rtResult
	name, coop, epochs := o.name, o.coop, o.epochs
	if v, err := strconv.Atoi(os.Getenv("XEN_RT_EPOCHS")); err == nil && v > 0 {
		epochs = uint64(v)
	}
	ctx := context.Background()
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	standbyName := name + "-standby"
	ramdisk, lines := domURamdisk, ""
	if o.net {
		script, err := xentest.SetupNet(ctx, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ramdisk, lines = domUNetRD, xentest.NetVifLine(script)
	}
	domid, cfgPath := createGuestWith(ctx, t, name, "pvh", guestMiB(), "dirtier.printevery=50", ramdisk, lines)
	if o.net {
		attachVif(t, domid)
	}
	waitConsole(t, name, "dirtier: 8192 pages", 150*time.Second)
	var echo *xentest.EchoClient
	if o.net {
		d, ok := xentest.WaitPing(xentest.NetGuestIP, 60*time.Second)
		if !ok {
			b, _ := readConsole(name)
			t.Fatalf("the guest does not answer ping; console:\n%s", tail(b, 30))
		}
		t.Logf("guest answers ping (%s)", d.Round(time.Millisecond))
		var err error
		if echo, err = xentest.StartEcho(netEcho); err != nil {
			t.Fatal(err)
		}
		defer echo.Stop()
	}

	t0 := time.Now()
	g, err := Open(ctx, domid, Options{Name: name, Logger: log, Cooperative: coop})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	t.Logf("primary: open %s, %d pages (%d mapped)", time.Since(t0).Round(time.Millisecond), g.NumPages(), g.Mapped().Count())

	t0 = time.Now()
	sb, err := NewStandby(ctx, StandbyOptions{
		Name: name, ConfigPath: cfgPath, DomainName: standbyName,
		XL: xentest.BinDir + "/xl", Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := readConsole(standbyName)
			t.Logf("standby's console:\n%s", tail(b, 40))
		}
		_, _ = xlRun(context.Background(), xentest.BinDir+"/xl", "destroy", standbyName)
	})
	defer sb.Close()
	res.standby = time.Since(t0)
	t.Logf("standby: domid %d created and mapped in %s (xl create -p %s), %d pages", sb.DomID(), time.Since(t0).Round(time.Millisecond), sb.created.Round(time.Millisecond), sb.NumPages())
	if o.net {
		attachVif(t, sb.DomID())
	}
	if sb.NumPages() != g.NumPages() {
		t.Fatalf("standby has %d pages, primary %d", sb.NumPages(), g.NumPages())
	}
	// A second standby of the same name is refused, and the first stays.
	if dup, err := NewStandby(ctx, StandbyOptions{Name: name, ConfigPath: cfgPath, DomainName: standbyName, XL: xentest.BinDir + "/xl", Logger: log}); err == nil {
		dup.Close()
		t.Fatal("a second standby with the name of an existing domain was created")
	} else {
		t.Logf("second standby refused: %v", err)
	}
	// Refused states leave the standby untouched.
	if err := sb.CommitDeviceState(1, []byte("RXEN junk")); err == nil {
		t.Fatal("junk state committed")
	}
	if _, err := sb.Activate(ctx); err == nil {
		t.Fatal("activated with nothing committed")
	}

	n := g.NumPages()
	rec := &recorder{Guest: g, mapped: g.Mapped(), priv: dirtymap.New(n), hashes: make([]uint64, n), rounds: make([]int64, n), snaps: map[uint64]rtSnapshot{}}

	// Output commit: on a guest with a vif, the plug qdisc on the
	// primary's vif holds the guest's output until its epoch is acked.
	var out outbuf.Buffer = outbuf.NewMemory(0, func(uint64, []byte) {})
	if o.net {
		pb, err := plug.New(ctx, plug.Config{Interface: fmt.Sprintf("vif%d.0", domid)}, log)
		if err != nil {
			t.Fatalf("plug on the primary's vif: %v", err)
		}
		defer pb.Close()
		out = pb
	}
	var committedDev []byte
	backup := checkpoint.NewBackup(checkpoint.BackupOptions{
		VMName: name, Replica: sb, Owner: "host-a", Backend: BackendName, BackendVersion: sb.BackendVersion(),
		HeartbeatInterval: 100 * time.Millisecond, HeartbeatTimeout: 20 * time.Second, Log: log,
		BeforeActivate: func(epoch uint64, memory, dev []byte) { committedDev = slices.Clone(dev) },
	})
	var serving sync.WaitGroup
	dial := func(ctx context.Context) (net.Conn, error) {
		a, b := transport.Pipe()
		serving.Add(1)
		go func() {
			defer serving.Done()
			r := transport.NewReader(b, transport.DefaultLimits())
			w := transport.NewWriter(b)
			f, err := r.ReadFrame()
			if err != nil {
				b.Close()
				return
			}
			h, ok := f.Header.(*remuspb.Hello)
			if !ok {
				b.Close()
				return
			}
			if err := backup.Serve(ctx, b, r, w, h, "host-a"); err != nil {
				t.Logf("backup link ended: %v", err)
			}
		}()
		return a, nil
	}
	type epochTimes struct {
		pause time.Duration // the engine's whole pause, less the recorder's hashing
		tm    Timings
		pages int
	}
	var (
		mu      sync.Mutex
		acked   uint64
		samples []epochTimes
	)
	primary, err := checkpoint.NewPrimary(checkpoint.PrimaryOptions{
		Guest: rec, Out: out, Dial: dial, ProtectionID: "xen-rt", Host: "host-a",
		Core:              checkpoint.PrimaryConfig{Interval: rtInterval},
		HeartbeatInterval: 100 * time.Millisecond, HeartbeatTimeout: 20 * time.Second, Log: log,
		OnCapture: func(ci checkpoint.CaptureInfo) {
			rec.mu.Lock()
			snap := rec.pending
			rec.snaps[ci.Epoch] = snap
			rec.mu.Unlock()
			tm, _, err := g.LastTimings(ctx)
			if err != nil {
				t.Errorf("timings: %v", err)
			}
			mu.Lock()
			if !ci.Full {
				samples = append(samples, epochTimes{ci.Pause - snap.hash, tm, ci.Pages})
			} else {
				t.Logf("epoch %d (full, %d pages): pause %s", ci.Epoch, ci.Pages, ci.Pause.Round(time.Millisecond))
			}
			mu.Unlock()
		},
		OnAck: func(e uint64) { mu.Lock(); acked = e; mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stopPrimary := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	start := time.Now()
	go func() { runDone <- primary.Run(runCtx) }()
	deadline := time.Now().Add(180 * time.Second)
	lastCheck := time.Now()
	for {
		mu.Lock()
		a := acked
		mu.Unlock()
		if a >= epochs {
			break
		}
		if time.Since(lastCheck) > time.Second {
			lastCheck = time.Now()
			if why := domainGone(ctx, g); why != "" {
				stopPrimary()
				b, _ := readConsole(name)
				t.Fatalf("the primary domain is gone after ack %d (%s); its console:\n%s", a, why, tail(b, 20))
			}
		}
		select {
		case err := <-runDone:
			t.Fatalf("primary stopped after ack %d: %v (stats %+v)", a, err, primary.Stats())
		default:
		}
		if time.Now().After(deadline) {
			stopPrimary()
			t.Fatalf("only epoch %d acked within 180 s (primary %+v, backup %+v)", a, primary.Stats(), backup.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	lastAcked := acked
	mu.Unlock()
	t.Logf("%d epochs acked in %s", lastAcked, time.Since(start).Round(time.Millisecond))
	res.acked = lastAcked

	if o.net {
		ok, _, err := echo.State()
		t.Logf("echo client before the failover: %d exchanges, error %v", ok, err)
		if ok == 0 || err != nil {
			t.Fatalf("the TCP echo did not work under protection: %d exchanges, %v", ok, err)
		}
	}
	// The primary host dies: its domain is destroyed while the engine
	// runs, then the engine stops.
	t0 = time.Now()
	xl(ctx, t, "destroy", name)
	t.Logf("primary domain destroyed (%s)", time.Since(t0).Round(time.Millisecond))
	stopPrimary()
	if err := <-runDone; err != nil {
		t.Logf("primary's Run: %v", err)
	}
	serving.Wait()
	mu.Lock()
	if lastAcked < acked {
		lastAcked = acked
	}
	mu.Unlock()

	committed := backup.Committed()
	if committed < lastAcked {
		t.Fatalf("backup committed epoch %d, below the last ack %d", committed, lastAcked)
	}
	rec.mu.Lock()
	snap, ok := rec.snaps[committed]
	rec.mu.Unlock()
	if !ok {
		t.Fatalf("backup committed epoch %d, which the primary never captured", committed)
	}
	t.Logf("backup committed epoch %d (last ack seen %d), dirtier round %d at its capture", committed, lastAcked, snap.round)

	// The standby's frames, read through a fresh mapping, are the
	// primary's pages at the committed epoch.
	ro, err := mapReadOnly(sb.DomID())
	if err != nil {
		t.Fatal(err)
	}
	mem := ro.memory()
	var bad []int
	rec.mapped.ForEach(func(p int) bool {
		if p*pageSize >= len(mem) || xxhash.Sum64(mem[p*pageSize:(p+1)*pageSize]) != snap.hashes[p] {
			bad = append(bad, p)
		}
		return true
	})
	sbMapped := dirtymap.New(n)
	sbMapped.OrWords(ro.mapped)
	sbRounds := make([]int64, n)
	dirtierRounds(mem, sbMapped, sbRounds)
	sbRound := slices.Max(sbRounds)
	ro.close()
	if len(bad) > 0 {
		t.Fatalf("%d of %d pages of the standby differ from the primary's committed epoch, first %#x", len(bad), rec.mapped.Count(), bad[:min(len(bad), 8)])
	}
	if sbRound != snap.round {
		t.Fatalf("standby's dirtier is at round %d, the committed epoch at %d", sbRound, snap.round)
	}
	t.Logf("standby frames equal the committed epoch: %d pages, dirtier round %d", rec.mapped.Count(), sbRound)

	// Failover.
	t0 = time.Now()
	ag, err := backup.Activate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	act := time.Since(t0)
	g2 := ag.(*Guest)
	defer g2.Close()
	st, err := ParseState(committedDev)
	if err != nil {
		t.Fatal(err)
	}
	if st.Suspended != coop {
		t.Fatalf("the committed state's suspended flag is %v for cooperative=%v", st.Suspended, coop)
	}
	ai := sb.LastActivation()
	res.activation, res.info = act, ai
	t.Logf("activated epoch %d in %s (setcontext %s, unpause %s, standby's own %s)", ai.Epoch, act.Round(time.Microsecond),
		ai.Context.Round(time.Microsecond), ai.Unpause.Round(time.Microsecond), ai.Total.Round(time.Microsecond))
	if ai.Epoch != committed {
		t.Fatalf("activated epoch %d, committed %d", ai.Epoch, committed)
	}
	if err := g2.HarvestDirty(ctx, dirtymap.New(n)); err == nil {
		t.Fatal("an activated standby harvested without dirty tracking")
	}

	// The guest carries on from the committed round: its memory shows
	// later rounds, and its console prints them, without a reboot.
	amem := g2.Memory()
	if !coop {
		// Observe what a bare-pause activation does.
		time.Sleep(20 * time.Second)
		dirtierRounds(amem, sbMapped, sbRounds)
		b, _ := readConsole(standbyName)
		out, _ := xlRun(ctx, xentest.BinDir+"/xl", "list")
		t.Logf("BARE-PAUSE ACTIVATION, 20 s later: dirtier at round %d (committed %d); xl list:\n%s\nstandby console:\n%s", slices.Max(sbRounds), snap.round, out, tail(b, 30))
		return res
	}
	deadline = time.Now().Add(90 * time.Second)
	var firstSeen, progress time.Duration
	for {
		dirtierRounds(amem, sbMapped, sbRounds)
		r := slices.Max(sbRounds)
		if r > snap.round && progress == 0 {
			progress = time.Since(t0)
		}
		if r > snap.round+100 {
			if firstSeen == 0 {
				firstSeen = time.Since(t0)
			}
			b, _ := readConsole(standbyName)
			if m := roundLine.FindAllStringSubmatch(b, -1); len(m) > 0 {
				first, _ := strconv.ParseInt(m[0][1], 10, 64)
				last, _ := strconv.ParseInt(m[len(m)-1][1], 10, 64)
				if first < snap.round || first > snap.round+50 {
					t.Fatalf("the standby's first printed round is %d, the committed state was at %d", first, snap.round)
				}
				if strings.Contains(b, "pages of") || strings.Contains(b, "Linux version") {
					t.Fatalf("the standby rebooted; console:\n%s", tail(b, 30))
				}
				res.progress, res.hundred = progress, firstSeen
				t.Logf("activated guest runs on: first new round in memory %s after Activate began, round %d after %s; console rounds %d..%d (committed %d)",
					progress.Round(time.Millisecond), r, firstSeen.Round(time.Millisecond), first, last, snap.round)
				t.Logf("standby console (tail):\n%s", tail(b, 12))
				break
			}
		}
		if time.Now().After(deadline) {
			b, _ := readConsole(standbyName)
			info, _ := xlRun(ctx, xentest.BinDir+"/xl", "list")
			t.Fatalf("the activated guest did not carry on from round %d within 90 s (memory at round %d); xl list:\n%s\nconsole:\n%s", snap.round, slices.Max(sbRounds), info, tail(b, 30))
		}
		if progress == 0 {
			time.Sleep(5 * time.Millisecond)
		} else {
			time.Sleep(100 * time.Millisecond)
		}
	}

	if o.net {
		checkNetAfterFailover(t, echo, t0, standbyName)
	}

	// Per-epoch figures of the cooperative epoch path.
	mu.Lock()
	defer mu.Unlock()
	if len(samples) == 0 {
		t.Fatal("no incremental epoch measured")
	}
	m := func(f func(epochTimes) time.Duration) string {
		v := make([]time.Duration, len(samples))
		for i, s := range samples {
			v[i] = f(s)
		}
		slices.Sort(v)
		return fmt.Sprintf("%s/%s/%s", us(v[len(v)/2]), us(v[len(v)*9/10]), us(v[len(v)-1]))
	}
	pages := make([]int, len(samples))
	for i, s := range samples {
		pages[i] = s.pages
		res.pauses = append(res.pauses, s.pause)
	}
	res.pages = slices.Clone(pages)
	slices.Sort(pages)
	t.Logf("cooperative epochs through the engine (%d, median/p90/max): whole pause %s; suspend %s; pause %s; harvest %s; context %s; resume(fast) %s; unpause %s; pages %d/%d/%d",
		len(samples), m(func(s epochTimes) time.Duration { return s.pause }), m(func(s epochTimes) time.Duration { return s.tm.Suspend }),
		m(func(s epochTimes) time.Duration { return s.tm.Pause }), m(func(s epochTimes) time.Duration { return s.tm.Harvest }),
		m(func(s epochTimes) time.Duration { return s.tm.Context }), m(func(s epochTimes) time.Duration { return s.tm.ResumeFast }),
		m(func(s epochTimes) time.Duration { return s.tm.Unpause }), pages[len(pages)/2], pages[len(pages)*9/10], pages[len(pages)-1])
	return res
}
