package bench

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Sanity tests: small guests, few samples. They check that the figures are
// well formed and the replica matched, never how fast anything ran.

func finitePositive(t *testing.T, name string, v float64) {
	t.Helper()
	if !(v > 0) || math.IsInf(v, 0) || math.IsNaN(v) {
		t.Errorf("%s = %v, want positive and finite", name, v)
	}
}

func TestMeasurePauseSanity(t *testing.T) {
	for _, layout := range []string{"scattered", "runs"} {
		t.Run(layout, func(t *testing.T) {
			res, err := MeasurePause(context.Background(), PauseConfig{
				MemoryBytes: 8 << 20, Fractions: []float64{0.01, 0.25}, Layout: layout,
				Samples: 4, Skip: 2, Interval: 5 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Sets) != 2 {
				t.Fatalf("sets %+v", res.Sets)
			}
			for _, s := range res.Sets {
				if s.Samples != 4 || s.ChosenPages == 0 || s.CapturePagesP50 < s.ChosenPages {
					t.Errorf("set %+v", s)
				}
				finitePositive(t, "ratio", s.Ratio)
				finitePositive(t, "memcpy GB/s", s.MemcpyGBps)
			}
		})
	}
}

func TestMeasureEncodeSanity(t *testing.T) {
	res, err := MeasureEncode(context.Background(), EncodeConfig{Pages: 256, Rounds: 3, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 {
		t.Fatalf("results %+v", res)
	}
	for _, r := range res {
		for name, v := range map[string]float64{
			"encode": r.EncodePagesPerSec, "lz4": r.LZ4PagesPerSec, "lz4 delta": r.LZ4DeltaPagesPerSec,
			"xor+rle": r.XORRLEPagesPerSec, "ratio": r.Ratio, "wire": r.WireOverRaw, "payload": r.PayloadOverRaw,
			"lz4/raw": r.LZ4OverRaw, "rle": r.XORRLEOverRaw, "wire vs rle": r.WireOverXORRLE,
		} {
			finitePositive(t, r.Kind+" "+name, v)
		}
		if r.Stats.Pages != 256 {
			t.Errorf("%s: stats %+v", r.Kind, r.Stats)
		}
	}
	// Sparse pages must be delta-encoded, random ones sent raw.
	if s := res[0].Stats; s.XORLZ4+s.XORRLE != 256 || res[0].WireOverRaw >= 0.5 {
		t.Errorf("sparse: stats %+v wire ratio %v", s, res[0].WireOverRaw)
	}
	for _, r := range res {
		if r.WireOverRaw <= r.PayloadOverRaw {
			t.Errorf("%s: wire %v not above payload %v: headers not counted", r.Kind, r.WireOverRaw, r.PayloadOverRaw)
		}
	}
	if s := res[1].Stats; s.Raw != 256 {
		t.Errorf("random: stats %+v", s)
	}
}

// TestRemusRefRoundTrip: the XOR+RLE reference decodes back to the pages
// it encoded (so its byte counts are of a working codec), and its decoder
// rejects malformed streams.
func TestRemusRefRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	const numPages = 2100 // more than two batches
	prev := make([]byte, numPages*pageSize)
	for i := range prev {
		prev[i] = byte(rng.Uint32())
	}
	cur := bytes.Clone(prev)
	var pfns []uint64
	for p := 0; p < numPages; p++ {
		if p%7 == 3 {
			continue // not dirty
		}
		pfns = append(pfns, uint64(p))
		switch changed := []int{0, 1, 4, 100, 512, pageSize}[p%6]; changed {
		case pageSize: // rewritten
			for i := range pageSize {
				cur[p*pageSize+i] = byte(rng.Uint32())
			}
		default:
			for range changed {
				cur[p*pageSize+rng.IntN(pageSize)] ^= byte(1 + rng.IntN(255))
			}
		}
	}
	pages := make([]byte, 0, len(pfns)*pageSize)
	for _, p := range pfns {
		pages = append(pages, cur[p*pageSize:(p+1)*pageSize]...)
	}
	for _, cached := range []bool{true, false} {
		prevOf := func(i int) []byte {
			if !cached || i%5 == 0 {
				return nil // never sent: FULL
			}
			return prev[pfns[i]*pageSize:][:pageSize]
		}
		stream := refEncodeEpoch(nil, pageSize, pfns, pages, prevOf)
		mem := bytes.Clone(prev)
		got, err := refDecodeEpoch(stream, pageSize, mem)
		if err != nil || !slices.Equal(got, pfns) || !bytes.Equal(mem, cur) {
			t.Fatalf("cached %v: err %v, pfns equal %v, memory equal %v", cached, err, slices.Equal(got, pfns), bytes.Equal(mem, cur))
		}
		if cached && len(stream) >= len(pages) {
			t.Errorf("deltas of %d pages took %d bytes, raw %d", len(pfns), len(stream), len(pages))
		}
		// Every truncation and a corrupted count, pfn, marker or run is
		// refused, never a panic.
		for _, n := range []int{1, 4, 12, 100, len(stream) / 2, len(stream) - 1} {
			if _, err := refDecodeEpoch(stream[:n], pageSize, bytes.Clone(prev)); err == nil {
				t.Errorf("stream truncated to %d bytes accepted", n)
			}
		}
		for _, off := range []int{0, 3, 4 + 8*5 + 2, 4 + 8*refMaxBatch, 4 + 8*refMaxBatch + 4 + 7, 4 + 8*refMaxBatch + 12} {
			bad := bytes.Clone(stream)
			bad[off] ^= 0xff
			mem := bytes.Clone(prev)
			if _, err := refDecodeEpoch(bad, pageSize, mem); err == nil && bytes.Equal(mem, cur) {
				t.Errorf("corrupted byte %d went unnoticed", off)
			}
		}
	}
}

func TestMeasurePipelineSanity(t *testing.T) {
	for _, wl := range []string{"uniform", "sparse"} {
		t.Run(wl, func(t *testing.T) {
			res, err := MeasurePipeline(context.Background(), PipelineConfig{
				MemoryBytes: 8 << 20, Workload: wl, Rate: 50_000, Interval: 5 * time.Millisecond,
				Warmup: 50 * time.Millisecond, Duration: 400 * time.Millisecond, Verify: true,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.PagesAcked <= 0 || res.EpochsAcked <= 0 || !res.Verified {
				t.Fatalf("result %+v", res)
			}
			finitePositive(t, "pages/s", res.PagesPerSec)
			finitePositive(t, "ratio", res.Ratio)
			finitePositive(t, "lz4 bound", res.LZ4PagesPerSec)
		})
	}
}

func TestRunQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	// Pause and codec only: every other section has its own sanity test
	// (the quick pipeline's 64 MiB sparse run is slow under -race).
	var progress bytes.Buffer
	r, err := RunWith(context.Background(), Options{Quick: true, Progress: &progress, Skip: []string{"pipeline", "latency", "failover", "sweep", "scale", "multivm"}})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := r.Write(&buf); err != nil {
		t.Fatal(err)
	}
	if len(r.Pause.Sets) != 3 || len(r.Encode) != 2 || len(r.Errors) != 0 || r.Latency != nil || !strings.Contains(progress.String(), "encode sparse") {
		t.Fatalf("report:\n%s\nprogress:\n%s", buf.String(), progress.String())
	}
	finitePositive(t, "pause_over_memcpy", r.PauseOverMemcpy)
	finitePositive(t, "wire_over_xor_rle", r.WireOverXORRLE)
	t.Logf("\n%s", buf.String())
}

// Benchmarks: each runs one measurement at realistic sizes and reports
// ratios against the bound measured in the same run. Use -benchtime 1x
// (the measurement sets its own sample counts); REMUSD_BENCH_MIB sets the
// guest size (default 256).

func benchMiB() int64 {
	if v, err := strconv.Atoi(os.Getenv("REMUSD_BENCH_MIB")); err == nil && v > 0 {
		return int64(v)
	}
	return 256
}

func BenchmarkPause(b *testing.B) {
	for _, layout := range []string{"scattered", "runs"} {
		b.Run(layout, func(b *testing.B) {
			for range b.N {
				res, err := MeasurePause(context.Background(), PauseConfig{MemoryBytes: benchMiB() << 20, Layout: layout})
				if err != nil {
					b.Fatal(err)
				}
				for _, s := range res.Sets {
					pct := fmt.Sprintf("%g%%", 100*s.Fraction)
					b.ReportMetric(s.Ratio, "pause/memcpy@"+pct)
					b.ReportMetric(float64(s.PauseP50.Microseconds()), "pause-p50-us@"+pct)
					b.ReportMetric(float64(s.MemcpyP50.Microseconds()), "memcpy-p50-us@"+pct)
				}
			}
		})
	}
}

func benchEncode(b *testing.B, kind string, workers int) {
	for range b.N {
		res, err := measureEncodeKind(context.Background(), EncodeConfig{Workers: workers}.withDefaults(), kind)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(res.EncodePagesPerSec, "pages/s")
		b.ReportMetric(res.LZ4PagesPerSec, "lz4-pages/s")
		b.ReportMetric(res.Ratio, "encode/lz4")
		b.ReportMetric(res.WireOverRaw, "wire/raw")
		b.ReportMetric(res.XORRLEOverRaw, "xorrle/raw")
		b.ReportMetric(res.WireOverXORRLE, "wire/xorrle")
	}
}

func BenchmarkEncodeSparse(b *testing.B)         { benchEncode(b, "sparse", 1) }
func BenchmarkEncodeRandom(b *testing.B)         { benchEncode(b, "random", 1) }
func BenchmarkEncodeSparseParallel(b *testing.B) { benchEncode(b, "sparse", runtime.GOMAXPROCS(0)) }
func BenchmarkEncodeRandomParallel(b *testing.B) { benchEncode(b, "random", runtime.GOMAXPROCS(0)) }

func BenchmarkPipelineLoopback(b *testing.B) {
	for _, c := range []struct {
		name  string
		wl    string
		cache int
	}{
		{"uniform", "uniform", 0},
		{"sparse", "sparse", 0},
		// The delta cache covering the whole guest.
		{"uniform-fullcache", "uniform", int(benchMiB() << 20 / pageSize)},
	} {
		b.Run(c.name, func(b *testing.B) {
			for range b.N {
				res, err := MeasurePipeline(context.Background(), PipelineConfig{MemoryBytes: benchMiB() << 20, Workload: c.wl, CachePages: c.cache})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(res.PagesPerSec, "pages/s")
				b.ReportMetric(res.MBPerSec, "MB/s")
				b.ReportMetric(res.LZ4PagesPerSec, "lz4-pages/s")
				b.ReportMetric(res.Ratio, "pipeline/lz4")
			}
		})
	}
}
