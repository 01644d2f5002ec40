package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// LatencyConfig configures MeasureLatency.
type LatencyConfig struct {
	// Intervals are the epoch intervals to measure protected (default 10,
	// 25, 50, 100, 200 ms).
	Intervals []time.Duration
	// MemoryBytes, Workload and Rate of the sim guest the service runs in
	// (default 16 MiB, hotset, 20000 writes/s).
	MemoryBytes int64
	Workload    string
	Rate        int
	// Warmup after the initial sync (default 300 ms) and Duration of the
	// closed-loop client at each point (default 3 s; at least 40 epochs).
	Warmup, Duration time.Duration
	// Verify the replica byte for byte after each protected point.
	Verify   bool
	Seed     uint64
	Log      *zap.Logger
	Progress func(format string, args ...any)
}

func (c LatencyConfig) withDefaults() LatencyConfig {
	if len(c.Intervals) == 0 {
		c.Intervals = []time.Duration{10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}
	}
	if c.MemoryBytes == 0 {
		c.MemoryBytes = 16 << 20
	}
	if c.Workload == "" {
		c.Workload = "hotset"
	}
	if c.Rate == 0 {
		c.Rate = 20000
	}
	if c.Warmup <= 0 {
		c.Warmup = 300 * time.Millisecond
	}
	if c.Duration <= 0 {
		c.Duration = 3 * time.Second
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	if c.Progress == nil {
		c.Progress = func(string, ...any) {}
	}
	return c
}

// LatencyStats are a closed-loop client's request→reply latencies.
type LatencyStats struct {
	Requests    int     `json:"requests"`
	ReqPerSec   float64 `json:"requests_per_s"`
	P50Ms       float64 `json:"p50_ms"`
	P90Ms       float64 `json:"p90_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
	MeanMs      float64 `json:"mean_ms"`
	DurationSec float64 `json:"duration_s"`
}

// LatencyPoint is the protected service at one epoch interval.
type LatencyPoint struct {
	IntervalMs float64      `json:"interval_ms"`
	Protected  LatencyStats `json:"protected"`
	// BackToBack is the same client without think time: it sends its
	// next request right after a release, so it waits about one whole
	// epoch (reported for information; the goals use Protected).
	BackToBack LatencyStats `json:"back_to_back"`
	// EpochMsP50 is the achieved epoch length (capture to capture).
	EpochMsP50 float64 `json:"epoch_ms_p50"`
	PauseMsP50 float64 `json:"pause_ms_p50"`
	PauseMsP99 float64 `json:"pause_ms_p99"`
	// AckMs*: capture → ack of the epochs captured while the client ran.
	AckMsP50 float64 `json:"ack_ms_p50"`
	AckMsP99 float64 `json:"ack_ms_p99"`
	// FloorMs is the output-commit floor: achieved epoch/2 + ack p50
	// (a reply waits on average half an epoch for its epoch to close,
	// then for the ack).
	FloorMs float64 `json:"floor_ms"`
	// AddedP50Ms/AddedP99Ms: protected − unprotected.
	AddedP50Ms float64 `json:"added_p50_ms"`
	AddedP99Ms float64 `json:"added_p99_ms"`
	// AddedOverFloor is AddedP50Ms / FloorMs (1 = at the floor).
	AddedOverFloor float64 `json:"added_over_floor"`
	// Goals from the issue: added p50 ≤ 0.6·epoch + 1 ms, p99 ≤ 1.1·epoch + 3 ms.
	GoalP50Ms float64 `json:"goal_added_p50_ms"`
	GoalP99Ms float64 `json:"goal_added_p99_ms"`
	// The same goals computed with the achieved epoch length instead of
	// the configured interval: separates the engine's epoch overrun from
	// the output-commit path.
	GoalP50AtAchievedMs float64 `json:"goal_added_p50_ms_at_achieved_epoch"`
	GoalP99AtAchievedMs float64 `json:"goal_added_p99_ms_at_achieved_epoch"`
	Verified            bool    `json:"replica_verified"`
}

// LatencyResult is what MeasureLatency returns.
type LatencyResult struct {
	Model       string         `json:"model"`
	MemoryBytes int64          `json:"memory_bytes"`
	Workload    string         `json:"workload"`
	Rate        int            `json:"rate"`
	Unprotected LatencyStats   `json:"unprotected"`
	Points      []LatencyPoint `json:"points"`
}

// LatencyModel describes the simulated service.
const LatencyModel = "closed-loop client with think time uniform in [0, epoch) (requests arrive at a uniform phase of the epoch) → service inside the sim guest (runs only while the guest runs); " +
	"unprotected: reply straight to the client; protected: reply emitted into the Primary's outbuf.Memory, " +
	"released to the client when the backup acks its epoch (loopback TCP link)"

// At returns the point at the given interval, if measured.
func (r *LatencyResult) At(interval time.Duration) (LatencyPoint, bool) {
	for _, p := range r.Points {
		if math.Abs(p.IntervalMs-msf(interval)) < 1e-9 {
			return p, true
		}
	}
	return LatencyPoint{}, false
}

// MeasureLatency runs the request/response service unprotected, then
// protected at each epoch interval, and reports client-observed latency.
func MeasureLatency(ctx context.Context, cfg LatencyConfig) (LatencyResult, error) {
	cfg = cfg.withDefaults()
	res := LatencyResult{Model: LatencyModel, MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate}
	var err error
	if res.Unprotected, err = latencyPoint(ctx, cfg, 0, nil); err != nil {
		return res, fmt.Errorf("unprotected: %w", err)
	}
	cfg.Progress("latency unprotected: p50 %.3f ms p99 %.3f ms, %.0f req/s", res.Unprotected.P50Ms, res.Unprotected.P99Ms, res.Unprotected.ReqPerSec)
	for _, iv := range cfg.Intervals {
		var pt LatencyPoint
		st, err := latencyPoint(ctx, cfg, iv, &pt)
		if err != nil {
			return res, fmt.Errorf("protected at %v: %w", iv, err)
		}
		pt.IntervalMs = msf(iv)
		pt.Protected = st
		pt.FloorMs = pt.EpochMsP50/2 + pt.AckMsP50
		pt.AddedP50Ms = st.P50Ms - res.Unprotected.P50Ms
		pt.AddedP99Ms = st.P99Ms - res.Unprotected.P99Ms
		if pt.FloorMs > 0 {
			pt.AddedOverFloor = pt.AddedP50Ms / pt.FloorMs
		}
		pt.GoalP50Ms = 0.6*pt.IntervalMs + 1
		pt.GoalP99Ms = 1.1*pt.IntervalMs + 3
		pt.GoalP50AtAchievedMs = 0.6*pt.EpochMsP50 + 1
		pt.GoalP99AtAchievedMs = 1.1*pt.EpochMsP50 + 3
		res.Points = append(res.Points, pt)
		cfg.Progress("latency protected %v: p50 %.2f ms p99 %.2f ms (added %.2f / %.2f ms; floor %.2f ms; epoch %.2f ms, ack p50 %.2f ms), %.0f req/s",
			iv, st.P50Ms, st.P99Ms, pt.AddedP50Ms, pt.AddedP99Ms, pt.FloorMs, pt.EpochMsP50, pt.AckMsP50, st.ReqPerSec)
	}
	return res, nil
}

// latencyPoint runs the service for one configuration: unprotected when
// interval is 0, else protected by a Primary at that interval (pt gets the
// engine figures).
func latencyPoint(ctx context.Context, cfg LatencyConfig, interval time.Duration, pt *LatencyPoint) (LatencyStats, error) {
	replies := make(chan uint64, 64)
	deliver := func(_ uint64, msg []byte) {
		if len(msg) >= 8 {
			select {
			case replies <- binary.LittleEndian.Uint64(msg):
			default: // closed loop: cannot happen
			}
		}
	}
	protected := interval > 0
	if !protected {
		interval = 25 * time.Millisecond // unused: the primary never runs
	}
	p, err := newPair(pairConfig{
		sim:           sim.Config{MemoryBytes: cfg.MemoryBytes, Workload: cfg.Workload, Rate: cfg.Rate, Seed: cfg.Seed, OutputEvery: 64},
		core:          checkpoint.PrimaryConfig{Interval: interval, MaxInflight: 1, AckTimeout: time.Minute},
		enc:           transport.DefaultEncoderConfig(),
		tcp:           true,
		log:           cfg.Log,
		sink:          deliver,
		noGuestOutput: true,
	})
	if err != nil {
		return LatencyStats{}, err
	}
	defer p.close()
	// The service: handles a request only while the guest runs.
	reqs := make(chan uint64)
	svcDone := make(chan struct{})
	go func() {
		defer close(svcDone)
		msg := make([]byte, 8)
		for id := range reqs {
			binary.LittleEndian.PutUint64(msg, id)
			p.guest.svc.RLock()
			if protected {
				p.out.Emit(msg)
			} else {
				deliver(0, msg)
			}
			p.guest.svc.RUnlock()
		}
	}()
	defer func() { close(reqs); <-svcDone }()
	if protected {
		p.start()
		if err := p.waitAcked(ctx, 2, time.Minute); err != nil {
			return LatencyStats{}, err
		}
	}
	if err := sleep(ctx, cfg.Warmup); err != nil {
		return LatencyStats{}, err
	}
	dur := cfg.Duration
	think := interval
	if protected {
		dur = max(dur, 40*interval)
		p.record(true)
	}
	// Think time uniform in [0, epoch): requests arrive at a uniform phase
	// of the epoch, as independent clients' requests do.
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x1a7))
	lat, el, err := closedLoop(ctx, dur, think, rng, 1, reqs, replies)
	if err != nil {
		return LatencyStats{}, err
	}
	st := latencyStats(lat, el)
	if protected {
		caps, acks := p.record(false)
		// Back to back (no think time): the client re-synchronises with
		// the releases and waits about a whole epoch.
		lat, el, err := closedLoop(ctx, dur/2, 0, rng, 1<<40, reqs, replies)
		if err != nil {
			return st, err
		}
		pt.BackToBack = latencyStats(lat, el)
		pt.AckMsP50, pt.AckMsP99 = msf(quantile(acks, 0.5)), msf(quantile(acks, 0.99))
		cs := summarizeCaptures(caps)
		pt.EpochMsP50, pt.PauseMsP50, pt.PauseMsP99 = cs.epochP50, cs.pauseP50, cs.pauseP99
		select {
		case <-p.runDone:
			return st, fmt.Errorf("bench: primary stopped: %v", p.runErr)
		default:
		}
		if err := p.stop(); err != nil {
			return st, err
		}
		if cfg.Verify {
			if err := p.verify(); err != nil {
				return st, err
			}
			pt.Verified = true
		}
	}
	return st, nil
}

// closedLoop sends one request at a time for dur and returns each
// request→reply latency and the elapsed time.
func closedLoop(ctx context.Context, dur, think time.Duration, rng *rand.Rand, firstID uint64, reqs chan<- uint64, replies <-chan uint64) ([]time.Duration, time.Duration, error) {
	var lat []time.Duration
	start := time.Now()
	timeout := time.NewTimer(time.Hour)
	defer timeout.Stop()
	for id := firstID; time.Since(start) < dur; id++ {
		if think > 0 {
			if err := sleep(ctx, time.Duration(rng.Int64N(int64(think)))); err != nil {
				return nil, 0, err
			}
		}
		t0 := time.Now()
		select {
		case reqs <- id:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
		timeout.Reset(10 * time.Second)
	wait:
		for {
			select {
			case got := <-replies:
				if got == id {
					break wait
				}
			case <-timeout.C:
				return nil, 0, fmt.Errorf("bench: no reply to request %d within 10 s", id)
			case <-ctx.Done():
				return nil, 0, ctx.Err()
			}
		}
		lat = append(lat, time.Since(t0))
	}
	if len(lat) == 0 {
		return nil, 0, errors.New("bench: no request completed")
	}
	return lat, time.Since(start), nil
}

func latencyStats(lat []time.Duration, el time.Duration) LatencyStats {
	st := LatencyStats{Requests: len(lat), DurationSec: el.Seconds()}
	if len(lat) == 0 {
		return st
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	st.ReqPerSec = float64(len(lat)) / el.Seconds()
	st.P50Ms = msf(quantile(lat, 0.5))
	st.P90Ms = msf(quantile(lat, 0.9))
	st.P99Ms = msf(quantile(lat, 0.99))
	st.MaxMs = msf(lat[len(lat)-1])
	st.MeanMs = msf(sum / time.Duration(len(lat)))
	return st
}

// captureSummary summarises recorded captures.
type captureSummary struct {
	n                            int
	epochP50                     float64 // ms, capture to capture
	pauseP50, pauseP99, pauseMax float64 // ms
	pagesP50, pagesMean          float64
}

func summarizeCaptures(caps []captureSample) captureSummary {
	cs := captureSummary{n: len(caps)}
	if len(caps) == 0 {
		return cs
	}
	var gaps, pauses []time.Duration
	var pages []float64
	var sum float64
	for i, c := range caps {
		if i > 0 {
			gaps = append(gaps, c.at.Sub(caps[i-1].at))
		}
		pauses = append(pauses, c.pause)
		pages = append(pages, float64(c.pages))
		sum += float64(c.pages)
	}
	cs.epochP50 = msf(quantile(gaps, 0.5))
	cs.pauseP50 = msf(quantile(pauses, 0.5))
	cs.pauseP99 = msf(quantile(pauses, 0.99))
	cs.pauseMax = msf(pauses[len(pauses)-1]) // sorted by quantile
	cs.pagesP50 = medianFloat(pages)
	cs.pagesMean = sum / float64(len(caps))
	return cs
}

func msf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
