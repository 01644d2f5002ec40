package watchdog

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

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
		return nil, fmt.Errorf("%w: domain %d is %q, not %q", ErrInvalidTarget, t.XenDomID, name, t.XenDomain)
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
