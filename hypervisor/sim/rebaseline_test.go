package sim

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/transport"
)

// TestRebaselineContract: Rebaseline runs while the workload writes; at the
// next pause every page the harvest does not report hashes to the value
// Rebaseline returned (hypervisor.Rebaseliner), for every writing
// workload, many times; and the harvest is not simply everything.
func TestRebaselineContract(t *testing.T) {
	for _, wl := range []string{"uniform", "hotset", "sequential", "sparse"} {
		t.Run(wl, func(t *testing.T) {
			cfg := Config{MemoryBytes: 16 << 20, Workload: wl, Rate: 400000, Seed: 7, OutputEvery: 16}
			g := newGuest(t, cfg)
			var _ hypervisor.Rebaseliner = g
			ctx := context.Background()
			n := g.NumPages()
			var changedTotal, during uint64
			for round := 0; round < 60; round++ {
				before := g.Ops()
				h, err := g.Rebaseline(ctx)
				if err != nil {
					t.Fatal(err)
				}
				during += g.Ops() - before
				if len(h) != n {
					t.Fatalf("%d hashes for %d pages", len(h), n)
				}
				time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
				pause(t, g)
				bm := dirtymap.New(n)
				if err := g.HarvestDirty(ctx, bm); err != nil {
					t.Fatal(err)
				}
				mem := g.Memory()
				for p := range h {
					if transport.PageHash(mem[p*pageSize:(p+1)*pageSize]) != h[p] {
						if !bm.Test(p) {
							t.Fatalf("round %d: page %d changed since the baseline but was not harvested", round, p)
						}
						changedTotal++
					}
				}
				if bm.Count() == n {
					t.Fatalf("round %d: every page harvested: the baseline did not take", round)
				}
				resume(t, g)
			}
			t.Logf("%d pages changed after their baseline (all harvested); %d ops ran during Rebaseline calls", changedTotal, during)
			if changedTotal == 0 || during == 0 {
				t.Fatal("no write met a Rebaseline: the test proves nothing")
			}
		})
	}
}

// TestRebaselinePausedAndClosed: on a paused guest the next harvest is
// empty and the hashes are the memory's; a closed guest refuses; a
// cancelled context changes nothing.
func TestRebaselinePausedAndClosed(t *testing.T) {
	g := newGuest(t, Config{MemoryBytes: 4 << 20, Workload: "uniform", Rate: 200000, Seed: 3})
	ctx := context.Background()
	waitOps(t, g, 100)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := g.Rebaseline(cctx); err == nil {
		t.Fatal("Rebaseline with a cancelled context succeeded")
	}
	pause(t, g)
	h, err := g.Rebaseline(ctx)
	if err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(g.NumPages())
	if err := g.HarvestDirty(ctx, bm); err != nil {
		t.Fatal(err)
	}
	if bm.Count() != 0 {
		t.Fatalf("harvest after a paused Rebaseline: %d pages", bm.Count())
	}
	mem := g.Memory()
	for p := range h {
		if transport.PageHash(mem[p*pageSize:(p+1)*pageSize]) != h[p] {
			t.Fatalf("page %d: hash differs from memory", p)
		}
	}
	resume(t, g)
	g.Close()
	if _, err := g.Rebaseline(ctx); err != ErrClosed {
		t.Fatalf("Rebaseline after Close: %v", err)
	}
}
