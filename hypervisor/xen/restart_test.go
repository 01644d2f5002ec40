//go:build xen

package xen

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cespare/xxhash/v2"
	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/transport"
	"github.com/remusd/remusd/xentest"
)

// TestXenRestart boots Xen under QEMU and runs, in dom0, what a restarted
// daemon relies on: Rebaseline's contract on a running guest
// (TestDom0Rebaseline), the recovery of a domain a dead daemon left
// suspended and paused (TestDom0Recover), and the harvest failing closed
// when the guest's memory changes under it (TestDom0LayoutChanged).
func TestXenRestart(t *testing.T) {
	runInDom0(t, "^TestDom0(Rebaseline|Recover|LayoutChanged)$", xentest.Config{Timeout: 420 * time.Second})
}

// domainInfo asks Xen about domid through a handle of its own.
func domainInfo(t *testing.T, domid uint32) domInfo {
	t.Helper()
	x, err := openXC(domid)
	if err != nil {
		t.Fatal(err)
	}
	defer x.close()
	info, err := x.info()
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// abandon stands in for the death of the process holding g: its handles
// and mapping go (as the kernel releases them at exit), while everything
// it did to the domain stays: log-dirty mode, a suspend, a pause
// reference.
func abandon(t *testing.T, g *Guest) {
	t.Helper()
	g.sem <- struct{}{}
	g.paused, g.suspended, g.logDirty = false, false, false
	<-g.sem
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
}

// maxRound is the highest dirtier round in guest memory.
func maxRound(g *Guest) int64 {
	rounds := make([]int64, g.NumPages())
	dirtierRounds(g.Memory(), g.Mapped(), rounds)
	return slices.Max(rounds)
}

// waitRunsOn waits until the dirtier's round in g's memory passes from.
func waitRunsOn(t *testing.T, g *Guest, from int64, what string) int64 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		r := maxRound(g)
		if r > from {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the dirtier did not run on (round %d, was %d); domain %+v", what, r, from, domainInfo(t, g.DomID()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestDom0Rebaseline checks hypervisor.Rebaseliner's contract against a
// real Xen: while the dirtier writes, Rebaseline returns H; at the next
// pause, every page whose content hashes differently from H[p] must be in
// the harvest. Also: holes hash as zero pages, a paused guest can be
// rebaselined, and a Rebaseline cut short by its deadline after the clean
// makes the next harvest report every page.
func TestDom0Rebaseline(t *testing.T) {
	inDom0(t)
	ctx := context.Background()
	domid := createGuest(ctx, t, "rebase", "pvh")
	waitConsole(t, "rebase", "dirtier: 8192 pages", 150*time.Second)
	g, err := Open(ctx, domid, Options{Name: "rebase", Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	n := g.NumPages()
	mem, mapped := g.Memory(), g.Mapped()
	// Rebaseline's hashes are compared with the backup's, which uses
	// transport.PageHash: it is xxhash64.
	if transport.PageHash(mem[:pageSize]) != xxhash.Sum64(mem[:pageSize]) {
		t.Fatal("transport.PageHash is not xxhash64")
	}
	zero := transport.PageHash(make([]byte, pageSize))
	// Content right after each Rebaseline, for diagnosing a miss.
	snap := make([]byte, len(mem))
	for i := 0; i < len(snap); i += pageSize { // first touch outside the timings
		snap[i] = 1
	}
	bm := dirtymap.New(n)
	var took, inside []time.Duration
	var totalChanged, totalReported int
	// Sleeps between Rebaseline and the pause; -1: rebaseline while paused.
	for round, sleep := range []time.Duration{0, 20 * time.Millisecond, 100 * time.Millisecond, 0, 500 * time.Millisecond, -1, 50 * time.Millisecond} {
		rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		if sleep < 0 {
			if err := g.Pause(rctx); err != nil {
				t.Fatal(err)
			}
		}
		t0 := time.Now()
		h, err := g.Rebaseline(rctx)
		d := time.Since(t0)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		copy(snap, mem)
		if len(h) != n {
			t.Fatalf("round %d: %d hashes for %d pages", round, len(h), n)
		}
		if sleep > 0 {
			time.Sleep(sleep)
		}
		if err := g.Pause(rctx); err != nil {
			t.Fatal(err)
		}
		bm.Reset()
		if err := g.HarvestDirty(rctx, bm); err != nil {
			t.Fatal(err)
		}
		tm, _, err := g.LastTimings(rctx)
		if err != nil {
			t.Fatal(err)
		}
		changed, missed := 0, 0
		for p := 0; p < n; p++ {
			if !mapped.Test(p) && h[p] != zero {
				t.Errorf("round %d: hole at index %d hashed %#x, not as a zero page", round, p, h[p])
			}
			pg := mem[p*pageSize : (p+1)*pageSize]
			if transport.PageHash(pg) == h[p] {
				continue
			}
			changed++
			if bm.Test(p) {
				continue
			}
			old := snap[p*pageSize : (p+1)*pageSize]
			if transport.PageHash(old) == h[p] {
				if why, ok := vcpuTimeWrite(old, pg); ok {
					// The README's Xen caveat: Xen 4.17 writes vcpu_info
					// outside log-dirty (the epoch path has it too).
					t.Logf("round %d: index %d changed only in a vcpu_time_info slot, not reported (Xen's vcpu_info writes): %s", round, p, why)
					continue
				}
			}
			missed++
			why, _ := vcpuTimeWrite(old, pg)
			t.Errorf("round %d: index %d hashes differently from Rebaseline's H[p] and is not in the harvest (%s)", round, p, why)
		}
		totalChanged += changed
		totalReported += bm.Count()
		took, inside = append(took, d), append(inside, tm.Rebaseline)
		t.Logf("round %d (pause after %v): Rebaseline %s (inside the call %s), %d pages changed since, %d reported, %d missed",
			round, sleep, us(d), us(tm.Rebaseline), changed, bm.Count(), missed)
		if err := g.Resume(rctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	if totalChanged == 0 {
		t.Fatal("vacuous: no page changed after a Rebaseline")
	}
	m := func(v []time.Duration) string {
		v = slices.Clone(v)
		slices.Sort(v)
		return fmt.Sprintf("median %s min %s max %s", us(v[len(v)/2]), us(v[0]), us(v[len(v)-1]))
	}
	t.Logf("Rebaseline of %d pages (%d MiB), %d rounds: as the caller waits %s; inside the call %s; %d pages changed after them, all reported (%d reported)",
		n, n*pageSize>>20, len(took), m(took), m(inside), totalChanged, totalReported)

	// Cut short after the clean: the next harvest must report every page.
	for attempt := 0; attempt < 5; attempt++ {
		short, cancel := context.WithTimeout(ctx, time.Duration(attempt+1)*2*time.Millisecond)
		_, err := g.Rebaseline(short)
		cancel()
		if err == nil {
			continue
		}
		if _, _, err := g.LastTimings(ctx); err != nil { // waits for the abandoned call
			t.Fatal(err)
		}
		g.sem <- struct{}{}
		all := g.allDirty
		<-g.sem
		if !all {
			t.Logf("a short Rebaseline failed before its clean: %v", err)
			continue
		}
		if err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		bm.Reset()
		if err := g.HarvestDirty(ctx, bm); err != nil {
			t.Fatal(err)
		}
		if bm.Count() != n {
			t.Fatalf("after a Rebaseline cut short (%v), the harvest reported %d of %d pages", err, bm.Count(), n)
		}
		if err := g.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		t.Logf("a Rebaseline cut short after its clean (%v): the next harvest reported all %d pages", err, n)
		return
	}
	t.Log("no short Rebaseline failed after its clean (timing): the conservative path was not exercised this run")
}

// TestDom0Recover: a daemon dies in the middle of a cooperative
// checkpoint, leaving its guest suspended and paused. Open without
// Recover refuses it and says why; Open with Recover resumes it and the
// guest runs on and can be checkpointed. The same for a guest left only
// paused.
func TestDom0Recover(t *testing.T) {
	inDom0(t)
	ctx := context.Background()
	domid := createGuest(ctx, t, "recov", "pvh")
	waitConsole(t, "recov", "dirtier: 8192 pages", 150*time.Second)
	log := zaptest.NewLogger(t)

	dead, err := Open(ctx, domid, Options{Name: "recov", Logger: log, Cooperative: true})
	if err != nil {
		t.Fatal(err)
	}
	r0 := waitRunsOn(t, dead, 0, "before the checkpoint")
	pctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	if err := dead.Pause(pctx); err != nil { // suspend, then pause
		t.Fatal(err)
	}
	cancel()
	abandon(t, dead)
	info := domainInfo(t, domid)
	if !info.shutdown || info.shutdownReason != shutdownSuspend || !info.paused {
		t.Fatalf("the dead daemon's domain: %+v, want suspended and paused", info)
	}

	_, err = Open(ctx, domid, Options{Name: "recov", Logger: log, Cooperative: true})
	if err == nil {
		t.Fatal("opened a domain left suspended without Recover")
	}
	t.Logf("without Recover: %v", err)
	if !errors.Is(err, ErrLeftSuspended) {
		t.Fatalf("error %v is not ErrLeftSuspended", err)
	}
	for _, w := range []string{"suspended", "paused", "Recover"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
	if info := domainInfo(t, domid); !info.shutdown || !info.paused {
		t.Fatalf("a refused Open changed the domain: %+v", info)
	}

	t0 := time.Now()
	g, err := Open(ctx, domid, Options{Name: "recov", Logger: log, Cooperative: true, Recover: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Open with Recover: %s; recovered: %q", time.Since(t0).Round(time.Millisecond), g.Recovered())
	if !strings.Contains(g.Recovered(), "adopted the suspend") || !strings.Contains(g.Recovered(), "pause reference") || !g.Paused() {
		t.Errorf("Recovered() = %q, Paused() = %v: want the suspend and the pause adopted", g.Recovered(), g.Paused())
	}
	// Adopted, not undone: the guest stays stopped until its owner says
	// it may run (the daemon: after the witness and the output buffer).
	time.Sleep(time.Second)
	if info := domainInfo(t, domid); !info.shutdown || !info.paused {
		t.Fatalf("after Open with Recover: %+v, want still suspended and paused", info)
	}
	rctx, rcancel := context.WithTimeout(ctx, 60*time.Second)
	if err := g.Resume(rctx); err != nil {
		t.Fatal(err)
	}
	rcancel()
	if info := domainInfo(t, domid); info.shutdown || info.paused || info.dying || g.Paused() {
		t.Fatalf("after Resume: %+v, want running", info)
	}
	r1 := waitRunsOn(t, g, r0, "after Recover and Resume")
	t.Logf("dirtier round %d before the dead checkpoint, %d after Recover (%s after Open began)", r0, r1, time.Since(t0).Round(time.Millisecond))
	// The recovered guest checkpoints as any other.
	ectx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := g.Pause(ectx); err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(g.NumPages())
	if err := g.HarvestDirty(ectx, bm); err != nil {
		t.Fatal(err)
	}
	st, err := g.SaveDeviceState(ectx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := ParseState(st); err != nil || !s.Suspended {
		t.Fatalf("state after recovery: suspended=%v, %v", s.Suspended, err)
	}
	r2 := maxRound(g)
	if err := g.Resume(ectx); err != nil {
		t.Fatal(err)
	}
	waitRunsOn(t, g, r2, "a checkpoint after Recover")
	t.Logf("a cooperative checkpoint after recovery: %d dirty pages, the guest ran on", bm.Count())
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}

	// A running domain: Recover does nothing.
	g, err = Open(ctx, domid, Options{Name: "recov", Logger: log, Recover: true})
	if err != nil {
		t.Fatal(err)
	}
	if g.Recovered() != "" {
		t.Errorf("Recover on a running domain did %q", g.Recovered())
	}
	// A daemon dies between its pause and its resume (a bare pause).
	if err := g.Pause(ectx); err != nil {
		t.Fatal(err)
	}
	abandon(t, g)
	if info := domainInfo(t, domid); !info.paused || info.shutdown {
		t.Fatalf("the dead daemon's domain: %+v, want paused", info)
	}
	// Without Recover the pause is left alone.
	g, err = Open(ctx, domid, Options{Name: "recov", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if info := domainInfo(t, domid); !info.paused {
		t.Fatalf("Open and Close without Recover unpaused the domain: %+v", info)
	}
	g, err = Open(ctx, domid, Options{Name: "recov", Logger: log, Recover: true})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Recovered() == "" || strings.Contains(g.Recovered(), "suspend") || !g.Paused() {
		t.Errorf("Recovered() = %q, Paused() = %v: want only the pause adopted", g.Recovered(), g.Paused())
	}
	if info := domainInfo(t, domid); !info.paused {
		t.Fatalf("after Open with Recover: %+v, want still paused (adopted, not undone)", info)
	}
	rctx, rcancel = context.WithTimeout(ctx, 60*time.Second)
	if err := g.Resume(rctx); err != nil {
		t.Fatal(err)
	}
	rcancel()
	if info := domainInfo(t, domid); info.paused || info.shutdown {
		t.Fatalf("after Recover and Resume: %+v, want running", info)
	}
	r3 := maxRound(g)
	waitRunsOn(t, g, r3, "after recovering a paused domain")
	t.Logf("paused domain recovered: %q", g.Recovered())
}

// layoutPopulated counts the gfns of g's layout that were mapped at Open
// and still hold guest memory.
func layoutPopulated(ctx context.Context, g *Guest) (int, error) {
	var n int
	err := g.call(ctx, "test: populated", func() error {
		var gfns []uint64
		for _, s := range g.x.segs {
			for i := uint64(0); i < s.Count; i++ {
				idx := s.Index + i
				if g.x.mapped[idx/64]&(1<<(idx%64)) != 0 {
					gfns = append(gfns, s.GFN+i)
				}
			}
		}
		pop, err := g.x.populated(gfns, nil)
		n = len(pop)
		return err
	})
	return n, err
}

// TestDom0LayoutChanged: the guest's balloon driver gives memory back
// (xl mem-set down) and takes it again (xl mem-set up) while it is
// checkpointed; the harvest must fail closed with ErrLayoutChanged, and
// keep failing, rather than go on replicating a layout that no longer
// holds the guest's memory.
func TestDom0LayoutChanged(t *testing.T) {
	inDom0(t)
	ctx := context.Background()
	domid := createGuest(ctx, t, "balloon", "pvh")
	waitConsole(t, "balloon", "dirtier: 8192 pages", 150*time.Second)
	g, err := Open(ctx, domid, Options{Name: "balloon", Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	bm := dirtymap.New(g.NumPages())
	epoch := func() error {
		ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := g.Pause(ectx); err != nil {
			t.Fatal(err)
		}
		bm.Reset()
		herr := g.HarvestDirty(ectx, bm)
		if err := g.Resume(ectx); err != nil {
			t.Fatal(err)
		}
		return herr
	}
	outside := 0
	for e := 0; e < 20; e++ {
		if err := epoch(); err != nil {
			t.Fatalf("epoch %d before any change: %v", e, err)
		}
		tm, _, _ := g.LastTimings(ctx)
		outside += tm.Outside
		time.Sleep(50 * time.Millisecond)
	}
	pop0, err := layoutPopulated(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("20 epochs unchanged: no false alarm (%d dirty gfns outside the layout in all); tot_pages %d, %d layout gfns populated",
		outside, g.totPages, pop0)

	// Until the guest's memory changes, or the deadline: the epochs' error.
	until := func(d time.Duration, done func() bool) error {
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			if err := epoch(); err != nil {
				return err
			}
			if done != nil && done() {
				return nil
			}
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	}
	check := func(err error, what string) {
		t.Helper()
		if !errors.Is(err, ErrLayoutChanged) {
			t.Fatalf("%s: harvest error %v, want ErrLayoutChanged", what, err)
		}
		for _, w := range []string{"re-protect", "unprotect"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not say %q", err, w)
			}
		}
		t.Logf("%s: %v", what, err)
		// Sticky: the next harvest and a Rebaseline fail as well.
		if err := epoch(); !errors.Is(err, ErrLayoutChanged) {
			t.Fatalf("the harvest after ErrLayoutChanged: %v", err)
		}
		if _, err := g.Rebaseline(ctx); !errors.Is(err, ErrLayoutChanged) {
			t.Fatalf("Rebaseline after ErrLayoutChanged: %v", err)
		}
	}

	// Balloon down by 16 MiB.
	t0 := time.Now()
	xl(ctx, t, "mem-set", "balloon", fmt.Sprintf("%dm", guestMiB()-16))
	popNow := pop0
	herr := until(60*time.Second, func() bool {
		if popNow, err = layoutPopulated(ctx, g); err != nil {
			t.Fatal(err)
		}
		return popNow <= pop0-2048
	})
	info := domainInfo(t, domid)
	t.Logf("xl mem-set -16 MiB: after %s, %d layout gfns populated (was %d), tot_pages %d (was %d), harvest: %v",
		time.Since(t0).Round(time.Millisecond), popNow, pop0, info.totPages, g.totPages, herr)
	if herr != nil {
		check(herr, "balloon down")
		return
	}
	if popNow > pop0-2048 {
		t.Fatalf("the guest's balloon driver released only %d pages in 60 s: the test is vacuous", pop0-popNow)
	}
	// The frames the guest released are still mapped by us (Xen frees
	// them, and lowers tot_pages, only at our unmap); the guest no
	// longer uses them. Taking memory again needs new frames.
	t0 = time.Now()
	xl(ctx, t, "mem-set", "balloon", fmt.Sprintf("%dm", guestMiB()))
	herr = until(60*time.Second, nil)
	info = domainInfo(t, domid)
	t.Logf("xl mem-set back: after %s, tot_pages %d (was %d at Open)", time.Since(t0).Round(time.Millisecond), info.totPages, g.totPages)
	if herr == nil {
		t.Fatalf("the guest ballooned down and up again and every harvest succeeded: memory populated after Open went unnoticed")
	}
	check(herr, "balloon up")
}
