package qemu

import (
	"context"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/transport"
)

// checkRebaselineContract asserts the hypervisor.Rebaseliner contract for
// one harvest: every page not reported hashes to its baseline hash. It
// returns how many pages changed since the baseline (all reported) and how
// many were reported although their hash is the baseline's.
func checkRebaselineContract(t *testing.T, mem []byte, h []uint64, bm *dirtymap.Bitmap) (changed, extra int) {
	t.Helper()
	if len(h) != len(mem)/pageSize {
		t.Fatalf("Rebaseline returned %d hashes for %d pages", len(h), len(mem)/pageSize)
	}
	for p := range h {
		same := transport.PageHash(mem[p*pageSize:(p+1)*pageSize]) == h[p]
		switch {
		case !same && !bm.Test(p):
			t.Fatalf("page %d changed since the baseline but was not harvested", p)
		case !same:
			changed++
		case bm.Test(p):
			extra++
		}
	}
	return changed, extra
}

// TestRebaselineContract: Rebaseline runs while a writer storms guest RAM
// (through a second shared mapping of the RAM file, as a vCPU would write
// it) and SeaBIOS runs; after the writer stops and the guest is paused,
// every page the harvest does not report hashes to the value Rebaseline
// returned, for both trackers, many times.
func TestRebaselineContract(t *testing.T) {
	for _, mode := range []Tracking{TrackShadow, TrackHash} {
		t.Run(mode.String(), func(t *testing.T) {
			// Writers on OS threads of their own, as vCPUs are, so that
			// they run while the rebaseline's workers copy and hash.
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(8))
			g := launchTest(t, "rebaseline", 64)
			g.SetTracking(mode)
			var _ hypervisor.Rebaseliner = g
			ctx := testCtx(t)
			w, err := mapRAM(g.spec.RAMPath, 0, true)
			if err != nil {
				t.Fatal(err)
			}
			defer w.unmap()
			n := g.NumPages()
			// Pages SeaBIOS leaves alone: [16 MiB, 48 MiB); a hot set of
			// 64 pages is rewritten over and over so that the copy meets
			// writes in the middle of pages.
			const lo, hi, hot = 16 << 20 / pageSize, 48 << 20 / pageSize, 64
			writer := func(stop <-chan struct{}, done *sync.WaitGroup, seed uint64) {
				defer done.Done()
				rng := rand.New(rand.NewPCG(seed, 7))
				for i := uint64(1); ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					p := lo + rng.IntN(hot)
					if i%64 == 0 {
						p = lo + rng.IntN(hi-lo)
					}
					page := w.mem[p*pageSize : (p+1)*pageSize]
					for off := 0; off < pageSize; off += 512 { // spread over the page
						page[off+rng.IntN(512)] = byte(i)
					}
				}
			}
			// A lock-word pattern on 64 pages of their own: a word is
			// changed, held a moment and changed back (RAM returns to
			// what a baseline copy may have seen).
			toggler := func(stop <-chan struct{}, done *sync.WaitGroup, seed uint64) {
				defer done.Done()
				rng := rand.New(rand.NewPCG(seed, 9))
				for {
					select {
					case <-stop:
						return
					default:
					}
					p := lo + hot + rng.IntN(hot)
					w := (*uint64)(unsafe.Pointer(&w.mem[p*pageSize+rng.IntN(pageSize/8)*8]))
					old := atomic.LoadUint64(w)
					atomic.StoreUint64(w, ^old)
					for i := 0; i < 100; i++ {
						_ = atomic.LoadUint64(w)
					}
					atomic.StoreUint64(w, old)
				}
			}
			var changedTotal, extraTotal, harvested int
			const rounds = 30
			for round := 0; round < rounds; round++ {
				stop := make(chan struct{})
				var wg sync.WaitGroup
				wg.Add(3)
				go writer(stop, &wg, uint64(round))
				go writer(stop, &wg, uint64(round)+1000)
				go toggler(stop, &wg, uint64(round))
				h, err := g.Rebaseline(ctx)
				if err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
				close(stop)
				wg.Wait()
				if err := g.Pause(ctx); err != nil {
					t.Fatal(err)
				}
				bm := dirtymap.New(n)
				if err := g.HarvestDirty(ctx, bm); err != nil {
					t.Fatal(err)
				}
				changed, extra := checkRebaselineContract(t, g.Memory(), h, bm)
				changedTotal += changed
				extraTotal += extra
				harvested += bm.Count()
				outside := bm.Count()
				bm.Runs(func(first, k int) bool {
					for p := first; p < first+k; p++ {
						if p >= lo && p < hi {
							outside--
						}
					}
					return true
				})
				if outside > n/16 {
					t.Fatalf("round %d: %d pages the writers never touch harvested: the baseline did not take", round, outside)
				}
				if err := g.Resume(ctx); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("%d rounds: %d pages harvested, %d changed since their baseline hash (all harvested), %d harvested with their baseline hash (rewritten to the same content)",
				rounds, harvested, changedTotal, extraTotal)
			if changedTotal == 0 {
				t.Fatal("the writers changed no page after Rebaseline: the test proves nothing")
			}

			// On a paused guest nothing changes: the next harvest is empty.
			if err := g.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			h, err := g.Rebaseline(ctx)
			if err != nil {
				t.Fatal(err)
			}
			bm := dirtymap.New(n)
			if err := g.HarvestDirty(ctx, bm); err != nil {
				t.Fatal(err)
			}
			if bm.Count() != 0 {
				t.Fatalf("harvest right after a paused Rebaseline: %d pages", bm.Count())
			}
			checkRebaselineContract(t, g.Memory(), h, bm)
			if err := g.Resume(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestRebaselineWriteBetweenCopyAndHash: a guest write that lands after a
// page was copied into the shadow and is undone before the pause (a lock
// word taken and released, say) leaves RAM equal to the shadow, so the
// harvest does not report the page: the hash returned must be the
// shadow's, not the transient RAM's.
func TestRebaselineWriteBetweenCopyAndHash(t *testing.T) {
	const pages = 256
	mem := make([]byte, pages*pageSize)
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	tr := newTracker(len(mem), TrackShadow)
	tr.workers = 1
	testHookAfterShadowCopy = func(p int) {
		if p%3 == 0 {
			mem[p*pageSize+100] ^= 0xff // written after the copy...
		}
	}
	defer func() { testHookAfterShadowCopy = nil }()
	h := make([]uint64, pages)
	if err := tr.rebaseline(context.Background(), mem, h); err != nil {
		t.Fatal(err)
	}
	for p := 0; p < pages; p += 3 {
		mem[p*pageSize+100] ^= 0xff // ...and undone before the pause
	}
	bm := dirtymap.New(pages)
	tr.scan(mem, bm)
	changed, _ := checkRebaselineContract(t, mem, h, bm)
	if changed != 0 || bm.Count() != 0 {
		t.Fatalf("%d changed, %d harvested; want none", changed, bm.Count())
	}
	// A write that stays is harvested.
	testHookAfterShadowCopy = func(p int) {
		if p%5 == 0 {
			mem[p*pageSize+200]++
		}
	}
	if err := tr.rebaseline(context.Background(), mem, h); err != nil {
		t.Fatal(err)
	}
	bm.Reset()
	tr.scan(mem, bm)
	if changed, _ := checkRebaselineContract(t, mem, h, bm); changed != (pages+4)/5 || bm.Count() != changed {
		t.Fatalf("%d changed, %d harvested; want %d both", changed, bm.Count(), (pages+4)/5)
	}
}

// TestRebaselineFresh: Rebaseline as the first thing after Reattach-like
// start (no tracker yet), and a cancelled context leaves tracking
// conservative (the next harvest reports every page).
func TestRebaselineFresh(t *testing.T) {
	g := launchTest(t, "rebaseline-fresh", 64)
	ctx := testCtx(t)
	n := g.NumPages()
	if _, err := g.Rebaseline(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(n)
	if err := g.HarvestDirty(ctx, bm); err != nil {
		t.Fatal(err)
	}
	if bm.Count() == n || bm.Count() > n/10 {
		t.Fatalf("first harvest after Rebaseline: %d of %d pages", bm.Count(), n)
	}
	if err := g.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := g.Rebaseline(cctx); err == nil {
		t.Fatal("Rebaseline with a cancelled context succeeded")
	}
	// A cancelled rebaseline part-way: drive the tracker directly.
	tr := newTracker(len(g.Memory()), TrackShadow)
	cctx, cancel = context.WithCancel(ctx)
	cancel()
	if err := tr.rebaseline(cctx, g.Memory(), make([]uint64, n)); err == nil || tr.primed {
		t.Fatalf("cancelled tracker rebaseline: err %v, primed %v", err, tr.primed)
	}
}
