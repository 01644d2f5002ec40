package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Sanity tests of the latency, failover, sweep and scale sections: tiny
// guests and windows; they check that figures are well formed, keys are
// present, replicas match and plots are written — never speed.

func TestMeasureLatencySanity(t *testing.T) {
	r, err := MeasureLatency(context.Background(), LatencyConfig{
		Intervals: []time.Duration{10 * time.Millisecond}, MemoryBytes: 4 << 20, Rate: 5000,
		Warmup: 50 * time.Millisecond, Duration: 500 * time.Millisecond, Verify: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	u := r.Unprotected
	if u.Requests <= 0 {
		t.Fatalf("unprotected %+v", u)
	}
	finitePositive(t, "unprotected p50", u.P50Ms)
	finitePositive(t, "unprotected req/s", u.ReqPerSec)
	if len(r.Points) != 1 {
		t.Fatalf("points %+v", r.Points)
	}
	pt := r.Points[0]
	if !pt.Verified || pt.Protected.Requests <= 0 || pt.BackToBack.Requests <= 0 {
		t.Fatalf("point %+v", pt)
	}
	for name, v := range map[string]float64{"p50": pt.Protected.P50Ms, "p99": pt.Protected.P99Ms, "max": pt.Protected.MaxMs,
		"req/s": pt.Protected.ReqPerSec, "epoch": pt.EpochMsP50, "ack": pt.AckMsP50, "floor": pt.FloorMs, "pause": pt.PauseMsP50} {
		finitePositive(t, name, v)
	}
	if pt.Protected.P50Ms > pt.Protected.P99Ms || pt.Protected.P99Ms > pt.Protected.MaxMs {
		t.Errorf("quantiles out of order: %+v", pt.Protected)
	}
}

func TestSweepSanity(t *testing.T) {
	pts := []SweepPoint{
		{Backend: "sim", Axis: "test", Interval: 10 * time.Millisecond, Workload: "uniform", Rate: 5000, MemoryBytes: 4 << 20, Duration: 300 * time.Millisecond},
		{Backend: "sim", Axis: "test", Interval: 10 * time.Millisecond, Workload: "idle", Rate: -1, MemoryBytes: 4 << 20, Duration: 200 * time.Millisecond},
	}
	var lines []string
	rs, err := Sweep(context.Background(), pts, map[string]Backend{"sim": SimBackend{Verify: true, Warmup: 50 * time.Millisecond}},
		func(f string, a ...any) { lines = append(lines, f) })
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 || len(lines) != 2 {
		t.Fatalf("results %+v, progress %d lines", rs, len(lines))
	}
	r := rs[0]
	if !r.Verified || r.Epochs <= 0 {
		t.Fatalf("result %+v", r)
	}
	for name, v := range map[string]float64{"pause p50": r.PauseMsP50, "pause max": r.PauseMsMax, "epoch": r.EpochMsP50, "dirty": r.DirtyPagesP50,
		"pages/s": r.PagesPerSec, "MB/s": r.MBPerSec, "wire": r.WireMBPerSec, "compression": r.CompressionRatio, "ack": r.AckMsP50, "cpu": r.CPUPairPct} {
		finitePositive(t, name, v)
	}
	if _, err := Sweep(context.Background(), []SweepPoint{{Backend: "qemu"}}, map[string]Backend{}, nil); err == nil {
		t.Error("unknown backend accepted")
	}
	if len(SweepGrid(true, "sim")) == 0 || len(SweepGrid(false, "sim")) <= len(SweepGrid(true, "sim")) {
		t.Error("grids")
	}
}

func TestScaleSanity(t *testing.T) {
	ds, err := MeasureDirtyScale(context.Background(), DirtyScaleConfig{MemoryBytes: []int64{4 << 20, 8 << 20}, DirtyPages: []int{32, 256}, Samples: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 4 {
		t.Fatalf("dirty scale %+v", ds)
	}
	for _, d := range ds {
		finitePositive(t, "pause", d.PauseMsP50)
		finitePositive(t, "memcpy", d.MemcpyMsP50)
	}
	mv, err := MeasureMultiVM(context.Background(), MultiVMConfig{Counts: []int{2}, MemoryBytes: 4 << 20, Rate: 2000, Interval: 10 * time.Millisecond, Duration: 300 * time.Millisecond, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(mv) != 1 || mv[0].VerifiedReplicas != 2 || !mv[0].AllEpochsAcked {
		t.Fatalf("multi-VM %+v", mv)
	}
	finitePositive(t, "aggregate pages/s", mv[0].AggPagesPerSec)
	finitePositive(t, "per-VM pause", mv[0].PauseMsP50)
}

// buildRemusd builds the remusd binary for the failover trials.
func buildRemusd(t *testing.T) string {
	t.Helper()
	goTool := filepath.Join(runtimeGOROOT(), "bin", "go")
	if _, err := os.Stat(goTool); err != nil {
		goTool = "go"
	}
	bin := filepath.Join(t.TempDir(), "remusd")
	cmd := exec.Command(goTool, "build", "-o", bin, "./cmd/remusd")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/remusd: %v\n%s", err, out)
	}
	return bin
}

func TestMeasureFailoverSanity(t *testing.T) {
	if testing.Short() {
		t.Skip("short: builds remusd and runs two daemons")
	}
	exe := buildRemusd(t)
	r, err := MeasureFailover(context.Background(), FailoverConfig{Exe: exe, Trials: 1, Run: 500 * time.Millisecond, MemoryBytes: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Trials) != 1 {
		t.Fatalf("trials %+v", r.Trials)
	}
	tr := r.Trials[0]
	for name, v := range map[string]float64{"next reply": tr.NextReplyMs, "detection": tr.DetectionMs, "activation": tr.ActivationMs, "active": tr.ActiveMs, "p50": r.NextReplyMsP50, "witness claim": tr.ClaimMs} {
		finitePositive(t, name, v)
	}
	if tr.LastSeqBefore == 0 || tr.FirstSeqAfter <= tr.LastSeqBefore {
		t.Errorf("output sequence before/after %d/%d", tr.LastSeqBefore, tr.FirstSeqAfter)
	}
	if r.Takeover != "auto" || tr.ClaimMs > tr.DetectionMs {
		t.Errorf("takeover %q, claim %.1f ms of detection %.1f ms", r.Takeover, tr.ClaimMs, tr.DetectionMs)
	}
	if _, err := MeasureFailover(context.Background(), FailoverConfig{}); err == nil {
		t.Error("no binary accepted")
	}
}

// TestReportOutputs checks the JSON keys, the Markdown and --out files on
// a small report assembled from synthetic section results.
func TestReportOutputs(t *testing.T) {
	r := Report{Quick: true}
	r.Pause = PauseResult{MemoryBytes: 8 << 20, Sets: []PauseSet{{Fraction: 0.1, ChosenPages: 200, PauseP50: 100 * time.Microsecond, MemcpyP50: 80 * time.Microsecond, Ratio: 1.25}}}
	r.Encode = []EncodeResult{{Kind: "sparse", WireOverXORRLE: 0.9}}
	r.PipelineSparse = PipelineResult{Workload: "sparse", PagesPerSec: 1000}
	r.Latency = &LatencyResult{Unprotected: LatencyStats{P50Ms: 0.01, P99Ms: 0.05}, Points: []LatencyPoint{
		{IntervalMs: 25, Protected: LatencyStats{P50Ms: 14, P99Ms: 27}, FloorMs: 14, AddedP50Ms: 13.99, AddedP99Ms: 26.95, GoalP50Ms: 16, GoalP99Ms: 30.5},
		{IntervalMs: 50, Protected: LatencyStats{P50Ms: 27, P99Ms: 52}, FloorMs: 27, AddedP50Ms: 26.99, AddedP99Ms: 51.95, GoalP50Ms: 31, GoalP99Ms: 58},
	}}
	r.Failover = &FailoverResult{Trials: []FailoverTrial{{NextReplyMs: 320}}, NextReplyMsP50: 320}
	r.Sweep = []SweepResult{
		{SweepPoint: SweepPoint{Workload: "uniform"}, PagesPerSec: 1000, WireMBPerSec: 1, MBPerSec: 4},
		{SweepPoint: SweepPoint{Workload: "uniform"}, PagesPerSec: 2000, WireMBPerSec: 2, MBPerSec: 8},
		{SweepPoint: SweepPoint{Workload: "idle"}, PagesPerSec: 0, WireMBPerSec: 0.1},
	}
	r.DirtyScale = []DirtyScalePoint{{MemoryBytes: 8 << 20, DirtyPages: 100, PauseMsP50: 0.1, MemcpyMsP50: 0.08}, {MemoryBytes: 8 << 20, DirtyPages: 400, PauseMsP50: 0.4, MemcpyMsP50: 0.3}}
	r.MultiVM = []MultiVMPoint{{VMs: 1, AggPagesPerSec: 10}}
	r.headline()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"pause_over_memcpy", "pipeline_pages_per_s", "wire_over_xor_rle", "added_latency_p50_ms_at_25ms", "added_latency_p99_ms_at_25ms", "failover_ms_p50",
		"goals", "pause", "encode", "pipeline", "latency", "failover", "sweep", "dirty_scale", "multi_vm"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON key %q missing", k)
		}
	}
	if m["added_latency_p50_ms_at_25ms"].(float64) != 13.99 || m["failover_ms_p50"].(float64) != 320 {
		t.Errorf("headline %v %v", m["added_latency_p50_ms_at_25ms"], m["failover_ms_p50"])
	}
	if len(r.Goals) != 6 {
		t.Errorf("goals %+v", r.Goals)
	}
	var md bytes.Buffer
	if err := r.Write(&md); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md.String(), "| goal | measured |") || strings.Contains(md.String(), "%!") {
		t.Errorf("markdown:\n%s", md.String())
	}
	for _, tb := range r.tables() {
		for _, row := range tb.rows {
			if len(row) != len(tb.header) {
				t.Errorf("%s: row of %d fields, header of %d", tb.name, len(row), len(tb.header))
			}
		}
	}
	dir := t.TempDir()
	files, err := r.WriteOut(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"report.json": false, "sweep.csv": false, "latency.csv": false, PlotLatency: false, PlotPause: false, PlotBandwidth: false}
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil || st.Size() == 0 {
			t.Errorf("%s: %v (size %d)", f, err, st.Size())
		}
		if _, ok := want[filepath.Base(f)]; ok {
			want[filepath.Base(f)] = true
		}
		if strings.HasSuffix(f, ".png") {
			b, _ := os.ReadFile(f)
			if !bytes.HasPrefix(b, []byte("\x89PNG")) {
				t.Errorf("%s is not a PNG", f)
			}
		}
	}
	for f, ok := range want {
		if !ok {
			t.Errorf("%s not written", f)
		}
	}
}

func runtimeGOROOT() string { return runtime.GOROOT() }
