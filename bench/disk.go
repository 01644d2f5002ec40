package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/guestsvc"
)

// DiskConfig configures MeasureDisk: the QEMU guest with a protected
// virtio disk (ext4, served by remusd over NBD).
type DiskConfig struct {
	// Exe is the remusd binary (required).
	Exe string
	// Interval is the epoch interval (default 50 ms).
	Interval time.Duration
	// Requests per latency window (default 300) and FILL requests per
	// write-heavy window (default 60 of FillKiB, default 256 KiB).
	Requests     int
	FillRequests int
	FillKiB      int
	// DiskMiB is the disk size (default 64).
	DiskMiB  int64
	Log      *zap.Logger
	Progress func(format string, args ...any)
}

func (c DiskConfig) withDefaults() DiskConfig {
	if c.Interval <= 0 {
		c.Interval = 50 * time.Millisecond
	}
	if c.Requests <= 0 {
		c.Requests = 300
	}
	if c.FillRequests <= 0 {
		c.FillRequests = 60
	}
	if c.FillKiB <= 0 {
		c.FillKiB = 256
	}
	if c.DiskMiB <= 0 {
		c.DiskMiB = 64
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.Progress == nil {
		c.Progress = func(string, ...any) {}
	}
	return c
}

// DiskResult is the disk section of the report.
type DiskResult struct {
	Skipped    string  `json:"skipped,omitempty"`
	Model      string  `json:"model"`
	IntervalMs float64 `json:"interval_ms"`
	DiskMiB    int64   `json:"disk_mib"`
	// LocalBound: on the primary's host, append 32 bytes to a file beside
	// the guest's image and fdatasync it (the write-to-durable floor of
	// the same file system, without a guest, network or remusd).
	LocalBound LatencyStats `json:"local_append_fdatasync"`
	// Unprotected and Protected: a LOG record (append + fsync in the
	// guest, reply over TCP), think time uniform in [0, epoch).
	Unprotected LatencyStats `json:"unprotected_log"`
	Protected   LatencyStats `json:"protected_log"`
	AddedP50Ms  float64      `json:"added_p50_ms"`
	AddedP99Ms  float64      `json:"added_p99_ms"`
	// FloorMs = achieved epoch/2 + ack p50 (the output-commit floor);
	// AddedOverFloor = AddedP50Ms ÷ FloorMs.
	EpochMsMean    float64 `json:"epoch_ms_mean"`
	AckMsP50       float64 `json:"ack_ms_p50"`
	FloorMs        float64 `json:"floor_ms"`
	AddedOverFloor float64 `json:"added_over_floor"`
	// PauseMsP50 (the primary's status after the LOG window) and
	// FloorWithPauseMs = FloorMs + PauseMsP50: a request that arrives in a
	// pause waits for it, and the guest's I/O completions wait too.
	PauseMsP50       float64 `json:"pause_ms_p50"`
	FloorWithPauseMs float64 `json:"floor_with_pause_ms"`
	// Of the LOG window: disk write data per epoch and the disk records'
	// payload bytes on the wire per epoch.
	LogDiskBytesPerEpoch float64 `json:"log_disk_bytes_per_epoch"`
	LogDiskWirePerEpoch  float64 `json:"log_disk_wire_bytes_per_epoch"`
	// The write-heavy window (FILL of FillKiB back to back, each fsynced):
	// throughput unprotected and protected, pause p50/p99 (the primary's
	// status right after the window: its last 1,024 pauses, which include
	// the first epochs of the protection), disk bytes per epoch.
	FillKiB              int          `json:"fill_kib"`
	FillUnprotected      LatencyStats `json:"fill_unprotected"`
	FillProtected        LatencyStats `json:"fill_protected"`
	FillMiBsUnprotected  float64      `json:"fill_mib_per_s_unprotected"`
	FillMiBsProtected    float64      `json:"fill_mib_per_s_protected"`
	FillPauseMsP50       float64      `json:"fill_pause_ms_p50"`
	FillPauseMsP99       float64      `json:"fill_pause_ms_p99"`
	FillDiskBytesPerEp   float64      `json:"fill_disk_bytes_per_epoch"`
	FillDiskWirePerEpoch float64      `json:"fill_disk_wire_bytes_per_epoch"`
	// The copy of the whole disk when protection started (while the
	// guest ran), and the data the backup applied and flushed.
	InitialCopyBytes uint64  `json:"initial_copy_bytes"`
	InitialCopyMs    float64 `json:"initial_copy_ms"`
	BackupFlushes    uint64  `json:"backup_flushes"`
	Seconds          float64 `json:"seconds"`
}

const diskModel = "the QEMU guest with a 64 MiB virtio disk (ext4, /data) served by remusd over NBD; the client in the client namespace sends LOG records (the guest appends a line to /data/log and fsyncs before replying) with think time uniform in [0, epoch), then FILL requests (FillKiB of data written and fsynced) back to back; unprotected = the same guest and connection before `protect`; local bound = append + fdatasync of a file beside the guest's image on the primary's host; floor = achieved epoch/2 + ack p50"

// MeasureDisk runs the disk section. Missing prerequisites give a result
// with Skipped set and no error.
func MeasureDisk(ctx context.Context, cfg DiskConfig) (res DiskResult, err error) {
	cfg = cfg.withDefaults()
	start := time.Now()
	res = DiskResult{Model: diskModel, IntervalMs: msf(cfg.Interval), DiskMiB: cfg.DiskMiB, FillKiB: cfg.FillKiB}
	defer func() { res.Seconds = time.Since(start).Seconds() }()
	if why := QEMUSkipReason(cfg.Exe); why != "" {
		res.Skipped = why
		return res, nil
	}
	lab, err := demo.StartQEMULab(ctx, demo.QEMULabConfig{Exe: cfg.Exe, DiskMiB: cfg.DiskMiB, EpochInterval: cfg.Interval, Takeover: daemon.TakeoverAuto, Log: cfg.Log})
	if err != nil {
		return res, fmt.Errorf("qemu disk lab: %w", err)
	}
	defer lab.Close()
	cfg.Progress("disk: guest with a %d MiB disk booted in %.1fs", cfg.DiskMiB, lab.BootTime.Seconds())

	if res.LocalBound, err = localAppendBound(filepath.Dir(lab.DiskA), cfg.Requests); err != nil {
		return res, err
	}
	logc, err := startQClientWith(ctx, lab, guestsvc.ClientOptions{Log: true})
	if err != nil {
		return res, err
	}
	defer logc.stop()
	if _, _, err := logc.window(ctx, 500*time.Millisecond, 0); err != nil {
		return res, fmt.Errorf("disk warm-up: %w", err)
	}
	logc.SetThink(cfg.Interval)
	lat, el, err := logc.window(ctx, 0, cfg.Requests)
	if err != nil {
		return res, fmt.Errorf("disk unprotected: %w", err)
	}
	res.Unprotected = latencyStats(lat, el)
	logc.SetThink(0)
	logc.Finish()

	fillc, err := startQClientWith(ctx, lab, guestsvc.ClientOptions{FillKiB: cfg.FillKiB})
	if err != nil {
		return res, err
	}
	defer fillc.stop()
	if lat, el, err = fillc.window(ctx, 0, cfg.FillRequests); err != nil {
		return res, fmt.Errorf("disk unprotected fill: %w", err)
	}
	res.FillUnprotected = latencyStats(lat, el)
	res.FillMiBsUnprotected = fillRate(res.FillUnprotected, cfg.FillKiB)
	cfg.Progress("disk unprotected: LOG p50 %.2f ms p99 %.2f ms; FILL %d KiB %.1f MiB/s; local append+fdatasync p50 %.2f ms",
		res.Unprotected.P50Ms, res.Unprotected.P99Ms, cfg.FillKiB, res.FillMiBsUnprotected, res.LocalBound.P50Ms)

	// Protected, write-heavy first (its pauses are the most recent when
	// the status is read right after it).
	if err := lab.Protect(ctx, cfg.Interval, 5); err != nil {
		return res, err
	}
	s0, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return res, err
	}
	res.InitialCopyBytes, res.InitialCopyMs = s0.DiskBytesCopied, s0.DiskCopyMs
	if lat, el, err = fillc.window(ctx, 0, cfg.FillRequests); err != nil {
		return res, fmt.Errorf("disk protected fill: %w", err)
	}
	res.FillProtected = latencyStats(lat, el)
	res.FillMiBsProtected = fillRate(res.FillProtected, cfg.FillKiB)
	s1, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return res, err
	}
	res.FillPauseMsP50, res.FillPauseMsP99 = s1.PauseMsP50, s1.PauseMsP99
	if n := s1.Epoch - s0.Epoch; n > 0 {
		res.FillDiskBytesPerEp = float64(s1.DiskBytesSent-s0.DiskBytesSent) / float64(n)
		res.FillDiskWirePerEpoch = float64(s1.DiskWireBytes-s0.DiskWireBytes) / float64(n)
	}
	fillc.Finish()
	cfg.Progress("disk protected FILL: %.1f MiB/s, pause p50 %.1f ms p99 %.1f ms, %.0f disk bytes/epoch (%.0f on the wire)",
		res.FillMiBsProtected, res.FillPauseMsP50, res.FillPauseMsP99, res.FillDiskBytesPerEp, res.FillDiskWirePerEpoch)

	logc2, err := startQClientWith(ctx, lab, guestsvc.ClientOptions{Log: true, LogAppend: true})
	if err != nil {
		return res, err
	}
	defer logc2.stop()
	if _, _, err := logc2.window(ctx, max(4*cfg.Interval, 300*time.Millisecond), 0); err != nil {
		return res, fmt.Errorf("disk protected log: %w", err)
	}
	s2, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	logc2.SetThink(cfg.Interval)
	if lat, el, err = logc2.window(ctx, 0, cfg.Requests); err != nil {
		return res, fmt.Errorf("disk protected log: %w", err)
	}
	res.Protected = latencyStats(lat, el)
	s3, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return res, err
	}
	if s3.Role != daemon.RolePrimary || s3.LastError != "" {
		return res, fmt.Errorf("protection not healthy: role %s, error %q", s3.Role, s3.LastError)
	}
	if n := s3.Epoch - s2.Epoch; n > 0 {
		res.EpochMsMean = msf(time.Since(t0)) / float64(n)
		res.LogDiskBytesPerEpoch = float64(s3.DiskBytesSent-s2.DiskBytesSent) / float64(n)
		res.LogDiskWirePerEpoch = float64(s3.DiskWireBytes-s2.DiskWireBytes) / float64(n)
	}
	res.AckMsP50, res.PauseMsP50 = s3.AckMsP50, s3.PauseMsP50
	res.FloorMs = res.EpochMsMean/2 + res.AckMsP50
	res.FloorWithPauseMs = res.FloorMs + res.PauseMsP50
	res.AddedP50Ms = res.Protected.P50Ms - res.Unprotected.P50Ms
	res.AddedP99Ms = res.Protected.P99Ms - res.Unprotected.P99Ms
	if res.FloorMs > 0 {
		res.AddedOverFloor = res.AddedP50Ms / res.FloorMs
	}
	if b, err := lab.BackupStatus(ctx); err == nil {
		res.BackupFlushes = b.DiskFlushes
	}
	cfg.Progress("disk protected LOG: p50 %.2f ms p99 %.2f ms, added p50 %.2f ms (floor %.2f ms: %.2f×), %.0f disk bytes/epoch (%.0f on the wire)",
		res.Protected.P50Ms, res.Protected.P99Ms, res.AddedP50Ms, res.FloorMs, res.AddedOverFloor, res.LogDiskBytesPerEpoch, res.LogDiskWirePerEpoch)
	return res, nil
}

// fillRate is the MiB/s a FILL window wrote.
func fillRate(st LatencyStats, kib int) float64 {
	if st.DurationSec <= 0 {
		return 0
	}
	return float64(st.Requests) * float64(kib) / 1024 / st.DurationSec
}

// localAppendBound measures n appends of 32 bytes + fdatasync to a file in
// dir: the host's own write-to-durable latency, independent of remusd.
func localAppendBound(dir string, n int) (LatencyStats, error) {
	f, err := os.CreateTemp(dir, "bound-*.log")
	if err != nil {
		return LatencyStats{}, fmt.Errorf("local bound: %w", err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	line := []byte("0123456789abcdef0123456789abcde\n")
	lat := make([]time.Duration, 0, n)
	t0 := time.Now()
	for range n {
		s := time.Now()
		if _, err := f.Write(line); err != nil {
			return LatencyStats{}, fmt.Errorf("local bound: %w", err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return LatencyStats{}, fmt.Errorf("local bound: fdatasync: %w", err)
		}
		lat = append(lat, time.Since(s))
	}
	return latencyStats(lat, time.Since(t0)), nil
}

func (r *Report) writeDisk(ew *errWriter) {
	d := r.Disk
	if d == nil {
		return
	}
	if d.Skipped != "" {
		ew.printf("\n## 10b. QEMU guest with a protected disk\n\nSkipped: %s.\n", d.Skipped)
		return
	}
	ew.printf("\n## 10b. QEMU guest with a protected disk (%.0f ms epochs)\n\n%s.\n\n", d.IntervalMs, d.Model)
	ew.printf("| write | requests | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n")
	for _, x := range []struct {
		name string
		s    LatencyStats
	}{{"local append + fdatasync on the primary's host (bound)", d.LocalBound}, {"LOG unprotected", d.Unprotected}, {"LOG protected", d.Protected}} {
		ew.printf("| %s | %d | %.3f | %.3f | %.3f | %.3f |\n", x.name, x.s.Requests, x.s.P50Ms, x.s.P90Ms, x.s.P99Ms, x.s.MaxMs)
	}
	ew.printf("\nAdded by protection: p50 %.2f ms, p99 %.2f ms; floor (achieved epoch %.1f ms / 2 + ack p50 %.2f ms) %.2f ms; added p50 ÷ floor %.2f; floor + pause p50 (%.1f ms) %.2f ms. Disk data per epoch under LOG: %.0f bytes (%.0f bytes of disk records on the wire).\n\n",
		d.AddedP50Ms, d.AddedP99Ms, d.EpochMsMean, d.AckMsP50, d.FloorMs, d.AddedOverFloor, d.PauseMsP50, d.FloorWithPauseMs, d.LogDiskBytesPerEpoch, d.LogDiskWirePerEpoch)
	ew.printf("Write-heavy (FILL %d KiB, fsynced, back to back): unprotected %.1f MiB/s (p50 %.1f ms), protected %.1f MiB/s (p50 %.1f ms); pause p50 %.1f ms p99 %.1f ms; %.0f disk bytes/epoch (%.0f on the wire). Initial copy of the disk while the guest ran: %d bytes in %.0f ms. Backup flushes before acks: %d.\n",
		d.FillKiB, d.FillMiBsUnprotected, d.FillUnprotected.P50Ms, d.FillMiBsProtected, d.FillProtected.P50Ms, d.FillPauseMsP50, d.FillPauseMsP99,
		d.FillDiskBytesPerEp, d.FillDiskWirePerEpoch, d.InitialCopyBytes, d.InitialCopyMs, d.BackupFlushes)
}

func (r *Report) diskTables() []table {
	d := r.Disk
	if d == nil || d.Skipped != "" {
		return nil
	}
	t := table{name: "disk_latency.csv", header: []string{"mode", "interval_ms", "requests", "p50_ms", "p90_ms", "p99_ms", "max_ms"}}
	for _, x := range []struct {
		name string
		s    LatencyStats
	}{{"local_bound", d.LocalBound}, {"unprotected", d.Unprotected}, {"protected", d.Protected}, {"fill_unprotected", d.FillUnprotected}, {"fill_protected", d.FillProtected}} {
		t.rows = append(t.rows, []string{x.name, ff(d.IntervalMs), fi(int64(x.s.Requests)), ff(x.s.P50Ms), ff(x.s.P90Ms), ff(x.s.P99Ms), ff(x.s.MaxMs)})
	}
	return []table{t}
}
