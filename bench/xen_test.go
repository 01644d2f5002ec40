package bench

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/xen/xenbench"
)

// xenConsole is a console as dom0 prints it: records among other lines.
func xenConsole(t *testing.T, recs ...any) string {
	t.Helper()
	var b bytes.Buffer
	b.WriteString("(XEN) Xen version 4.17\n=== RUN   TestDom0Bench\n")
	for _, r := range recs {
		kind := xenbench.KindPause
		switch r.(type) {
		case xenbench.Failover:
			kind = xenbench.KindFailover
		case xenbench.Error:
			kind = xenbench.KindError
		case xenbench.Done:
			kind = xenbench.KindDone
		}
		if err := xenbench.Write(&b, kind, r); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}

func TestXenFill(t *testing.T) {
	st := func(p50 float64) xenbench.Stat { return xenbench.Stat{P50: p50, P90: 2 * p50, Max: 3 * p50} }
	bare := xenbench.Case{GuestMiB: 128, Mode: xenbench.ModeBare, Epochs: 10, Load: "dirtier", Stopped: st(8), Paused: st(8), Pause: st(0.5), Harvest: st(0.4), Copy: st(2), Context: st(3), Unpause: st(0.6), Memcpy: st(1), Pages: st(600)}
	coop := bare
	susp, rf := st(90), st(2)
	coop.Mode, coop.Stopped, coop.Paused, coop.Suspend, coop.ResumeFast = xenbench.ModeCooperative, st(100), st(10), &susp, &rf
	fo := xenbench.Failover{GuestMiB: 128, Epochs: 6, IntervalMs: 50, ActivationMs: 12, FirstProgressMs: 260, HundredRoundsMs: 1100, EnginePause: st(110)}
	console := xenConsole(t, bare, xenbench.Error{Case: "128/cooperative", Error: "attempt 1: gone"}, coop, fo, xenbench.Done{Seconds: 80})
	var r XenResult
	cfg := XenConfig{GuestMiB: []int{128}}.withDefaults()
	if err := r.fill(xenbench.Parse(console), cfg); err != nil {
		t.Fatal(err)
	}
	b, ok := r.Pause(128, xenbench.ModeBare)
	c, ok2 := r.Pause(128, xenbench.ModeCooperative)
	if !ok || !ok2 {
		t.Fatalf("pauses %+v", r.Pauses)
	}
	if b.StoppedOverMemcpy != 8 || b.CopyOverMemcpy != 2 || b.StoppedOverBare != 0 {
		t.Fatalf("bare ratios %+v", b)
	}
	if c.StoppedOverBare != 12.5 || c.PausedOverBare != 1.25 || c.PausedOverMemcpy != 10 {
		t.Fatalf("cooperative ratios %+v", c)
	}
	if r.Failover == nil || r.Failover.ActivationMs != 12 || len(r.Retries) != 1 || len(r.Errors) != 0 || r.Dom0Seconds != 80 {
		t.Fatalf("result %+v", r)
	}

	rep := Report{Xen: &r, Took: time.Second}
	var out bytes.Buffer
	if err := rep.Write(&out); err != nil {
		t.Fatal(err)
	}
	md := out.String()
	for _, want := range []string{"xen backend", "## 12. Xen backend", "| 128 MiB | bare | 10 |", "| 8.00 | 2.00 |", "12.5 / 1.25", "### Xen failover", "| 12.0 ms |", "Retried after a TCG triple fault"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	// The bare row prints no suspend or resume-fast figure (not measured).
	for _, l := range strings.Split(md, "\n") {
		if strings.HasPrefix(l, "| 128 MiB | bare") && !strings.Contains(l, "| 8.00 / 16.00 / 24.00 |  | 0.50 / 1.00 / 1.50 |") {
			t.Errorf("bare row: %s", l)
		}
	}
	ts := rep.xenTables()
	if len(ts) != 2 || len(ts[0].rows) != 2 || len(ts[1].rows) != 1 {
		t.Fatalf("tables %+v", ts)
	}
	for i, h := range ts[0].header {
		if h == "suspend_ms_p50" && ts[0].rows[0][i] != "" {
			t.Errorf("bare suspend in the CSV: %q", ts[0].rows[0][i])
		}
	}

	// What is missing is an error: a size, the failover, the end.
	var r2 XenResult
	err := r2.fill(xenbench.Parse(xenConsole(t, bare, xenbench.Error{Case: "128/cooperative", Error: "attempt 3: gone", Final: true})), cfg)
	for _, want := range []string{"128 MiB guest, cooperative", "no failover result", "did not finish", "attempt 3: gone"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v lacks %q", err, want)
		}
	}
}

func TestXenBackendSelection(t *testing.T) {
	if !IsSection("xen") {
		t.Fatal("xen is not a section")
	}
	found := false
	for _, b := range Backends {
		found = found || b == "xen"
	}
	if !found {
		t.Fatal("xen is not a backend")
	}
}
