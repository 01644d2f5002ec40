package watchdog

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/xen"
)

// Xen domains: the watchdog "stops" a protected Xen primary by taking one
// pause reference on its domain (xc_domain_pause; Xen counts references,
// so the daemon's own pauses and suspends neither lift it nor are lifted
// by it) and "continues" it by dropping the references it took, never
// one it did not take. A domain is supervised only if its name is one of
// the daemon's Xen domains the watchdog was started with (--xen-domain)
// and xenstore gives the domid that name; the domain's Xen handle (its
// UUID) is then recorded, and checked before every pause and unpause, so
// a domain that replaced it under a reused id is never touched (the pidfd
// of a QEMU process does the same).

// XenOps is the Xen the watchdog acts on (hypervisor/xen by default; a
// fake in tests). Each call has ctx's deadline.
type XenOps interface {
	Name(ctx context.Context, domid uint32) (string, error)
	Handle(ctx context.Context, domid uint32) ([16]byte, error)
	Paused(ctx context.Context, domid uint32) (bool, error)
	Pause(ctx context.Context, domid uint32) error
	Unpause(ctx context.Context, domid uint32) error
}

// HostXen is XenOps on this host's Xen (needs a binary built with the xen
// tag; otherwise every call fails with xen.ErrNotBuilt).
type HostXen struct{}

func (HostXen) Name(ctx context.Context, domid uint32) (string, error) {
	return xen.DomainName(ctx, domid)
}
func (HostXen) Handle(ctx context.Context, domid uint32) ([16]byte, error) {
	return xen.DomainHandle(ctx, domid)
}
func (HostXen) Paused(ctx context.Context, domid uint32) (bool, error) {
	st, err := xen.DomainState(ctx, domid)
	return st.Paused, err
}
func (HostXen) Pause(ctx context.Context, domid uint32) error   { return xen.PauseDomain(ctx, domid) }
func (HostXen) Unpause(ctx context.Context, domid uint32) error { return xen.UnpauseDomain(ctx, domid) }

// xenCallTimeout bounds each Xen call the watchdog makes.
const xenCallTimeout = 5 * time.Second

// XenProcs opens Xen domains (Target.Xen) for the watchdog.
type XenProcs struct {
	ops     XenOps
	domains []string
}

// NewXenProcs supervises domains named in domains (the daemon's xen_vms
// domain names) through ops.
func NewXenProcs(ops XenOps, domains []string) (*XenProcs, error) {
	for _, d := range domains {
		if !xenDomainRE.MatchString(d) {
			return nil, fmt.Errorf("watchdog: Xen domain name %q: want 1-64 letters, digits, '.', '_' or '-'", d)
		}
	}
	return &XenProcs{ops: ops, domains: slices.Clone(domains)}, nil
}

// Domains are the domain names it may pause.
func (x *XenProcs) Domains() []string { return slices.Clone(x.domains) }

// Open implements Procs for a Xen target.
func (x *XenProcs) Open(t Target) (Proc, error) {
	if err := t.validate(); err != nil {
		return nil, err
	}
	if !t.Xen() {
		return nil, fmt.Errorf("%w: not a Xen domain", ErrInvalidTarget)
	}
	if !slices.Contains(x.domains, t.XenDomain) {
		return nil, fmt.Errorf("%w: %q is not one of the Xen domains this watchdog was started with (--xen-domain: the daemon's xen_vms)", ErrInvalidTarget, t.XenDomain)
	}
	ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
	defer cancel()
	h, err := x.ops.Handle(ctx, t.XenDomID)
	if err != nil {
		return nil, fmt.Errorf("%w: domain %d: %w", ErrInvalidTarget, t.XenDomID, err)
	}
	name, err := x.ops.Name(ctx, t.XenDomID)
	if err != nil {
		return nil, fmt.Errorf("%w: domain %d: %w", ErrInvalidTarget, t.XenDomID, err)
	}
	if name != t.XenDomain {
		return nil, fmt.Errorf("%w: domain %d is %q, not %q (%w)", ErrInvalidTarget, t.XenDomID, name, t.XenDomain, errStale)
	}
	// The handle again: the name was read from the domain it names.
	if h2, err := x.ops.Handle(ctx, t.XenDomID); err != nil || h2 != h {
		return nil, fmt.Errorf("%w: domain %d changed while it was checked", ErrInvalidTarget, t.XenDomID)
	}
	return &xenProc{ops: x.ops, domid: t.XenDomID, handle: h}, nil
}

// xenProc is one supervised domain. Core serializes its calls.
type xenProc struct {
	ops    XenOps
	domid  uint32
	handle [16]byte
	held   int // pause references this watchdog took and holds
}

var errDomainGone = errors.New("the domain is gone (its id is free or another domain's)")

// same checks that domid is still the domain that was validated.
func (p *xenProc) same(ctx context.Context) error {
	h, err := p.ops.Handle(ctx, p.domid)
	if err != nil {
		if errors.Is(err, xen.ErrNoDomain) {
			return fmt.Errorf("domain %d: %w", p.domid, errDomainGone)
		}
		return fmt.Errorf("domain %d: %w", p.domid, err)
	}
	if h != p.handle {
		return fmt.Errorf("domain %d: %w", p.domid, errDomainGone)
	}
	return nil
}

// Stop takes one pause reference.
func (p *xenProc) Stop() error {
	ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
	defer cancel()
	if err := p.same(ctx); err != nil {
		return err
	}
	if err := p.ops.Pause(ctx, p.domid); err != nil {
		return err
	}
	p.held++
	return nil
}

// Cont drops the pause references this watchdog holds (none: nothing).
func (p *xenProc) Cont() error {
	if p.held == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
	defer cancel()
	if err := p.same(ctx); err != nil {
		return err
	}
	for p.held > 0 {
		if err := p.ops.Unpause(ctx, p.domid); err != nil {
			return err
		}
		p.held--
	}
	return nil
}

// Stopped reports whether the domain is paused. One that is not holds
// none of this watchdog's references any more (someone dropped them).
func (p *xenProc) Stopped() (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
	defer cancel()
	if err := p.same(ctx); err != nil {
		return false, err
	}
	paused, err := p.ops.Paused(ctx, p.domid)
	if err != nil {
		return false, err
	}
	if !paused {
		p.held = 0
	}
	return paused, nil
}

// Exited reports whether the domain is gone (a Xen that does not answer
// is not taken for that).
func (p *xenProc) Exited() bool {
	ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
	defer cancel()
	return errors.Is(p.same(ctx), errDomainGone)
}

// Close lets go of the domain; a pause it holds stays (the next daemon
// finds the domain paused and decides).
func (p *xenProc) Close() error { return nil }

// targetProcs sends each target to the Procs of its kind.
type targetProcs struct {
	qemu, xen Procs
}

func (t targetProcs) Open(tg Target) (Proc, error) {
	if tg.Xen() {
		if t.xen == nil {
			return nil, fmt.Errorf("%w: this watchdog supervises no Xen domains (start it with --xen-domain; it needs a remusd built with the xen tag)", ErrInvalidTarget)
		}
		return t.xen.Open(tg)
	}
	if t.qemu == nil {
		return nil, fmt.Errorf("%w: this watchdog supervises no QEMU processes (no QEMU binary resolved)", ErrInvalidTarget)
	}
	return t.qemu.Open(tg)
}

// XenStateName is the file in the state directory where the watchdog
// records the Xen domains it holds paused: a pause says nothing of its
// owner, so a watchdog that exits (killed, crashed) while holding one
// would leave it unknown to the next. The next one restores it (if the
// domain is still the one recorded) and reports it stopped, for the
// daemon to decide.
const XenStateName = "watchdog-xen.json"

// HeldXen is one Xen domain the watchdog holds paused, as recorded.
type HeldXen struct {
	VM       string `json:"vm"`
	DomID    uint32 `json:"domid"`
	Domain   string `json:"domain"`
	Handle   string `json:"handle"` // hex
	Held     int    `json:"held"`   // pause references taken
	AtUnixMs int64  `json:"at_unix_ms"`
	Why      string `json:"why"`
}

// XenHeld lists the Xen domains the watchdog holds paused.
func (c *Core) XenHeld() []HeldXen {
	var out []HeldXen
	for name, e := range c.vms {
		xp, ok := e.proc.(*xenProc)
		if !ok || !e.stopped || xp.held == 0 {
			continue
		}
		out = append(out, HeldXen{VM: name, DomID: e.t.XenDomID, Domain: e.t.XenDomain, Handle: hex.EncodeToString(xp.handle[:]),
			Held: xp.held, AtUnixMs: e.stoppedAt.UnixMilli(), Why: e.why})
	}
	slices.SortFunc(out, func(a, b HeldXen) int { return strings.Compare(a.VM, b.VM) })
	return out
}

// errStale marks a recorded pause whose domain is gone, is another
// domain now, or is not paused: nothing of it to restore.
var errStale = errors.New("stale")

// RestoreXen supervises, as stopped, a domain a previous watchdog
// recorded holding paused, if it is still that domain (name and handle)
// and paused. A record proven stale (the domain gone, another one, or
// not paused: the reference was dropped) is an error wrapping errStale;
// any other error leaves the question open.
func (c *Core) RestoreXen(x *XenProcs, h HeldXen) error {
	t := Target{VM: h.VM, XenDomID: h.DomID, XenDomain: h.Domain}
	raw, err := hex.DecodeString(h.Handle)
	// The watchdog holds at most one reference per domain.
	if err != nil || len(raw) != 16 || h.Held != 1 {
		return fmt.Errorf("watchdog: a recorded pause of %s is malformed", h.VM)
	}
	if _, ok := c.vms[h.VM]; ok {
		return fmt.Errorf("watchdog: %s is supervised already", h.VM)
	}
	p, err := x.Open(t)
	switch {
	case errors.Is(err, xen.ErrNoDomain) && !errors.Is(err, errStale):
		return fmt.Errorf("watchdog: %s: %w: %w", h.VM, errStale, err)
	case err != nil:
		return err // errStale for another domain's name now
	}
	xp := p.(*xenProc)
	if !bytes.Equal(xp.handle[:], raw) {
		return fmt.Errorf("watchdog: domain %d is not the domain recorded for %s any more: %w", h.DomID, h.VM, errStale)
	}
	if st, err := xp.Stopped(); err != nil {
		return err
	} else if !st {
		return fmt.Errorf("watchdog: domain %d (%s) is not paused: the recorded reference was dropped: %w", h.DomID, h.VM, errStale)
	}
	xp.held = h.Held
	now := c.now()
	c.vms[h.VM] = &entry{t: t, proc: xp, stopped: true, stoppedAt: time.UnixMilli(h.AtUnixMs), checkedAt: now, restarting: true,
		why: h.Why + " (restored from a previous watchdog's record)"}
	c.log.Warn("restored a Xen domain a previous watchdog held paused", zap.String("vm", h.VM), zap.Uint32("domid", h.DomID), zap.Int("references", h.Held))
	return nil
}
