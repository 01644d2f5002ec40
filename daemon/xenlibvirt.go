package daemon

// Xen domains managed by libvirt's libxl driver (issue 10 item 3).
//
// A xen_vms entry with "libvirt": true names a domain libvirtd manages
// (xen:///system, config field xen.libvirt). The daemon finds it through
// libvirt, by name (LookupXen: its domid, type, vifs, disks), refuses what
// it cannot protect (a PV or HVM domain, block devices) and cross-checks
// libvirt's answer against Xen's own: xenstore must name the domid with
// the same name and list the same vifs (names and MACs, in device order),
// or the domain is refused. The output buffer goes on the vif the guest
// really uses, so any disagreement fails closed. From the domid on, the
// path is the xl one (libxc, xenstore: hypervisor/xen).
//
// `remusd start NAME` starts the libvirt-defined domain (virDomainCreate)
// instead of `xl create`; `remusd stop NAME` pauses it, destroys it
// through libvirt and then lets go of it.
//
// On a backup whose xen_vms entry says libvirt, the standby is this
// host's libvirt definition of the domain started paused
// (virDomainCreateWithFlags with VIR_DOMAIN_START_PAUSED: it never runs
// before activation), cross-checked against xenstore as a primary's domain
// is; remusd fills it with the primary's memory, activation resumes it
// through libvirt (virDomainResume), and a standby that is not activated
// is destroyed through libvirt. libvirt knows the domain throughout, so the
// activated VM is a libvirt domain like any other (virsh list, dominfo,
// destroy) and a restarted daemon finds it through libvirt. The backup's
// definition is the operator's, as an xl_config is: the same memory size,
// type and vifs as the primary's (the layouts are compared at the
// handshake), on this host's bridge. Without libvirt: true the standby
// is made with `xl create -p` of the entry's xl_config.
//
// libvirtd being down is never taken for the domain being gone: a lookup
// that gets no answer is an error (errLibvirtDown), and a restarted daemon
// whose recorded domain Xen still runs under its name attaches to it
// through Xen alone, with a warning.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/xen"
)

// errXenRefused marks a domain that runs but that remusd will not attach
// to (wrong type, disks, libvirt and xenstore disagree).
var errXenRefused = errors.New("refused")

// errLibvirtDown marks a libvirt lookup that got no usable answer
// (libvirtd unreachable, hung, a call that failed): it says nothing about
// whether the domain runs.
var errLibvirtDown = errors.New("libvirtd did not answer")

// xenLibvirt is what the daemon asks libvirt's libxl driver (a seam for
// tests; libvirtXen by default).
type xenLibvirt interface {
	// Lookup finds the running domain name (libvirt.Conn.LookupXen).
	Lookup(ctx context.Context, name string) (libvirt.XenDomain, error)
	// Start starts the defined domain name.
	Start(ctx context.Context, name string) error
	// StartPaused creates the defined domain name paused and returns its
	// domid.
	StartPaused(ctx context.Context, name string) (uint32, error)
	// Resume unpauses domain name if it is still domain domid.
	Resume(ctx context.Context, name string, domid uint32) error
	// Destroy destroys domain name if it is still domain domid.
	Destroy(ctx context.Context, name string, domid uint32) error
}

// xenHost is what the daemon asks Xen itself (xl, libxc, xenstore): a seam
// for tests; xlHost by default.
type xenHost interface {
	DomainID(ctx context.Context, name string) (uint32, error)
	DomainState(ctx context.Context, domid uint32) (xen.DomainStatus, error)
	DomainName(ctx context.Context, domid uint32) (string, error)
	Vifs(ctx context.Context, domid uint32) ([]xen.Vif, error)
	// Devices lists the domain's frontends ("vif/0", "vbd/51712", ...).
	Devices(ctx context.Context, domid uint32) ([]string, error)
	// IfIndex is dom0's interface index of name.
	IfIndex(ctx context.Context, name string) (int, error)
	Create(ctx context.Context, configPath, domain string) (uint32, error)
	Destroy(ctx context.Context, domid uint32) error
	// WaitSuspendable waits until a just-started domain's guest can
	// suspend itself (xen.WaitSuspendable).
	WaitSuspendable(ctx context.Context, domid uint32) error
}

// withXenSeams replaces the daemon's Xen and libvirt access (tests).
func withXenSeams(h xenHost, lv xenLibvirt) Option {
	return func(d *Daemon) { d.xh, d.xlv = h, lv }
}

// xlHost is xenHost on this host's Xen.
type xlHost struct{ xl string }

func (h xlHost) DomainID(ctx context.Context, name string) (uint32, error) {
	return xen.DomainID(ctx, h.xl, name)
}
func (xlHost) DomainState(ctx context.Context, domid uint32) (xen.DomainStatus, error) {
	return xen.DomainState(ctx, domid)
}
func (xlHost) DomainName(ctx context.Context, domid uint32) (string, error) {
	return xen.DomainName(ctx, domid)
}
func (xlHost) Vifs(ctx context.Context, domid uint32) ([]xen.Vif, error) {
	return xen.Vifs(ctx, domid)
}
func (xlHost) Devices(ctx context.Context, domid uint32) ([]string, error) {
	return xen.FrontendDevices(ctx, domid)
}
func (xlHost) IfIndex(_ context.Context, name string) (int, error) {
	i, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return i.Index, nil
}
func (xlHost) WaitSuspendable(ctx context.Context, domid uint32) error {
	return xen.WaitSuspendable(ctx, domid)
}
func (h xlHost) Create(ctx context.Context, configPath, domain string) (uint32, error) {
	return xen.Create(ctx, h.xl, configPath, domain)
}
func (h xlHost) Destroy(ctx context.Context, domid uint32) error {
	return xen.Destroy(ctx, h.xl, domid)
}

// libvirtXen is xenLibvirt on libvirtd: a connection per operation (they
// are rare, and a libvirtd restarted meanwhile costs nothing).
type libvirtXen struct{ cfg libvirt.Config }

func (l libvirtXen) Lookup(ctx context.Context, name string) (libvirt.XenDomain, error) {
	c, err := libvirt.DialXen(ctx, l.cfg)
	if err != nil {
		return libvirt.XenDomain{}, err
	}
	defer c.Close()
	return c.LookupXen(ctx, name)
}

func (l libvirtXen) Start(ctx context.Context, name string) error {
	c, err := libvirt.DialXen(ctx, l.cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.StartXen(ctx, name)
}

func (l libvirtXen) StartPaused(ctx context.Context, name string) (uint32, error) {
	c, err := libvirt.DialXen(ctx, l.cfg)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.StartXenPaused(ctx, name)
}

func (l libvirtXen) Resume(ctx context.Context, name string, domid uint32) error {
	c, err := libvirt.DialXen(ctx, l.cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.ResumeXen(ctx, name, domid)
}

func (l libvirtXen) Destroy(ctx context.Context, name string, domid uint32) error {
	c, err := libvirt.DialXen(ctx, l.cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.DestroyXen(ctx, name, domid)
}

// validateXenLibvirt checks config field f (xen.libvirt) as DialXen reads it.
func validateXenLibvirt(c libvirt.Config, f string) []error {
	var errs []error
	if c.Socket != "" && !strings.HasPrefix(c.Socket, "/") {
		errs = append(errs, fmt.Errorf("config field %s.socket: %q must be absolute", f, c.Socket))
	} else if err := c.ValidateXen(); err != nil {
		field := f
		if c.URI != "" {
			field = f + ".uri"
		}
		errs = append(errs, fmt.Errorf("config field %s: %w", field, err))
	}
	return errs
}

// lookupLibvirtXen finds x's domain through libvirt and checks it against
// Xen: its domid, once libvirt and xenstore agree on its name and vifs
// and it is a PVH domain without disks. A domain libvirt does not know or
// that does not run is xen.ErrNoDomain (wrapped); no answer from libvirtd
// is errLibvirtDown; a domain remusd will not use is errXenRefused.
func (d *Daemon) lookupLibvirtXen(ctx context.Context, x XenVM) (uint32, error) {
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	t0 := time.Now()
	dom, err := d.xlv.Lookup(ctx, x.domain())
	took := time.Since(t0)
	switch {
	case errors.Is(err, libvirt.ErrNoDomain), errors.Is(err, libvirt.ErrNotRunning):
		return 0, fmt.Errorf("%w: %w", xen.ErrNoDomain, err)
	case errors.Is(err, libvirt.ErrBadXML):
		return 0, fmt.Errorf("%w: %w", errXenRefused, err)
	case err != nil:
		uri := d.cfg.Xen.Libvirt.URI
		if uri == "" {
			uri = libvirt.DefaultXenURI
		}
		return 0, fmt.Errorf("%w (%s, after %v; whether domain %s runs is unknown): %w", errLibvirtDown, uri, took.Round(time.Millisecond), x.domain(), err)
	}
	if !dom.PVH {
		why := "a PV domain: Debian's Xen is built without shadow paging, so Xen cannot track a PV guest's dirty memory"
		if dom.OSType == "hvm" {
			why = "an HVM domain: its device model's (QEMU's) state is not replicated, so a standby would come up without its emulated devices"
		}
		return 0, fmt.Errorf("%w: libvirt domain %s (%d) has os type %q (machine %q), %s; define it as PVH (<type arch='x86_64' machine='xenpvh'>xenpvh</type>)",
			errXenRefused, x.domain(), dom.ID, dom.OSType, dom.Machine, why)
	}
	if dom.HasDisks() {
		return 0, fmt.Errorf("%w: libvirt domain %s (%d) has disks (%s): remusd does not replicate a Xen domain's disks yet, so a standby would resume with a disk that lacks the primary's writes; protect Xen domains without disks, or run the VM on the qemu backend",
			errXenRefused, x.domain(), dom.ID, strings.Join(dom.Disks, ", "))
	}
	name, err := d.xh.DomainName(ctx, dom.ID)
	if err != nil {
		return 0, fmt.Errorf("libvirt says %s is domain %d: xenstore: %w", x.domain(), dom.ID, err)
	}
	if name != x.domain() {
		return 0, fmt.Errorf("%w: libvirt says %s is domain %d, xenstore names domain %d %q", errXenRefused, x.domain(), dom.ID, dom.ID, printable(name))
	}
	vifs, err := d.xh.Vifs(ctx, dom.ID)
	if err != nil {
		return 0, fmt.Errorf("libvirt says %s is domain %d: xenstore: %w", x.domain(), dom.ID, err)
	}
	if err := sameVifs(dom.Interfaces, vifs); err != nil {
		return 0, fmt.Errorf("%w: domain %s (%d): %w: its output would be held on the wrong interface", errXenRefused, x.domain(), dom.ID, err)
	}
	d.log.Info("xen domain found through libvirt", zap.String("vm", x.Name), zap.String("domain", x.domain()), zap.Uint32("domid", dom.ID),
		zap.Int("vifs", len(vifs)), zap.Duration("lookup", took), zap.Bool("persistent", dom.Persistent))
	return dom.ID, nil
}

// sameVifs compares libvirt's interfaces (XML order: device 0, 1, ...)
// with dom0's xenstore backends (by device id): same count, and each
// with the same dom0 interface name and MAC.
func sameVifs(lv []libvirt.XenInterface, xs []xen.Vif) error {
	xs = slices.Clone(xs)
	slices.SortFunc(xs, func(a, b xen.Vif) int { return a.DevID - b.DevID })
	describe := func() string {
		var l, x []string
		for _, i := range lv {
			l = append(l, i.Name+" "+i.MAC)
		}
		for _, v := range xs {
			x = append(x, fmt.Sprintf("%d:%s %s", v.DevID, v.Name, printable(v.MAC)))
		}
		return fmt.Sprintf("libvirt [%s], xenstore [%s]", strings.Join(l, ", "), strings.Join(x, ", "))
	}
	if len(lv) != len(xs) {
		return fmt.Errorf("libvirt lists %d vifs and xenstore %d: %s", len(lv), len(xs), describe())
	}
	for i := range lv {
		if lv[i].Name != xs[i].Name || !strings.EqualFold(lv[i].MAC, xs[i].MAC) {
			return fmt.Errorf("vif %d differs: %s", i, describe())
		}
	}
	return nil
}

// destroyXenDomain destroys x's domain domid: through libvirt for a
// libvirt-managed VM (so that libvirt knows it stopped), else `xl destroy`.
func (d *Daemon) destroyXenDomain(ctx context.Context, x *XenVM, domid uint32) error {
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	if x != nil && x.Libvirt {
		err := d.xlv.Destroy(ctx, x.domain(), domid)
		if err == nil {
			return nil
		}
		if !errors.Is(err, libvirt.ErrNoDomain) && !errors.Is(err, libvirt.ErrNotRunning) {
			return fmt.Errorf("destroy libvirt domain %s (%d): %w", x.domain(), domid, err)
		}
		// Not libvirt's: an activated standby, which xl created. Only if
		// Xen still names domid as the VM's domain.
		name, nerr := d.xh.DomainName(ctx, domid)
		if nerr != nil {
			return fmt.Errorf("libvirt does not run domain %s (%v) and Xen cannot name domain %d: not destroying it: %w", x.domain(), err, domid, nerr)
		}
		if name != x.domain() {
			return fmt.Errorf("libvirt does not run domain %s (%v) and domain %d is %q now: not destroying it", x.domain(), err, domid, printable(name))
		}
		d.log.Info("libvirt does not run the domain (an activated standby?): destroying it with xl", zap.String("vm", x.Name), zap.Uint32("domid", domid), zap.Error(err))
	}
	return d.xh.Destroy(ctx, domid)
}

// createXenDomain starts x's domain: the libvirt-defined one for a
// libvirt-managed VM (then found through libvirt), else `xl create` of
// its xl_config. Returns its domid.
func (d *Daemon) createXenDomain(ctx context.Context, x XenVM) (uint32, error) {
	if !x.Libvirt {
		if x.XLConfig == "" {
			return 0, errors.New("its xen_vms entry has no xl_config to create the domain from (or start it with xl create)")
		}
		return d.xh.Create(ctx, x.XLConfig, x.domain())
	}
	cctx, cancel := context.WithTimeout(ctx, xenOpenTimeout)
	defer cancel()
	t0 := time.Now()
	if err := d.xlv.Start(cctx, x.domain()); err != nil {
		return 0, fmt.Errorf("start libvirt domain %s (virsh -c xen:///system start %s): %w", x.domain(), x.domain(), err)
	}
	d.log.Info("libvirt started the xen domain", zap.String("vm", x.Name), zap.String("domain", x.domain()), zap.Duration("took", time.Since(t0)))
	return d.lookupLibvirtXen(ctx, x)
}

// libvirtStandby is a libvirt VM's standby domain on a backup
// (xen.DomainManager): libvirt starts this host's definition of the
// domain paused, resumes it at activation and destroys a standby that is
// not activated, so that libvirt knows the domain throughout.
type libvirtStandby struct {
	d *Daemon
	x XenVM
}

func (s libvirtStandby) String() string { return "libvirt domain " + s.x.domain() }

// CreatePaused starts the definition paused and checks the domain as a
// primary's is (libvirt and xenstore agree on its name and vifs, a PVH
// domain without disks); a domain that fails the check is destroyed.
func (s libvirtStandby) CreatePaused(ctx context.Context) (uint32, error) {
	// Within NewStandby's CreateTimeout (xenOpenTimeout too); bounded
	// here all the same, as every call to libvirt is.
	ctx, cancel := context.WithTimeout(ctx, xenOpenTimeout)
	defer cancel()
	t0 := time.Now()
	domid, err := s.d.xlv.StartPaused(ctx, s.x.domain())
	switch {
	case errors.Is(err, libvirt.ErrNoDomain):
		return 0, fmt.Errorf("%w: define the VM in this host's libvirt too (virsh -c xen:///system define), as on its primary, named %s", err, s.x.domain())
	case err != nil:
		return 0, err
	}
	found, err := s.d.lookupLibvirtXen(ctx, s.x)
	if err == nil && found != domid {
		err = fmt.Errorf("libvirt started domain %d paused, but says %s is domain %d", domid, s.x.domain(), found)
	}
	if err == nil {
		// A standby must never have run before remusd fills it.
		cctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
		st, serr := s.d.xh.DomainState(cctx, domid)
		cancel()
		switch {
		case serr != nil:
			err = fmt.Errorf("domain %d: %w", domid, serr)
		case !st.NeverRan():
			err = fmt.Errorf("domain %d is not paused before its first run (paused %v, %d ns of CPU time): not a fresh standby", domid, st.Paused, st.CPUTimeNs)
		}
	}
	if err != nil {
		if derr := s.d.destroyXenDomain(context.WithoutCancel(ctx), &s.x, domid); derr != nil {
			s.d.log.Error("destroying a refused standby failed", zap.String("vm", s.x.Name), zap.Uint32("domid", domid), zap.Error(derr))
		}
		return 0, fmt.Errorf("the standby libvirt started (domain %d) is refused: %w", domid, err)
	}
	s.d.log.Info("libvirt started the standby paused", zap.String("vm", s.x.Name), zap.String("domain", s.x.domain()),
		zap.Uint32("domid", domid), zap.Duration("took", time.Since(t0)))
	return domid, nil
}

// Unpause resumes the loaded standby through libvirt.
func (s libvirtStandby) Unpause(ctx context.Context, domid uint32) error {
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	return s.d.xlv.Resume(ctx, s.x.domain(), domid)
}

// Destroy destroys the standby through libvirt (through xl if libvirt
// does not run it).
func (s libvirtStandby) Destroy(ctx context.Context, domid uint32) error {
	return s.d.destroyXenDomain(ctx, &s.x, domid)
}
