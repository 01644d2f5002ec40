//go:build xen

package xen

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor/xen/xenbench"
	"github.com/remusd/remusd/xentest"
)

// benchInterval is the time the guest runs between two checkpoints of the
// in-dom0 benchmark (the round trip's epoch interval).
const benchInterval = rtInterval

// benchWarmup epochs are run and not counted after each Open (the first
// harvest holds everything written since log-dirty was enabled).
const benchWarmup = 2

// TestDom0Bench is the in-dom0 side of `remusd bench --backend xen`
// (package bench boots Xen and runs it; nothing runs it on the host): for
// each guest size in $XEN_BENCH_MIB, a PVH guest running the dirtier is
// checkpointed $XEN_BENCH_EPOCHS times by bare pause, then as many times
// with a cooperative suspend (the mode the product uses), every
// benchInterval, through the calls the engine makes; with
// $XEN_BENCH_FAILOVER=1 the round trip of TestDom0RoundTrip then runs once
// more (cooperative, 128 MiB) for its activation figures. Results are
// printed as xenbench records. A block whose guest died in a TCG triple
// fault (Xen's log says so) is run again on a new guest, up to twice.
func TestDom0Bench(t *testing.T) {
	inDom0(t)
	start := time.Now()
	ctx := context.Background()
	mibs := []int{128}
	if v := os.Getenv(xenbench.EnvGuestMiB); v != "" {
		mibs = nil
		for _, f := range strings.Split(v, ",") {
			m, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || m < 128 {
				t.Fatalf("%s=%q: want sizes of at least 128 MiB", xenbench.EnvGuestMiB, v)
			}
			mibs = append(mibs, m)
		}
	}
	epochs := envInt(xenbench.EnvEpochs, 20)
	emit := func(kind string, rec any) {
		if err := xenbench.Write(os.Stdout, kind, rec); err != nil {
			t.Error(err)
		}
	}
	const maxAttempts = 3
	for _, mib := range mibs {
		var g *benchGuest
		for _, coop := range []bool{false, true} {
			mode := xenbench.ModeBare
			if coop {
				mode = xenbench.ModeCooperative
			}
			key := fmt.Sprintf("%d/%s", mib, mode)
			for attempt := 1; ; attempt++ {
				faults := tripleFaults(ctx)
				var err error
				if g == nil {
					g, err = newBenchGuest(ctx, t, fmt.Sprintf("bench%d-%d%s", mib, attempt, mode[:1]), mib)
				}
				var rec xenbench.Case
				if err == nil {
					rec, err = benchPause(ctx, t, g, coop, epochs)
				}
				if err == nil {
					rec.Attempts = attempt
					emit(xenbench.KindPause, rec)
					t.Logf("dom0: bench %s: stopped %s ms, paused %s ms, memcpy bound %s ms, %s dirty pages (p50/p90/max)",
						key, stat(rec.Stopped), stat(rec.Paused), stat(rec.Memcpy), stat(rec.Pages))
					break
				}
				retry := attempt < maxAttempts && tripleFaults(ctx) > faults
				emit(xenbench.KindError, xenbench.Error{Case: key, Error: fmt.Sprintf("attempt %d: %v", attempt, err), Final: !retry})
				if g != nil {
					g.destroy(ctx)
					g = nil
				}
				if !retry {
					t.Errorf("bench %s: %v", key, err)
					break
				}
				t.Logf("dom0: bench %s: RETRYING on a new guest after a triple fault: %v", key, err)
			}
		}
		if g != nil {
			g.destroy(ctx)
		}
		g = nil
		debug.FreeOSMemory() // the buffers, before the next size
	}
	if os.Getenv(xenbench.EnvFailover) == "1" {
		foEpochs := envInt(xenbench.EnvFOEpochs, 12)
		for attempt := 1; ; attempt++ {
			faults := tripleFaults(ctx)
			var r rtResult
			ok := t.Run(fmt.Sprintf("failover-%d", attempt), func(t *testing.T) {
				r = roundTripWith(t, rtOptions{name: fmt.Sprintf("benchfo%d", attempt), coop: true, epochs: uint64(foEpochs)})
			})
			debug.FreeOSMemory()
			if ok {
				pages := make([]float64, len(r.pages))
				for i, p := range r.pages {
					pages[i] = float64(p)
				}
				emit(xenbench.KindFailover, xenbench.Failover{
					GuestMiB: guestMiB(), Epochs: int(r.acked), IntervalMs: ms(rtInterval), Attempts: attempt,
					StandbySec: r.standby.Seconds(), EnginePause: xenbench.Durations(r.pauses), EnginePages: xenbench.Values(pages),
					ActivationMs: ms(r.activation), SetContextMs: ms(r.info.Context), UnpauseMs: ms(r.info.Unpause),
					FirstProgressMs: ms(r.progress), HundredRoundsMs: ms(r.hundred),
				})
				break
			}
			retry := attempt < maxAttempts && tripleFaults(ctx) > faults
			emit(xenbench.KindError, xenbench.Error{Case: "failover", Error: fmt.Sprintf("attempt %d failed (see the test's log)", attempt), Final: !retry})
			if !retry {
				break
			}
		}
	}
	emit(xenbench.KindDone, xenbench.Done{Seconds: time.Since(start).Seconds()})
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func stat(s xenbench.Stat) string { return fmt.Sprintf("%.2f/%.2f/%.2f", s.P50, s.P90, s.Max) }

// tripleFaults counts the domU triple faults in Xen's log (xl dmesg).
func tripleFaults(ctx context.Context) int {
	out, _ := xlRun(ctx, filepath.Join(xentest.BinDir, "xl"), "dmesg")
	return strings.Count(out, tripleFault)
}

// benchGuest is a running dirtier guest of the benchmark.
type benchGuest struct {
	name  string
	domid uint32
	mib   int
	// staging and src (the bound's source) are allocated and first
	// touched once per guest size, outside the timings (first touch is
	// slow under TCG), and reused by both modes.
	staging, src []byte
}

// buffers returns staging for pages mapped pages and src for n.
func (g *benchGuest) buffers(mapped, n int) (staging, src []byte) {
	if len(g.staging) != mapped*pageSize || len(g.src) != n*pageSize {
		g.staging, g.src = make([]byte, mapped*pageSize), make([]byte, n*pageSize)
		for _, b := range [][]byte{g.staging, g.src} {
			for i := 0; i < len(b); i += pageSize {
				b[i] = 1
			}
		}
	}
	return g.staging, g.src
}

func newBenchGuest(ctx context.Context, t *testing.T, name string, mib int) (*benchGuest, error) {
	domid, _ := createGuestWith(ctx, t, name, "pvh", mib, "", domURamdisk, "")
	if err := waitConsoleErr(name, "dirtier: 8192 pages", 150*time.Second); err != nil {
		_, _ = xlRun(ctx, filepath.Join(xentest.BinDir, "xl"), "destroy", name)
		return nil, err
	}
	return &benchGuest{name: name, domid: domid, mib: mib}, nil
}

func (g *benchGuest) destroy(ctx context.Context) {
	_ = exec.CommandContext(ctx, filepath.Join(xentest.BinDir, "xl"), "destroy", g.name).Run()
}

// benchPause checkpoints g epochs times (after benchWarmup more) the way
// the engine does (Pause, HarvestDirty, CopyDirty into staging,
// SaveDeviceState, Resume), bare or cooperative, and after each epoch
// copies the same runs of pages between two warm dom0 buffers: the
// bound.
func benchPause(ctx context.Context, t *testing.T, bg *benchGuest, coop bool, epochs int) (xenbench.Case, error) {
	mode := xenbench.ModeBare
	if coop {
		mode = xenbench.ModeCooperative
	}
	rec := xenbench.Case{GuestMiB: bg.mib, Mode: mode, Epochs: epochs, IntervalMs: ms(benchInterval), Load: dirtierLoad}
	g, err := Open(ctx, bg.domid, Options{Name: bg.name, Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), Cooperative: coop})
	if err != nil {
		return rec, err
	}
	defer g.Close()
	n := g.NumPages()
	mapped := g.Mapped()
	rec.MappedPages, rec.Backend = mapped.Count(), g.BackendVersion()
	staging, src := bg.buffers(mapped.Count(), n)
	bm := dirtymap.New(n)
	var state []byte
	var stopped, paused, suspend, pause, harvest, cp, context_, resumeFast, unpause, memcpy []time.Duration
	var pages []float64
	for e := 0; e < benchWarmup+epochs; e++ {
		time.Sleep(benchInterval)
		if why := domainGone(ctx, g); why != "" {
			return rec, fmt.Errorf("epoch %d: the guest is gone (%s)", e, why)
		}
		ectx, cancel := context.WithTimeout(ctx, 60*time.Second)
		t0 := time.Now()
		err := g.Pause(ectx)
		if err == nil {
			bm.Reset()
			err = g.HarvestDirty(ectx, bm)
		}
		if err == nil {
			_, err = g.CopyDirty(bm, staging)
		}
		if err == nil {
			state, err = g.SaveDeviceState(ectx, state[:0])
		}
		if err == nil {
			err = g.Resume(ectx)
		}
		whole := time.Since(t0)
		cancel()
		if err != nil {
			return rec, fmt.Errorf("epoch %d: %w", e, err)
		}
		tm, _, err := g.LastTimings(ctx)
		if err != nil {
			return rec, err
		}
		// The bound: the same runs, between two warm private buffers.
		t1 := time.Now()
		k := 0
		bm.Runs(func(start, cnt int) bool {
			copy(staging[k*pageSize:(k+cnt)*pageSize], src[start*pageSize:(start+cnt)*pageSize])
			k += cnt
			return true
		})
		mc := time.Since(t1)
		if e < benchWarmup {
			continue
		}
		stopped, paused = append(stopped, whole), append(paused, whole-tm.Suspend)
		pause, harvest, cp, context_, unpause = append(pause, tm.Pause), append(harvest, tm.Harvest), append(cp, tm.Copy), append(context_, tm.Context), append(unpause, tm.Unpause)
		if coop {
			suspend, resumeFast = append(suspend, tm.Suspend), append(resumeFast, tm.ResumeFast)
		}
		memcpy = append(memcpy, mc)
		pages = append(pages, float64(tm.DirtyPages))
	}
	d := xenbench.Durations
	rec.Stopped, rec.Paused, rec.Pause, rec.Harvest = d(stopped), d(paused), d(pause), d(harvest)
	rec.Copy, rec.Context, rec.Unpause, rec.Memcpy = d(cp), d(context_), d(unpause), d(memcpy)
	if coop {
		s, r := d(suspend), d(resumeFast)
		rec.Suspend, rec.ResumeFast = &s, &r
	}
	rec.Pages = xenbench.Values(pages)
	return rec, nil
}
