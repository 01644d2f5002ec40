package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"
)

// TestMeasureQEMUSanity runs the QEMU section with a handful of requests
// per point and one failover trial, only where root, QEMU and the network
// tools are present. It checks sanity, never speed.
func TestMeasureQEMUSanity(t *testing.T) {
	exe := needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	r, err := MeasureQEMU(ctx, QEMUConfig{Exe: exe, Intervals: []time.Duration{25 * time.Millisecond}, Requests: 30, FailoverTrials: 1, MemoryMiB: 128})
	if err != nil {
		t.Fatalf("MeasureQEMU: %v (%+v)", err, r)
	}
	if r.Skipped != "" {
		t.Fatalf("skipped: %s", r.Skipped)
	}
	if !r.SessionIntact || r.ClientError != "" {
		t.Fatalf("TCP session broken: %q", r.ClientError)
	}
	u := r.Unprotected
	if u.Requests != 30 || r.UnprotectedBackToBack.Requests != 30 {
		t.Fatalf("unprotected requests %d/%d, want 30", u.Requests, r.UnprotectedBackToBack.Requests)
	}
	finitePositive(t, "unprotected p50", u.P50Ms)
	finitePositive(t, "unprotected p99", u.P99Ms)
	finitePositive(t, "unprotected req/s", r.UnprotectedBackToBack.ReqPerSec)
	if len(r.Points) != 1 {
		t.Fatalf("points %+v", r.Points)
	}
	p := r.Points[0]
	if p.Protected.Requests != 30 {
		t.Fatalf("protected requests %d, want 30", p.Protected.Requests)
	}
	for name, v := range map[string]float64{"p50": p.Protected.P50Ms, "p90": p.Protected.P90Ms, "p99": p.Protected.P99Ms, "max": p.Protected.MaxMs,
		"req/s": p.BackToBack.ReqPerSec, "achieved epoch": p.EpochMsMean, "ack p50": p.AckMsP50, "floor": p.FloorMs} {
		finitePositive(t, "protected "+name, v)
	}
	// Output commit holds every reply until its epoch is acknowledged.
	if p.Protected.P50Ms < u.P50Ms || p.Protected.MaxMs < u.P50Ms || p.BackToBack.P50Ms < r.UnprotectedBackToBack.P50Ms {
		t.Fatalf("protected latency below unprotected: protected %+v, unprotected %+v", p.Protected, u)
	}
	if p.FloorMs < p.EpochMsMean/2 {
		t.Fatalf("floor %.2f < achieved epoch/2 %.2f", p.FloorMs, p.EpochMsMean/2)
	}
	if len(r.Trials) != 1 {
		t.Fatalf("failover trials %+v, errors %v", r.Trials, r.FailoverErrors)
	}
	// Two planned switchovers, there and back, on the same connection.
	if len(r.Switchovers) != 2 || r.SwitchoverError != "" {
		t.Fatalf("switchovers %+v (%s)", r.Switchovers, r.SwitchoverError)
	}
	for _, sw := range r.Switchovers {
		t.Logf("switchover %+v", sw)
		finitePositive(t, "switchover paused", sw.PausedMs)
		finitePositive(t, "switchover client gap", sw.ClientGapMs)
		if sw.RepliesDuring == 0 {
			t.Fatalf("no reply after the switchover %+v", sw)
		}
	}
	tr := r.Trials[0]
	if !tr.SessionIntact || tr.RepliesBefore == 0 {
		t.Fatalf("failover trial %+v", tr)
	}
	finitePositive(t, "failover next reply", tr.NextReplyMs)
	finitePositive(t, "failover activation", tr.ActivationMs)
	finitePositive(t, "failover witness claim", tr.ClaimMs)
	// The backup's first reply cannot precede the start of its activation
	// (ActiveMs and DetectionMs are whole-millisecond wall clock).
	if tr.NextReplyMs < tr.DetectionMs-1 || tr.ActiveMs < tr.DetectionMs {
		t.Fatalf("next reply %.1f ms, VM active %.1f ms, before the backup began activating (%.1f ms after the kill)", tr.NextReplyMs, tr.ActiveMs, tr.DetectionMs)
	}
	rep := Report{QEMU: &r}
	rep.headline()
	// The p50 of one trial is that trial (within the float rounding of
	// durations converted to milliseconds along different paths).
	if math.Abs(rep.QEMUAddedLatencyP50MsAt25-p.AddedP50Ms) > 0.01 || math.Abs(rep.QEMUFailoverMsP50-tr.NextReplyMs) > 0.01 {
		t.Fatalf("headline %+v", rep)
	}
}

// TestQEMUSkipAndReport: without a binary the section is skipped with its
// reason (no error), and the report carries it; the sim default is
// unchanged (no qemu keys).
func TestQEMUSkipAndReport(t *testing.T) {
	r, err := RunWith(context.Background(), Options{Backend: "qemu"})
	if err != nil {
		t.Fatalf("RunWith qemu without a binary: %v", err)
	}
	if r.QEMU == nil || r.QEMU.Skipped == "" || len(r.Sweep) != 0 || r.Latency != nil {
		t.Fatalf("qemu-only run: %+v", r)
	}
	var md bytes.Buffer
	if err := r.Write(&md); err != nil || !strings.Contains(md.String(), "QEMU backend") || !strings.Contains(md.String(), "Skipped: ") {
		t.Fatalf("markdown (%v):\n%s", err, md.String())
	}
	if _, err := RunWith(context.Background(), Options{Backend: "bogus"}); err == nil {
		t.Fatal("unknown backend accepted")
	}

	// A filled section renders its tables and headline keys.
	q := &QEMUResult{QEMU: "QEMU 7.2", MemoryMiB: 128, SessionIntact: true,
		Unprotected: LatencyStats{Requests: 10, P50Ms: 0.5, P99Ms: 1}, Points: []QEMULatencyPoint{{IntervalMs: 25, Protected: LatencyStats{Requests: 10, P50Ms: 13, P99Ms: 26}, AddedP50Ms: 12.5, AddedP99Ms: 25, FloorMs: 13.5}},
		Trials: []QEMUFailoverTrial{{NextReplyMs: 1200, ActivationMs: 12, DetectionMs: 950}}, NextReplyMsP50: 1200}
	rep := Report{QEMU: q}
	rep.headline()
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`"qemu_added_latency_p50_ms_at_25ms":12.5`, `"qemu_added_latency_p99_ms_at_25ms":25`, `"qemu_failover_ms_p50":1200`, `"qemu":{`} {
		if !bytes.Contains(b, []byte(k)) {
			t.Errorf("JSON lacks %s", k)
		}
	}
	md.Reset()
	if err := rep.Write(&md); err != nil || !strings.Contains(md.String(), "| 25 ms | 10 |") || !strings.Contains(md.String(), "QEMU backend: failover") {
		t.Fatalf("markdown (%v):\n%s", err, md.String())
	}
	if ts := rep.qemuTables(); len(ts) != 2 || len(ts[0].rows) != 2 || len(ts[1].rows) != 1 {
		t.Fatalf("csv tables %+v", ts)
	}
	sim, err := json.Marshal(Report{})
	if err != nil || bytes.Contains(sim, []byte("qemu")) {
		t.Fatalf("sim report mentions qemu: %s", sim)
	}
}

// TestMeasureSoakQuick is the soak's quick profile: a protected QEMU guest
// under a back-to-back client for 15 s with the default timeouts and the
// witness. A healthy primary must keep its VM: no takeover, no race, no
// witness generation change, no reconnect, every reply right. (`remusd
// bench --backend qemu --soak 30m` is the long profile.)
func TestMeasureSoakQuick(t *testing.T) {
	exe := needQEMU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	r, err := MeasureSoak(ctx, SoakConfig{Exe: exe, Duration: 15 * time.Second, Progress: t.Logf})
	if err != nil {
		t.Fatalf("MeasureSoak: %v (%+v)", err, r)
	}
	if r.Skipped != "" || r.Polls == 0 || r.Epochs == 0 {
		t.Fatalf("soak did not run: %+v", r)
	}
	if !r.Healthy() {
		t.Fatalf("healthy primary disturbed: %+v", r)
	}
	var md bytes.Buffer
	rep := Report{Soak: &r}
	rep.headline()
	if err := rep.Write(&md); err != nil || !strings.Contains(md.String(), "## 11. QEMU soak") {
		t.Fatalf("report: %v\n%s", err, md.String())
	}
}

// needQEMU skips (saying why) where a QEMU guest cannot boot here, and
// returns the remusd binary the QEMU lab runs.
func needQEMU(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a QEMU guest")
	}
	if why := QEMUSkipReason("remusd"); why != "" {
		t.Skip("qemu prerequisites: " + why)
	}
	return buildRemusd(t)
}
