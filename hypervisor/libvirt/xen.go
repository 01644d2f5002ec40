package libvirt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/remusd/remusd/hypervisor"
)

// Xen domains through libvirt's libxl driver (xen:///system): discovery
// only. remusd drives a Xen domain with libxc and xenstore
// (hypervisor/xen); libvirt tells it which domain a name is, its vifs and
// its configuration, where libvirt manages the host's domains. The libxl
// driver knows only the domains it started (or defined): one made by
// `xl create` is not there, and LookupXen reports it as ErrNoDomain.

// DefaultXenURI is the libxl driver's URI.
const DefaultXenURI = "xen:///system"

// ErrNoDomain reports a name libvirt has no domain for.
var ErrNoDomain = errors.New("no such domain")

// ErrNotRunning reports a domain that is defined but not running.
var ErrNotRunning = errors.New("domain is not running")

// ErrBadXML reports domain XML that does not describe a Xen domain
// remusd can use (a value out of range or malformed).
var ErrBadXML = errors.New("unusable domain XML")

// MaxDomID is the highest id of a Xen domain (DOMID_FIRST_RESERVED-1:
// 0x7ff0 and above are reserved ids).
const MaxDomID = 0x7fef

// DialXen connects to libvirtd and opens its libxl driver: cfg.URI is
// xen:///system (the default) or xen+unix:///system?socket=PATH; the
// connection is always to libvirtd's unix socket (cfg.Socket, default
// DefaultSocket), under ctx's deadline or DefaultTimeout.
func DialXen(ctx context.Context, cfg Config) (*Conn, error) {
	socket, uri, err := cfg.resolveFor("xen", DefaultXenURI, "xen:///system (or xen+unix:///system?socket=PATH)", "system")
	if err != nil {
		return nil, err
	}
	return dial(ctx, socket, uri)
}

// XenDomain is a running Xen domain as libvirt's libxl driver describes
// it. Every value taken from the XML is checked.
type XenDomain struct {
	Name string
	UUID string
	// ID is the domain's id (domid), 1..MaxDomID.
	ID uint32
	// OSType is <os><type> ("xenpvh" for PVH, "xen" or "linux" for PV,
	// "hvm"), Machine its machine attribute ("xenpvh", "xenpv", "xenfv").
	OSType, Machine string
	// PVH is true for a PVH domain: os type xenpvh, whatever the machine.
	// The older form, os type xen with machine xenpvh, is not PVH with
	// libvirt 9.0: it keeps it as os type linux and libxl runs it as PV
	// (measured).
	PVH bool
	// MemoryKiB is <memory> (the maximum), CurrentMemoryKiB
	// <currentMemory>; VCPUs is <vcpu>.
	MemoryKiB, CurrentMemoryKiB uint64
	VCPUs                       int
	// Kernel, Initrd and Cmdline are the direct boot of <os>.
	Kernel, Initrd, Cmdline string
	// Interfaces are the domain's network interfaces, in XML order (their
	// Xen device ids are 0, 1, ... in that order unless libvirt was told
	// otherwise).
	Interfaces []XenInterface
	// Disks are the target devs of the domain's disks (xvda, ...).
	Disks []string
	// Persistent is true if libvirt keeps a definition of the domain
	// (virsh define), false for a transient one (virsh create).
	Persistent bool
	// XML is the live domain XML the fields come from.
	XML string
}

// XenInterface is one network interface of a Xen domain.
type XenInterface struct {
	// Type is the interface type: "bridge", "ethernet", "network".
	Type string
	// Name is the backend's interface in dom0 (target dev: vifDOMID.DEVID
	// unless the configuration names it), a valid interface name.
	Name string
	// MAC is the guest's MAC address, lower case.
	MAC string
	// Bridge is the dom0 bridge the vif is on ("" if none).
	Bridge string
	// Script is the hotplug script libxl runs for it ("" for its
	// default).
	Script string
}

// HasDisks reports whether the domain has block devices (remusd does not
// replicate their writes).
func (d XenDomain) HasDisks() bool { return len(d.Disks) > 0 }

// xenXML is the part of a Xen domain's XML LookupXen reads.
type xenXML struct {
	Type          string    `xml:"type,attr"`
	ID            string    `xml:"id,attr"`
	Name          string    `xml:"name"`
	UUID          string    `xml:"uuid"`
	Memory        xmlMemory `xml:"memory"`
	CurrentMemory xmlMemory `xml:"currentMemory"`
	VCPU          string    `xml:"vcpu"`
	OS            struct {
		Type struct {
			Arch    string `xml:"arch,attr"`
			Machine string `xml:"machine,attr"`
			Value   string `xml:",chardata"`
		} `xml:"type"`
		Kernel  string `xml:"kernel"`
		Initrd  string `xml:"initrd"`
		Cmdline string `xml:"cmdline"`
	} `xml:"os"`
	Devices struct {
		Interfaces []struct {
			Type string `xml:"type,attr"`
			MAC  struct {
				Address string `xml:"address,attr"`
			} `xml:"mac"`
			Source struct {
				Bridge string `xml:"bridge,attr"`
			} `xml:"source"`
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
			Script struct {
				Path string `xml:"path,attr"`
			} `xml:"script"`
		} `xml:"interface"`
		Disks []struct {
			Device string `xml:"device,attr"`
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
		} `xml:"disk"`
	} `xml:"devices"`
}

type xmlMemory struct {
	Unit  string `xml:"unit,attr"`
	Value string `xml:",chardata"`
}

var (
	// ifNameRE is what Linux accepts as an interface name (IFNAMSIZ-1
	// characters), restricted to the characters xl and libvirt use.
	ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,15}$`)
	macRE    = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`)
	uuidRE   = regexp.MustCompile(`^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$`)
)

// LookupXen finds the running Xen domain named name (a valid VM name,
// hypervisor.ValidateVMName, checked before libvirt is asked) on a
// connection to the libxl driver (DialXen): its domid, type, interfaces
// (the dom0 vif, MAC, bridge), disks and whether libvirt keeps its
// definition. A name libvirt does not know is ErrNoDomain, a defined
// domain that is not running ErrNotRunning, XML with a value out of range
// ErrBadXML. Each of its four libvirt calls has ctx's deadline (or
// DefaultTimeout).
func (c *Conn) LookupXen(ctx context.Context, name string) (XenDomain, error) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return XenDomain{}, fmt.Errorf("libvirt: %w", err)
	}
	var dom golibvirt.Domain
	err := c.call(ctx, fmt.Sprintf("domain %q: DomainLookupByName", name), func() (err error) {
		dom, err = c.l.DomainLookupByName(name)
		return err
	})
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return XenDomain{}, fmt.Errorf("libvirt: %s has no domain %q (it knows only the domains it defined or started, not those made by xl create): %w: %w", c.uri, name, ErrNoDomain, err)
		}
		return XenDomain{}, err
	}
	var st int32
	err = c.call(ctx, fmt.Sprintf("domain %q: DomainGetState", name), func() (err error) {
		st, _, err = c.l.DomainGetState(dom, 0)
		return err
	})
	if err != nil {
		return XenDomain{}, notFound(err, c.uri, name)
	}
	if s := golibvirt.DomainState(st); !active(s) {
		return XenDomain{}, fmt.Errorf("libvirt: domain %q is %s: %w (virsh -c %s start %s)", name, stateName(s), ErrNotRunning, c.uri, name)
	}
	var x string
	err = c.call(ctx, fmt.Sprintf("domain %q: DomainGetXMLDesc", name), func() (err error) {
		x, err = c.l.DomainGetXMLDesc(dom, 0)
		return err
	})
	if err != nil {
		return XenDomain{}, notFound(err, c.uri, name)
	}
	var persistent int32
	err = c.call(ctx, fmt.Sprintf("domain %q: DomainIsPersistent", name), func() (err error) {
		persistent, err = c.l.DomainIsPersistent(dom)
		return err
	})
	if err != nil {
		return XenDomain{}, notFound(err, c.uri, name)
	}
	d, err := parseXenDomain(x)
	if err != nil {
		return XenDomain{}, fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	if d.Name != name {
		return XenDomain{}, fmt.Errorf("libvirt: domain %q: %w: the XML names %q", name, ErrBadXML, d.Name)
	}
	if d.ID == 0 {
		// An active domain's live XML carries its id; this one does not
		// (it stopped between the calls).
		return XenDomain{}, fmt.Errorf("libvirt: domain %q: %w (its XML has no id)", name, ErrNotRunning)
	}
	if dom.ID != 0 && uint32(dom.ID) != d.ID {
		return XenDomain{}, fmt.Errorf("libvirt: domain %q: id %d at lookup, %d in its XML (restarted?)", name, dom.ID, d.ID)
	}
	d.Persistent = persistent == 1
	return d, nil
}

// notFound marks a libvirt "no domain" error (the domain went away between
// calls) as ErrNoDomain.
func notFound(err error, uri, name string) error {
	if golibvirt.IsNotFound(err) {
		return fmt.Errorf("libvirt: %s has no domain %q: %w: %w", uri, name, ErrNoDomain, err)
	}
	return err
}

// parseXenDomain reads and checks the live XML of a running Xen domain.
func parseXenDomain(x string) (XenDomain, error) {
	var v xenXML
	if err := xml.Unmarshal([]byte(x), &v); err != nil {
		return XenDomain{}, fmt.Errorf("%w: %w", ErrBadXML, err)
	}
	bad := func(format string, a ...any) (XenDomain, error) {
		return XenDomain{}, fmt.Errorf("%w: "+format, append([]any{ErrBadXML}, a...)...)
	}
	if v.Type != "xen" {
		return bad("domain type %q, want 'xen' (a domain of libvirt's libxl driver, %s)", v.Type, DefaultXenURI)
	}
	if err := hypervisor.ValidateVMName(v.Name); err != nil {
		return bad("%v", err)
	}
	d := XenDomain{
		Name:    v.Name,
		OSType:  strings.TrimSpace(v.OS.Type.Value),
		Machine: v.OS.Type.Machine,
		Kernel:  v.OS.Kernel,
		Initrd:  v.OS.Initrd,
		Cmdline: v.OS.Cmdline,
		XML:     x,
	}
	if v.UUID != "" {
		if !uuidRE.MatchString(v.UUID) {
			return bad("uuid %q", v.UUID)
		}
		d.UUID = strings.ToLower(v.UUID)
	}
	if v.ID != "" && v.ID != "-1" {
		id, err := strconv.ParseUint(v.ID, 10, 32)
		if err != nil || id < 1 || id > MaxDomID {
			return bad("domain id %q, want 1..%d", v.ID, MaxDomID)
		}
		d.ID = uint32(id)
	}
	switch d.OSType {
	case "xenpvh":
		d.PVH = true
	case "xen", "linux", "hvm":
		// PV ("linux" is libvirt's old name for xen, which libvirt 9.0
		// keeps for os type xen with machine xenpvh, and runs as PV) or
		// HVM.
	default:
		return bad("os type %q, want xenpvh, xen, linux or hvm", d.OSType)
	}
	var err error
	if d.MemoryKiB, err = kib(v.Memory); err != nil {
		return bad("memory: %v", err)
	}
	if v.CurrentMemory.Value != "" {
		if d.CurrentMemoryKiB, err = kib(v.CurrentMemory); err != nil {
			return bad("currentMemory: %v", err)
		}
	}
	if s := strings.TrimSpace(v.VCPU); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 4096 {
			return bad("vcpu %q", s)
		}
		d.VCPUs = n
	}
	for i, nic := range v.Devices.Interfaces {
		n := XenInterface{Type: nic.Type, Name: nic.Target.Dev, MAC: strings.ToLower(nic.MAC.Address), Bridge: nic.Source.Bridge, Script: nic.Script.Path}
		if !ifNameRE.MatchString(n.Name) {
			return bad("interface %d: target dev %q is not a valid interface name", i, n.Name)
		}
		if !macRE.MatchString(n.MAC) {
			return bad("interface %d (%s): mac %q is not a MAC address", i, n.Name, nic.MAC.Address)
		}
		if n.Bridge != "" && !ifNameRE.MatchString(n.Bridge) {
			return bad("interface %d (%s): bridge %q is not a valid interface name", i, n.Name, n.Bridge)
		}
		for _, o := range d.Interfaces {
			if o.Name == n.Name {
				return bad("interfaces %q twice", n.Name)
			}
		}
		d.Interfaces = append(d.Interfaces, n)
	}
	for i, dk := range v.Devices.Disks {
		if dk.Target.Dev == "" {
			return bad("disk %d has no target dev", i)
		}
		d.Disks = append(d.Disks, dk.Target.Dev)
	}
	return d, nil
}

// kib converts a libvirt memory element to KiB.
func kib(m xmlMemory) (uint64, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(m.Value), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number", m.Value)
	}
	var mult, div uint64 = 1, 1
	switch strings.ToLower(m.Unit) {
	case "b", "bytes":
		div = 1024
	case "", "k", "kib":
	case "kb":
		mult, div = 1000, 1024
	case "m", "mib":
		mult = 1 << 10
	case "mb":
		mult, div = 1000*1000, 1024
	case "g", "gib":
		mult = 1 << 20
	case "gb":
		mult, div = 1000*1000*1000, 1024
	default:
		return 0, fmt.Errorf("unit %q", m.Unit)
	}
	if v > (1<<63)/mult {
		return 0, fmt.Errorf("%s %s is too large", m.Value, m.Unit)
	}
	return v * mult / div, nil
}

// ValidateXen checks cfg as DialXen will read it (the xen scheme, an
// absolute socket), without connecting.
func (c Config) ValidateXen() error {
	socket, _, err := c.resolveFor("xen", DefaultXenURI, "xen:///system (or xen+unix:///system?socket=PATH)", "system")
	if err != nil {
		return err
	}
	if !strings.HasPrefix(socket, "/") || strings.ContainsAny(socket, "\x00\n") {
		return fmt.Errorf("libvirt: socket %q must be an absolute path", socket)
	}
	return nil
}

// domainByName checks name and looks the domain up (ErrNoDomain if
// libvirt does not know it), under ctx's deadline.
func (c *Conn) domainByName(ctx context.Context, name string) (golibvirt.Domain, error) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return golibvirt.Domain{}, fmt.Errorf("libvirt: %w", err)
	}
	var dom golibvirt.Domain
	err := c.call(ctx, fmt.Sprintf("domain %q: DomainLookupByName", name), func() (err error) {
		dom, err = c.l.DomainLookupByName(name)
		return err
	})
	if err != nil {
		return golibvirt.Domain{}, notFound(err, c.uri, name)
	}
	return dom, nil
}

// StartXen starts the defined (persistent, shut off) Xen domain named
// name (virsh start): libxl creates and runs it. A name libvirt does not
// know is ErrNoDomain. Both calls have ctx's deadline.
func (c *Conn) StartXen(ctx context.Context, name string) error {
	dom, err := c.domainByName(ctx, name)
	if err != nil {
		return err
	}
	return c.call(ctx, fmt.Sprintf("domain %q: DomainCreate", name), func() error {
		return c.l.DomainCreate(dom)
	})
}

// StartXenPaused creates the defined (persistent, shut off) Xen domain
// named name paused (virsh start --paused) as a standby: libxl builds it
// and its devices, and its vCPUs never run until ResumeXen. It returns the
// new domain's id. A name libvirt does not know is ErrNoDomain. A
// definition with a managed save image is refused (libvirt would restore
// that old guest instead of building a fresh domain), and so is one
// marked autostart (libvirtd would start it by itself when it restarts,
// while the VM runs on its primary).
func (c *Conn) StartXenPaused(ctx context.Context, name string) (uint32, error) {
	dom, err := c.domainByName(ctx, name)
	if err != nil {
		return 0, err
	}
	var saved, auto int32
	if err := c.call(ctx, fmt.Sprintf("domain %q: DomainHasManagedSaveImage", name), func() (err error) {
		saved, err = c.l.DomainHasManagedSaveImage(dom, 0)
		return err
	}); err != nil {
		return 0, err
	}
	if saved != 0 {
		return 0, fmt.Errorf("libvirt: domain %q has a managed save image: starting it would restore that guest, not make a fresh standby (virsh -c %s managedsave-remove %s)", name, c.uri, name)
	}
	if err := c.call(ctx, fmt.Sprintf("domain %q: DomainGetAutostart", name), func() (err error) {
		auto, err = c.l.DomainGetAutostart(dom)
		return err
	}); err != nil {
		return 0, err
	}
	if auto != 0 {
		return 0, fmt.Errorf("libvirt: domain %q is marked autostart: libvirtd would start this host's copy of the VM by itself (virsh -c %s autostart --disable %s)", name, c.uri, name)
	}
	var started golibvirt.Domain
	if err := c.call(ctx, fmt.Sprintf("domain %q: DomainCreateWithFlags(START_PAUSED)", name), func() (err error) {
		started, err = c.l.DomainCreateWithFlags(dom, uint32(golibvirt.DomainStartPaused))
		return err
	}); err != nil {
		return 0, err
	}
	if started.ID <= 0 {
		// Not every driver fills the id in: ask again.
		if started, err = c.domainByName(ctx, name); err != nil {
			return 0, fmt.Errorf("libvirt: domain %q: started paused but cannot be found: %w", name, err)
		}
	}
	if started.ID <= 0 || started.ID >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0, fmt.Errorf("libvirt: domain %q: started paused but its id is %d", name, started.ID)
	}
	return uint32(started.ID), nil
}

// ResumeXen unpauses the Xen domain named name (virsh resume) through
// libvirt, so that libvirt knows it runs, but only if it is still domain
// domid. A name libvirt does not know is ErrNoDomain, one that does not
// run ErrNotRunning.
func (c *Conn) ResumeXen(ctx context.Context, name string, domid uint32) error {
	dom, err := c.runningDomain(ctx, name, domid, "resuming")
	if err != nil {
		return err
	}
	return notFound(c.call(ctx, fmt.Sprintf("domain %q (%d): DomainResume", name, domid), func() error {
		return c.l.DomainResume(dom)
	}), c.uri, name)
}

// runningDomain looks name up and checks that it is domain domid.
func (c *Conn) runningDomain(ctx context.Context, name string, domid uint32, doing string) (golibvirt.Domain, error) {
	dom, err := c.domainByName(ctx, name)
	if err != nil {
		return golibvirt.Domain{}, err
	}
	switch {
	case dom.ID <= 0:
		return golibvirt.Domain{}, fmt.Errorf("libvirt: domain %q: %w", name, ErrNotRunning)
	case uint32(dom.ID) != domid:
		return golibvirt.Domain{}, fmt.Errorf("libvirt: domain %q is domain %d now, not %d: not %s it", name, dom.ID, domid, doing)
	}
	return dom, nil
}

// DestroyXen destroys the running Xen domain named name (virsh destroy),
// but only if it is still domain domid: a domain started again under the
// name since is not touched (an error). A name libvirt does not know is
// ErrNoDomain, one that does not run ErrNotRunning.
func (c *Conn) DestroyXen(ctx context.Context, name string, domid uint32) error {
	dom, err := c.runningDomain(ctx, name, domid, "destroying")
	if err != nil {
		return err
	}
	return notFound(c.call(ctx, fmt.Sprintf("domain %q (%d): DomainDestroy", name, domid), func() error {
		return c.l.DomainDestroy(dom)
	}), c.uri, name)
}
