// Package xenbench is the record format between the Xen benchmark that
// runs in a xentest dom0 (TestDom0Bench in hypervisor/xen, built with the
// "xen" tag) and `remusd bench --backend xen` on the host (package bench),
// which reads the records from the serial console. It is plain Go: the
// host side needs no Xen headers.
//
// A record is one console line: Prefix, its kind, the CRC-32 (IEEE, hex)
// of its JSON and the JSON. Dom0's console may interleave kernel or Xen
// messages with a long line, so every record is printed twice and the
// parser keeps the first copy whose checksum matches.
package xenbench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Prefix starts every record line.
const Prefix = "REMUSD-XENBENCH "

// Record kinds.
const (
	KindPause    = "pause"
	KindFailover = "failover"
	KindError    = "error"
	KindDone     = "done"
)

// Modes of a pause record.
const (
	ModeBare        = "bare"
	ModeCooperative = "cooperative"
)

// Environment the in-dom0 benchmark reads (set by the host side).
const (
	EnvGuestMiB = "XEN_BENCH_MIB"      // comma-separated guest sizes, e.g. "128,512"
	EnvEpochs   = "XEN_BENCH_EPOCHS"   // measured epochs per guest and mode
	EnvFailover = "XEN_BENCH_FAILOVER" // "1": also the failover round trip (128 MiB)
	EnvFOEpochs = "XEN_BENCH_FO_EPOCHS"
)

// Stat is a distribution's median, 90th percentile and maximum, in
// milliseconds (or pages, for page counts).
type Stat struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	Max float64 `json:"max"`
}

// Durations summarises d in milliseconds (zero Stat if empty).
func Durations(d []time.Duration) Stat {
	v := make([]float64, len(d))
	for i, x := range d {
		v[i] = float64(x) / float64(time.Millisecond)
	}
	return Values(v)
}

// Values summarises v (nearest-rank quantiles; zero Stat if empty).
func Values(v []float64) Stat {
	if len(v) == 0 {
		return Stat{}
	}
	v = slices.Clone(v)
	slices.Sort(v)
	return Stat{P50: v[len(v)/2], P90: v[len(v)*9/10], Max: v[len(v)-1]}
}

// Case is one guest size and checkpoint mode: the epoch path of
// hypervisor/xen (Pause, HarvestDirty, CopyDirty into staging,
// SaveDeviceState, Resume), as the engine calls it, every IntervalMs.
type Case struct {
	GuestMiB    int     `json:"guest_mib"`
	Mode        string  `json:"mode"`
	Epochs      int     `json:"epochs"`
	IntervalMs  float64 `json:"interval_ms"`
	MappedPages int     `json:"mapped_pages"`
	Load        string  `json:"load"`
	// Backend is Guest.BackendVersion (Xen's version, the layout's hash).
	Backend string `json:"backend_version"`
	// Attempts: 1, or more when the guest died (TCG triple fault) and the
	// block was run again on a new guest.
	Attempts int  `json:"attempts"`
	Pages    Stat `json:"dirty_pages"`
	// Stopped: the guest's progress stops, as the caller waits: from the
	// suspend request (cooperative) or the pause call (bare) until the
	// domain runs again. Paused: from the pause call on.
	Stopped Stat `json:"stopped_ms"`
	Paused  Stat `json:"paused_ms"`
	// The steps: Suspend as the caller waits and ResumeFast
	// (cooperative only: nil for a bare pause, which has neither), Copy
	// the memcpy out of the foreign mapping, the others inside their
	// libxc calls (Guest.LastTimings).
	Suspend    *Stat `json:"suspend_ms,omitempty"`
	Pause      Stat  `json:"pause_ms"`
	Harvest    Stat  `json:"harvest_ms"`
	Copy       Stat  `json:"copy_ms"`
	Context    Stat  `json:"context_ms"`
	ResumeFast *Stat `json:"resume_fast_ms,omitempty"`
	Unpause    Stat  `json:"unpause_ms"`
	// Memcpy is the bound: copy() of the same runs of the same pages
	// between two warm dom0 buffers, right after each epoch.
	Memcpy Stat `json:"memcpy_ms"`
}

// Key identifies a case.
func (p Case) Key() string { return fmt.Sprintf("%d/%s", p.GuestMiB, p.Mode) }

// Failover is the round trip of hypervisor/xen's tests (the engine over an
// in-memory link into a standby domain on the same host, cooperative
// checkpoints), its primary domain destroyed and the standby activated.
type Failover struct {
	GuestMiB    int     `json:"guest_mib"`
	Epochs      int     `json:"epochs_acked"`
	IntervalMs  float64 `json:"interval_ms"`
	Attempts    int     `json:"attempts"`
	StandbySec  float64 `json:"standby_s"` // xl create -p and mapping
	EnginePause Stat    `json:"engine_pause_ms"`
	EnginePages Stat    `json:"engine_dirty_pages"`
	// ActivationMs: Backup.Activate as the caller waits; SetContextMs
	// and UnpauseMs: the standby's steps.
	ActivationMs float64 `json:"activation_ms"`
	SetContextMs float64 `json:"set_context_ms"`
	UnpauseMs    float64 `json:"unpause_ms"`
	// FirstProgressMs: Activate began → the guest's memory shows a
	// dirtier round beyond the committed one; HundredRoundsMs: → 100
	// rounds beyond.
	FirstProgressMs float64 `json:"first_progress_ms"`
	HundredRoundsMs float64 `json:"hundred_rounds_ms"`
}

// Error is a block that failed (after its retries) or a failed attempt.
type Error struct {
	Case  string `json:"case"`
	Error string `json:"error"`
	Final bool   `json:"final"` // false: the block was retried
}

// Done ends the run.
type Done struct {
	Seconds float64 `json:"seconds"`
}

// Write prints rec as a record line of kind, twice.
func Write(w io.Writer, kind string, rec any) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("xenbench: %w", err)
	}
	line := fmt.Sprintf("%s%s %08x %s\n", Prefix, kind, crc32.ChecksumIEEE(b), b)
	if _, err := io.WriteString(w, line+line); err != nil {
		return fmt.Errorf("xenbench: %w", err)
	}
	return nil
}

// Results are the records read from a console.
type Results struct {
	Pauses    []Case
	Failovers []Failover
	Errors    []Error
	Done      *Done
	// Corrupt counts record lines whose checksum or JSON was wrong (their
	// duplicate may have been read).
	Corrupt int
}

// Parse reads every record in console. Duplicates (same kind and key)
// keep the first valid copy.
func Parse(console string) Results {
	var r Results
	seen := map[string]bool{}
	for _, line := range strings.Split(console, "\n") {
		kind, payload, ok := parseLine(line)
		if !ok {
			if strings.Contains(line, Prefix) {
				r.Corrupt++
			}
			continue
		}
		var key string
		switch kind {
		case KindPause:
			var p Case
			if json.Unmarshal(payload, &p) != nil {
				r.Corrupt++
				continue
			}
			if key = kind + p.Key(); !seen[key] {
				r.Pauses = append(r.Pauses, p)
			}
		case KindFailover:
			var f Failover
			if json.Unmarshal(payload, &f) != nil {
				r.Corrupt++
				continue
			}
			if key = kind + strconv.Itoa(f.GuestMiB); !seen[key] {
				r.Failovers = append(r.Failovers, f)
			}
		case KindError:
			var e Error
			if json.Unmarshal(payload, &e) != nil {
				r.Corrupt++
				continue
			}
			if key = kind + string(payload); !seen[key] {
				r.Errors = append(r.Errors, e)
			}
		case KindDone:
			var d Done
			if json.Unmarshal(payload, &d) != nil {
				r.Corrupt++
				continue
			}
			if key = kind; !seen[key] {
				r.Done = &d
			}
		default:
			r.Corrupt++
			continue
		}
		seen[key] = true
	}
	return r
}

// parseLine returns a record line's kind and JSON if its checksum matches.
func parseLine(line string) (string, []byte, bool) {
	i := strings.Index(line, Prefix)
	if i < 0 {
		return "", nil, false
	}
	f := strings.SplitN(strings.TrimRight(line[i+len(Prefix):], "\r"), " ", 3)
	if len(f) != 3 {
		return "", nil, false
	}
	sum, err := strconv.ParseUint(f[1], 16, 32)
	if err != nil || len(f[1]) != 8 {
		return "", nil, false
	}
	payload := []byte(f[2])
	if crc32.ChecksumIEEE(payload) != uint32(sum) || !json.Valid(payload) || !bytes.HasPrefix(payload, []byte("{")) {
		return "", nil, false
	}
	return f[0], payload, true
}
