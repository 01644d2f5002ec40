package bench

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"time"

	"go.uber.org/zap"
)

// Report holds the figures of one Run.
type Report struct {
	Quick      bool
	GOMAXPROCS int
	Pause      PauseResult
	Encode     []EncodeResult
	Pipeline   PipelineResult
	Took       time.Duration
}

// Run runs the three engine benchmarks (pause, codec, loopback pipeline)
// and returns their figures. quick uses small sizes (16 MiB guests, few
// samples) and verifies the pipeline's replica; otherwise 256 MiB guests.
// log may be nil.
func Run(ctx context.Context, quick bool, log *zap.Logger) (Report, error) {
	if log == nil {
		log = zap.NewNop()
	}
	start := time.Now()
	r := Report{Quick: quick, GOMAXPROCS: runtime.GOMAXPROCS(0)}
	pc, ec, lc := PauseConfig{}, EncodeConfig{}, PipelineConfig{}
	if quick {
		pc = PauseConfig{MemoryBytes: 16 << 20, Samples: 8, Skip: 2, Interval: 5 * time.Millisecond}
		ec = EncodeConfig{Pages: 512, Rounds: 4}
		lc = PipelineConfig{MemoryBytes: 16 << 20, Rate: 50_000, Interval: 5 * time.Millisecond,
			Warmup: 100 * time.Millisecond, Duration: 500 * time.Millisecond, Verify: true}
	}
	pc.Log, lc.Log = log, log
	var err error
	log.Info("bench: pause vs memcpy")
	if r.Pause, err = MeasurePause(ctx, pc); err != nil {
		return r, fmt.Errorf("pause: %w", err)
	}
	log.Info("bench: codec vs lz4 and XOR+RLE")
	if r.Encode, err = MeasureEncode(ctx, ec); err != nil {
		return r, fmt.Errorf("encode: %w", err)
	}
	log.Info("bench: loopback pipeline")
	if r.Pipeline, err = MeasurePipeline(ctx, lc); err != nil {
		return r, fmt.Errorf("pipeline: %w", err)
	}
	r.Took = time.Since(start)
	return r, nil
}

// Write prints the report as text.
func (r Report) Write(w io.Writer) error {
	ew := &errWriter{w: w}
	p := r.Pause
	ew.printf("remusd engine benchmarks (GOMAXPROCS %d, quick %v, took %v)\n\n", r.GOMAXPROCS, r.Quick, r.Took.Round(time.Millisecond))
	ew.printf("1. Pause vs memcpy of the same dirty set (guest %d MiB, %s layout; setup+first touch %v excluded)\n",
		p.MemoryBytes>>20, p.Layout, p.Setup.Round(time.Millisecond))
	ew.printf("   %s\n", p.Included)
	ew.printf("   %7s %8s %8s %7s %10s %10s %10s %8s %9s\n", "dirty", "pages", "captured", "samples", "pause p50", "pause p99", "memcpy p50", "ratio", "memcpy")
	for _, s := range p.Sets {
		ew.printf("   %6.1f%% %8d %8d %7d %10v %10v %10v %8.2f %6.1fGB/s\n", 100*s.Fraction, s.ChosenPages, s.CapturePagesP50, s.Samples,
			s.PauseP50.Round(time.Microsecond), s.PauseP99.Round(time.Microsecond), s.MemcpyP50.Round(time.Microsecond), s.Ratio, s.MemcpyGBps)
	}
	ew.printf("\n2. Delta codec vs raw lz4 (one core) and XOR+RLE (Xen Remus-like)\n")
	ew.printf("   %-7s %8s %12s %12s %7s %12s %12s %8s %8s %8s %9s\n", "pages", "workers", "encode p/s", "lz4 p/s", "ratio", "lz4(xor) p/s", "xor+rle p/s", "wire/raw", "lz4/raw", "rle/raw", "wire/rle")
	for _, e := range r.Encode {
		ew.printf("   %-7s %8d %12.0f %12.0f %7.2f %12.0f %12.0f %8.4f %8.4f %8.4f %9.3f\n", e.Kind, e.Workers, e.EncodePagesPerSec, e.LZ4PagesPerSec, e.Ratio,
			e.LZ4DeltaPagesPerSec, e.XORRLEPagesPerSec, e.WireRatio, e.LZ4WireRatio, e.XORRLEWireRatio, e.WireVsXORRLE)
	}
	l := r.Pipeline
	ew.printf("\n3. Pipeline primary→backup over loopback TCP (guest %d MiB, %s at %d ops/s, delta cache %d pages, %.1fs measured, setup %v excluded)\n",
		l.MemoryBytes>>20, l.Workload, l.Rate, l.CachePages, l.Seconds, l.Setup.Round(time.Millisecond))
	ew.printf("   %.0f pages/s acked (%.1f MB/s raw, %.1f MB/s wire, %d epochs, pause p50 %v); lz4 bound %.0f pages/s one core; ratio %.3f; replica verified %v\n",
		l.PagesPerSec, l.MBPerSec, l.WireMBPerSec, l.EpochsAcked, l.PauseP50.Round(time.Microsecond), l.LZ4PagesPerSec, l.Ratio, l.Verified)
	return ew.err
}

type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) printf(format string, args ...any) {
	if e.err == nil {
		_, e.err = fmt.Fprintf(e.w, format, args...)
	}
}
