//go:build xen

package xen

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/dirtymap"
)

// TestDom0Suspend checkpoints a PVH guest by cooperative suspend (xenstore
// control/shutdown=suspend, wait for SHUTDOWN_suspend), harvest, copy,
// context, xc_domain_resume(fast), and checks the guest carries on.
func TestDom0Suspend(t *testing.T) {
	inDom0(t)
	ctx := context.Background()
	domid := createGuest(ctx, t, "susp", "pvh")
	waitConsole(t, "susp", "dirtier: 8192 pages", 150*time.Second)
	g, err := Open(ctx, domid, Options{Name: "susp", Logger: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	n := g.NumPages()
	bm := dirtymap.New(n)
	mapped := g.Mapped()
	staging := make([]byte, mapped.Count()*pageSize)
	for i := 0; i < len(staging); i += pageSize { // first touch outside the timings
		staging[i] = 1
	}
	mem := g.Memory()
	rounds := make([]int64, n)
	var state []byte
	const epochs = 20
	var susp, rest, resume []time.Duration
	maxRound := func() int64 {
		dirtierRounds(mem, mapped, rounds)
		return slices.Max(rounds)
	}
	for e := 0; e < epochs; e++ {
		time.Sleep(50 * time.Millisecond)
		ectx, cancel := context.WithTimeout(ctx, 20*time.Second)
		t0 := time.Now()
		if err := g.SuspendCooperative(ectx); err != nil {
			t.Fatalf("epoch %d: %v", e, err)
		}
		t1 := time.Now()
		if err := g.Pause(ectx); err != nil {
			t.Fatal(err)
		}
		bm.Reset()
		if err := g.HarvestDirty(ectx, bm); err != nil {
			t.Fatal(err)
		}
		if _, err := g.CopyDirty(bm, staging); err != nil {
			t.Fatal(err)
		}
		if state, err = g.SaveDeviceState(ectx, state[:0]); err != nil {
			t.Fatal(err)
		}
		t2 := time.Now()
		before := maxRound() // not timed: a scan of the dirtier's pages
		t2b := time.Now()
		if err := g.ResumeFast(ectx); err != nil {
			t.Fatal(err)
		}
		if err := g.Resume(ectx); err != nil {
			t.Fatal(err)
		}
		t3 := time.Now()
		cancel()
		susp, rest, resume = append(susp, t1.Sub(t0)), append(rest, t2.Sub(t1)), append(resume, t3.Sub(t2b))
		t.Logf("epoch %2d: suspend %s, pause+harvest+copy+context %s (%d pages), resume(fast)+unpause %s; dirtier round %d",
			e, us(t1.Sub(t0)), us(t2.Sub(t1)), bm.Count(), us(t3.Sub(t2b)), before)
		// The guest carries on after each cancelled suspend.
		deadline := time.Now().Add(10 * time.Second)
		for maxRound() <= before {
			if time.Now().After(deadline) {
				b, _ := readConsole("susp")
				t.Fatalf("epoch %d: the dirtier did not run on after the resume; console:\n%s", e, tail(b, 20))
			}
			time.Sleep(time.Millisecond)
		}
	}
	m := func(v []time.Duration) string {
		v = slices.Clone(v)
		slices.Sort(v)
		return fmt.Sprintf("median %s max %s", us(v[len(v)/2]), us(v[len(v)-1]))
	}
	t.Logf("cooperative checkpoint, %d epochs: suspend %s; pause+harvest+copy+context %s; resume(fast)+unpause %s", epochs, m(susp), m(rest), m(resume))
	if b, err := readConsole("susp"); err == nil && bytes.Contains([]byte(b), []byte("Freezing")) {
		t.Logf("guest console (tail):\n%s", tail(b, 12))
	}
}

func readConsole(name string) (string, error) {
	b, err := os.ReadFile("/var/log/xen/console/guest-" + name + ".log")
	return string(b), err
}
