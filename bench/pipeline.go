package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/pierrec/lz4/v4"
	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// PipelineConfig configures MeasurePipeline.
type PipelineConfig struct {
	// MemoryBytes of the sim guest (default 256 MiB).
	MemoryBytes int64
	// Workload and Rate of the guest: heavy by default (uniform, 500k
	// ops/s, i.e. ~500k page writes/s: more than the pipeline ships, so it
	// runs saturated, epochs stretched by backpressure).
	Workload string
	Rate     int
	// Interval between checkpoints (default 25 ms); MaxInflight unacked
	// epochs (default 2, so that capture overlaps send).
	Interval    time.Duration
	MaxInflight int
	// Warmup after the initial full sync is acknowledged (default 1 s),
	// then Duration of measurement (default 3 s; extended if no epoch was
	// acknowledged in it).
	Warmup, Duration time.Duration
	// CachePages of the encoder's delta cache (0: the transport default,
	// 16384 pages = 64 MiB).
	CachePages int
	// Verify replays the guest after the run and checks the replica byte
	// for byte (small guests only: it allocates a second guest).
	Verify bool
	Seed   uint64
	Log    *zap.Logger
}

func (c PipelineConfig) withDefaults() PipelineConfig {
	if c.MemoryBytes == 0 {
		c.MemoryBytes = 256 << 20
	}
	if c.Workload == "" {
		c.Workload = "uniform"
	}
	if c.Rate == 0 {
		c.Rate = 500_000
	}
	if c.Interval <= 0 {
		c.Interval = 25 * time.Millisecond
	}
	if c.MaxInflight <= 0 {
		c.MaxInflight = 2
	}
	if c.Warmup <= 0 {
		c.Warmup = time.Second
	}
	if c.Duration <= 0 {
		c.Duration = 3 * time.Second
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	return c
}

// PipelineResult is the end-to-end throughput primary→backup.
type PipelineResult struct {
	MemoryBytes int64
	Workload    string
	Rate        int
	CachePages  int
	Seconds     float64
	// PagesAcked and EpochsAcked in the measured window.
	PagesAcked, EpochsAcked int64
	PagesPerSec             float64
	// MBPerSec is raw page bytes acknowledged per second (MB = 1e6 B);
	// WireMBPerSec every byte the primary wrote on the link per second
	// (frame and protobuf headers, heartbeats included).
	MBPerSec, WireMBPerSec float64
	// PauseP50 of the captures during the run.
	PauseP50 time.Duration
	// LZ4PagesPerSec is the bound: one core lz4-compressing pages of the
	// guest's memory after the run (the content the pipeline shipped).
	LZ4PagesPerSec float64
	// Ratio is PagesPerSec / LZ4PagesPerSec.
	Ratio float64
	// Verified: the replica was checked byte for byte (Verify).
	Verified bool
	Setup    time.Duration
}

// MeasurePipeline runs a Primary with a loaded sim guest and a Backup over
// loopback TCP and measures acknowledged pages per second.
func MeasurePipeline(ctx context.Context, cfg PipelineConfig) (PipelineResult, error) {
	cfg = cfg.withDefaults()
	res := PipelineResult{MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate}
	setup := time.Now()
	enc := transport.DefaultEncoderConfig()
	if cfg.CachePages > 0 {
		enc.CachePages = cfg.CachePages
	}
	p, err := newPair(pairConfig{
		sim:  sim.Config{MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate, Seed: cfg.Seed, OutputEvery: 64},
		core: checkpoint.PrimaryConfig{Interval: cfg.Interval, MaxInflight: cfg.MaxInflight, AckTimeout: time.Minute},
		enc:  enc,
		tcp:  true,
		log:  cfg.Log,
	})
	if err != nil {
		return res, err
	}
	defer p.close()
	p.start()
	if err := p.waitAcked(ctx, 1, 5*time.Minute); err != nil {
		return res, err
	}
	res.Setup = time.Since(setup)
	res.CachePages = enc.CachePages
	if err := sleep(ctx, cfg.Warmup); err != nil {
		return res, err
	}
	_, pages0, eps0 := p.counts()
	s0 := p.primary.Stats()
	t0 := time.Now()
	if err := sleep(ctx, cfg.Duration); err != nil {
		return res, err
	}
	_, pages1, eps1 := p.counts()
	// A slow machine (or -race) may ack nothing within Duration, or only
	// epochs the starved guest dirtied nothing in: extend the window, up
	// to 20 times, until an epoch with pages is acknowledged.
	for ext := 0; (eps1 == eps0 || pages1 == pages0) && ext < 20; ext++ {
		if err := sleep(ctx, cfg.Duration); err != nil {
			return res, err
		}
		_, pages1, eps1 = p.counts()
	}
	s1 := p.primary.Stats()
	el := time.Since(t0).Seconds()
	select {
	case <-p.runDone:
		return res, fmt.Errorf("bench: primary stopped: %v", p.runErr)
	default:
	}
	if err := p.stop(); err != nil {
		return res, err
	}
	res.Seconds = el
	res.PagesAcked, res.EpochsAcked = pages1-pages0, eps1-eps0
	res.PagesPerSec = float64(res.PagesAcked) / el
	res.MBPerSec = res.PagesPerSec * pageSize / 1e6
	res.WireMBPerSec = float64(s1.WireBytesSent-s0.WireBytesSent) / el / 1e6
	res.PauseP50 = s1.PauseP50
	if cfg.Verify {
		if err := p.verify(); err != nil {
			return res, err
		}
		res.Verified = true
	}
	// The bound, on the guest's memory (closed: quiescent).
	p.guest.Close()
	res.LZ4PagesPerSec = lz4Rate(p.guest.Memory(), 4096, cfg.Seed)
	if res.LZ4PagesPerSec > 0 {
		res.Ratio = res.PagesPerSec / res.LZ4PagesPerSec
	}
	return res, nil
}

// lz4Rate compresses n pages of mem drawn at random (the median
// of 5 passes after one warm-up) on one core and returns pages per second.
func lz4Rate(mem []byte, n int, seed uint64) float64 {
	pages := len(mem) / pageSize
	if pages == 0 {
		return 0
	}
	rng := rand.New(rand.NewPCG(seed, 0x124))
	idx := make([]int, n)
	for i := range idx {
		idx[i] = rng.IntN(pages)
	}
	var comp lz4.Compressor
	out := make([]byte, lz4.CompressBlockBound(pageSize))
	var rates []float64
	for pass := range 6 {
		t0 := time.Now()
		for _, i := range idx {
			_, _ = comp.CompressBlock(mem[i*pageSize:(i+1)*pageSize], out)
		}
		if pass > 0 {
			rates = append(rates, float64(n)/time.Since(t0).Seconds())
		}
	}
	return medianFloat(rates)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
