package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// DirtyScalePoint is the pause for one dirty-set size in one guest size.
type DirtyScalePoint struct {
	MemoryBytes int64   `json:"memory_bytes"`
	DirtyPages  int     `json:"dirty_pages"`
	PauseMsP50  float64 `json:"pause_ms_p50"`
	PauseMsP99  float64 `json:"pause_ms_p99"`
	MemcpyMsP50 float64 `json:"memcpy_ms_p50"`
	Ratio       float64 `json:"pause_over_memcpy"`
}

// DirtyScaleConfig configures MeasureDirtyScale.
type DirtyScaleConfig struct {
	// MemoryBytes: the guest sizes (default 16 and 64 MiB); DirtyPages:
	// the dirty-set sizes, the same in every guest (default 256, 1024, 3072).
	MemoryBytes []int64
	DirtyPages  []int
	Samples     int // per size (default 12)
	Log         *zap.Logger
	Progress    func(string, ...any)
}

// MeasureDirtyScale measures the pause for the same dirty-set sizes in
// guests of different sizes: with exact dirty tracking the pause should
// grow with the dirty pages, not with the guest.
func MeasureDirtyScale(ctx context.Context, cfg DirtyScaleConfig) ([]DirtyScalePoint, error) {
	if len(cfg.MemoryBytes) == 0 {
		cfg.MemoryBytes = []int64{16 << 20, 64 << 20}
	}
	if len(cfg.DirtyPages) == 0 {
		cfg.DirtyPages = []int{256, 1024, 3072}
	}
	if cfg.Samples <= 0 {
		cfg.Samples = 12
	}
	if cfg.Progress == nil {
		cfg.Progress = func(string, ...any) {}
	}
	var out []DirtyScalePoint
	for _, mem := range cfg.MemoryBytes {
		n := int(mem / pageSize)
		var fr []float64
		for _, k := range cfg.DirtyPages {
			if k > n {
				return out, fmt.Errorf("bench: %d dirty pages in a %d-page guest", k, n)
			}
			fr = append(fr, float64(k)/float64(n))
		}
		r, err := MeasurePause(ctx, PauseConfig{MemoryBytes: mem, Fractions: fr, Samples: cfg.Samples, Skip: 2, Interval: 10 * time.Millisecond, Log: cfg.Log})
		if err != nil {
			return out, err
		}
		for _, s := range r.Sets {
			pt := DirtyScalePoint{MemoryBytes: mem, DirtyPages: s.ChosenPages, PauseMsP50: msf(s.PauseP50), PauseMsP99: msf(s.PauseP99), MemcpyMsP50: msf(s.MemcpyP50), Ratio: s.Ratio}
			out = append(out, pt)
			cfg.Progress("dirty scale: guest %d MiB, %d dirty pages: pause p50 %.3f ms (memcpy %.3f ms, ratio %.2f)", mem>>20, pt.DirtyPages, pt.PauseMsP50, pt.MemcpyMsP50, pt.Ratio)
		}
	}
	return out, nil
}

// MultiVMPoint is N guests protected by one primary/backup process pair.
type MultiVMPoint struct {
	VMs              int     `json:"vms"`
	MemoryBytesEach  int64   `json:"memory_bytes_each"`
	IntervalMs       float64 `json:"interval_ms"`
	Seconds          float64 `json:"seconds"`
	AggPagesPerSec   float64 `json:"aggregate_pages_per_s"`
	AggWireMBPerSec  float64 `json:"aggregate_wire_mb_per_s"`
	PauseMsP50       float64 `json:"per_vm_pause_ms_p50"`     // median over VMs of each VM's p50
	PauseMsP99       float64 `json:"per_vm_pause_ms_p99_max"` // worst VM's p99
	EpochMsP50       float64 `json:"per_vm_epoch_ms_p50"`
	AckMsP50         float64 `json:"per_vm_ack_ms_p50"`
	CPUPct           float64 `json:"cpu_process_pct"`
	AllEpochsAcked   bool    `json:"every_vm_acked"`
	VerifiedReplicas int     `json:"replicas_verified"`
}

// MultiVMConfig configures MeasureMultiVM.
type MultiVMConfig struct {
	Counts      []int         // default 1, 4, 16
	MemoryBytes int64         // each (default 8 MiB)
	Workload    string        // default hotset
	Rate        int           // each (default 5000)
	Interval    time.Duration // default 25 ms
	Duration    time.Duration // default 2 s
	Verify      bool
	Log         *zap.Logger
	Progress    func(string, ...any)
}

// MeasureMultiVM protects N small sim guests at once, each with its own
// Primary/Backup pair and TCP link, all in this process (as one daemon
// pair would run them).
func MeasureMultiVM(ctx context.Context, cfg MultiVMConfig) ([]MultiVMPoint, error) {
	if len(cfg.Counts) == 0 {
		cfg.Counts = []int{1, 4, 16}
	}
	if cfg.MemoryBytes == 0 {
		cfg.MemoryBytes = 8 << 20
	}
	if cfg.Workload == "" {
		cfg.Workload = "hotset"
	}
	if cfg.Rate == 0 {
		cfg.Rate = 5000
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 25 * time.Millisecond
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 2 * time.Second
	}
	if cfg.Progress == nil {
		cfg.Progress = func(string, ...any) {}
	}
	var out []MultiVMPoint
	for _, n := range cfg.Counts {
		pt, err := multiVMPoint(ctx, cfg, n)
		if err != nil {
			return out, fmt.Errorf("%d VMs: %w", n, err)
		}
		out = append(out, pt)
		cfg.Progress("multi-VM %d × %d MiB at %v: %.0f pages/s aggregate, wire %.2f MB/s, per-VM pause p50 %.2f ms (worst p99 %.2f ms), epoch %.1f ms, cpu %.0f%%",
			n, cfg.MemoryBytes>>20, cfg.Interval, pt.AggPagesPerSec, pt.AggWireMBPerSec, pt.PauseMsP50, pt.PauseMsP99, pt.EpochMsP50, pt.CPUPct)
	}
	return out, nil
}

func multiVMPoint(ctx context.Context, cfg MultiVMConfig, n int) (MultiVMPoint, error) {
	pt := MultiVMPoint{VMs: n, MemoryBytesEach: cfg.MemoryBytes, IntervalMs: msf(cfg.Interval)}
	pairs := make([]*pair, 0, n)
	defer func() {
		for _, p := range pairs {
			p.close()
		}
	}()
	for i := range n {
		p, err := newPair(pairConfig{
			name: fmt.Sprintf("vm%d", i),
			sim:  sim.Config{MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate, Seed: uint64(i + 1), OutputEvery: 64},
			core: checkpoint.PrimaryConfig{Interval: cfg.Interval, MaxInflight: 1, AckTimeout: time.Minute},
			enc:  transport.DefaultEncoderConfig(),
			tcp:  true,
			log:  cfg.Log,
		})
		if err != nil {
			return pt, err
		}
		pairs = append(pairs, p)
	}
	for _, p := range pairs {
		p.start()
	}
	for _, p := range pairs {
		if err := p.waitAcked(ctx, 2, 5*time.Minute); err != nil {
			return pt, err
		}
	}
	if err := sleep(ctx, 200*time.Millisecond); err != nil {
		return pt, err
	}
	pages0 := make([]int64, n)
	eps0 := make([]int64, n)
	s0 := make([]checkpoint.PrimaryStats, n)
	for i, p := range pairs {
		_, pages0[i], eps0[i] = p.counts()
		s0[i] = p.primary.Stats()
		p.record(true)
	}
	c0, t0 := processCPU(), time.Now()
	if err := sleep(ctx, cfg.Duration); err != nil {
		return pt, err
	}
	el := time.Since(t0).Seconds()
	pt.CPUPct = 100 * (processCPU() - c0).Seconds() / el
	pt.Seconds = el
	var p50s, epochs, acks []float64
	var pages, wire float64
	pt.AllEpochsAcked = true
	for i, p := range pairs {
		caps, ackd := p.record(false)
		_, pg, ep := p.counts()
		s1 := p.primary.Stats()
		pages += float64(pg - pages0[i])
		wire += float64(s1.WireBytesSent - s0[i].WireBytesSent)
		if ep == eps0[i] {
			pt.AllEpochsAcked = false
		}
		cs := summarizeCaptures(caps)
		p50s = append(p50s, cs.pauseP50)
		epochs = append(epochs, cs.epochP50)
		acks = append(acks, msf(quantile(ackd, 0.5)))
		pt.PauseMsP99 = max(pt.PauseMsP99, cs.pauseP99)
	}
	pt.AggPagesPerSec = pages / el
	pt.AggWireMBPerSec = wire / el / 1e6
	pt.PauseMsP50, pt.EpochMsP50, pt.AckMsP50 = medianFloat(p50s), medianFloat(epochs), medianFloat(acks)
	var errs []error
	for _, p := range pairs {
		if err := p.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return pt, err
	}
	if cfg.Verify {
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, p := range pairs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := p.verify()
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err)
				} else {
					pt.VerifiedReplicas++
				}
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return pt, err
		}
	}
	return pt, nil
}
