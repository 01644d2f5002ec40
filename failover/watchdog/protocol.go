// Package watchdog is remusd's last resort against a hung daemon: a
// separate process (`remusd watchdog`) that stops a protected primary's
// QEMU guest (SIGSTOP, never a kill) when the daemon has stopped proving
// that this host still holds the VM.
//
// The daemon pets it over a unix socket in its state directory (mode
// 0600, peers checked with SO_PEERCRED) with, per protected VM, the QEMU
// process id, its QMP socket and how long the daemon's proof of holding
// the VM remains valid. When that time passes without a new pet, or the
// daemon's connection closes without a restart notice (the daemon died),
// the watchdog sends SIGSTOP to the QEMU process through a pidfd and keeps
// it stopped. It works whatever state the daemon or QMP are in: a
// SIGSTOPped, deadlocked, crashed or killed daemon, a wedged monitor.
//
// Only the daemon lifts a stop (Cont), after it has checked that it still
// holds the VM; it then resumes or fences the guest itself. A daemon that
// restarts cleanly says so first (Restart): the guests it names get the
// restart grace the backup also grants.
//
// A pid is supervised only after validation: the process must run one of
// the QEMU binaries the watchdog was started with (/proc/PID/exe) and its
// command line must name the VM (-name VM) and its QMP socket (-qmp
// unix:PATH,...). The process is then held by a pidfd, so a recycled pid
// is never signalled. The core logic (Core) is pure: clock and process
// operations are injected, and tested with fakes.
package watchdog

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/remusd/remusd/hypervisor"
)

// File names in the state directory.
const (
	SocketName = "watchdog.sock" // the daemon's channel (0600)
	LockName   = "watchdog.lock" // held (flock) by the running watchdog
	PidName    = "watchdog.pid"  // the running watchdog's pid
	LogName    = "watchdog.log"  // its log when the daemon starts it
)

// ProtocolVersion is the version a Hello carries; the watchdog refuses
// another.
const ProtocolVersion = 1

// Limits on what the watchdog reads from its socket.
const (
	maxLine = 1 << 20 // one request
	maxVMs  = 4096    // VMs in one pet
)

// Operations.
const (
	OpHello   = "hello"
	OpPet     = "pet"
	OpCont    = "cont"
	OpRestart = "restart"
)

// Request is one line the daemon sends (JSON).
type Request struct {
	Op string `json:"op"`
	// Hello.
	Version   int `json:"version,omitempty"`
	DaemonPid int `json:"daemon_pid,omitempty"`
	// Pet: every VM the daemon vouches for now; a VM left out is no
	// longer supervised (unless it is stopped, or in a restart grace).
	VMs []PetVM `json:"vms,omitempty"`
	// Cont: lift the stop of VM; supervise it for ValidForNs more, or
	// stop supervising it (Release: the daemon fenced it itself).
	VM         string `json:"vm,omitempty"`
	ValidForNs int64  `json:"valid_for_ns,omitempty"`
	Release    bool   `json:"release,omitempty"`
	// Restart: the daemon exits for a restart; Names get GraceNs from now,
	// the other VMs keep their deadlines, and the connection's close does
	// not count as the daemon's death.
	Names   []string `json:"names,omitempty"`
	GraceNs int64    `json:"grace_ns,omitempty"`
}

// PetVM is one VM the daemon vouches for: its QEMU process (Pid, QMP) or
// its Xen domain (XenDomID, XenDomain: the domain's name).
type PetVM struct {
	Name      string `json:"name"`
	Pid       int    `json:"pid,omitempty"`
	QMP       string `json:"qmp,omitempty"`
	XenDomID  uint32 `json:"xen_domid,omitempty"`
	XenDomain string `json:"xen_domain,omitempty"`
	// ValidForNs: the daemon can prove it holds the VM for this long from
	// now (≤ 0: it cannot; stop the guest now).
	ValidForNs int64 `json:"valid_for_ns"`
}

// Target is the guest a PetVM names.
func (p PetVM) Target() Target {
	return Target{VM: p.Name, Pid: p.Pid, QMP: p.QMP, XenDomID: p.XenDomID, XenDomain: p.XenDomain}
}

// Reply is the watchdog's answer (JSON, one line).
type Reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// WatchdogPid is the watchdog's process id (Hello).
	WatchdogPid int `json:"watchdog_pid,omitempty"`
	// Stopped are the guests the watchdog holds stopped (every reply).
	Stopped []StoppedVM `json:"stopped,omitempty"`
	// Refused are the VMs of a pet the watchdog does not supervise, and
	// why (an invalid pid, a process that is not that VM's QEMU).
	Refused []Refusal `json:"refused,omitempty"`
}

// StoppedVM is a guest the watchdog stopped.
type StoppedVM struct {
	Name     string `json:"name"`
	Pid      int    `json:"pid,omitempty"`
	QMP      string `json:"qmp,omitempty"`
	XenDomID uint32 `json:"xen_domid,omitempty"`
	// AtUnixMs is when it was stopped; LateMs how long after its deadline
	// (the watchdog's own reaction time); Why says what ran out.
	AtUnixMs int64   `json:"at_unix_ms"`
	LateMs   float64 `json:"late_ms"`
	Why      string  `json:"why"`
}

// Refusal is a pet entry the watchdog refused.
type Refusal struct {
	Name     string `json:"name"`
	Pid      int    `json:"pid,omitempty"`
	XenDomID uint32 `json:"xen_domid,omitempty"`
	Error    string `json:"error"`
}

// Target is a VM's QEMU process, or its Xen domain, as the daemon names
// it.
type Target struct {
	VM  string
	Pid int
	QMP string
	// XenDomID and XenDomain: a Xen domain (its id and name) instead of a
	// QEMU process.
	XenDomID  uint32
	XenDomain string
}

// Xen reports whether t names a Xen domain.
func (t Target) Xen() bool { return t.XenDomID != 0 || t.XenDomain != "" }

// ErrInvalidTarget is the error of a target the watchdog will not touch.
var ErrInvalidTarget = errors.New("watchdog: not a guest of this daemon")

// xenDomainRE is what a Xen domain name may be (as the daemon's xen_vms
// entries allow).
var xenDomainRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// validate checks a target's fields (not the process or domain: see
// Procs).
func (t Target) validate() error {
	if err := hypervisor.ValidateVMName(t.VM); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidTarget, err)
	}
	if t.Xen() {
		switch {
		case t.Pid != 0 || t.QMP != "":
			return fmt.Errorf("%w: a Xen domain with a pid or QMP socket", ErrInvalidTarget)
		case t.XenDomID == 0 || t.XenDomID >= 0x7ff0: // dom0, DOMID_FIRST_RESERVED
			return fmt.Errorf("%w: Xen domain id %d", ErrInvalidTarget, t.XenDomID)
		case !xenDomainRE.MatchString(t.XenDomain):
			return fmt.Errorf("%w: Xen domain name %q", ErrInvalidTarget, t.XenDomain)
		}
		return nil
	}
	if t.Pid <= 1 {
		return fmt.Errorf("%w: pid %d", ErrInvalidTarget, t.Pid)
	}
	if !filepath.IsAbs(t.QMP) || filepath.Clean(t.QMP) != t.QMP || strings.ContainsAny(t.QMP, ",\x00\n") || len(t.QMP) > 107 {
		return fmt.Errorf("%w: QMP socket path %q", ErrInvalidTarget, t.QMP)
	}
	return nil
}

func durationNs(ns int64) time.Duration { return time.Duration(ns) }
