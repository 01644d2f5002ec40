package bench

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// SweepPoint is one configuration of a sweep.
type SweepPoint struct {
	Backend  string        `json:"backend"`
	Interval time.Duration `json:"-"`
	Workload string        `json:"workload"`
	// Rate is the guest's page writes per second (sim.Disabled: idle).
	Rate        int   `json:"rate"`
	MemoryBytes int64 `json:"memory_bytes"`
	// Duration measured (after the initial sync and a short warm-up).
	Duration time.Duration `json:"-"`
	// Axis names the sweep the point belongs to ("interval×workload",
	// "dirty rate", "guest size").
	Axis string `json:"axis"`
}

// SweepResult is the figures of one point.
type SweepResult struct {
	SweepPoint
	IntervalMs float64 `json:"interval_ms"`
	Seconds    float64 `json:"seconds"`
	Epochs     int     `json:"epochs"`
	PauseMsP50 float64 `json:"pause_ms_p50"`
	PauseMsP99 float64 `json:"pause_ms_p99"`
	PauseMsMax float64 `json:"pause_ms_max"`
	// EpochMsP50 is the achieved epoch length (capture to capture);
	// EpochOverConfigured = EpochMsP50 / IntervalMs.
	EpochMsP50          float64 `json:"epoch_ms_p50"`
	EpochOverConfigured float64 `json:"epoch_over_configured"`
	DirtyPagesP50       float64 `json:"dirty_pages_per_epoch_p50"`
	DirtyPagesMean      float64 `json:"dirty_pages_per_epoch_mean"`
	// Pipeline: acknowledged pages per second, raw MB/s (1e6 B) of those
	// pages, and wire MB/s: every byte the primary wrote on the link
	// (frame and protobuf headers, heartbeats included). CompressionRatio
	// = raw page and device-state bytes ÷ the epoch records' wire bytes,
	// headers included.
	PagesPerSec      float64 `json:"pages_per_s"`
	MBPerSec         float64 `json:"mb_per_s"`
	WireMBPerSec     float64 `json:"wire_mb_per_s"`
	CompressionRatio float64 `json:"compression_ratio"`
	AckMsP50         float64 `json:"ack_ms_p50"`
	AckMsP99         float64 `json:"ack_ms_p99"`
	// CPUPairPct is the process CPU (user+sys, all threads) over the
	// window ÷ wall time, in % of one core: guest workload + primary +
	// backup together (they share one process; per-goroutine CPU is not
	// measurable). CPUGuestPct is the same guest run alone, unprotected,
	// for the same time; CPUProtectionPct = pair − guest (both sides).
	CPUPairPct       float64 `json:"cpu_pair_pct"`
	CPUGuestPct      float64 `json:"cpu_guest_alone_pct"`
	CPUProtectionPct float64 `json:"cpu_protection_pct"`
	Verified         bool    `json:"replica_verified"`
}

// Backend measures sweep points on one hypervisor backend. The sim
// backend is SimBackend; a QEMU backend plugs in here.
type Backend interface {
	Name() string
	Measure(ctx context.Context, pt SweepPoint) (SweepResult, error)
}

// SimBackend runs each point with a sim guest, a Primary and a Backup over
// loopback TCP in this process.
type SimBackend struct {
	Log *zap.Logger
	// Verify the replica byte for byte after each point whose guest is at
	// most VerifyMaxBytes (default 64 MiB).
	Verify         bool
	VerifyMaxBytes int64
	// Warmup after the initial sync (default 200 ms).
	Warmup time.Duration
}

// Name implements Backend.
func (b SimBackend) Name() string { return "sim" }

// Measure implements Backend.
func (b SimBackend) Measure(ctx context.Context, pt SweepPoint) (SweepResult, error) {
	res := SweepResult{SweepPoint: pt, IntervalMs: msf(pt.Interval)}
	if pt.Duration <= 0 {
		pt.Duration = 2 * time.Second
	}
	if b.Warmup <= 0 {
		b.Warmup = 200 * time.Millisecond
	}
	if b.VerifyMaxBytes <= 0 {
		b.VerifyMaxBytes = 64 << 20
	}
	scfg := sim.Config{MemoryBytes: pt.MemoryBytes, Workload: pt.Workload, Rate: pt.Rate, Seed: 1, OutputEvery: 64}
	// The guest alone, unprotected, for the CPU baseline.
	{
		g, err := sim.New("baseline", scfg, b.Log)
		if err != nil {
			return res, err
		}
		c0, t0 := processCPU(), time.Now()
		err = sleep(ctx, min(pt.Duration, time.Second))
		res.CPUGuestPct = 100 * (processCPU() - c0).Seconds() / time.Since(t0).Seconds()
		g.Close()
		if err != nil {
			return res, err
		}
	}
	p, err := newPair(pairConfig{
		sim:  scfg,
		core: checkpoint.PrimaryConfig{Interval: pt.Interval, MaxInflight: 1, AckTimeout: time.Minute},
		enc:  transport.DefaultEncoderConfig(),
		tcp:  true,
		log:  b.Log,
	})
	if err != nil {
		return res, err
	}
	defer p.close()
	p.start()
	if err := p.waitAcked(ctx, 2, 5*time.Minute); err != nil {
		return res, err
	}
	if err := sleep(ctx, b.Warmup); err != nil {
		return res, err
	}
	_, pages0, _ := p.counts()
	s0 := p.primary.Stats()
	p.record(true)
	c0, t0 := processCPU(), time.Now()
	if err := sleep(ctx, pt.Duration); err != nil {
		return res, err
	}
	caps, acks := p.record(false)
	cpu, el := processCPU()-c0, time.Since(t0).Seconds()
	_, pages1, _ := p.counts()
	s1 := p.primary.Stats()
	select {
	case <-p.runDone:
		return res, fmt.Errorf("bench: primary stopped: %v", p.runErr)
	default:
	}
	if err := p.stop(); err != nil {
		return res, err
	}
	cs := summarizeCaptures(caps)
	res.Seconds, res.Epochs = el, cs.n
	res.PauseMsP50, res.PauseMsP99, res.PauseMsMax = cs.pauseP50, cs.pauseP99, cs.pauseMax
	res.EpochMsP50 = cs.epochP50
	if res.IntervalMs > 0 {
		res.EpochOverConfigured = res.EpochMsP50 / res.IntervalMs
	}
	res.DirtyPagesP50, res.DirtyPagesMean = cs.pagesP50, cs.pagesMean
	res.PagesPerSec = float64(pages1-pages0) / el
	res.MBPerSec = res.PagesPerSec * pageSize / 1e6
	res.WireMBPerSec = float64(s1.WireBytesSent-s0.WireBytesSent) / el / 1e6
	if ew := s1.EpochWireBytes - s0.EpochWireBytes; ew > 0 {
		res.CompressionRatio = float64(s1.RawBytes-s0.RawBytes) / float64(ew)
	}
	res.AckMsP50, res.AckMsP99 = msf(quantile(acks, 0.5)), msf(quantile(acks, 0.99))
	res.CPUPairPct = 100 * cpu.Seconds() / el
	res.CPUProtectionPct = res.CPUPairPct - res.CPUGuestPct
	if b.Verify && pt.MemoryBytes <= b.VerifyMaxBytes {
		if err := p.verify(); err != nil {
			return res, err
		}
		res.Verified = true
	}
	return res, nil
}

// processCPU is this process's user+system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// SweepGrid returns the default points: interval × workload at a fixed
// rate and size, then a dirty-rate axis and a guest-size axis (one factor
// at a time around the 25 ms, 20k writes/s point; a full factorial grid
// would take hours). quick is a tiny grid.
func SweepGrid(quick bool, backend string) []SweepPoint {
	var pts []SweepPoint
	add := func(axis string, iv time.Duration, wl string, rate int, mem int64, dur time.Duration) {
		pts = append(pts, SweepPoint{Backend: backend, Axis: axis, Interval: iv, Workload: wl, Rate: rate, MemoryBytes: mem, Duration: dur})
	}
	ms := time.Millisecond
	if quick {
		d := 800 * ms
		add("interval×workload", 25*ms, "uniform", 20000, 16<<20, d)
		add("interval×workload", 25*ms, "sparse", 20000, 16<<20, d)
		add("interval×workload", 100*ms, "hotset", 20000, 16<<20, d)
		add("dirty rate", 25*ms, "idle", sim.Disabled, 16<<20, d)
		add("dirty rate", 25*ms, "uniform", 100000, 16<<20, d)
		return pts
	}
	d := 2 * time.Second
	for _, iv := range []time.Duration{10 * ms, 25 * ms, 50 * ms, 100 * ms, 200 * ms} {
		for _, wl := range []string{"uniform", "hotset", "sequential", "sparse"} {
			add("interval×workload", iv, wl, 20000, 64<<20, max(d, 20*iv))
		}
	}
	for _, r := range []int{sim.Disabled, 1000, 5000, 50000, 100000, 200000} {
		wl := "uniform"
		if r == sim.Disabled {
			wl = "idle"
		}
		add("dirty rate", 25*ms, wl, r, 64<<20, d)
	}
	for _, m := range []int64{16 << 20, 256 << 20} {
		add("guest size", 25*ms, "hotset", 20000, m, d)
	}
	return pts
}

// Sweep measures each point on its backend.
func Sweep(ctx context.Context, pts []SweepPoint, backends map[string]Backend, progress func(string, ...any)) ([]SweepResult, error) {
	if progress == nil {
		progress = func(string, ...any) {}
	}
	var out []SweepResult
	for i, pt := range pts {
		b, ok := backends[pt.Backend]
		if !ok {
			return out, fmt.Errorf("bench: no backend %q", pt.Backend)
		}
		r, err := b.Measure(ctx, pt)
		if err != nil {
			return out, fmt.Errorf("sweep point %d (%s %v %s rate %d, %d MiB): %w", i+1, pt.Backend, pt.Interval, pt.Workload, pt.Rate, pt.MemoryBytes>>20, err)
		}
		out = append(out, r)
		progress("sweep %d/%d: %s %v %s rate %d %d MiB: pause p50 %.2f ms p99 %.2f ms, epoch %.1f ms, dirty %.0f/epoch, %.0f pages/s, wire %.2f MB/s (%.1fx), ack p50 %.2f ms, cpu pair %.0f%% (guest alone %.0f%%)",
			i+1, len(pts), pt.Backend, pt.Interval, pt.Workload, pt.Rate, pt.MemoryBytes>>20, r.PauseMsP50, r.PauseMsP99, r.EpochMsP50, r.DirtyPagesP50,
			r.PagesPerSec, r.WireMBPerSec, r.CompressionRatio, r.AckMsP50, r.CPUPairPct, r.CPUGuestPct)
	}
	return out, nil
}
