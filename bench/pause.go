package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// PauseConfig configures MeasurePause.
type PauseConfig struct {
	// MemoryBytes is the sim guest's RAM (default 256 MiB).
	MemoryBytes int64
	// Fractions are the dirty-set sizes to measure, as fractions of the
	// guest's pages (default 1%, 5%, 25%).
	Fractions []float64
	// Layout of the chosen dirty set: "scattered" (distinct pages drawn
	// uniformly, the default) or "runs" (runs of RunPages consecutive
	// pages at random places).
	Layout   string
	RunPages int // default 16
	// Workload and Rate of the sim guest running underneath (default
	// sparse at 1000 ops/s: a live guest whose own writes add only a few
	// pages to each epoch's chosen set).
	Workload string
	Rate     int
	// Samples per dirty-set size (default 30); the first Skip (default 3)
	// captures after switching sets are discarded.
	Samples, Skip int
	// Interval between checkpoints (default 25 ms).
	Interval time.Duration
	// Seed for the dirty-set layout (default 1).
	Seed uint64
	Log  *zap.Logger
}

func (c PauseConfig) withDefaults() PauseConfig {
	if c.MemoryBytes == 0 {
		c.MemoryBytes = 256 << 20
	}
	if len(c.Fractions) == 0 {
		c.Fractions = []float64{0.01, 0.05, 0.25}
	}
	if c.Layout == "" {
		c.Layout = "scattered"
	}
	if c.RunPages <= 0 {
		c.RunPages = 16
	}
	if c.Workload == "" {
		c.Workload = "sparse"
	}
	if c.Rate == 0 {
		c.Rate = 1000
	}
	if c.Samples <= 0 {
		c.Samples = 30
	}
	if c.Skip <= 0 {
		c.Skip = 3
	}
	if c.Interval <= 0 {
		c.Interval = 25 * time.Millisecond
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	return c
}

// PauseSet is the pause measured for one dirty-set size.
type PauseSet struct {
	Fraction float64
	// ChosenPages is the size of the chosen dirty set; CapturePagesP50 the
	// median page count of the measured captures (chosen set plus the few
	// pages the live workload dirtied).
	ChosenPages, CapturePagesP50 int
	Samples                      int
	PauseP50, PauseP99           time.Duration
	// MemcpyP50 is the bound: copy() of the same runs of the same number
	// of pages from a warm source into a warm preallocated destination,
	// timed on the engine goroutine right after each capture.
	MemcpyP50 time.Duration
	// Ratio is PauseP50 / MemcpyP50.
	Ratio float64
	// MemcpyGBps is the bound's copy rate.
	MemcpyGBps float64
}

// PauseResult is what MeasurePause returns.
type PauseResult struct {
	MemoryBytes int64
	Layout      string
	Sets        []PauseSet
	// Setup is the time spent allocating and first-touching guest,
	// replica, staging and bound buffers plus the initial full sync: it is
	// excluded from every timing above.
	Setup time.Duration
	// Included lists what the pause contains besides the copy.
	Included string
}

// PauseIncluded says what a capture's pause contains besides the copy.
const PauseIncluded = "pause = sim Pause (waits for the workload's current batch) + HarvestDirty (bitmap union+reset) + AppendSet of pfns + copy of dirty runs to staging + SaveDeviceState (4 KiB blob, CRC) + outbuf.Checkpoint + Resume"

// pausePhase collects the samples of one dirty-set size. It is driven from
// OnCapture, on the engine goroutine.
type pausePhase struct {
	set    *dirtymap.Bitmap
	chosen int
	skip   int
	want   int
	dst    []byte
	pause  []time.Duration
	pages  []int
	memcpy []time.Duration
	done   chan struct{}
}

// MeasurePause drives a checkpoint.Primary end to end over transport.Pipe
// with a checkpoint.Backup and, for each dirty-set size, reports the
// capture pause (from OnCapture) beside a memcpy of the same pages.
func MeasurePause(ctx context.Context, cfg PauseConfig) (PauseResult, error) {
	cfg = cfg.withDefaults()
	res := PauseResult{MemoryBytes: cfg.MemoryBytes, Layout: cfg.Layout, Included: PauseIncluded}
	setupStart := time.Now()
	var (
		mu    sync.Mutex
		phase *pausePhase
		src   []byte
	)
	onCapture := func(ci checkpoint.CaptureInfo) {
		mu.Lock()
		defer mu.Unlock()
		ph := phase
		if ph == nil || ci.Full {
			return
		}
		if ph.skip > 0 {
			ph.skip--
			return
		}
		ph.pause = append(ph.pause, ci.Pause)
		ph.pages = append(ph.pages, ci.Pages)
		// The bound, same goroutine, right after the capture.
		t0 := time.Now()
		off := 0
		ph.set.Runs(func(first, n int) bool {
			b := first * pageSize
			off += copy(ph.dst[off:], src[b:b+n*pageSize])
			return true
		})
		ph.memcpy = append(ph.memcpy, time.Since(t0))
		if len(ph.pause) == ph.want {
			close(ph.done)
			phase = nil
		}
	}
	p, err := newPair(pairConfig{
		sim:       sim.Config{MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate, Seed: cfg.Seed, OutputEvery: 64},
		core:      checkpoint.PrimaryConfig{Interval: cfg.Interval, MaxInflight: 1, AckTimeout: time.Minute},
		enc:       transport.DefaultEncoderConfig(),
		log:       cfg.Log,
		onCapture: onCapture,
	})
	if err != nil {
		return res, err
	}
	defer p.close()
	n := p.guest.NumPages()
	// The bound's source: a warm copy of guest-like memory.
	src = make([]byte, cfg.MemoryBytes)
	pretouch(src)
	p.start()
	// Initial full sync (every page), then one ordinary epoch.
	if err := p.waitAcked(ctx, 2, 5*time.Minute); err != nil {
		return res, err
	}
	res.Setup = time.Since(setupStart)
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x9a05e))
	for _, f := range cfg.Fractions {
		if f <= 0 || f > 1 {
			return res, fmt.Errorf("bench: dirty fraction %v out of (0, 1]", f)
		}
		set := chooseSet(rng, n, f, cfg.Layout, cfg.RunPages)
		k := set.Count()
		ph := &pausePhase{set: set, chosen: k, skip: cfg.Skip, want: cfg.Samples, dst: make([]byte, k*pageSize), done: make(chan struct{})}
		pretouch(ph.dst)
		p.guest.extra.Store(set)
		mu.Lock()
		phase = ph
		mu.Unlock()
		timeout := time.Duration(cfg.Samples+cfg.Skip)*time.Second + time.Minute
		select {
		case <-ph.done:
		case <-ctx.Done():
			return res, ctx.Err()
		case <-p.runDone:
			return res, fmt.Errorf("bench: primary stopped: %v", p.runErr)
		case <-time.After(timeout):
			return res, fmt.Errorf("bench: %d pause samples at %.0f%% not collected within %v (primary %+v)", cfg.Samples, 100*f, timeout, p.primary.Stats())
		}
		s := PauseSet{
			Fraction: f, ChosenPages: k, CapturePagesP50: medianInt(ph.pages), Samples: len(ph.pause),
			PauseP50: quantile(ph.pause, 0.5), PauseP99: quantile(ph.pause, 0.99), MemcpyP50: quantile(ph.memcpy, 0.5),
		}
		if s.MemcpyP50 > 0 {
			s.Ratio = float64(s.PauseP50) / float64(s.MemcpyP50)
			s.MemcpyGBps = float64(k*pageSize) / s.MemcpyP50.Seconds() / 1e9
		}
		res.Sets = append(res.Sets, s)
	}
	p.guest.extra.Store(nil)
	if err := p.stop(); err != nil {
		return res, err
	}
	if len(res.Sets) == 0 {
		return res, errors.New("bench: no dirty-set size measured")
	}
	return res, nil
}

// chooseSet returns a dirty set of about frac*n pages.
func chooseSet(rng *rand.Rand, n int, frac float64, layout string, run int) *dirtymap.Bitmap {
	m := dirtymap.New(n)
	k := max(1, int(frac*float64(n)+0.5))
	switch layout {
	case "runs":
		run = min(run, n)
		for m.Count() < k {
			m.SetRange(rng.IntN(n-run+1), min(run, k-m.Count()))
		}
	default:
		for _, i := range rng.Perm(n)[:k] {
			m.Set(i)
		}
	}
	return m
}
