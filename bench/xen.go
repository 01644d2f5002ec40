package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/xen/xenbench"
	"github.com/remusd/remusd/xentest"
)

// XenConfig configures MeasureXen: Debian's Xen 4.17 booted under QEMU TCG
// by xentest, and in its dom0 the test binary of hypervisor/xen (built
// here with cgo and the "xen" tag) running TestDom0Bench.
type XenConfig struct {
	// GuestMiB are the PVH guests' sizes (default 128 and 512).
	GuestMiB []int
	// Epochs measured per guest size and mode (default 30), after two
	// warm-up epochs.
	Epochs int
	// NoFailover skips the failover round trip (128 MiB).
	NoFailover bool
	// FailoverEpochs acknowledged before the primary is destroyed
	// (default 12).
	FailoverEpochs int
	// CacheDir is xentest's cache (default vmtest's).
	CacheDir string
	// Timeout bounds the whole Xen run (default from the profile).
	Timeout time.Duration
	// Console, if set, receives a copy of the serial console.
	Console  io.Writer
	Log      *zap.Logger
	Progress func(format string, args ...any)
}

func (c XenConfig) withDefaults() XenConfig {
	if len(c.GuestMiB) == 0 {
		c.GuestMiB = []int{128, 512}
	}
	if c.Epochs <= 0 {
		c.Epochs = 30
	}
	if c.FailoverEpochs <= 0 {
		c.FailoverEpochs = 12
	}
	if c.Timeout <= 0 {
		c.Timeout = time.Duration(150+len(c.GuestMiB)*(90+2*c.Epochs)) * time.Second
		if !c.NoFailover {
			c.Timeout += 4 * time.Minute
		}
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.Progress == nil {
		c.Progress = func(string, ...any) {}
	}
	return c
}

// XenPause is one guest size and checkpoint mode, with its ratios to the
// bounds measured in the same run.
type XenPause struct {
	xenbench.Case
	// StoppedOverMemcpy: stopped p50 ÷ memcpy p50 (the same epochs' dirty
	// runs copied between two warm dom0 buffers); CopyOverMemcpy: the
	// copy out of the foreign mapping p50 ÷ memcpy p50.
	StoppedOverMemcpy float64 `json:"stopped_over_memcpy"`
	PausedOverMemcpy  float64 `json:"paused_over_memcpy"`
	CopyOverMemcpy    float64 `json:"copy_over_memcpy"`
	// Cooperative only, against the bare pause of the same guest size
	// (the lower bound: the same checkpoint without the suspend): stopped
	// p50 ÷ bare stopped p50, paused p50 ÷ bare paused p50.
	StoppedOverBare float64 `json:"stopped_over_bare,omitempty"`
	PausedOverBare  float64 `json:"paused_over_bare,omitempty"`
}

// XenResult is the Xen section of the report.
type XenResult struct {
	// Skipped says why the section did not run (not an error).
	Skipped string `json:"skipped,omitempty"`
	Model   string `json:"model"`
	// Dom0MiB and MachineMiB: dom0's memory and the QEMU machine's.
	Dom0Mem    string     `json:"dom0_mem"`
	MachineMem string     `json:"machine_mem"`
	Pauses     []XenPause `json:"pauses"`
	// Failover is the round trip's activation (nil if not run or failed).
	Failover *xenbench.Failover `json:"failover,omitempty"`
	// Retries are attempts that failed in a TCG triple fault and were run
	// again on a new guest; Errors the blocks that failed for good.
	Retries []string `json:"retries,omitempty"`
	Errors  []string `json:"errors,omitempty"`
	// CorruptRecords: console record lines with a bad checksum (each
	// record is printed twice).
	CorruptRecords int `json:"corrupt_records,omitempty"`
	// ConsoleTail: the end of the serial console, kept when the section
	// failed.
	ConsoleTail string `json:"console_tail,omitempty"`
	// Dom0Seconds: the benchmark in dom0; Seconds: the whole section
	// (building the test binary and the guest, booting Xen).
	Dom0Seconds float64 `json:"dom0_s"`
	Seconds     float64 `json:"seconds"`
}

// Pause returns the record of guest size mib and mode.
func (r *XenResult) Pause(mib int, mode string) (XenPause, bool) {
	for _, p := range r.Pauses {
		if p.GuestMiB == mib && p.Mode == mode {
			return p, true
		}
	}
	return XenPause{}, false
}

const xenModel = "Debian's Xen 4.17 under QEMU TCG (-cpu qemu64,+svm,+npt, 3 vCPUs: dom0's two vCPUs pinned to two, the guest to the third; no KVM: these are TCG figures, not bare metal), Debian's generic kernel as PV dom0; in dom0 a PVH guest (Debian cloud kernel) whose /init is xentest's dirtier is checkpointed every 50 ms the way the engine calls the backend (Pause, HarvestDirty, CopyDirty into staging, SaveDeviceState, Resume), first by bare pause, then with a cooperative suspend per checkpoint (the mode the product uses); stopped = suspend request (cooperative) or pause call (bare) until the domain runs again, as the caller waits; paused = from the pause call; the steps inside their libxc calls (Guest.LastTimings), copy = memcpy out of the foreign mapping; bound = copy() of the same runs of pages between two warm dom0 buffers right after each epoch"

// XenSkipReason is why the Xen section cannot run here ("" = it can): it
// needs the source tree this binary was built from (the dom0 side is
// built from it with -tags xen), the Go toolchain, a C compiler and
// libxen-dev. Missing Xen packages, QEMU or kernels are found later.
func XenSkipReason() string {
	if _, err := os.Stat(filepath.Join(xenPkgDir(), "guest.go")); err != nil {
		return fmt.Sprintf("the dom0 side is built from the remusd source tree, not found at %s (this binary was built elsewhere or with -trimpath)", xenPkgDir())
	}
	if _, err := exec.LookPath("go"); err != nil {
		return "no Go toolchain in PATH (the dom0 side is built with `go test -c -tags xen`)"
	}
	if _, err := exec.LookPath("gcc"); err != nil {
		return "no C compiler (gcc) for cgo"
	}
	if _, err := os.Stat("/usr/include/xenctrl.h"); err != nil {
		return "no Xen headers (/usr/include/xenctrl.h): install libxen-dev (sh xentest/setup.sh)"
	}
	return ""
}

// xenPkgDir is hypervisor/xen in the source tree this file was built from.
func xenPkgDir() string {
	_, self, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(self), "..", "hypervisor", "xen")
}

// MeasureXen runs the Xen section. Missing prerequisites give a result
// with Skipped set and no error.
func MeasureXen(ctx context.Context, cfg XenConfig) (res XenResult, err error) {
	cfg = cfg.withDefaults()
	start := time.Now()
	res.Model = xenModel
	defer func() { res.Seconds = time.Since(start).Seconds() }()
	if why := XenSkipReason(); why != "" {
		res.Skipped = why
		return res, nil
	}
	tmp, err := os.MkdirTemp("", "remusd-xenbench-")
	if err != nil {
		return res, fmt.Errorf("xen: %w", err)
	}
	defer os.RemoveAll(tmp)
	domU, err := xentest.DomUFiles(ctx, cfg.CacheDir, tmp)
	if errors.Is(err, xentest.ErrUnavailable) {
		res.Skipped = err.Error()
		return res, nil
	}
	if err != nil {
		return res, fmt.Errorf("xen: %w", err)
	}
	largest := 0
	mibs := make([]string, len(cfg.GuestMiB))
	for i, m := range cfg.GuestMiB {
		if m < 128 {
			return res, fmt.Errorf("xen: guest of %d MiB: Debian's kernels need at least 128 MiB under Xen", m)
		}
		largest = max(largest, m)
		mibs[i] = strconv.Itoa(m)
	}
	if !cfg.NoFailover {
		largest = max(largest, 128) // plus its standby, 128 MiB: after the others are destroyed
	}
	dom0, machine := xentest.LabMemory(largest)
	res.Dom0Mem, res.MachineMem = dom0, machine
	if res.Dom0Mem == "" {
		res.Dom0Mem, res.MachineMem = "1024M", "2048"
	}
	env := map[string]string{
		xenbench.EnvGuestMiB: strings.Join(mibs, ","),
		xenbench.EnvEpochs:   strconv.Itoa(cfg.Epochs),
		xenbench.EnvFOEpochs: strconv.Itoa(cfg.FailoverEpochs),
	}
	if !cfg.NoFailover {
		env[xenbench.EnvFailover] = "1"
	}
	cfg.Progress("xen: building the dom0 test binary, booting Xen under QEMU TCG (dom0 %s of %s MiB); guests %s MiB, %d epochs per mode, failover %v",
		res.Dom0Mem, res.MachineMem, strings.Join(mibs, ", "), cfg.Epochs, !cfg.NoFailover)
	seen := map[string]bool{} // every record is printed twice
	console := &recordWriter{copyTo: cfg.Console, onRecord: func(line string) {
		one := xenbench.Parse(line)
		key := line[strings.Index(line, xenbench.Prefix):]
		if seen[key] || one.Corrupt > 0 {
			return
		}
		seen[key] = true
		if len(one.Pauses) > 0 {
			p := one.Pauses[0]
			cfg.Progress("xen %d MiB %s: stopped p50 %.2f ms, paused p50 %.2f ms, memcpy bound p50 %.3f ms, %.0f dirty pages p50", p.GuestMiB, p.Mode, p.Stopped.P50, p.Paused.P50, p.Memcpy.P50, p.Pages.P50)
		} else if len(one.Failovers) > 0 {
			f := one.Failovers[0]
			cfg.Progress("xen failover: activation %.1f ms, first progress %.0f ms after it began", f.ActivationMs, f.FirstProgressMs)
		} else if len(one.Errors) > 0 {
			cfg.Progress("xen %s: %s (final %v)", one.Errors[0].Case, one.Errors[0].Error, one.Errors[0].Final)
		}
	}}
	run, runErr := xentest.RunGoTest(ctx, xenPkgDir(), "^TestDom0Bench$", []string{"xen"}, xentest.Config{
		CacheDir: cfg.CacheDir, Files: domU, Env: env, Dom0Mem: dom0, Memory: machine, Timeout: cfg.Timeout, Console: console,
	})
	if errors.Is(runErr, xentest.ErrUnavailable) {
		res.Skipped = runErr.Error()
		return res, nil
	}
	text := console.String()
	if run != nil {
		text = run.Console
	}
	err = res.fill(xenbench.Parse(text), cfg)
	if runErr != nil || err != nil {
		res.ConsoleTail = lastConsoleLines(text, 120)
		cfg.Log.Info("xen: console tail", zap.String("console", res.ConsoleTail))
	}
	if runErr != nil {
		return res, errors.Join(fmt.Errorf("xen: %w", runErr), err)
	}
	if err != nil {
		return res, fmt.Errorf("%w (verdict %q)", err, run.Verdict)
	}
	return res, nil
}

// fill builds the result from the records and says what is missing.
func (r *XenResult) fill(recs xenbench.Results, cfg XenConfig) error {
	r.CorruptRecords = recs.Corrupt
	if recs.Done != nil {
		r.Dom0Seconds = recs.Done.Seconds
	}
	for _, e := range recs.Errors {
		if e.Final {
			r.Errors = append(r.Errors, e.Case+": "+e.Error)
		} else {
			r.Retries = append(r.Retries, e.Case+": "+e.Error)
		}
	}
	r.Failover = nil
	if len(recs.Failovers) > 0 {
		f := recs.Failovers[0]
		r.Failover = &f
	}
	r.Pauses = nil
	for _, p := range recs.Pauses {
		r.Pauses = append(r.Pauses, XenPause{Case: p})
	}
	for i := range r.Pauses {
		p := &r.Pauses[i]
		p.StoppedOverMemcpy = ratio(p.Stopped.P50, p.Memcpy.P50)
		p.PausedOverMemcpy = ratio(p.Paused.P50, p.Memcpy.P50)
		p.CopyOverMemcpy = ratio(p.Copy.P50, p.Memcpy.P50)
		if p.Mode == xenbench.ModeCooperative {
			if b, ok := r.Pause(p.GuestMiB, xenbench.ModeBare); ok {
				p.StoppedOverBare = ratio(p.Stopped.P50, b.Stopped.P50)
				p.PausedOverBare = ratio(p.Paused.P50, b.Paused.P50)
			}
		}
	}
	var errs []error
	for _, m := range cfg.GuestMiB {
		for _, mode := range []string{xenbench.ModeBare, xenbench.ModeCooperative} {
			if _, ok := r.Pause(m, mode); !ok {
				errs = append(errs, fmt.Errorf("xen: no result for the %d MiB guest, %s", m, mode))
			}
		}
	}
	if !cfg.NoFailover && r.Failover == nil {
		errs = append(errs, errors.New("xen: no failover result"))
	}
	if recs.Done == nil {
		errs = append(errs, errors.New("xen: the dom0 benchmark did not finish"))
	}
	for _, e := range r.Errors {
		errs = append(errs, fmt.Errorf("xen: %s", e))
	}
	return errors.Join(errs...)
}

// ratio is a ÷ b, 0 (not computed) unless both are positive.
func ratio(a, b float64) float64 {
	if a <= 0 || b <= 0 {
		return 0
	}
	return a / b
}

func lastConsoleLines(s string, n int) string {
	ls := strings.Split(s, "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// recordWriter keeps the console, copies it on, and calls onRecord with
// every complete line holding a record.
type recordWriter struct {
	copyTo   io.Writer
	onRecord func(line string)

	mu      sync.Mutex
	all     bytes.Buffer
	partial []byte
}

func (w *recordWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.all.Write(p)
	if w.copyTo != nil {
		_, _ = w.copyTo.Write(p)
	}
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		line := string(w.partial[:i])
		w.partial = w.partial[i+1:]
		if strings.Contains(line, xenbench.Prefix) && w.onRecord != nil {
			w.onRecord(line)
		}
	}
	return len(p), nil
}

func (w *recordWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.all.String()
}

func (r *Report) writeXen(ew *errWriter) {
	x := r.Xen
	if x == nil {
		return
	}
	if x.Skipped != "" {
		ew.printf("\n## 12. Xen backend\n\nSkipped: %s.\n", x.Skipped)
		return
	}
	ew.printf("\n## 12. Xen backend: pause per checkpoint (dom0 %s of a %s MiB machine; %.0f s in dom0, %.0f s in all)\n\n%s. Dirtying load: %s. Figures p50 / p90 / max in ms; ratios of medians, bounds from the same run.\n\n",
		x.Dom0Mem, x.MachineMem, x.Dom0Seconds, x.Seconds, xenModel, xenLoad(x))
	if len(x.Pauses) > 0 {
		ew.printf("| guest | mode | epochs | dirty pages | stopped | paused | suspend | pause | harvest | copy | context | resume-fast | unpause | memcpy bound | stopped÷memcpy | copy÷memcpy | ÷bare: stopped / paused |\n|---:|---|---:|---|---|---|---|---|---|---|---|---|---|---|---:|---:|---|\n")
		for _, p := range x.Pauses {
			st := func(s xenbench.Stat) string { return fmt.Sprintf("%.2f / %.2f / %.2f", s.P50, s.P90, s.Max) }
			opt := func(s *xenbench.Stat) string {
				if s == nil {
					return ""
				}
				return st(*s)
			}
			vsBare := ""
			if p.StoppedOverBare > 0 {
				vsBare = fmt.Sprintf("%.1f / %.2f", p.StoppedOverBare, p.PausedOverBare)
			}
			ew.printf("| %d MiB | %s | %d | %.0f / %.0f / %.0f | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
				p.GuestMiB, p.Mode, p.Epochs, p.Pages.P50, p.Pages.P90, p.Pages.Max, st(p.Stopped), st(p.Paused), opt(p.Suspend), st(p.Pause), st(p.Harvest),
				st(p.Copy), st(p.Context), opt(p.ResumeFast), st(p.Unpause), st(p.Memcpy), ratioCell(p.StoppedOverMemcpy), ratioCell(p.CopyOverMemcpy), vsBare)
		}
	}
	if f := x.Failover; f != nil {
		ew.printf("\n### Xen failover (the round trip of hypervisor/xen's tests: engine over an in-memory link into a standby domain in the same dom0, cooperative checkpoints every %.0f ms, %d MiB)\n\nThe primary domain is destroyed after %d acknowledged epochs and the standby activated (`Backup.Activate`); no failure detection is in these figures. First progress: Activate began → the guest's memory shows a dirtier round beyond the committed one.\n\n",
			f.IntervalMs, f.GuestMiB, f.Epochs)
		ew.printf("| standby created and mapped | engine pause p50 / p90 / max | dirty pages p50 | activation | of which set context / unpause | first progress | 100 rounds on |\n|---:|---|---:|---:|---|---:|---:|\n")
		ew.printf("| %.1f s | %.1f / %.1f / %.1f ms | %.0f | %.1f ms | %.1f / %.1f ms | %.0f ms | %.0f ms |\n", f.StandbySec, f.EnginePause.P50, f.EnginePause.P90, f.EnginePause.Max,
			f.EnginePages.P50, f.ActivationMs, f.SetContextMs, f.UnpauseMs, f.FirstProgressMs, f.HundredRoundsMs)
	}
	for _, s := range x.Retries {
		ew.printf("\nRetried after a TCG triple fault: %s\n", s)
	}
	for _, s := range x.Errors {
		ew.printf("\nFailed: %s\n", s)
	}
	if x.CorruptRecords > 0 {
		ew.printf("\n%d record lines were garbled on the console (each record is printed twice).\n", x.CorruptRecords)
	}
}

func ratioCell(v float64) string {
	if v <= 0 {
		return ""
	}
	return fmt.Sprintf("%.2f", v)
}

func xenLoad(x *XenResult) string {
	for _, p := range x.Pauses {
		if p.Load != "" {
			return "`" + p.Load + "` (xentest's dirtier: stamps 32 MiB of pages and rewrites about one in 7 of them, then sleeps 5 ms, over and over; the same whatever the guest's size)"
		}
	}
	return "xentest's dirtier"
}

func (r *Report) xenTables() []table {
	x := r.Xen
	if x == nil || x.Skipped != "" {
		return nil
	}
	t := table{name: "xen_pause.csv", header: []string{"guest_mib", "mode", "epochs", "interval_ms", "dirty_pages_p50", "dirty_pages_p90",
		"stopped_ms_p50", "stopped_ms_p90", "stopped_ms_max", "paused_ms_p50", "paused_ms_p90", "paused_ms_max",
		"suspend_ms_p50", "pause_ms_p50", "harvest_ms_p50", "copy_ms_p50", "context_ms_p50", "resume_fast_ms_p50", "unpause_ms_p50",
		"memcpy_ms_p50", "stopped_over_memcpy", "paused_over_memcpy", "copy_over_memcpy", "stopped_over_bare", "paused_over_bare", "attempts"}}
	opt := func(v float64, ok bool) string {
		if !ok {
			return ""
		}
		return ff(v)
	}
	p50 := func(s *xenbench.Stat) string {
		if s == nil {
			return ""
		}
		return ff(s.P50)
	}
	for _, p := range x.Pauses {
		t.rows = append(t.rows, []string{fi(int64(p.GuestMiB)), p.Mode, fi(int64(p.Epochs)), ff(p.IntervalMs), ff(p.Pages.P50), ff(p.Pages.P90),
			ff(p.Stopped.P50), ff(p.Stopped.P90), ff(p.Stopped.Max), ff(p.Paused.P50), ff(p.Paused.P90), ff(p.Paused.Max),
			p50(p.Suspend), ff(p.Pause.P50), ff(p.Harvest.P50), ff(p.Copy.P50), ff(p.Context.P50), p50(p.ResumeFast), ff(p.Unpause.P50),
			ff(p.Memcpy.P50), ff(p.StoppedOverMemcpy), ff(p.PausedOverMemcpy), ff(p.CopyOverMemcpy), opt(p.StoppedOverBare, p.StoppedOverBare > 0), opt(p.PausedOverBare, p.PausedOverBare > 0), fi(int64(p.Attempts))})
	}
	ts := []table{t}
	if f := x.Failover; f != nil {
		ts = append(ts, table{name: "xen_failover.csv", header: []string{"guest_mib", "epochs_acked", "interval_ms", "standby_s", "engine_pause_ms_p50", "engine_pause_ms_p90",
			"activation_ms", "set_context_ms", "unpause_ms", "first_progress_ms", "hundred_rounds_ms", "attempts"},
			rows: [][]string{{fi(int64(f.GuestMiB)), fi(int64(f.Epochs)), ff(f.IntervalMs), ff(f.StandbySec), ff(f.EnginePause.P50), ff(f.EnginePause.P90),
				ff(f.ActivationMs), ff(f.SetContextMs), ff(f.UnpauseMs), ff(f.FirstProgressMs), ff(f.HundredRoundsMs), fi(int64(f.Attempts))}}})
	}
	return ts
}
