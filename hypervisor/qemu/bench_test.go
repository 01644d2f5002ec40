package qemu

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
)

// BenchmarkHarvest128MiB is the scan of one epoch on 128 MiB of RAM with 1%
// of the pages changed, for both trackers. The first pass (initial sync,
// including first touch of the shadow or hash table) is excluded.
func BenchmarkHarvest128MiB(b *testing.B) {
	const size = 128 << 20
	mem := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < size; i += 8 {
		mem[i] = byte(rng.Uint32()) // no two pages alike, every page touched
	}
	pages := size / pageSize
	for _, mode := range []Tracking{TrackShadow, TrackHash} {
		b.Run(mode.String(), func(b *testing.B) {
			t := newTracker(size, mode)
			bm := dirtymap.New(pages)
			t.scan(mem, bm)
			b.SetBytes(size)
			b.ResetTimer()
			dirty := 0
			for b.Loop() {
				b.StopTimer()
				for range pages / 100 {
					mem[rng.IntN(pages)*pageSize+rng.IntN(pageSize)]++
				}
				bm.Reset()
				b.StartTimer()
				t.scan(mem, bm)
				dirty += bm.Count()
			}
			b.ReportMetric(float64(dirty)/float64(b.N), "dirty/op")
		})
	}
}

// BenchmarkPauseParts measures the parts of one checkpoint pause on a real
// 128 MiB BIOS-only guest under TCG: stop, scan, copy, save, cont.
func BenchmarkPauseParts(b *testing.B) {
	for _, mode := range []Tracking{TrackShadow, TrackHash} {
		b.Run(mode.String(), func(b *testing.B) { benchPauseParts(b, mode) })
	}
}

func benchPauseParts(b *testing.B, mode Tracking) {
	g := launchTest(b, "bench", 128)
	g.SetTracking(mode)
	ctx := testCtx(b)
	bm := dirtymap.New(g.NumPages())
	staging := make([]byte, len(g.Memory()))
	var dev []byte
	var stop, scan, cp, save, cont, total time.Duration
	dirty := 0
	epoch := func(measure bool) {
		t0 := time.Now()
		if err := g.Pause(ctx); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		bm.Reset()
		if err := g.HarvestDirty(ctx, bm); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		off := 0
		mem := g.Memory()
		bm.Runs(func(first, n int) bool {
			off += copy(staging[off:], mem[first*pageSize:(first+n)*pageSize])
			return true
		})
		t3 := time.Now()
		var err error
		if dev, err = g.SaveDeviceState(ctx, dev[:0]); err != nil {
			b.Fatal(err)
		}
		t4 := time.Now()
		if err := g.Resume(ctx); err != nil {
			b.Fatal(err)
		}
		t5 := time.Now()
		if measure {
			stop += t1.Sub(t0)
			scan += t2.Sub(t1)
			cp += t3.Sub(t2)
			save += t4.Sub(t3)
			cont += t5.Sub(t4)
			total += t5.Sub(t0)
			dirty += bm.Count()
		}
	}
	epoch(false) // initial sync: every page, first touch
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		time.Sleep(20 * time.Millisecond) // the guest runs
		b.StartTimer()
		epoch(true)
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / n }
	b.ReportMetric(ms(stop), "stop-ms")
	b.ReportMetric(ms(scan), "scan-ms")
	b.ReportMetric(ms(cp), "copy-ms")
	b.ReportMetric(ms(save), "save-ms")
	b.ReportMetric(ms(cont), "cont-ms")
	b.ReportMetric(ms(total), "pause-ms")
	b.ReportMetric(float64(dirty)/n, "dirty/op")
	b.ReportMetric(float64(len(dev)), "devstate-bytes")
}

// BenchmarkRebaseline is Rebaseline on a running BIOS-only guest of 128 MiB
// and 1 GiB, for both trackers. Reported beside ns/op (the steady cost,
// tracker and mapping warm): map-first-ms, the first pass over a fresh
// mapping of the RAM file (what a re-attached daemon pays once), and
// first-ms, the first Rebaseline, which allocates the shadow or hash table
// (first touch of fresh anonymous memory, ARCHITECTURE §5).
func BenchmarkRebaseline(b *testing.B) {
	for _, mib := range []int{128, 1024} {
		for _, mode := range []Tracking{TrackShadow, TrackHash} {
			b.Run(fmt.Sprintf("%dMiB/%s", mib, mode), func(b *testing.B) {
				g := launchTest(b, "rebaseline-bench", mib)
				g.SetTracking(mode)
				ctx := testCtx(b)
				t0 := time.Now()
				mem := g.Memory()
				for i := 0; i < len(mem); i += pageSize {
					benchSink += mem[i]
				}
				mapFirst := time.Since(t0)
				t0 = time.Now()
				if _, err := g.Rebaseline(ctx); err != nil {
					b.Fatal(err)
				}
				first := time.Since(t0)
				b.SetBytes(int64(mib) << 20)
				for b.Loop() {
					if _, err := g.Rebaseline(ctx); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(mapFirst.Microseconds())/1000, "map-first-ms")
				b.ReportMetric(float64(first.Microseconds())/1000, "first-ms")
			})
		}
	}
}

var benchSink byte
