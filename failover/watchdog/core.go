package watchdog

import (
	"errors"
	"fmt"
	"sort"
	"time"

	"go.uber.org/zap"
)

// Procs opens the processes the watchdog may stop (linuxProcs; a fake in
// tests).
type Procs interface {
	// Open validates that pid is t's QEMU (see package doc) and returns a
	// handle that signals exactly that process, or an error wrapping
	// ErrInvalidTarget.
	Open(t Target) (Proc, error)
}

// Proc is one validated process.
type Proc interface {
	Stop() error // SIGSTOP
	Cont() error // SIGCONT
	// Stopped reports whether the process is in a stopped state now.
	Stopped() (bool, error)
	// Exited reports whether the process has exited.
	Exited() bool
	Close() error
}

// ErrUnknownVM: Cont of a VM the watchdog does not supervise.
var ErrUnknownVM = errors.New("watchdog: VM not supervised")

// DefaultRecheck is how often a stopped guest is checked to still be
// stopped (and stopped again if something continued it).
const DefaultRecheck = time.Second

// Core is the watchdog's state: the supervised VMs, their deadlines and
// stops. Pure: time comes from now, processes from procs. Not safe for
// concurrent use (Server serializes).
type Core struct {
	now     func() time.Time
	procs   Procs
	log     *zap.Logger
	recheck time.Duration
	vms     map[string]*entry
	// refused remembers the last refusal per VM, so that a daemon that
	// keeps naming a process the watchdog will not touch does not have it
	// validated (and logged) on every pet.
	refused map[string]refusal
}

type refusal struct {
	t   Target
	err error
	at  time.Time
}

// refuseRetry is how long a refusal stands before the same target is
// validated again.
const refuseRetry = 30 * time.Second

type entry struct {
	t    Target
	proc Proc
	// deadline: stop the guest at this time unless a pet moves it.
	deadline time.Time
	why      string // what the deadline stands for
	// owner is the connection that last vouched for the VM.
	owner uint64
	// restarting: the deadline is a restart grace (the VM stays
	// supervised while a pet leaves it out).
	restarting bool
	stopped    bool
	stoppedAt  time.Time
	late       time.Duration
	checkedAt  time.Time
}

// NewCore returns an empty core. now defaults to time.Now, log to a no-op.
func NewCore(now func() time.Time, procs Procs, log *zap.Logger) *Core {
	if now == nil {
		now = time.Now
	}
	if log == nil {
		log = zap.NewNop()
	}
	return &Core{now: now, procs: procs, log: log, recheck: DefaultRecheck, vms: map[string]*entry{}, refused: map[string]refusal{}}
}

// Pet records what the daemon on connection owner vouches for: each VM's
// deadline becomes now + ValidForNs (a stopped VM stays stopped: only
// Cont lifts a stop). A new VM, or one whose pid or QMP socket changed,
// is validated first; a refused one is reported and not supervised. VMs
// the pet leaves out stop being supervised, unless stopped or in a
// restart grace.
func (c *Core) Pet(owner uint64, vms []PetVM) Reply {
	now := c.now()
	var rep Reply
	seen := map[string]bool{}
	for _, p := range vms {
		t := p.Target()
		if seen[p.Name] {
			rep.Refused = append(rep.Refused, Refusal{Name: p.Name, Pid: p.Pid, XenDomID: p.XenDomID, Error: "listed twice"})
			continue
		}
		seen[p.Name] = true
		if err := t.validate(); err != nil {
			rep.Refused = append(rep.Refused, Refusal{Name: p.Name, Pid: p.Pid, XenDomID: p.XenDomID, Error: err.Error()})
			continue
		}
		e := c.vms[p.Name]
		if e != nil && e.t != t {
			if e.stopped && !e.proc.Exited() {
				rep.Refused = append(rep.Refused, Refusal{Name: p.Name, Pid: p.Pid, XenDomID: p.XenDomID,
					Error: fmt.Sprintf("the watchdog holds this VM's process %d stopped: cont it first", e.t.Pid)})
				continue
			}
			c.drop(p.Name, e, "its daemon names another process now")
			e = nil
		}
		if e == nil {
			if r, ok := c.refused[p.Name]; ok && r.t == t && now.Sub(r.at) < refuseRetry {
				rep.Refused = append(rep.Refused, Refusal{Name: p.Name, Pid: p.Pid, XenDomID: p.XenDomID, Error: r.err.Error()})
				continue
			}
			proc, err := c.procs.Open(t)
			if err != nil {
				c.refused[p.Name] = refusal{t: t, err: err, at: now}
				c.log.Warn("refused to supervise a guest", zap.String("vm", p.Name), zap.Int("pid", p.Pid), zap.String("qmp", p.QMP), zap.Uint32("xen_domid", p.XenDomID), zap.Error(err))
				rep.Refused = append(rep.Refused, Refusal{Name: p.Name, Pid: p.Pid, XenDomID: p.XenDomID, Error: err.Error()})
				continue
			}
			delete(c.refused, p.Name)
			e = &entry{t: t, proc: proc}
			c.vms[p.Name] = e
			c.log.Info("supervising a protected guest", zap.String("vm", p.Name), zap.Int("pid", p.Pid), zap.String("qmp", p.QMP), zap.Uint32("xen_domid", p.XenDomID))
		}
		e.owner, e.restarting = owner, false
		if !e.stopped {
			e.deadline, e.why = now.Add(durationNs(p.ValidForNs)), "the daemon's proof that this host holds the VM ran out"
		}
	}
	for name, e := range c.vms {
		if !seen[name] && !e.stopped && !e.restarting {
			c.drop(name, e, "its daemon no longer protects it here")
		}
	}
	rep.OK = true
	rep.Stopped = c.Stopped()
	return rep
}

// Restart is a clean restart notice: the VMs named get grace from now
// (what the backup grants a restarting primary), the others keep their
// deadlines; all of them stay supervised until the next daemon's pets.
func (c *Core) Restart(owner uint64, names []string, grace time.Duration) {
	now := c.now()
	for _, name := range names {
		if e := c.vms[name]; e != nil && !e.stopped {
			e.deadline, e.why, e.restarting = now.Add(grace), "its daemon restarted and no daemon vouched for the VM within the restart grace", true
		}
	}
	for name, e := range c.vms {
		if !e.restarting && !e.stopped {
			e.restarting = true // kept while the next daemon starts; its deadline stands
			c.log.Warn("daemon restarts: this VM keeps its deadline", zap.String("vm", name), zap.Time("deadline", e.deadline))
		}
	}
	c.log.Info("daemon restarts", zap.Uint64("conn", owner), zap.Strings("grace_for", names), zap.Duration("grace", grace))
}

// Disconnected is the end of connection owner. Unless it announced a
// restart, its daemon died (crash, kill): nothing vouches for the VMs it
// pet any more, so they are due at once.
func (c *Core) Disconnected(owner uint64, restart bool) {
	if restart {
		return
	}
	now := c.now()
	for name, e := range c.vms {
		if e.owner == owner && !e.stopped && !e.restarting {
			e.deadline, e.why = now, "its daemon's connection closed without a restart notice (the daemon died)"
			c.log.Error("daemon connection closed without a restart notice: its guest is due now", zap.String("vm", name), zap.Int("pid", e.t.Pid))
		}
	}
}

// Cont lifts the stop of VM name (SIGCONT) at its daemon's request, and
// supervises it for validFor more, or not at all (release). The signal
// goes also to a VM the watchdog did not stop itself (a previous watchdog
// did, before it exited): the daemon found it stopped.
func (c *Core) Cont(name string, validFor time.Duration, release bool) error {
	e := c.vms[name]
	if e == nil {
		return fmt.Errorf("%w: %s", ErrUnknownVM, name)
	}
	if err := e.proc.Cont(); err != nil {
		return fmt.Errorf("watchdog: SIGCONT %s (pid %d): %w", name, e.t.Pid, err)
	}
	if e.stopped {
		c.log.Warn("guest continued at its daemon's request", zap.String("vm", name), zap.Int("pid", e.t.Pid),
			zap.Duration("stopped_for", c.now().Sub(e.stoppedAt)), zap.Bool("released", release))
		e.stopped = false
	}
	if release {
		c.drop(name, e, "its daemon released it")
		return nil
	}
	e.deadline, e.why, e.restarting = c.now().Add(validFor), "the daemon's proof that this host holds the VM ran out", false
	return nil
}

// Tick stops every guest whose deadline has passed, checks that stopped
// guests stay stopped, forgets exited ones, and returns when it next
// needs to run.
func (c *Core) Tick() time.Time {
	now := c.now()
	next := now.Add(c.recheck)
	for name, e := range c.vms {
		if e.proc.Exited() {
			c.drop(name, e, "its process exited")
			continue
		}
		if e.stopped {
			if now.Sub(e.checkedAt) >= c.recheck {
				e.checkedAt = now
				if st, err := e.proc.Stopped(); err == nil && !st {
					c.log.Error("a guest the watchdog stopped was continued by someone else: stopping it again", zap.String("vm", name), zap.Int("pid", e.t.Pid))
					if err := e.proc.Stop(); err != nil {
						c.log.Error("SIGSTOP failed", zap.String("vm", name), zap.Int("pid", e.t.Pid), zap.Error(err))
					}
				}
			}
			continue
		}
		if now.Before(e.deadline) {
			if e.deadline.Before(next) {
				next = e.deadline
			}
			continue
		}
		if err := e.proc.Stop(); err != nil {
			c.log.Error("cannot stop a guest whose daemon cannot prove it holds the VM: SIGSTOP failed", zap.String("vm", name), zap.Int("pid", e.t.Pid), zap.Error(err))
			continue // retried at the next tick
		}
		e.stopped, e.stoppedAt, e.late, e.checkedAt = true, now, now.Sub(e.deadline), now
		c.log.Error("stopped the guest (SIGSTOP, or a Xen pause): "+e.why, zap.String("vm", name), zap.Int("pid", e.t.Pid), zap.Uint32("xen_domid", e.t.XenDomID),
			zap.Time("deadline", e.deadline), zap.Duration("late", e.late))
	}
	return next
}

// Stopped lists the guests the watchdog holds stopped, by name.
func (c *Core) Stopped() []StoppedVM {
	var out []StoppedVM
	for name, e := range c.vms {
		if e.stopped {
			out = append(out, StoppedVM{Name: name, Pid: e.t.Pid, QMP: e.t.QMP, XenDomID: e.t.XenDomID, AtUnixMs: e.stoppedAt.UnixMilli(),
				LateMs: float64(e.late.Microseconds()) / 1000, Why: e.why})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Deadline returns VM name's deadline and whether it is supervised.
func (c *Core) Deadline(name string) (time.Time, bool) {
	e := c.vms[name]
	if e == nil {
		return time.Time{}, false
	}
	return e.deadline, true
}

// Idle reports whether nothing is supervised.
func (c *Core) Idle() bool { return len(c.vms) == 0 }

// Close lets go of every process (stopped ones stay stopped: the next
// daemon finds them in state T and decides).
func (c *Core) Close() {
	for name, e := range c.vms {
		if e.stopped {
			c.log.Warn("watchdog exits: a guest it stopped stays stopped", zap.String("vm", name), zap.Int("pid", e.t.Pid))
		}
		_ = e.proc.Close()
		delete(c.vms, name)
	}
}

func (c *Core) drop(name string, e *entry, why string) {
	_ = e.proc.Close()
	delete(c.vms, name)
	c.log.Info("no longer supervising a guest: "+why, zap.String("vm", name), zap.Int("pid", e.t.Pid))
}
