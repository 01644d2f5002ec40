package bench

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// WriteOut writes the report into dir: report.json, one CSV per section
// and the PNG plots. It returns the files written.
func (r *Report) WriteOut(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	var files []string
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	path := filepath.Join(dir, "report.json")
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	files = append(files, path)
	for _, t := range r.tables() {
		if len(t.rows) == 0 {
			continue
		}
		path := filepath.Join(dir, t.name)
		if err := writeCSV(path, t.header, t.rows); err != nil {
			return files, err
		}
		files = append(files, path)
	}
	plots, err := r.WritePlots(dir)
	files = append(files, plots...)
	return files, err
}

type table struct {
	name   string
	header []string
	rows   [][]string
}

func ff(v float64) string { return strconv.FormatFloat(v, 'g', 6, 64) }
func fi(v int64) string   { return strconv.FormatInt(v, 10) }
func fb(v bool) string    { return strconv.FormatBool(v) }

func (r *Report) tables() []table {
	var ts []table
	t := table{name: "goals.csv", header: []string{"goal", "measured", "target", "met", "measured_ok"}}
	for _, g := range r.Goals {
		t.rows = append(t.rows, []string{g.Name, ff(g.Measured), g.Target, fb(g.Met), fb(g.HasValue)})
	}
	ts = append(ts, t)
	t = table{name: "pause.csv", header: []string{"memory_bytes", "fraction", "dirty_pages", "captured_pages_p50", "samples", "pause_ms_p50", "pause_ms_p99", "memcpy_ms_p50", "pause_over_memcpy", "memcpy_gb_per_s"}}
	for _, s := range r.Pause.Sets {
		t.rows = append(t.rows, []string{fi(r.Pause.MemoryBytes), ff(s.Fraction), fi(int64(s.ChosenPages)), fi(int64(s.CapturePagesP50)), fi(int64(s.Samples)),
			ff(msf(s.PauseP50)), ff(msf(s.PauseP99)), ff(msf(s.MemcpyP50)), ff(s.Ratio), ff(s.MemcpyGBps)})
	}
	ts = append(ts, t)
	t = table{name: "encode.csv", header: []string{"kind", "pages", "workers", "encode_pages_per_s", "lz4_pages_per_s", "encode_over_lz4", "lz4_delta_pages_per_s", "xor_rle_pages_per_s", "wire_over_raw", "payload_over_raw", "lz4_over_raw", "xor_rle_over_raw", "wire_over_xor_rle"}}
	for _, e := range r.Encode {
		t.rows = append(t.rows, []string{e.Kind, fi(int64(e.Pages)), fi(int64(e.Workers)), ff(e.EncodePagesPerSec), ff(e.LZ4PagesPerSec), ff(e.Ratio),
			ff(e.LZ4DeltaPagesPerSec), ff(e.XORRLEPagesPerSec), ff(e.WireOverRaw), ff(e.PayloadOverRaw), ff(e.LZ4OverRaw), ff(e.XORRLEOverRaw), ff(e.WireOverXORRLE)})
	}
	ts = append(ts, t)
	t = table{name: "pipeline.csv", header: []string{"workload", "memory_bytes", "rate", "seconds", "pages_acked", "epochs_acked", "pages_per_s", "mb_per_s", "wire_mb_per_s", "pause_ms_p50", "lz4_pages_per_s", "over_lz4", "verified"}}
	for _, l := range []PipelineResult{r.Pipeline, r.PipelineSparse} {
		if l.Workload == "" {
			continue
		}
		t.rows = append(t.rows, []string{l.Workload, fi(l.MemoryBytes), fi(int64(l.Rate)), ff(l.Seconds), fi(l.PagesAcked), fi(l.EpochsAcked), ff(l.PagesPerSec), ff(l.MBPerSec),
			ff(l.WireMBPerSec), ff(msf(l.PauseP50)), ff(l.LZ4PagesPerSec), ff(l.Ratio), fb(l.Verified)})
	}
	ts = append(ts, t)
	if l := r.Latency; l != nil {
		t = table{name: "latency.csv", header: []string{"mode", "interval_ms", "requests", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "added_p50_ms", "added_p99_ms", "floor_ms", "added_over_floor", "goal_added_p50_ms", "goal_added_p99_ms", "goal_added_p50_ms_at_achieved_epoch", "goal_added_p99_ms_at_achieved_epoch", "epoch_ms_p50", "ack_ms_p50", "ack_ms_p99", "pause_ms_p50", "back_to_back_p50_ms"}}
		u := l.Unprotected
		t.rows = append(t.rows, []string{"unprotected", "0", fi(int64(u.Requests)), ff(u.ReqPerSec), ff(u.P50Ms), ff(u.P90Ms), ff(u.P99Ms), ff(u.MaxMs), "", "", "", "", "", "", "", "", "", "", "", "", ""})
		for _, p := range l.Points {
			s := p.Protected
			t.rows = append(t.rows, []string{"protected", ff(p.IntervalMs), fi(int64(s.Requests)), ff(s.ReqPerSec), ff(s.P50Ms), ff(s.P90Ms), ff(s.P99Ms), ff(s.MaxMs),
				ff(p.AddedP50Ms), ff(p.AddedP99Ms), ff(p.FloorMs), ff(p.AddedOverFloor), ff(p.GoalP50Ms), ff(p.GoalP99Ms), ff(p.GoalP50AtAchievedMs), ff(p.GoalP99AtAchievedMs), ff(p.EpochMsP50), ff(p.AckMsP50), ff(p.AckMsP99), ff(p.PauseMsP50), ff(p.BackToBack.P50Ms)})
		}
		ts = append(ts, t)
	}
	if f := r.Failover; f != nil {
		t = table{name: "failover.csv", header: []string{"trial", "detection_ms", "activation_ms", "active_ms", "next_reply_ms", "last_seq_before", "first_seq_after", "unreleased_msgs", "heartbeat_interval_ms", "heartbeat_timeout_ms"}}
		for i, x := range f.Trials {
			t.rows = append(t.rows, []string{fi(int64(i + 1)), ff(x.DetectionMs), ff(x.ActivationMs), ff(x.ActiveMs), ff(x.NextReplyMs), strconv.FormatUint(x.LastSeqBefore, 10),
				strconv.FormatUint(x.FirstSeqAfter, 10), strconv.FormatUint(x.UnreleasedMsgs, 10), ff(f.HeartbeatIntervalMs), ff(f.HeartbeatTimeoutMs)})
		}
		ts = append(ts, t)
	}
	t = table{name: "sweep.csv", header: []string{"backend", "axis", "interval_ms", "workload", "rate", "memory_bytes", "seconds", "epochs", "pause_ms_p50", "pause_ms_p99", "pause_ms_max",
		"epoch_ms_p50", "epoch_over_configured", "dirty_pages_p50", "dirty_pages_mean", "pages_per_s", "mb_per_s", "wire_mb_per_s", "compression_ratio", "ack_ms_p50", "ack_ms_p99",
		"cpu_pair_pct", "cpu_guest_alone_pct", "cpu_protection_pct", "verified"}}
	for _, s := range r.Sweep {
		t.rows = append(t.rows, []string{s.Backend, s.Axis, ff(s.IntervalMs), s.Workload, fi(int64(s.Rate)), fi(s.MemoryBytes), ff(s.Seconds), fi(int64(s.Epochs)),
			ff(s.PauseMsP50), ff(s.PauseMsP99), ff(s.PauseMsMax), ff(s.EpochMsP50), ff(s.EpochOverConfigured), ff(s.DirtyPagesP50), ff(s.DirtyPagesMean),
			ff(s.PagesPerSec), ff(s.MBPerSec), ff(s.WireMBPerSec), ff(s.CompressionRatio), ff(s.AckMsP50), ff(s.AckMsP99), ff(s.CPUPairPct), ff(s.CPUGuestPct), ff(s.CPUProtectionPct), fb(s.Verified)})
	}
	ts = append(ts, t)
	t = table{name: "dirty_scale.csv", header: []string{"memory_bytes", "dirty_pages", "pause_ms_p50", "pause_ms_p99", "memcpy_ms_p50", "pause_over_memcpy"}}
	for _, d := range r.DirtyScale {
		t.rows = append(t.rows, []string{fi(d.MemoryBytes), fi(int64(d.DirtyPages)), ff(d.PauseMsP50), ff(d.PauseMsP99), ff(d.MemcpyMsP50), ff(d.Ratio)})
	}
	ts = append(ts, t)
	t = table{name: "multi_vm.csv", header: []string{"vms", "memory_bytes_each", "interval_ms", "seconds", "aggregate_pages_per_s", "aggregate_wire_mb_per_s", "per_vm_pause_ms_p50", "per_vm_pause_ms_p99_max", "per_vm_epoch_ms_p50", "per_vm_ack_ms_p50", "cpu_pct", "replicas_verified"}}
	for _, m := range r.MultiVM {
		t.rows = append(t.rows, []string{fi(int64(m.VMs)), fi(m.MemoryBytesEach), ff(m.IntervalMs), ff(m.Seconds), ff(m.AggPagesPerSec), ff(m.AggWireMBPerSec), ff(m.PauseMsP50), ff(m.PauseMsP99), ff(m.EpochMsP50), ff(m.AckMsP50), ff(m.CPUPct), fi(int64(m.VerifiedReplicas))})
	}
	ts = append(ts, t)
	ts = append(ts, r.qemuTables()...)
	ts = append(ts, r.diskTables()...)
	ts = append(ts, r.xenTables()...)
	return ts
}

func writeCSV(path string, header []string, rows [][]string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	w := csv.NewWriter(f)
	_ = w.Write(header)
	_ = w.WriteAll(rows)
	if err := w.Error(); err != nil {
		f.Close()
		return fmt.Errorf("bench: %s: %w", path, err)
	}
	return f.Close()
}
