//go:build xen

package bench

import (
	"context"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/xen/xenbench"
)

// TestMeasureXenQuick runs the Xen section's short profile in a real Xen
// under QEMU TCG (one boot, one 128 MiB guest, 8 epochs per mode, no
// failover: the round trip is TestXenRoundTrip's) and checks the figures
// are there, positive and consistent with each other, never their speed.
// About 70 s (more when a TCG triple fault costs a retry). Built only
// with the "xen" tag, as the other tests that boot Xen.
func TestMeasureXenQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Xen under QEMU")
	}
	if why := XenSkipReason(); why != "" {
		t.Skip(why)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	start := time.Now()
	r, err := MeasureXen(ctx, XenConfig{GuestMiB: []int{128}, Epochs: 8, NoFailover: true, Progress: t.Logf})
	if r.Skipped != "" {
		t.Skip(r.Skipped)
	}
	if err != nil {
		t.Fatalf("MeasureXen: %v\nconsole tail:\n%s", err, r.ConsoleTail)
	}
	t.Logf("took %s (%.0f s in dom0); retries %v", time.Since(start).Round(time.Second), r.Dom0Seconds, r.Retries)
	bare, ok := r.Pause(128, xenbench.ModeBare)
	coop, ok2 := r.Pause(128, xenbench.ModeCooperative)
	if !ok || !ok2 {
		t.Fatalf("pauses %+v", r.Pauses)
	}
	for _, p := range []XenPause{bare, coop} {
		if p.Epochs != 8 || p.MappedPages < 32768 || p.Backend == "" {
			t.Errorf("%s: epochs %d, mapped %d, backend %q", p.Mode, p.Epochs, p.MappedPages, p.Backend)
		}
		for name, v := range map[string]float64{"dirty pages": p.Pages.P50, "stopped": p.Stopped.P50, "paused": p.Paused.P50, "pause": p.Pause.P50,
			"harvest": p.Harvest.P50, "copy": p.Copy.P50, "context": p.Context.P50, "unpause": p.Unpause.P50, "memcpy": p.Memcpy.P50,
			"stopped÷memcpy": p.StoppedOverMemcpy, "paused÷memcpy": p.PausedOverMemcpy, "copy÷memcpy": p.CopyOverMemcpy} {
			finitePositive(t, p.Mode+" "+name, v)
		}
		// Each epoch's copy is part of its pause, which is part of the
		// time the guest stopped: so are their medians.
		if p.Paused.P50 < p.Copy.P50 || p.Stopped.P50 < p.Paused.P50 || p.Stopped.Max < p.Paused.Max {
			t.Errorf("%s: stopped %+v, paused %+v, copy %+v out of order", p.Mode, p.Stopped, p.Paused, p.Copy)
		}
		if p.Stopped.P50 > p.Stopped.P90 || p.Stopped.P90 > p.Stopped.Max {
			t.Errorf("%s: stopped quantiles %+v", p.Mode, p.Stopped)
		}
	}
	if bare.Suspend != nil || bare.ResumeFast != nil || bare.StoppedOverBare != 0 {
		t.Errorf("the bare pause has cooperative figures: %+v", bare)
	}
	if coop.Suspend == nil || coop.ResumeFast == nil {
		t.Fatalf("cooperative: no suspend or resume-fast figures: %+v", coop)
	}
	finitePositive(t, "cooperative suspend", coop.Suspend.P50)
	finitePositive(t, "cooperative resume-fast", coop.ResumeFast.P50)
	finitePositive(t, "cooperative stopped÷bare", coop.StoppedOverBare)
	finitePositive(t, "cooperative paused÷bare", coop.PausedOverBare)
	if coop.Stopped.P50 < coop.Suspend.P50 {
		t.Errorf("cooperative: stopped %+v below its suspend %+v", coop.Stopped, coop.Suspend)
	}
	if want := coop.Stopped.P50 / bare.Stopped.P50; coop.StoppedOverBare != want {
		t.Errorf("stopped÷bare %v, want %v from the same run", coop.StoppedOverBare, want)
	}
	if r.Failover != nil || r.Dom0Seconds <= 0 {
		t.Errorf("failover %+v, dom0 %.0f s", r.Failover, r.Dom0Seconds)
	}
}
