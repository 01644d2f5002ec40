package qemu

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
)

// BenchmarkPauseBySize is issue 4 item 8's pause-time figure: the pause of
// one checkpoint epoch and its parts (stop, scan, copy, save, cont) on a
// real BIOS-only guest under TCG, for guest sizes 64 MiB, 256 MiB and
// 1 GiB, with the default tracker (shadow copy). The first epoch (every
// page, first touch of the shadow and the staging buffer) is excluded.
// Benchmarks only run with -bench; the 1 GiB case takes a while under TCG:
//
//	go test -run '^$' -bench PauseBySize -benchtime 30x ./hypervisor/qemu/
func BenchmarkPauseBySize(b *testing.B) {
	for _, mib := range []int{64, 256, 1024} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) { benchPauseSize(b, mib) })
	}
}

func benchPauseSize(b *testing.B, mib int) {
	g := launchTest(b, fmt.Sprintf("pb%d", mib), mib)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	bm := dirtymap.New(g.NumPages())
	staging := make([]byte, len(g.Memory()))
	var dev []byte
	var parts [5]time.Duration // stop, scan, copy, save, cont
	var total, worst time.Duration
	dirty := 0
	epoch := func(measure bool) {
		var t [6]time.Time
		t[0] = time.Now()
		if err := g.Pause(ctx); err != nil {
			b.Fatal(err)
		}
		t[1] = time.Now()
		bm.Reset()
		if err := g.HarvestDirty(ctx, bm); err != nil {
			b.Fatal(err)
		}
		t[2] = time.Now()
		off := 0
		mem := g.Memory()
		bm.Runs(func(first, n int) bool {
			off += copy(staging[off:], mem[first*pageSize:(first+n)*pageSize])
			return true
		})
		t[3] = time.Now()
		var err error
		if dev, err = g.SaveDeviceState(ctx, dev[:0]); err != nil {
			b.Fatal(err)
		}
		t[4] = time.Now()
		if err := g.Resume(ctx); err != nil {
			b.Fatal(err)
		}
		t[5] = time.Now()
		if !measure {
			return
		}
		for i := range parts {
			parts[i] += t[i+1].Sub(t[i])
		}
		p := t[5].Sub(t[0])
		total += p
		worst = max(worst, p)
		dirty += bm.Count()
	}
	// Initial sync: every page reported, first touch of shadow and staging
	// (copy every page once so the staging buffer is faulted in too).
	epoch(false)
	epoch(false)
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		time.Sleep(25 * time.Millisecond) // the guest runs one epoch interval
		b.StartTimer()
		epoch(true)
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / n }
	for i, name := range []string{"stop", "scan", "copy", "save", "cont"} {
		b.ReportMetric(ms(parts[i]), name+"-ms")
	}
	b.ReportMetric(ms(total), "pause-ms")
	b.ReportMetric(float64(worst)/float64(time.Millisecond), "pause-max-ms")
	b.ReportMetric(float64(dirty)/n, "dirty/op")
	b.ReportMetric(float64(len(dev)), "devstate-bytes")
}
