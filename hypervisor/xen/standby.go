//go:build xen

package xen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor"
)

var _ hypervisor.Replica = (*Standby)(nil)

// activateTimeout bounds loading the state and unpausing at activation.
const activateTimeout = time.Minute

// Standby is the backup's hot standby of a protected Xen VM: a paused
// domain of this host's Xen, created from the backup's own xl
// configuration of the VM (`xl create -p`), whose guest frames the engine
// writes through a writable foreign mapping (Memory). CommitDeviceState
// keeps the committed epoch's state (the primary's SaveDeviceState blob,
// checked record by record); Activate loads its HVM context into the
// standby domain and unpauses it.
//
// The replicated pages are the standby's populated gfns grouped into
// segments (see layoutOf), computed on the standby's own domain; the
// primary's layout must be the same, which the handshake checks through
// BackendVersion. Holes inside segments take writes into private memory
// Xen never sees.
//
// Pairing: the engine calls CommitDeviceState and writes that epoch's
// pages under one lock and Activate only after marking the replica
// activated under that lock, so the state Activate loads belongs to the
// frames the domain holds. A refused state never replaces the committed
// one, and nothing is committed once Activate began.
type Standby struct {
	caller // for the libxc calls on the standby domain
	o      StandbyOptions
	x      *xc // nil once Activate handed it to the Guest, or closed

	pvh       bool
	pages     int
	version   string
	maxVCPUID uint32
	created   time.Duration

	mu        sync.Mutex
	epoch     uint64
	state     []byte
	st        State // parsed state (aliases state)
	activated bool
	closed    bool
	lastAct   ActivationInfo
}

// NewStandby creates the standby domain paused (`xl create -p` of
// o.ConfigPath, named o.DomainName, or o.Manager's CreatePaused), checks
// its type, and maps its guest memory read-write. A domain of that name
// must not exist already (a standby left by a crashed daemon is not taken
// over: it may hold anything). On any failure after creation the domain is
// destroyed.
func NewStandby(ctx context.Context, o StandbyOptions) (*Standby, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.CreateTimeout)
	defer cancel()
	log := o.Logger.With(zap.String("vm", o.Name), zap.String("backend", BackendName), zap.String("standby", o.DomainName))
	if id, err := xlDomid(ctx, o.XL, o.DomainName); err == nil {
		return nil, fmt.Errorf("xen: standby: a domain named %q exists already (domid %d): not taking it over", o.DomainName, id)
	}
	t0 := time.Now()
	domid, err := createStandbyDomain(ctx, o, log)
	if err != nil {
		return nil, err
	}
	s := &Standby{caller: newCaller(domid, log.With(zap.Uint32("domid", domid))), o: o, created: time.Since(t0)}
	if err := s.call(ctx, "open standby", s.attach); err != nil {
		s.destroy()
		return nil, err
	}
	s.log.Info("standby created", zap.String("type", o.Type), zap.String("xen", s.version), zap.Int("pages", s.pages),
		zap.Duration("create", s.created), zap.Duration("total", time.Since(t0)))
	return s, nil
}

// createStandbyDomain creates the standby's domain paused and returns its
// domid: through o.Manager, or `xl create -p`.
func createStandbyDomain(ctx context.Context, o StandbyOptions, log *zap.Logger) (uint32, error) {
	if o.Manager != nil {
		domid, err := o.Manager.CreatePaused(ctx)
		if err != nil {
			return 0, fmt.Errorf("xen: standby: create %s paused: %w", o.Manager, err)
		}
		return domid, nil
	}
	out, err := xlRun(ctx, o.XL, "create", "-p", o.ConfigPath, fmt.Sprintf("name=%q", o.DomainName))
	if err != nil {
		return 0, fmt.Errorf("xen: standby: xl create -p %s: %w: %s", o.ConfigPath, err, lastLine(out))
	}
	domid, err := xlDomid(ctx, o.XL, o.DomainName)
	if err != nil {
		// The name is ours (it did not exist before the create): do not
		// leave a paused domain behind.
		dctx, dcancel := context.WithTimeout(context.Background(), o.DestroyTimeout)
		out, derr := xlRun(dctx, o.XL, "destroy", o.DomainName)
		dcancel()
		if derr != nil {
			log.Error("destroying the standby after a failed lookup failed", zap.Error(derr), zap.String("xl", lastLine(out)))
		}
		return 0, fmt.Errorf("xen: standby: created %q but cannot find it: %w", o.DomainName, err)
	}
	return domid, nil
}

// attach runs under sem.
func (s *Standby) attach() error {
	x, err := openXC(s.domid)
	if err != nil {
		return err
	}
	fail := func(err error) error { x.close(); return err }
	if s.version, err = x.version(); err != nil {
		return fail(err)
	}
	info, err := x.info()
	if err != nil {
		return fail(err)
	}
	typ := "pv"
	if info.hvm {
		typ = "hvm"
		if info.pvh {
			typ = "pvh"
		}
	}
	switch {
	case typ != s.o.Type:
		return fail(fmt.Errorf("standby domain is %s, want %s (check %s)", typ, s.o.Type, s.o.source()))
	case !info.paused:
		return fail(errors.New("standby domain is not paused"))
	case info.shutdown || info.dying:
		return fail(errors.New("standby domain is shutting down"))
	case info.maxVCPUID >= maxVCPUs:
		return fail(fmt.Errorf("standby has max vcpu id %d", info.maxVCPUID))
	}
	s.pvh, s.maxVCPUID = info.pvh, info.maxVCPUID
	maxGPFN, err := x.maxGPFN()
	if err != nil {
		return fail(err)
	}
	if maxGPFN >= 1<<32 {
		return fail(fmt.Errorf("max gpfn %#x is implausibly large", maxGPFN))
	}
	if _, err = x.mapAll(int(maxGPFN)+1, true); err != nil {
		return fail(err)
	}
	s.pages = x.memPages
	s.version = layoutVersion(s.version, x.segs)
	s.x = x
	return nil
}

// DomID is the standby domain's id.
func (s *Standby) DomID() uint32 { return s.domid }

// Managed reports whether a toolstack other than xl owns the standby's
// domain (StandbyOptions.Manager): it knows the domain, also once
// activated.
func (s *Standby) Managed() bool { return s.o.Manager != nil }

// BackendVersion is this host's Xen version and the standby's layout hash
// (the primary's must equal it).
func (s *Standby) BackendVersion() string { return s.version }

// NumPages is the number of replicated pages.
func (s *Standby) NumPages() int { return s.pages }

// Memory is the writable foreign mapping of the standby's segments,
// page index i at offset i*PageSize, holes backed by private memory. Nil after Activate (the
// activated Guest owns it) or Close.
func (s *Standby) Memory() []byte {
	if s.x == nil {
		return nil
	}
	return s.x.memory()
}

// Committed returns the epoch of the committed state (0: none).
func (s *Standby) Committed() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.epoch
}

// LastActivation describes the successful Activate.
func (s *Standby) LastActivation() ActivationInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastAct
}

// CheckState checks that a state blob from the primary fits this standby
// (see CheckStateFor).
func (s *Standby) CheckState(b []byte) (State, error) {
	return CheckStateFor(b, s.pvh, int(s.maxVCPUID)+1)
}

// CommitDeviceState records a copy of state (a SaveDeviceState blob) as
// the state of epoch, after CheckState. A refused state leaves the
// standby at its previous epoch.
func (s *Standby) CommitDeviceState(epoch uint64, state []byte) error {
	if _, err := s.CheckState(state); err != nil {
		return fmt.Errorf("xen: standby %q: commit epoch %d: %w", s.o.DomainName, epoch, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.activated {
		return fmt.Errorf("xen: standby %q: commit epoch %d: %w", s.o.DomainName, epoch, errStandbyDone)
	}
	s.state = append(s.state[:0], state...)
	st, err := ParseState(s.state) // aliases s.state
	if err != nil {
		return fmt.Errorf("xen: standby %q: commit epoch %d: %w", s.o.DomainName, epoch, err)
	}
	s.st, s.epoch = st, epoch
	return nil
}

// Activate starts the VM from the committed state: the HVM context is
// loaded into the standby domain (xc_domain_hvm_setcontext: registers,
// LAPIC, MTRRs, TSC, ...; for HVM and PVH domains the vCPU contexts in
// the blob are a subset of it, and Xen's own restore loads only the HVM
// context too), and the domain is unpaused. It may succeed only once.
//
// A state taken with the guest suspended (Options.Cooperative on the
// primary) activates as Xen's restore does: the guest's suspend hypercall
// returns 0 and it re-establishes its Xen-side state on this host. A state
// from a bare pause lacks that state (event channel bindings, timers,
// shared_info and vcpu_info registrations are Xen's, not the guest's): a
// PV-aware guest will not get its timer or device events. It is loaded
// all the same, loudly.
//
// The returned Guest has no dirty tracking (HarvestDirty returns
// ErrNotTracking) and owns the memory mapping; remusd does not own the
// domain's lifecycle any more (Close of either leaves it running).
func (s *Standby) Activate(ctx context.Context) (hypervisor.Guest, error) {
	g, err := s.ActivateGuest(ctx)
	if err != nil {
		return nil, err
	}
	return g, nil
}

// ActivateGuest is Activate returning the concrete type.
func (s *Standby) ActivateGuest(ctx context.Context) (*Guest, error) {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.activated {
		return nil, fmt.Errorf("xen: standby %q: activate: %w", s.o.DomainName, errStandbyDone)
	}
	if s.state == nil {
		return nil, fmt.Errorf("xen: standby %q: activate: no state committed", s.o.DomainName)
	}
	// From here on no commit may change the state being loaded.
	s.activated = true
	info := ActivationInfo{Epoch: s.epoch, Suspended: s.st.Suspended}
	if !s.st.Suspended {
		s.log.Warn("activating from a state taken by a bare pause: the guest's event channels, timers and PV devices are not re-established on this host",
			zap.Uint64("epoch", s.epoch))
	}
	// Not the caller's deadline: a load abandoned half-way (or an
	// unpause whose answer is lost) would leave a domain that may run,
	// which must then not be destroyed as a failed standby. The calls
	// take milliseconds; the bound is for a hung hypervisor.
	actx, acancel := context.WithTimeout(context.WithoutCancel(ctx), activateTimeout)
	defer acancel()
	loaded := false
	err := s.call(actx, "activate", func() error {
		t := time.Now()
		if err := s.x.setHVMContext(s.st.HVM); err != nil {
			return err
		}
		loaded = true
		info.Context = time.Since(t)
		if s.o.Manager != nil {
			return nil
		}
		t = time.Now()
		if err := s.x.unpause(); err != nil {
			return err
		}
		info.Unpause = time.Since(t)
		return nil
	})
	if err == nil && s.o.Manager != nil {
		t := time.Now()
		err = s.managedUnpause(actx)
		info.Unpause = time.Since(t)
	}
	if err != nil && !loaded && !errors.Is(err, context.DeadlineExceeded) {
		// The context was refused: the standby never ran and may hold a
		// half-loaded state: it is not a VM to keep. Close destroys it.
		s.activated = false
		s.closed = true
		s.closeLocked()
		return nil, fmt.Errorf("xen: standby %q: activate epoch %d: %w", s.o.DomainName, info.Epoch, err)
	}
	if err != nil {
		// Loaded (or unknown): the domain may run. It is left as it is,
		// for the operator (xl list, xl unpause or xl destroy; virsh for
		// a libvirt standby); nothing destroys it.
		return nil, fmt.Errorf("xen: standby %q: activate epoch %d: the state was loaded (or the call hung) but the unpause failed: the domain %d is left as it is: %w", s.o.DomainName, info.Epoch, s.domid, err)
	}
	typ := typeName(s.pvh)
	g := &Guest{
		caller:  newCaller(s.domid, s.log.With(zap.String("role", "activated"))),
		name:    s.o.Name,
		version: s.version,
		pvh:     s.pvh,
		pages:   s.pages,
		x:       s.x,
	}
	g.config, _ = json.Marshal(Config{DomID: s.domid, Type: typ, Pages: s.pages, Segments: s.x.segs, MaxVCPUID: s.maxVCPUID, Version: s.version})
	s.x = nil
	info.Total = time.Since(start)
	s.lastAct = info
	s.log.Info("standby activated", zap.Uint64("epoch", info.Epoch), zap.Bool("suspended", info.Suspended),
		zap.Duration("setcontext", info.Context), zap.Duration("unpause", info.Unpause), zap.Duration("total", info.Total))
	return g, nil
}

// managedUnpause lets the loaded standby run through the toolstack that
// owns it, so that it knows the domain runs. Xen has the last word: a
// toolstack that failed, timed out or answered without unpausing (libvirt
// resumes only a domain it believes paused) leaves a paused domain, which
// is then unpaused through Xen, loudly (the toolstack's view is stale; a
// failover must not hang on it).
func (s *Standby) managedUnpause(ctx context.Context) error {
	uerr := s.o.Manager.Unpause(ctx, s.domid)
	// Xen's own answer, under a bound of its own (the toolstack may
	// have used up ctx).
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return s.call(cctx, "activate: unpause check", func() error {
		info, err := s.x.info()
		if err != nil {
			return fmt.Errorf("after unpausing through %s (%v): %w", s.o.Manager, uerr, err)
		}
		if !info.paused {
			if uerr != nil {
				s.log.Warn("the toolstack reported an error but the standby runs", zap.Stringer("manager", s.o.Manager), zap.Error(uerr))
			}
			return nil
		}
		s.log.Error("the toolstack did not unpause the activated standby: unpausing it through Xen; the toolstack still says it is paused (virsh resume puts that right)",
			zap.Stringer("manager", s.o.Manager), zap.Error(uerr))
		return s.x.unpause()
	})
}

// Close destroys the standby domain unless it was activated (then it is
// the VM, and stays). It never touches another domain: it destroys the
// domid it created.
func (s *Standby) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.activated {
		return nil
	}
	return s.closeLocked()
}

// closeLocked unmaps the standby and destroys its domain.
func (s *Standby) closeLocked() error {
	// Wait for an abandoned libxc call before closing its handles.
	s.sem <- struct{}{}
	if s.x != nil {
		s.x.close()
		s.x = nil
	}
	<-s.sem
	return s.destroy()
}

func (s *Standby) destroy() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.o.DestroyTimeout)
	defer cancel()
	if s.o.Manager != nil {
		if err := s.o.Manager.Destroy(ctx, s.domid); err != nil {
			s.log.Error("destroying the standby domain failed", zap.Error(err), zap.Stringer("manager", s.o.Manager))
			return fmt.Errorf("xen: standby %q: destroy %d through %s: %w", s.o.DomainName, s.domid, s.o.Manager, err)
		}
		s.log.Info("standby destroyed", zap.Stringer("manager", s.o.Manager))
		return nil
	}
	out, err := xlRun(ctx, s.o.XL, "destroy", strconv.FormatUint(uint64(s.domid), 10))
	if err != nil {
		s.log.Error("destroying the standby domain failed", zap.Error(err), zap.String("xl", lastLine(out)))
		return fmt.Errorf("xen: standby %q: xl destroy %d: %w: %s", s.o.DomainName, s.domid, err, lastLine(out))
	}
	s.log.Info("standby destroyed")
	return nil
}

// xlRun runs xl with a deadline; a child that outlives it (xl create's
// domain monitor daemonises) does not hold the caller past WaitDelay.
func xlRun(ctx context.Context, xl string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, xl, args...)
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return string(out), err
}

func xlDomid(ctx context.Context, xl, name string) (uint32, error) {
	out, err := xlRun(ctx, xl, "domid", name)
	if err != nil {
		return 0, fmt.Errorf("xl domid %s: %w: %s", name, err, lastLine(out))
	}
	id, err := strconv.ParseUint(strings.TrimSpace(out), 10, 32)
	if err != nil || id == 0 || id >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0, fmt.Errorf("xl domid %s: unexpected answer %q", name, lastLine(out))
	}
	return uint32(id), nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 300 {
		s = s[:300]
	}
	return s
}
