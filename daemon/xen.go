package daemon

// The Xen backend in the daemon (issue 10 item 3).
//
// A xen_vms entry names a domain of this host's Xen (dom0). remusd does
// not create or own the domain on the primary: the operator starts it
// (`xl create`), the daemon finds it by name (`xl domid`) at start and at
// `remusd start`, and `remusd protect NAME --peer HOST:PORT` protects it
// like a QEMU VM: every epoch the guest suspends cooperatively, the
// daemon harvests Xen's log-dirty bitmap, copies the dirty frames and the
// vCPU/HVM context, and cancels the suspend (hypervisor/xen). Its output
// is held on its vif in dom0 (the plug, or NFQUEUE; the vif's name comes
// from xenstore). On exit the daemon lets go of the domain (log-dirty off,
// mappings dropped, a suspend cancelled): it runs on, with its output held
// until the next daemon resumes the protection.
//
// On the backup the same entry describes the VM: its xl_config is the
// backup's own configuration of the domain, from which the hot standby is
// created paused (`xl create -p`, named by the entry's domain), never from
// anything the primary sends. The primary's layout (populated memory
// segments and Xen version) must equal the standby's, which the handshake
// checks through the backend version. Activation loads the committed
// vCPU/HVM context and unpauses it: the guest resumes as "moved" and
// reconnects its frontends to this host's backends.

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/xen"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// XenVM describes one Xen domain on this host.
type XenVM struct {
	// Name is the VM's name (equal on both hosts: it names the protection).
	Name string `json:"name"`
	// Domain is the domain's name on this host (default Name). On the
	// backup the standby is created under this name; a primary and a
	// backup sharing one Xen (a test) need different ones.
	Domain string `json:"domain,omitempty"`
	// XLConfig is this host's xl configuration file of the VM (absolute).
	// Required on a backup: the standby is created from it. On the
	// primary `remusd start NAME` creates the domain from it.
	XLConfig string `json:"xl_config,omitempty"`
	// Type is the domain type: "pvh" (the default and the only one
	// supported: an HVM guest's device model state is not replicated).
	Type string `json:"type,omitempty"`
	// Libvirt: the domain is managed by libvirt's libxl driver (config
	// field xen.libvirt): found, started and destroyed through libvirt
	// (daemon/xenlibvirt.go). A backup still creates the standby from
	// XLConfig with xl.
	Libvirt bool `json:"libvirt,omitempty"`
}

// XenConfig holds the settings of the Xen backend.
type XenConfig struct {
	// XL is the xl binary (default "xl", looked up in PATH).
	XL string `json:"xl,omitempty"`
	// SuspendTimeout bounds each cooperative suspend (default 30s).
	SuspendTimeout Duration `json:"suspend_timeout,omitempty"`
	// Libvirt is where libvirtd listens, for xen_vms with libvirt set
	// (socket default /run/libvirt/libvirt-sock, uri default
	// xen:///system).
	Libvirt libvirt.Config `json:"libvirt"`
}

func (x XenVM) domain() string {
	if x.Domain != "" {
		return x.Domain
	}
	return x.Name
}

func (c XenConfig) xl() string {
	if c.XL != "" {
		return c.XL
	}
	return "xl"
}

// validate returns one error per bad field, named with prefix f.
func (x XenVM) validate(f string) []error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("config field %s.%s: %s", f, field, fmt.Sprintf(format, a...)))
	}
	if err := hypervisor.ValidateVMName(x.Name); err != nil {
		bad("name", "%v", err)
	}
	if x.Domain != "" {
		if err := xen.ValidDomainName(x.Domain); err != nil {
			bad("domain", "%v", err)
		}
	} else if err := xen.ValidDomainName(x.Name); err != nil {
		bad("name", "%v: set domain", err)
	}
	if x.XLConfig != "" && (!filepath.IsAbs(x.XLConfig) || strings.ContainsAny(x.XLConfig, "\n\x00")) {
		bad("xl_config", "%q must be an absolute path", x.XLConfig)
	}
	switch x.Type {
	case "", "pvh":
	case "hvm":
		bad("type", "hvm is not supported: the device model's (QEMU's) state of an HVM guest is not replicated, so an activated standby would lose its emulated devices; run the guest as PVH")
	default:
		bad("type", "%q: want pvh", x.Type)
	}
	return errs
}

func (c XenConfig) validate(f string) []error {
	var errs []error
	if c.XL != "" && (strings.ContainsAny(c.XL, "\n\x00") || (strings.Contains(c.XL, "/") && !filepath.IsAbs(c.XL))) {
		errs = append(errs, fmt.Errorf("config field %s.xl: %q must be a program name or an absolute path", f, c.XL))
	}
	if d := c.SuspendTimeout.D(); d < 0 || d > 10*time.Minute {
		errs = append(errs, fmt.Errorf("config field %s.suspend_timeout: %v out of range [0, 10m]", f, d))
	}
	errs = append(errs, validateXenLibvirt(c.Libvirt, f+".libvirt")...)
	return errs
}

// xenCallTimeout bounds one discovery call (xl domid, xenstore, netlink).
const xenCallTimeout = 30 * time.Second

// xenOpenTimeout bounds opening a domain: mapping its memory takes 2 s for
// 128 MiB under TCG, more for larger guests.
const xenOpenTimeout = 2 * time.Minute

// bringUpXen makes a configured Xen VM known at daemon start: its domain
// found running here (re-attached, with its protection resumed if a
// previous daemon ran one), or stopped.
func (d *Daemon) bringUpXen(x XenVM) error {
	v := &vm{name: x.Name, backend: xen.BackendName, role: RoleStopped, xcfg: &x}
	d.vms[x.Name] = v
	rec, err := d.records.load(x.Name)
	if err != nil {
		v.stoppedWhy = fmt.Sprintf("its state record is unreadable (%v): left alone; check whether it runs, then fix or remove the file", err)
		d.log.Error("unreadable state record: the VM is left alone", zap.String("vm", x.Name), zap.Error(err))
		return nil
	}
	if why, held := d.xenWatchdogHeld[x.Name]; held {
		// Not attached: Recover would adopt the watchdog's pause as a
		// dead daemon's, and its resume would drop it.
		v.stoppedWhy = why
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), xenOpenTimeout)
	defer cancel()
	recordedAlive := false
	if rec != nil && rec.Xen != nil {
		// The recorded domain, by id: only Xen's "no such domain" proves
		// it gone (a timeout or a missing xl proves nothing, and taking a
		// live guest for gone would drop its output rules).
		_, err := d.recordedDomain(ctx, x, rec.Xen.DomID)
		recordedAlive = err == nil
		switch {
		case errors.Is(err, xen.ErrNotBuilt):
			v.stoppedWhy = "this remusd was built without Xen support (build it with -tags xen on a host with libxen-dev)"
			return nil
		case errors.Is(err, xen.ErrNoDomain):
			d.forgetGoneXen(v, rec, err)
			if rec.Role == RolePrimary || rec.Role == RoleActive {
				// Whatever runs under the name now is another instance:
				// not taken for this VM, which may run elsewhere.
				return nil
			}
			rec = nil
		case err != nil:
			v.stoppedWhy = fmt.Sprintf("cannot tell whether its domain %d still runs (%v): left alone, its output held as it was; restart remusd once Xen answers", rec.Xen.DomID, err)
			d.log.Error("cannot look the recorded Xen domain up: leaving it alone", zap.String("vm", x.Name), zap.Uint32("domid", rec.Xen.DomID), zap.Error(err))
			return nil
		}
	}
	find := x
	xlStandby := rec != nil && (rec.Xen != nil && rec.Xen.XLStandby || rec.Role == RoleActive && (rec.Xen == nil || !rec.Xen.LibvirtStandby))
	libvirtStandby := rec != nil && rec.Xen != nil && rec.Xen.LibvirtStandby
	if xlStandby {
		// An activated standby (protected again since, or not) that xl
		// created from xl_config: libvirt does not know it.
		find.Libvirt = false
	}
	domid, st, err := d.findXenDomain(ctx, find)
	if find.Libvirt && recordedAlive {
		// Xen runs the recorded domain under its name: libvirt's word
		// cannot make it gone.
		switch {
		case errors.Is(err, errLibvirtDown):
			d.log.Warn("libvirtd does not answer: attaching to the recorded domain, which Xen runs under its name", zap.String("vm", x.Name),
				zap.Uint32("domid", rec.Xen.DomID), zap.Error(err))
			domid = rec.Xen.DomID
			st, err = d.recordedDomain(ctx, x, domid)
		case errors.Is(err, xen.ErrNoDomain):
			v.stoppedWhy = fmt.Sprintf("Xen runs the recorded domain %d as %s, but libvirt does not (%v): left alone, its output held as it was; restart remusd once libvirt and Xen agree", rec.Xen.DomID, x.domain(), err)
			d.log.Error("libvirt does not know the recorded domain Xen runs: leaving it alone", zap.String("vm", x.Name), zap.Uint32("domid", rec.Xen.DomID), zap.Error(err))
			return nil
		}
	}
	switch {
	case errors.Is(err, xen.ErrNotBuilt):
		v.stoppedWhy = "this remusd was built without Xen support (build it with -tags xen on a host with libxen-dev)"
		return nil
	case errors.Is(err, xen.ErrNoDomain):
		if rec != nil && rec.Xen != nil {
			d.forgetGoneXen(v, rec, err)
			return nil
		}
		how := "xl create, or `remusd start " + x.Name + "` with xl_config set"
		if x.Libvirt {
			how = "virsh -c xen:///system start " + x.domain() + ", or `remusd start " + x.Name + "`"
		}
		v.stoppedWhy = fmt.Sprintf("domain %s is not running on this host (%v; start it with %s)", x.domain(), err, how)
		return nil
	case errors.Is(err, errXenRefused):
		v.stoppedWhy = fmt.Sprintf("domain %s runs here but is not attached: %v", x.domain(), err)
		d.log.Error("refusing a Xen domain", zap.String("vm", x.Name), zap.Error(err))
		return nil
	case err != nil:
		// Unknown: it may run. Leave it (and any output rules) alone.
		v.stoppedWhy = fmt.Sprintf("cannot tell whether domain %s runs here (%v): left alone; restart remusd once xl (and libvirtd, for a libvirt VM) answers", x.domain(), err)
		d.log.Error("cannot look the Xen domain up: leaving it alone", zap.String("vm", x.Name), zap.Error(err))
		return nil
	}
	if rec != nil && rec.Xen != nil && rec.Xen.DomID != domid {
		v.stoppedWhy = fmt.Sprintf("the record names domain %d, but %s is domain %d: left alone", rec.Xen.DomID, x.domain(), domid)
		return nil
	}
	if rec == nil && st.NeverRan() {
		// `xl create -p` and never unpaused: a standby a backup daemon
		// left behind (killed before it could destroy it). It holds no
		// state anyone saw; the next replica of this VM replaces it.
		v.stoppedWhy = fmt.Sprintf("domain %s (%d) is paused and has never run: a standby a previous backup daemon left; it is replaced when the VM's primary connects (or `xl destroy %d`)", x.domain(), domid, domid)
		d.log.Warn("found a standby domain a previous daemon left", zap.String("vm", x.Name), zap.Uint32("domid", domid))
		return nil
	}
	recover := rec != nil && rec.Role == RolePrimary
	g, n, err := d.openXen(ctx, v.name, domid, recover)
	if err == nil {
		n.xlStandby, n.libvirtStandby = xlStandby, libvirtStandby
		v.installXen(g, n)
	}
	if err != nil {
		v.stoppedWhy = fmt.Sprintf("domain %s (%d) exists but cannot be attached (%v): left alone, its output held as it was", x.domain(), domid, err)
		d.log.Error("cannot attach to a running Xen domain: leaving it alone", zap.String("vm", x.Name), zap.Uint32("domid", domid), zap.Error(err))
		return nil
	}
	v.role = RoleLocal
	if rec != nil {
		v.role = rec.Role
		v.xrecVif = rec.Xen.Vif
		if rec.Role == RolePrimary && rec.Protection != nil {
			p := *rec.Protection
			v.resume = &p
			v.busy = "resuming protection"
		}
		d.log.Warn("re-attached to a Xen domain a previous daemon left running", zap.String("vm", x.Name), zap.String("role", rec.Role), zap.Uint32("domid", domid))
	}
	d.saveRecord(v)
	return nil
}

// forgetGoneXen handles a recorded domain that is gone: its dead daemon's
// NFQUEUE rules on its vif are removed (they would drop the output of a
// later guest on an interface of that name), and a VM that was protected
// or active here is not looked for again automatically.
func (d *Daemon) forgetGoneXen(v *vm, rec *vmRecord, why error) {
	d.log.Warn("a Xen domain recorded in the state directory is gone", zap.String("vm", v.name), zap.String("role", rec.Role), zap.Error(why))
	if p := rec.Protection; p != nil && p.OutBuf != "" && rec.Xen.Vif != "" {
		ctx, cancel := context.WithTimeout(context.Background(), xenCallTimeout)
		err := removeStaleNetBuffer(ctx, p.OutBuf, netBufferSpec{Interface: rec.Xen.Vif, Bridged: rec.Xen.Bridged, QueueNum: p.Queue})
		cancel()
		if err != nil {
			d.log.Error("cannot remove a dead guest's output buffer rules: a guest started on its vif may be cut off", zap.String("vm", v.name), zap.Error(err))
		}
	}
	if rec.Role == RolePrimary || rec.Role == RoleActive {
		v.stoppedWhy = fmt.Sprintf("it was %s here when the daemon stopped and its domain is gone (%v); it may run on the other host now", rec.Role, why)
		// The record stays until the VM runs here again: `remusd start`
		// or a replica replaces it.
		return
	}
	_ = d.records.remove(v.name)
}

// findXenDomain looks the entry's domain up: its id and state. A
// libvirt-managed domain is found through libvirt (lookupLibvirtXen), any
// other by `xl domid`.
func (d *Daemon) findXenDomain(ctx context.Context, x XenVM) (uint32, xen.DomainStatus, error) {
	cctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	var domid uint32
	var err error
	if x.Libvirt {
		domid, err = d.lookupLibvirtXen(cctx, x)
	} else {
		domid, err = d.xh.DomainID(cctx, x.domain())
	}
	if err != nil {
		return 0, xen.DomainStatus{}, err
	}
	st, err := d.xh.DomainState(cctx, domid)
	if err != nil {
		return 0, xen.DomainStatus{}, err
	}
	if st.Dying || (st.Shutdown && !st.Suspended) {
		return 0, st, fmt.Errorf("%w: domain %s (%d) is shutting down", xen.ErrNoDomain, x.domain(), domid)
	}
	return domid, st, nil
}

// recordedDomain checks that domain domid still exists and is x's (its
// xenstore name): ErrNoDomain (wrapped) only when Xen says so. Xen, not
// libvirt, answers: a libvirtd that is down must not make a running
// domain look gone.
func (d *Daemon) recordedDomain(ctx context.Context, x XenVM, domid uint32) (xen.DomainStatus, error) {
	cctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	st, err := d.xh.DomainState(cctx, domid)
	if err != nil {
		return st, err
	}
	if st.Dying || (st.Shutdown && !st.Suspended) {
		return st, fmt.Errorf("%w: domain %d is shutting down", xen.ErrNoDomain, domid)
	}
	name, err := d.xh.DomainName(cctx, domid)
	if err != nil {
		return st, err
	}
	if name != x.domain() {
		return st, fmt.Errorf("%w: domain %d is %q now, not %s", xen.ErrNoDomain, domid, printable(name), x.domain())
	}
	return st, nil
}

// openXen attaches to domain domid: dirty tracking on, memory mapped,
// checkpoints cooperative; its vif found. recover resumes a domain a dead
// daemon left suspended or paused in a checkpoint (its output is held on
// the vif, so it may run). Runs without d.mu (it takes seconds).
func (d *Daemon) openXen(ctx context.Context, name string, domid uint32, recover bool) (*xen.Guest, xenNet, error) {
	n, err := d.xenNetOf(ctx, domid)
	if err != nil {
		return nil, xenNet{}, err
	}
	g, err := xen.Open(ctx, domid, xen.Options{Name: name, Logger: d.log, Cooperative: true,
		SuspendTimeout: d.cfg.Xen.SuspendTimeout.D(), Recover: recover})
	if err != nil {
		return nil, xenNet{}, err
	}
	if r := g.Recovered(); r != "" {
		d.log.Warn("a previous daemon left the domain in a checkpoint: resumed it (its output stays held)", zap.String("vm", name), zap.String("done", r))
	}
	d.log.Info("xen domain attached", zap.String("vm", name), zap.Uint32("domid", domid), zap.Int("vifs", n.nics), zap.String("vif", n.vif),
		zap.Bool("bridged", n.bridged), zap.Int("pages", g.NumPages()))
	return g, n, nil
}

// installXen makes g (on n) v's guest, releasing the one it held. d.mu
// held (or v not yet shared).
func (v *vm) installXen(g *xen.Guest, n xenNet) {
	if old, ok := v.guest.(*xen.Guest); ok && old != nil && old != g {
		old.Release()
	}
	v.guest, v.xnet = g, n
	v.qnet = qemuNet{tap: n.vif, bridged: n.bridged}
}

// xenNetOf reads domain domid's vifs and block devices from xenstore.
func (d *Daemon) xenNetOf(ctx context.Context, domid uint32) (xenNet, error) {
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	vifs, err := xen.Vifs(ctx, domid)
	if err != nil {
		return xenNet{}, err
	}
	n := xenNet{domid: domid, nics: len(vifs)}
	if len(vifs) > 0 {
		n.vif = vifs[0].Name
		if n.bridged, n.master, err = bridgePort(ctx, n.vif); err != nil {
			return xenNet{}, err
		}
	}
	if n.disks, err = xen.Disks(ctx, domid); err != nil {
		return xenNet{}, err
	}
	return n, nil
}

// xenNet is where a Xen VM's first vif meets dom0.
type xenNet struct {
	domid   uint32
	vif     string
	bridged bool
	nics    int // the domain's vifs (only the first can be held: more are refused at protect)
	// xlStandby: an activated standby, created by xl (for a libvirt VM,
	// libvirt does not know it: found and destroyed through xl).
	xlStandby bool
	// libvirtStandby: an activated standby libvirt made (it knows it).
	libvirtStandby bool
	// master names the vif's master when it is not a Linux bridge (an
	// Open vSwitch port, a bond): NFQUEUE's physdev match cannot see it.
	master string
	// disks are the domain's block devices ("vbd/51712"): their writes
	// are not replicated, so such a domain is refused at protect.
	disks []string
}

// bridgePort reports whether interface name is a Linux bridge's port, or
// else names its master device if it has one (type and name).
func bridgePort(ctx context.Context, name string) (bool, string, error) {
	if err := ctx.Err(); err != nil {
		return false, "", err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return false, "", fmt.Errorf("vif %s: netlink: %w", name, err)
	}
	defer h.Close()
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		return false, "", fmt.Errorf("vif %s: netlink timeout: %w", name, err)
	}
	l, err := h.LinkByName(name)
	if err != nil {
		return false, "", fmt.Errorf("vif %s: %w", name, err)
	}
	mi := l.Attrs().MasterIndex
	if mi == 0 {
		return false, "", nil
	}
	m, err := h.LinkByIndex(mi)
	if err != nil {
		return false, "", fmt.Errorf("vif %s: its master: %w", name, err)
	}
	if m.Type() == "bridge" {
		return true, "", nil
	}
	return false, fmt.Sprintf("%s %s", m.Type(), m.Attrs().Name), nil
}

// prepareXenProtection makes sure v's guest tracks dirty pages (an
// activated standby does not: it is opened again), reads its vifs and
// disks afresh (they may have changed since it was attached), and refuses
// what remusd cannot protect: an HVM domain, block devices, more than one
// vif, a vif whose master NFQUEUE cannot match, a vif other than the one
// a resumed protection held. Called with v busy and d.mu free.
func (d *Daemon) prepareXenProtection(ctx context.Context, v *vm, resume bool) error {
	d.mu.Lock()
	g, _ := v.guest.(*xen.Guest)
	recVif := v.xrecVif
	d.mu.Unlock()
	if g == nil {
		return errors.New("the domain is not attached")
	}
	octx, cancel := context.WithTimeout(ctx, xenOpenTimeout)
	defer cancel()
	domid := g.DomID()
	var n xenNet
	if !g.Tracking() {
		// Released first: one handle per domain enables and disables
		// its log-dirty mode.
		g.Release()
		ng, nn, err := d.openXen(octx, v.name, domid, false)
		if err != nil {
			return fmt.Errorf("attach the domain for protection: %w", err)
		}
		d.mu.Lock()
		nn.xlStandby, nn.libvirtStandby = v.xnet.xlStandby, v.xnet.libvirtStandby
		v.installXen(ng, nn)
		d.mu.Unlock()
		g, n = ng, nn
	} else {
		var err error
		if n, err = d.xenNetOf(octx, domid); err != nil {
			return err
		}
		d.mu.Lock()
		n.xlStandby, n.libvirtStandby = v.xnet.xlStandby, v.xnet.libvirtStandby
		v.xnet, v.qnet = n, qemuNet{tap: n.vif, bridged: n.bridged}
		d.mu.Unlock()
	}
	if !g.PVH() {
		return fmt.Errorf("domain %d is an HVM domain: its device model's (QEMU's) state is not replicated, so a standby would come up without its emulated devices; run the guest as PVH", domid)
	}
	if len(n.disks) > 0 {
		return fmt.Errorf("domain %d has block devices (%s): remusd does not replicate a Xen domain's disks yet, so a standby would resume with a disk that lacks the primary's writes (shared storage is no better: it holds writes the standby's memory never saw); protect Xen domains without disks, or run the VM on the qemu backend, whose disks are replicated with each epoch",
			domid, strings.Join(n.disks, ", "))
	}
	if n.nics > 1 {
		return fmt.Errorf("domain %d has %d vifs: remusd holds the output of one (the first); give the guest one network interface", domid, n.nics)
	}
	if n.master != "" && d.outbufProbe().Kind != "plug" {
		return fmt.Errorf("vif %s is a port of %s, not of a Linux bridge: the NFQUEUE output buffer (this host has no sch_plug) matches bridge ports with physdev only, so its output could not be held; load sch_plug or put the vif on a Linux bridge", n.vif, n.master)
	}
	if resume && recVif != "" && n.vif != recVif {
		return fmt.Errorf("the protection held output on vif %s, but the domain's vif is %s now: not resuming on an interface whose output was never held; unprotect and protect again", recVif, n.vif)
	}
	return nil
}

// xenConfig returns this host's configuration of a Xen VM. d.mu held.
func (d *Daemon) xenConfig(name string) *XenVM {
	for i := range d.cfg.XenVMs {
		if d.cfg.XenVMs[i].Name == name {
			x := d.cfg.XenVMs[i]
			return &x
		}
	}
	return nil
}

// newXenReplica creates the hot standby of a primary's Xen VM from this
// host's own configuration of it (local): `xl create -p` of its
// xl_config under its domain name, or for a libvirt VM libvirt's
// definition of that domain started paused. The primary's description is only
// checked; the layouts are compared at the handshake (backend version).
// A paused domain of that name that never ran (a standby a killed daemon
// or a killed `xl create` left) is destroyed first; any other domain of
// that name is left alone and the replica refused. Runs without d.mu.
func (d *Daemon) newXenReplica(ctx context.Context, h *remuspb.Hello, identity string, local XenVM) (*vm, error) {
	var cfg xen.Config
	if err := unmarshalStrict(h.BackendConfig, &cfg); err != nil {
		return nil, fmt.Errorf("VM %s: bad xen backend config: %w", h.VmName, err)
	}
	if cfg.Type != "pvh" {
		return nil, fmt.Errorf("VM %s: the primary's domain is of type %q: only pvh is supported", h.VmName, printable(cfg.Type))
	}
	if uint64(cfg.Pages)*hypervisor.PageSize != h.MemoryBytes {
		return nil, fmt.Errorf("VM %s: hello says %d bytes of memory, backend config %d pages", h.VmName, h.MemoryBytes, cfg.Pages)
	}
	opts := xen.StandbyOptions{Name: h.VmName, DomainName: local.domain(), XL: d.cfg.Xen.xl(), Type: local.Type, Logger: d.log}
	switch {
	case local.XLConfig != "":
		// xl_config wins where both are set: what such an entry did
		// before libvirt could make standbys.
		opts.ConfigPath = local.XLConfig
	case local.Libvirt:
		opts.Manager = libvirtStandby{d: d, x: local}
		opts.CreateTimeout = xenOpenTimeout
	default:
		return nil, fmt.Errorf("VM %s: %s's xen_vms entry has no xl_config to create the standby from (nor libvirt: true for a domain libvirt defines)", h.VmName, d.cfg.Name)
	}
	if err := d.destroyLeftoverStandby(ctx, local); err != nil {
		return nil, fmt.Errorf("VM %s: %w", h.VmName, err)
	}
	sb, err := xen.NewStandby(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("VM %s: standby: %w", h.VmName, err)
	}
	if sb.BackendVersion() != h.BackendVersion {
		sb.Close()
		return nil, fmt.Errorf("VM %s: the primary's domain (%s) and this host's standby (%s) differ in Xen version or memory layout: give both the same memory size and type in their xl configurations and run the same Xen",
			h.VmName, printable(h.BackendVersion), sb.BackendVersion())
	}
	v := &vm{name: h.VmName, backend: xen.BackendName, role: RoleBackup, xstandby: sb}
	d.attachBackup(v, sb, identity, sb.BackendVersion(),
		func(epoch uint64, _ []byte) auditRecord { return auditRecord{Event: "commit", Epoch: epoch} },
		func(epoch uint64, _, dev []byte) auditRecord {
			return auditRecord{Event: "activate", Epoch: epoch, DeviceXXH: transport.PageHash(dev)}
		})
	d.log.Info("new xen replica", zap.String("vm", h.VmName), zap.String("owner", identity), zap.Uint32("standby_domid", sb.DomID()),
		zap.String("domain", local.domain()), zap.Int("pages", sb.NumPages()))
	return v, nil
}

// destroyLeftoverStandby makes room for a new standby: a domain of its
// name that is paused and never ran is a standby a killed daemon (or a
// killed `xl create` or libvirt start) left, holding nothing anyone saw:
// it is destroyed. A domain of that name that ran is refused: it may be
// the VM itself.
func (d *Daemon) destroyLeftoverStandby(ctx context.Context, x XenVM) error {
	cctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	domid, st, err := d.findXenDomain(cctx, x)
	if x.Libvirt && errors.Is(err, xen.ErrNoDomain) {
		// Not libvirt's: one xl made (a remusd that made libvirt VMs'
		// standbys with xl) is found through xl.
		x.Libvirt = false
		domid, st, err = d.findXenDomain(cctx, x)
	}
	if errors.Is(err, xen.ErrNoDomain) {
		return nil
	}
	if err != nil {
		return err
	}
	if !st.NeverRan() {
		return fmt.Errorf("a domain named %s (%d) exists on this backup and has run: it may be the VM itself; not creating a standby over it (destroy it, or give the standby another domain name in xen_vms)", x.domain(), domid)
	}
	if err := d.destroyXenDomain(cctx, &x, domid); err != nil {
		return fmt.Errorf("destroy the standby a previous daemon left: %w", err)
	}
	d.log.Warn("destroyed the standby domain a previous daemon left", zap.String("vm", x.Name), zap.Uint32("domid", domid))
	return nil
}

// startXen starts the VM's domain (`remusd start`): `xl create` of its
// xl_config, or for a libvirt-managed VM the domain libvirt defines; then
// attaches to it. Called with v busy and d.mu free.
func (d *Daemon) startXen(ctx context.Context, v *vm) error {
	x := *v.xcfg
	if !x.Libvirt && x.XLConfig == "" {
		return fmt.Errorf("its xen_vms entry has no xl_config to create the domain from (or start it with xl create)")
	}
	ctx, cancel := context.WithTimeout(ctx, xenOpenTimeout)
	defer cancel()
	// The domain may have been started by hand meanwhile: attach to it.
	domid, st, err := d.findXenDomain(ctx, x)
	switch {
	case errors.Is(err, xen.ErrNoDomain):
		domid, err = d.createXenDomain(ctx, x)
	case err == nil && st.NeverRan():
		return fmt.Errorf("domain %s (%d) is paused and has never run: a standby a backup left, not a running VM; `xl destroy %d` first if this host should start the VM afresh", x.domain(), domid, domid)
	}
	if err != nil {
		return err
	}
	// Attach once the guest can suspend (the cooperative Open suspends
	// it; a booting guest cannot yet), also when it was started by hand a
	// moment ago: at once for a guest that has booted.
	if err := d.xh.WaitSuspendable(ctx, domid); err != nil {
		return err
	}
	g, n, err := d.openXen(ctx, v.name, domid, false)
	if err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.installXen(g, n)
	v.role, v.stoppedWhy = RoleLocal, ""
	d.saveRecord(v)
	d.log.Info("xen VM running", zap.String("vm", v.name), zap.Uint32("domid", domid), zap.String("vif", n.vif), zap.Bool("libvirt", x.Libvirt))
	return nil
}

// stopGuest ends a guest that runs here: QEMU quits (Close); a Xen
// domain, which Close would only let go of, is destroyed.
func (d *Daemon) stopGuest(ctx context.Context, g hypervisor.Guest) error {
	if xg, ok := g.(*xen.Guest); ok {
		return d.stopXen(ctx, xg)
	}
	return g.Close()
}

// fencePause pauses a guest that must not run on (fencing): at once for a
// Xen domain (its cooperative Pause would first wait for the guest to
// suspend, and a guest that does not would run on).
func fencePause(ctx context.Context, g hypervisor.Guest) error {
	if xg, ok := g.(*xen.Guest); ok {
		return xg.PauseNow(ctx)
	}
	return g.Pause(ctx)
}

// fenceResume undoes fencePause.
func fenceResume(ctx context.Context, g hypervisor.Guest) error {
	if xg, ok := g.(*xen.Guest); ok {
		return xg.UnpauseNow(ctx)
	}
	return g.Resume(ctx)
}

// stopXen destroys g's domain (`remusd stop`, a switchover's old copy):
// paused first, so that it does not run on should the destroy fail (then
// it stays paused, and the error says so), destroyed (through libvirt for
// a libvirt-managed VM), and let go of afterwards.
func (d *Daemon) stopXen(ctx context.Context, g *xen.Guest) error {
	domid := g.DomID()
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	if err := g.PauseNow(ctx); err != nil {
		return fmt.Errorf("pause domain %d before destroying it: %w", domid, err)
	}
	if err := d.destroyXenDomain(ctx, d.xenConfig(g.Name()), domid); err != nil {
		return fmt.Errorf("%w (domain %d is left paused)", err, domid)
	}
	g.Release()
	return nil
}

// xenDeviceCheckEvery is how often a protected Xen domain's devices are
// checked against what its protection holds and replicates;
// xenDeviceCheckFailures how long checks may keep failing before the
// copy is fenced all the same (nothing can be said of its devices).
const (
	xenDeviceCheckEvery    = 200 * time.Millisecond
	xenDeviceCheckFailures = 5 * time.Second
)

// xenDevices is a protected domain's devices as the guard saw them: its
// frontends (every device a toolstack gave it, whichever domain runs the
// backend) and dom0's index of the held vif (0: none, or it is gone).
type xenDevices struct {
	frontends map[string]bool
	vifIndex  int
}

func (d *Daemon) readXenDevices(ctx context.Context, domid uint32, vif string) (xenDevices, error) {
	ctx, cancel := context.WithTimeout(ctx, xenCallTimeout)
	defer cancel()
	list, err := d.xh.Devices(ctx, domid)
	if err != nil {
		return xenDevices{}, err
	}
	x := xenDevices{frontends: map[string]bool{}}
	for _, f := range list {
		x.frontends[f] = true
	}
	if vif != "" {
		if x.vifIndex, err = d.xh.IfIndex(ctx, vif); err != nil {
			x.vifIndex = 0 // gone (detached): nothing leaves through it
		}
	}
	return x, nil
}

// xenDevicesChanged says what a protected domain gained since base: a
// device it did not have (a vif: output not held; anything else: not
// replicated), or a held vif replaced by another interface of its name
// ("" if nothing). A device that went away is no leak and not reported.
func xenDevicesChanged(base, now xenDevices, domid uint32, vif string) string {
	var added []string
	for f := range now.frontends {
		if !base.frontends[f] {
			added = append(added, f)
		}
	}
	slices.Sort(added)
	for _, f := range added {
		kind, _, _ := strings.Cut(f, "/")
		switch kind {
		case "vif":
			return fmt.Sprintf("vif %s was plugged into domain %d during protection: its output is not held (remusd holds the output of one vif, %s)", f, domid, vif)
		case "vbd", "vbd3", "qdisk":
			return fmt.Sprintf("block device %s was plugged into domain %d during protection: its writes are not replicated", f, domid)
		default:
			return fmt.Sprintf("device %s was plugged into domain %d during protection: what goes through it is neither held nor replicated", printable(f), domid)
		}
	}
	if base.vifIndex != 0 && now.vifIndex != 0 && now.vifIndex != base.vifIndex {
		return fmt.Sprintf("vif %s of domain %d was replaced during protection (dom0 interface %d, now %d): the new one's output is not held", vif, domid, base.vifIndex, now.vifIndex)
	}
	return ""
}

// guardXenDevices checks a protected Xen domain's devices every `every`
// until ctx ends (the protection stops): a device hot-plugged into it
// (xl network-attach, block-attach, libvirt's attach-device), or its held
// vif replaced, is output that leaves unheld or writes the backup never
// gets. The copy is then fenced at once, as one that lost its witness
// record: the domain paused, the protection stopped, its held output
// dropped; the backup keeps the last committed epoch, from which it can
// take the VM over. Checks that keep failing for `failures` fence too.
// A VM busy with an operation (unprotect, switchover) is left to it.
func (d *Daemon) guardXenDevices(ctx context.Context, v *vm, p *checkpoint.Primary, domid uint32, vif string, every, failures time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	var base xenDevices
	haveBase := false
	var failingSince, loggedAt time.Time
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
		now, err := d.readXenDevices(ctx, domid, vif)
		why := ""
		switch {
		case err != nil && ctx.Err() != nil:
			return
		case err != nil:
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			if time.Since(failingSince) < failures {
				if time.Since(loggedAt) > 10*time.Second {
					loggedAt = time.Now()
					d.log.Warn("cannot check the protected domain's devices", zap.String("vm", v.name), zap.Uint32("domid", domid), zap.Error(err))
				}
				continue
			}
			why = fmt.Sprintf("the devices of domain %d could not be checked for %v (%v): a device plugged meanwhile would leave output unheld", domid, failures, err)
		case !haveBase:
			base, haveBase, failingSince = now, true, time.Time{}
			continue
		default:
			failingSince = time.Time{}
			why = xenDevicesChanged(base, now, domid, vif)
		}
		if why == "" {
			continue
		}
		why += ": the domain is paused and this copy fenced; fail over to the backup (remusd failover " + v.name + " there), or end this copy (remusd stop " + v.name + ")"
		d.mu.Lock()
		switch {
		case v.primary != p:
			// Another protection (or none) now: not this guard's.
			d.mu.Unlock()
			return
		case v.busy != "":
			d.mu.Unlock()
			continue // unprotect or switchover under way: checked again after it
		case v.role == RolePrimary && v.w.view != WitnessFenced:
			v.w.view, v.w.err = WitnessFenced, why
			d.fenceLocked(v, why)
			d.log.Error("a device was hot-plugged into a protected domain: fenced", zap.String("vm", v.name), zap.Uint32("domid", domid), zap.String("why", why))
		}
		d.mu.Unlock()
		return
	}
}
