package sim

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
)

var allWorkloads = []string{"uniform", "hotset", "sequential", "sparse", "idle"}

func testConfig(wl string) Config {
	return Config{MemoryBytes: 1 << 20, Workload: wl, Rate: 200000, Seed: 42, OutputEvery: 16}
}

func newGuest(t *testing.T, cfg Config, opts ...Option) *Guest {
	t.Helper()
	g, err := New("vm-"+cfg.Workload, cfg, nil, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// waitOps waits (with a generous deadline) until the guest has executed more
// than n ops.
func waitOps(t *testing.T, g *Guest, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for g.Ops() <= n {
		if time.Now().After(deadline) {
			t.Fatalf("guest made no progress beyond %d ops", n)
		}
		time.Sleep(200 * time.Microsecond)
	}
}

func pause(t *testing.T, g *Guest) {
	t.Helper()
	if err := g.Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func resume(t *testing.T, g *Guest) {
	t.Helper()
	if err := g.Resume(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func state(t *testing.T, g *Guest) []byte {
	t.Helper()
	s, err := g.SaveDeviceState(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// pagesDiffering returns the pages where a and b differ.
func pagesDiffering(a, b []byte) []int {
	var d []int
	for p := 0; p*pageSize < len(a); p++ {
		if !bytes.Equal(a[p*pageSize:(p+1)*pageSize], b[p*pageSize:(p+1)*pageSize]) {
			d = append(d, p)
		}
	}
	return d
}

func TestDirtyTracking(t *testing.T) {
	for _, wl := range allWorkloads {
		t.Run(wl, func(t *testing.T) {
			cfg := testConfig(wl)
			g := newGuest(t, cfg)
			pause(t, g)
			bm := dirtymap.New(g.NumPages())
			if err := g.HarvestDirty(context.Background(), bm); err != nil {
				t.Fatal(err)
			}
			if bm.Count() != g.NumPages() {
				t.Fatalf("first harvest has %d pages, want all %d", bm.Count(), g.NumPages())
			}
			// shadow replays the same ops incrementally: its dirty map is
			// exactly the set of pages the live guest wrote.
			shadow := newMachine(cfg.WithDefaults())
			for shadow.ops < g.Ops() {
				shadow.step(nil)
			}
			prev := bytes.Clone(g.Memory())
			for cycle := 0; cycle < 30; cycle++ {
				resume(t, g)
				if wl != "idle" {
					waitOps(t, g, g.Ops())
				} else {
					time.Sleep(time.Millisecond)
				}
				pause(t, g)
				bm.Reset()
				if err := g.HarvestDirty(context.Background(), bm); err != nil {
					t.Fatal(err)
				}
				cur := g.Memory()
				for _, p := range pagesDiffering(prev, cur) {
					if !bm.Test(p) {
						t.Fatalf("cycle %d: page %d changed but is not in the harvested bitmap", cycle, p)
					}
				}
				shadow.dirty.Reset()
				for shadow.ops < g.Ops() {
					shadow.step(nil)
				}
				if !shadow.dirty.Equal(bm) {
					t.Fatalf("cycle %d: harvested %d pages, replay wrote %d", cycle, bm.Count(), shadow.dirty.Count())
				}
				if wl == "idle" && bm.Any() {
					t.Fatal("idle guest dirtied pages")
				}
				prev = bytes.Clone(cur)
			}
		})
	}
}

func TestPauseStops(t *testing.T) {
	g := newGuest(t, testConfig("uniform"))
	waitOps(t, g, 0)
	pause(t, g)
	pause(t, g) // no-op
	if !g.Paused() {
		t.Fatal("Paused() = false after Pause")
	}
	ops := g.Ops()
	snap := bytes.Clone(g.Memory())
	time.Sleep(5 * time.Millisecond)
	if g.Ops() != ops || !bytes.Equal(snap, g.Memory()) {
		t.Fatal("guest changed while paused")
	}
	resume(t, g)
	resume(t, g) // no-op
	waitOps(t, g, ops)
	if err := g.HarvestDirty(context.Background(), dirtymap.New(g.NumPages())); !errors.Is(err, ErrNotPaused) {
		t.Fatalf("HarvestDirty while running: %v, want ErrNotPaused", err)
	}
	if _, err := g.SaveDeviceState(context.Background(), nil); !errors.Is(err, ErrNotPaused) {
		t.Fatalf("SaveDeviceState while running: %v, want ErrNotPaused", err)
	}
}

func TestPauseContext(t *testing.T) {
	g := newGuest(t, testConfig("uniform"))
	pause(t, g)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := g.Resume(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Resume with cancelled ctx: %v", err)
	}
	if err := g.HarvestDirty(ctx, dirtymap.New(g.NumPages())); !errors.Is(err, context.Canceled) {
		t.Fatalf("HarvestDirty with cancelled ctx: %v", err)
	}
}

func TestDeterminism(t *testing.T) {
	for _, wl := range allWorkloads {
		t.Run(wl, func(t *testing.T) {
			cfg := testConfig(wl)
			g := newGuest(t, cfg)
			for range 3 {
				if wl != "idle" {
					waitOps(t, g, g.Ops()+50)
				}
				pause(t, g)
				mem, dev, err := Replay(cfg, g.Ops())
				if err != nil {
					t.Fatal(err)
				}
				if d := pagesDiffering(mem, g.Memory()); len(d) != 0 {
					t.Fatalf("replay of %d ops differs in %d pages (first %d)", g.Ops(), len(d), d[0])
				}
				if !bytes.Equal(dev, state(t, g)) {
					t.Fatalf("replay device state differs after %d ops", g.Ops())
				}
				resume(t, g)
			}
		})
	}
}

func TestDeviceStateChanges(t *testing.T) {
	cfg := testConfig("sparse")
	_, a, err := Replay(cfg, 10)
	if err != nil {
		t.Fatal(err)
	}
	_, b, _ := Replay(cfg, 11)
	if bytes.Equal(a[fillerOffset:], b[fillerOffset:]) {
		t.Fatal("device state filler did not change with ops")
	}
	info, err := DecodeDeviceState(b)
	if err != nil {
		t.Fatal(err)
	}
	if info.Ops != 11 || info.OutputSeq != 0 || info.Workload != "sparse" || info.Seed != 42 {
		t.Fatalf("decoded %+v", info)
	}
	_, c, _ := Replay(cfg, 32)
	if info, _ := DecodeDeviceState(c); info.OutputSeq != 2 {
		t.Fatalf("OutputSeq after 32 ops every 16 = %d, want 2", info.OutputSeq)
	}
}

func TestDecodeDeviceStateErrors(t *testing.T) {
	_, good, err := Replay(testConfig("uniform"), 5)
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := map[string][]byte{
		"length":   good[:100],
		"magic":    mut(func(b []byte) []byte { b[0] = 'X'; return b }),
		"version":  mut(func(b []byte) []byte { b[8] = 9; return b }),
		"checksum": mut(func(b []byte) []byte { b[2000] ^= 1; return b }),
	}
	for name, b := range cases {
		_, err := DecodeDeviceState(b)
		if !errors.Is(err, ErrBadDeviceState) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: got %v", name, err)
		}
	}
}

func TestRestore(t *testing.T) {
	for _, wl := range []string{"uniform", "sequential", "hotset", "sparse"} {
		t.Run(wl, func(t *testing.T) {
			cfg := testConfig(wl)
			g := newGuest(t, cfg)
			waitOps(t, g, 100)
			pause(t, g)
			mem, dev := bytes.Clone(g.Memory()), state(t, g)
			ops, seq := g.Ops(), g.OutputSeq()
			g.Close()

			r, err := restore("restored", cfg, mem, dev, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Ops() != ops || r.OutputSeq() != seq {
				t.Fatalf("restored ops/seq = %d/%d, want %d/%d", r.Ops(), r.OutputSeq(), ops, seq)
			}
			var mu sync.Mutex
			var seqs []uint64
			r.SetOutput(func(s uint64, _ []byte) { mu.Lock(); seqs = append(seqs, s); mu.Unlock() })
			resume(t, r)
			waitOps(t, r, ops+uint64(cfg.OutputEvery)*3)
			pause(t, r)
			wantMem, wantDev, err := Replay(cfg, r.Ops())
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(wantMem, r.Memory()) || !bytes.Equal(wantDev, state(t, r)) {
				t.Fatalf("restored guest diverged from replay after %d ops", r.Ops())
			}
			mu.Lock()
			defer mu.Unlock()
			if len(seqs) == 0 || seqs[0] != seq+1 || seqs[len(seqs)-1] != r.OutputSeq() ||
				uint64(len(seqs)) != r.OutputSeq()-seq {
				t.Fatalf("output after restore %v, want %d..%d", seqs, seq+1, r.OutputSeq())
			}
		})
	}
}

func TestRestoreErrors(t *testing.T) {
	cfg := testConfig("uniform")
	mem, dev, err := Replay(cfg, 3)
	if err != nil {
		t.Fatal(err)
	}
	other := cfg
	other.Seed = 7
	if _, err := Restore("x", other, mem, dev, nil); !errors.Is(err, ErrBadDeviceState) || !strings.Contains(err.Error(), "seed") {
		t.Fatalf("seed mismatch: %v", err)
	}
	if _, err := Restore("x", cfg, mem[:4096], dev, nil); err == nil || !strings.Contains(err.Error(), "memory") {
		t.Fatalf("short memory: %v", err)
	}
	if _, err := Restore("x", cfg, mem, dev[:10], nil); !errors.Is(err, ErrBadDeviceState) {
		t.Fatalf("short state: %v", err)
	}
}

func TestOutput(t *testing.T) {
	cfg := testConfig("uniform")
	var mu sync.Mutex
	var last uint64
	var count int
	var bad error
	g := newGuest(t, cfg, WithOutput(func(seq uint64, msg []byte) {
		mu.Lock()
		defer mu.Unlock()
		if seq <= last || len(msg) != 16 || binary.LittleEndian.Uint64(msg) != seq {
			bad = errors.New("bad output message")
		}
		last = seq
		count++
	}))
	waitOps(t, g, uint64(cfg.OutputEvery)*20)
	pause(t, g)
	mu.Lock()
	defer mu.Unlock()
	if bad != nil {
		t.Fatal(bad)
	}
	if count == 0 || last != g.OutputSeq() {
		t.Fatalf("last seq %d (%d messages), OutputSeq %d", last, count, g.OutputSeq())
	}
	mem := g.Memory()
	if got := binary.LittleEndian.Uint64(mem); got != g.OutputSeq() {
		t.Fatalf("seq in memory %d, OutputSeq %d", got, g.OutputSeq())
	}
	if g.OutputSeq() != g.Ops()/uint64(cfg.OutputEvery) {
		t.Fatalf("OutputSeq %d after %d ops every %d", g.OutputSeq(), g.Ops(), cfg.OutputEvery)
	}
}

func TestConfig(t *testing.T) {
	d := Config{}.WithDefaults()
	if d != (Config{MemoryBytes: 64 << 20, Workload: "uniform", Rate: 20000, Seed: 1, OutputEvery: 64}) {
		t.Fatalf("defaults %+v", d)
	}
	if d.WithDefaults() != d {
		t.Fatal("WithDefaults not idempotent")
	}
	for _, tc := range []struct {
		cfg   Config
		field string
	}{
		{Config{Workload: "foo"}, `workload "foo" unknown (want uniform|hotset|sequential|sparse|idle)`},
		{Config{MemoryBytes: 1000}, "memory_bytes"},
		{Config{MemoryBytes: -4096}, "memory_bytes"},
		{Config{OutputEvery: 1 << 40}, "output_every"},
	} {
		err := tc.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: error %v does not name %q", tc.cfg, err, tc.field)
		}
		if _, err := New("x", tc.cfg, nil); err == nil {
			t.Errorf("New accepted %+v", tc.cfg)
		}
	}
	c := Config{MemoryBytes: 8192, Workload: "sparse", Rate: Disabled, Seed: 9, OutputEvery: Disabled}
	got, err := ParseConfig(c.Marshal())
	if err != nil || got != c {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := ParseConfig([]byte(`{"memory_bytes":4096,"bogus":1}`)); err == nil {
		t.Fatal("unknown field accepted")
	}
	if _, err := ParseConfig([]byte(`{"workload":"foo"}`)); err == nil || !strings.Contains(err.Error(), "workload") {
		t.Fatalf("bad workload parsed: %v", err)
	}
}

func TestDisabledRate(t *testing.T) {
	cfg := testConfig("uniform")
	cfg.Rate = Disabled
	g := newGuest(t, cfg)
	time.Sleep(3 * time.Millisecond)
	if g.Ops() != 0 {
		t.Fatalf("guest with Rate Disabled ran %d ops", g.Ops())
	}
}

func TestReplica(t *testing.T) {
	cfg := testConfig("uniform")
	g := newGuest(t, cfg)
	pc, err := ParseConfig(g.Config())
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewReplica("vm", pc, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.NumPages() != g.NumPages() {
		t.Fatalf("replica pages %d, guest %d", r.NumPages(), g.NumPages())
	}
	if _, err := r.Activate(context.Background()); err == nil || !strings.Contains(err.Error(), "no device state") {
		t.Fatalf("Activate without state: %v", err)
	}
	if err := r.CommitDeviceState(1, []byte("junk")); !errors.Is(err, ErrBadDeviceState) {
		t.Fatalf("commit junk: %v", err)
	}
	bm := dirtymap.New(g.NumPages())
	var ops, seq uint64
	for epoch := uint64(1); epoch <= 5; epoch++ {
		waitOps(t, g, g.Ops())
		pause(t, g)
		bm.Reset()
		if err := g.HarvestDirty(context.Background(), bm); err != nil {
			t.Fatal(err)
		}
		bm.ForEach(func(p int) bool {
			copy(r.Memory()[p*pageSize:(p+1)*pageSize], g.Memory()[p*pageSize:])
			return true
		})
		if err := r.CommitDeviceState(epoch, state(t, g)); err != nil {
			t.Fatal(err)
		}
		ops, seq = g.Ops(), g.OutputSeq()
		resume(t, g)
	}
	g.Close()
	if e, s := r.DeviceState(); e != 5 || len(s) != DeviceStateSize {
		t.Fatalf("DeviceState epoch %d len %d", e, len(s))
	}
	hg, err := r.Activate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ng := hg.(*Guest)
	defer ng.Close()
	// The activated guest is already running, so it may be past the
	// checkpoint; the replay comparison below proves it continued exactly.
	if ng.Ops() < ops || ng.OutputSeq() < seq {
		t.Fatalf("activated at ops/seq %d/%d, before checkpoint %d/%d", ng.Ops(), ng.OutputSeq(), ops, seq)
	}
	waitOps(t, ng, ops)
	pause(t, ng)
	wantMem, wantDev, err := Replay(cfg, ng.Ops())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(wantMem, ng.Memory()) || !bytes.Equal(wantDev, state(t, ng)) {
		t.Fatal("activated guest diverged from replay")
	}
	if _, err := r.Activate(context.Background()); err == nil {
		t.Fatal("second Activate succeeded")
	}
}

func TestCloseNoLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	for i := 0; i < 20; i++ {
		g, err := New("leak", testConfig(allWorkloads[i%len(allWorkloads)]), nil)
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			pause(t, g) // close while paused too
		}
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		if err := g.Close(); err != nil {
			t.Fatal("second Close:", err)
		}
		if err := g.Pause(context.Background()); !errors.Is(err, ErrClosed) {
			t.Fatalf("Pause after Close: %v", err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines leaked: %d > %d\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(time.Millisecond)
	}
}

func TestInitialMemory(t *testing.T) {
	cfg := Config{MemoryBytes: 1 << 20, Seed: 3}
	mem, _, err := Replay(cfg, 0)
	if err != nil {
		t.Fatal(err)
	}
	pages := len(mem) / pageSize
	zero, seen, dup := 0, map[string]bool{}, 0
	for p := 0; p < pages; p++ {
		pg := string(mem[p*pageSize : (p+1)*pageSize])
		if strings.Count(pg, "\x00") == pageSize {
			zero++
			continue
		}
		if seen[pg] {
			dup++
		}
		seen[pg] = true
	}
	if zero < pages/2 || dup < pages/32 {
		t.Fatalf("%d pages: %d zero, %d duplicates", pages, zero, dup)
	}
	mem2, _, _ := Replay(cfg, 0)
	if !bytes.Equal(mem, mem2) {
		t.Fatal("initial memory not deterministic")
	}
}

func BenchmarkReplay(b *testing.B) {
	for _, wl := range []string{"uniform", "sequential"} {
		b.Run(wl, func(b *testing.B) {
			m := newMachine(testConfig(wl).WithDefaults())
			b.ResetTimer()
			for range b.N {
				m.step(nil)
			}
		})
	}
}

// BenchmarkPauseResume measures a pause/resume cycle of a running guest.
func BenchmarkPauseResume(b *testing.B) {
	for _, wl := range []string{"uniform", "sequential"} {
		b.Run(wl, func(b *testing.B) {
			cfg := testConfig(wl)
			cfg.MemoryBytes = 4 << 20
			g, err := New("bench", cfg, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			ctx := context.Background()
			b.ResetTimer()
			for range b.N {
				if err := g.Pause(ctx); err != nil {
					b.Fatal(err)
				}
				if err := g.Resume(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
