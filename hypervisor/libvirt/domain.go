package libvirt

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
)

// SharedMemoryXML is what a domain's XML needs (inside <domain>) for
// remusd to map its RAM.
const SharedMemoryXML = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"

// ErrNotSharedMemory reports a domain whose RAM remusd cannot map.
var ErrNotSharedMemory = errors.New("guest RAM is not a shared file mapping")

// Domain is one libvirt domain (QEMU driver).
type Domain struct {
	c    *Conn
	dom  golibvirt.Domain
	name string
	xml  string
	def  domainXML
	// xmlFlags: 0 reads the live XML of a running domain,
	// DomainXMLInactive its persistent definition.
	xmlFlags golibvirt.DomainXMLFlags
	seam     *DiskSeam // built by Attach for the domain's disks
}

// domainXML is the part of the domain XML remusd reads.
type domainXML struct {
	Type   string `xml:"type,attr"`
	ID     string `xml:"id,attr"`
	Name   string `xml:"name"`
	Memory struct {
		Unit  string `xml:"unit,attr"`
		Value uint64 `xml:",chardata"`
	} `xml:"memory"`
	VCPU          int `xml:"vcpu"`
	MemoryBacking *struct {
		Source *struct {
			Type string `xml:"type,attr"`
		} `xml:"source"`
		Access *struct {
			Mode string `xml:"mode,attr"`
		} `xml:"access"`
	} `xml:"memoryBacking"`
	CPU struct {
		Mode  string `xml:"mode,attr"`
		Model string `xml:"model"`
		NUMA  struct {
			Cells []struct {
				MemAccess string `xml:"memAccess,attr"`
			} `xml:"cell"`
		} `xml:"numa"`
	} `xml:"cpu"`
	OS struct {
		Type struct {
			Arch    string `xml:"arch,attr"`
			Machine string `xml:"machine,attr"`
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
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
			Model struct {
				Type string `xml:"type,attr"`
			} `xml:"model"`
			Address *pciAddress `xml:"address"`
		} `xml:"interface"`
		Disks  []diskDef `xml:"disk"`
		Others []struct {
			XMLName xml.Name
			Type    string `xml:"type,attr"`
			Model   string `xml:"model,attr"`
			Bus     string `xml:"bus,attr"`
			Index   string `xml:"index,attr"`
			Target  struct {
				Type string `xml:"type,attr"`
				Port string `xml:"port,attr"`
			} `xml:"target"`
		} `xml:",any"`
	} `xml:"devices"`
}

type pciAddress struct {
	Type     string `xml:"type,attr"`
	Domain   string `xml:"domain,attr"`
	Bus      string `xml:"bus,attr"`
	Slot     string `xml:"slot,attr"`
	Function string `xml:"function,attr"`
}

// LookupDomain finds a domain by name (hypervisor.ValidateVMName) and
// reads its XML (the live one if it runs).
func (c *Conn) LookupDomain(ctx context.Context, name string) (*Domain, error) {
	return c.lookupDomain(ctx, name, 0)
}

func (c *Conn) lookupDomain(ctx context.Context, name string, flags golibvirt.DomainXMLFlags) (*Domain, error) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return nil, fmt.Errorf("libvirt: %w", err)
	}
	d := &Domain{c: c, name: name, xmlFlags: flags}
	err := c.call(ctx, fmt.Sprintf("domain %q: DomainLookupByName", name), func() (err error) {
		d.dom, err = c.l.DomainLookupByName(name)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := d.Refresh(ctx); err != nil {
		return nil, err
	}
	return d, nil
}

// Refresh re-reads the domain XML.
func (d *Domain) Refresh(ctx context.Context) error {
	var x string
	err := d.c.call(ctx, fmt.Sprintf("domain %q: DomainGetXMLDesc", d.name), func() (err error) {
		x, err = d.c.l.DomainGetXMLDesc(d.dom, d.xmlFlags)
		return err
	})
	if err != nil {
		return err
	}
	var def domainXML
	if err := xml.Unmarshal([]byte(x), &def); err != nil {
		return fmt.Errorf("libvirt: domain %q: parse XML: %w", d.name, err)
	}
	d.xml, d.def = x, def
	return nil
}

// Name returns the domain name.
func (d *Domain) Name() string { return d.name }

// XML returns the domain XML read last.
func (d *Domain) XML() string { return d.xml }

// MemoryBytes is the domain's memory size from its XML.
func (d *Domain) MemoryBytes() uint64 {
	mult := uint64(1024) // libvirt's default unit is KiB
	switch strings.ToLower(d.def.Memory.Unit) {
	case "b", "bytes":
		mult = 1
	case "", "k", "kib":
		mult = 1 << 10
	case "kb":
		mult = 1000
	case "m", "mib":
		mult = 1 << 20
	case "mb":
		mult = 1000 * 1000
	case "g", "gib":
		mult = 1 << 30
	case "gb":
		mult = 1000 * 1000 * 1000
	}
	return d.def.Memory.Value * mult
}

// CheckSharedMemory returns nil if the domain's RAM is a shared file
// mapping remusd can map, else an error (matching ErrNotSharedMemory)
// that says what to add to the domain XML.
func (d *Domain) CheckSharedMemory() error {
	if d.def.Type != "" && d.def.Type != "qemu" && d.def.Type != "kvm" {
		return fmt.Errorf("libvirt: domain %q: type %q: only QEMU domains (type='qemu' or 'kvm') are supported", d.name, d.def.Type)
	}
	if n := len(d.def.CPU.NUMA.Cells); n > 0 {
		return fmt.Errorf("libvirt: domain %q: %w: it has %d NUMA cells (one RAM file per cell); remusd supports one RAM file: remove <numa> from <cpu> and add %s inside <domain> (virsh edit %s), then restart the domain",
			d.name, ErrNotSharedMemory, n, SharedMemoryXML, d.name)
	}
	mb := d.def.MemoryBacking
	var problem string
	switch {
	case mb == nil:
		problem = "it has no <memoryBacking>"
	case mb.Source == nil || mb.Source.Type != "file":
		got := "none"
		if mb.Source != nil {
			got = fmt.Sprintf("%q", mb.Source.Type)
		}
		problem = fmt.Sprintf("<memoryBacking> has source type %s, need <source type='file'/>", got)
	case mb.Access == nil || mb.Access.Mode != "shared":
		got := "none (private)"
		if mb.Access != nil {
			got = fmt.Sprintf("%q", mb.Access.Mode)
		}
		problem = fmt.Sprintf("<memoryBacking> has access mode %s, need <access mode='shared'/>", got)
	default:
		return nil
	}
	return fmt.Errorf("libvirt: domain %q: %w (%s): remusd maps guest RAM from the file QEMU uses; add %s inside <domain> (virsh edit %s), then restart the domain (destroy + start)",
		d.name, ErrNotSharedMemory, problem, SharedMemoryXML, d.name)
}

// State returns the domain state (golibvirt.DomainRunning, ...).
func (d *Domain) State(ctx context.Context) (golibvirt.DomainState, error) {
	var st int32
	err := d.c.call(ctx, fmt.Sprintf("domain %q: DomainGetState", d.name), func() (err error) {
		st, _, err = d.c.l.DomainGetState(d.dom, 0)
		return err
	})
	if err != nil {
		// call may return before the abandoned call finishes writing st.
		return 0, err
	}
	return golibvirt.DomainState(st), nil
}

// Monitor returns the domain's QMP monitor through libvirt's passthrough.
// Its Close does not close the libvirt connection.
func (d *Domain) Monitor() *Monitor {
	return newMonitor(d, false)
}

// RAMPath finds the file backing guest RAM: the mem-path of the domain's
// memory-backend-file object, asked over QMP (qom-list /objects, qom-get);
// libvirt puts it at <memory_backing_dir>/libvirt/qemu/<id>-<name>/pc.ram
// on x86. Its size must match the domain's memory.
func (d *Domain) RAMPath(ctx context.Context) (string, error) {
	m := newMonitor(d, false)
	defer m.Close()
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := m.Execute(ctx, "qom-list", map[string]any{"path": "/objects"}, &objs); err != nil {
		return "", err
	}
	var files []string
	for _, o := range objs {
		if o.Type == "child<memory-backend-file>" {
			files = append(files, o.Name)
		}
	}
	if len(files) != 1 {
		return "", fmt.Errorf("libvirt: domain %q: %w: QEMU has %d memory-backend-file objects %v, want exactly 1; add %s inside <domain>",
			d.name, ErrNotSharedMemory, len(files), files, SharedMemoryXML)
	}
	obj := "/objects/" + files[0]
	var path string
	if err := m.Execute(ctx, "qom-get", map[string]any{"path": obj, "property": "mem-path"}, &path); err != nil {
		return "", err
	}
	var share bool
	if err := m.Execute(ctx, "qom-get", map[string]any{"path": obj, "property": "share"}, &share); err != nil {
		return "", err
	}
	if !share {
		return "", fmt.Errorf("libvirt: domain %q: %w: %s has share=off; add <access mode='shared'/> to <memoryBacking>", d.name, ErrNotSharedMemory, obj)
	}
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("libvirt: domain %q: RAM file of %s: %w (remusd must run on the domain's host)", d.name, obj, err)
	}
	if st.IsDir() {
		return "", fmt.Errorf("libvirt: domain %q: RAM path %s of %s is a directory (QEMU made an unlinked file in it, which remusd cannot map)", d.name, path, obj)
	}
	if want := d.MemoryBytes(); want != 0 && uint64(st.Size()) != want {
		return "", fmt.Errorf("libvirt: domain %q: RAM file %s is %d bytes, the domain has %d (memory hotplug/balloon devices are not supported)", d.name, path, st.Size(), want)
	}
	return path, nil
}

// Spec is the domain as a hypervisor/qemu machine description (what the
// directly launched standby of hypervisor/qemu runs): name, memory,
// vCPUs, machine type (libvirt's versioned one, e.g. pc-q35-7.2),
// accelerator (kvm for type='kvm'), direct kernel boot, the first
// NIC's MAC and tap, and the disks (ID the target dev, Path the source
// file on this host, SizeBytes its size or 0 when it cannot be read,
// PCISlot the slot of its address). Check StandbyProblems first: Spec does not say what
// it leaves out.
func (d *Domain) Spec() qemu.Spec {
	s := qemu.Spec{
		Name:      d.name,
		MemoryMiB: int(d.MemoryBytes() >> 20),
		CPUs:      d.def.VCPU,
		Kernel:    d.def.OS.Kernel,
		Initrd:    d.def.OS.Initrd,
		Append:    d.def.OS.Cmdline,
		Machine:   d.def.OS.Type.Machine,
	}
	if d.def.Type == "kvm" {
		s.Accel = "kvm"
	}
	for _, nic := range d.def.Devices.Interfaces {
		s.MAC, s.Tap = strings.ToLower(nic.MAC.Address), nic.Target.Dev
		break
	}
	s.Disks = d.diskSpecs()
	return s
}

// Options configure Attach.
type Options struct {
	// StateDir is where QEMU writes the saved device state. Default: a
	// directory next to the RAM file, owned by the RAM file's owner (the
	// QEMU user). Attach removes the default one on Close/Detach.
	StateDir string
	// Disks configure the seam Attach builds for the domain's disks.
	Disks DiskOptions
}

// Attach checks the domain (running, shared file memory), maps its RAM and
// returns a qemu Guest driven through libvirt's QMP passthrough. The guest
// owns the connection: Detach (leave the domain running) and Close (QMP
// quit) close it.
//
// A domain with disks gets its block seam (see disks.go and DiskSeam): the
// guest's Disks are their journals, its HarvestDirty checks the mirror jobs, and
// (*Domain).DiskSeam returns the seam, whose Remove takes it out of the
// domain (unprotect) and Start builds it again. Detach leaves the mirror
// jobs for the next daemon. With Options.Disks.Deferred, Attach only
// checks the disks and Start builds the seam.
func (c *Conn) Attach(ctx context.Context, name string, opts Options, gopts qemu.MonitorGuestOptions) (*qemu.Guest, *Domain, error) {
	d, err := c.LookupDomain(ctx, name)
	if err != nil {
		return nil, nil, err
	}
	if err := d.CheckSharedMemory(); err != nil {
		return nil, nil, err
	}
	st, err := d.State(ctx)
	if err != nil {
		return nil, nil, err
	}
	if st != golibvirt.DomainRunning && st != golibvirt.DomainPaused {
		return nil, nil, fmt.Errorf("libvirt: domain %q is not running (state %s): start it first (virsh start %s)", name, stateName(st), name)
	}
	ram, err := d.RAMPath(ctx)
	if err != nil {
		return nil, nil, err
	}
	stateDir, own := opts.StateDir, false
	if stateDir == "" {
		if stateDir, err = qemuStateDir(ram, name); err != nil {
			return nil, nil, fmt.Errorf("libvirt: domain %q: %w", name, err)
		}
		own = true
	}
	m := newMonitor(d, true)
	if own {
		m.removeDir = stateDir
	}
	spec := gopts.Spec
	if spec.Name == "" {
		spec = d.Spec()
	}
	if len(d.def.Devices.Disks) > 0 {
		if opts.Disks.Log == nil {
			opts.Disks.Log = gopts.Log
		}
		seam, err := newDiskSeam(d, m, ram, opts.Disks)
		if err == nil && !opts.Disks.Deferred {
			err = seam.Start(ctx)
		}
		if err != nil {
			m.closeOnly()
			if own {
				os.RemoveAll(stateDir)
			}
			return nil, nil, err
		}
		d.seam = seam
		gopts.Disks = seam
	}
	gopts.Spec, gopts.StateDir = spec, stateDir
	g, err := qemu.NewMonitorGuest(ctx, m, name, ram, gopts)
	if err != nil {
		if d.seam != nil {
			d.seam.Remove(ctx)
		}
		m.closeOnly()
		if own {
			os.RemoveAll(stateDir)
		}
		return nil, nil, fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	return g, d, nil
}

// DiskSeam is the block seam Attach built for the domain's disks (nil
// without disks).
func (d *Domain) DiskSeam() *DiskSeam { return d.seam }

// qemuStateDir makes a private directory next to the RAM file that the
// QEMU process (the RAM file's owner) can write.
func qemuStateDir(ram, name string) (string, error) {
	dir, err := os.MkdirTemp(filepath.Dir(ram), ".remusd-"+name+"-state-")
	if err != nil {
		return "", fmt.Errorf("device state dir: %w", err)
	}
	if err := chownLike(dir, ram); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("device state dir: %w", err)
	}
	return dir, nil
}

func stateName(s golibvirt.DomainState) string {
	switch s {
	case golibvirt.DomainNostate:
		return "nostate"
	case golibvirt.DomainRunning:
		return "running"
	case golibvirt.DomainBlocked:
		return "blocked"
	case golibvirt.DomainPaused:
		return "paused"
	case golibvirt.DomainShutdown:
		return "shutting down"
	case golibvirt.DomainShutoff:
		return "shut off"
	case golibvirt.DomainCrashed:
		return "crashed"
	case golibvirt.DomainPmsuspended:
		return "pmsuspended"
	}
	return fmt.Sprintf("state %d", s)
}

// Monitor is a qemu.Monitor over libvirt's QMP passthrough
// (virDomainQemuMonitorCommand). Done closes when the domain stops running
// or the libvirt connection is lost.
type Monitor struct {
	d         *Domain
	ownConn   bool
	removeDir string

	once   sync.Once
	done   chan struct{}
	stop   chan struct{}
	closed sync.Once
}

var _ qemu.Monitor = (*Monitor)(nil)

// pollInterval is how often Monitor checks that the domain still runs.
const pollInterval = 500 * time.Millisecond

func newMonitor(d *Domain, ownConn bool) *Monitor {
	m := &Monitor{d: d, ownConn: ownConn, done: make(chan struct{}), stop: make(chan struct{})}
	go m.watch()
	return m
}

// watch closes done when the domain stops or the connection is lost.
func (m *Monitor) watch() {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			m.markDone()
			return
		case <-m.d.c.Disconnected():
			m.markDone()
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), DefaultTimeout)
			st, err := m.d.State(ctx)
			cancel()
			if (err == nil && !active(st)) || golibvirt.IsNotFound(err) || errors.Is(err, ErrDisconnected) || errors.Is(err, ErrTimeout) {
				m.markDone()
				return
			}
		}
	}
}

func active(st golibvirt.DomainState) bool {
	return st == golibvirt.DomainRunning || st == golibvirt.DomainPaused || st == golibvirt.DomainBlocked
}

func (m *Monitor) markDone() { m.once.Do(func() { close(m.done) }) }

// Done is closed when the domain is no longer running, the connection is
// lost, or Close was called.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Close stops watching; for a monitor made by Attach it also closes the
// libvirt connection and removes the device state directory.
func (m *Monitor) Close() error {
	var err error
	m.closed.Do(func() {
		close(m.stop)
		if m.ownConn {
			err = m.d.c.Close()
		}
		if m.removeDir != "" {
			os.RemoveAll(m.removeDir)
		}
	})
	return err
}

func (m *Monitor) closeOnly() { _ = m.Close() }

// qmpReply is a QMP answer as libvirt passes it through.
type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// Execute runs one QMP command through libvirt. QEMU's errors are
// *qemu.CommandError; a domain that is gone matches qemu.ErrQEMUExited.
func (m *Monitor) Execute(ctx context.Context, cmd string, args any, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("libvirt: domain %q: QMP %s: %w", m.d.name, cmd, err)
	}
	var res string
	err = m.d.c.call(ctx, fmt.Sprintf("domain %q: QEMUDomainMonitorCommand(%s)", m.d.name, cmd), func() (err error) {
		res, err = m.d.c.l.QEMUDomainMonitorCommand(m.d.dom, string(b), 0)
		return err
	})
	if err != nil {
		var le golibvirt.Error
		if errors.As(err, &le) && (le.Code == uint32(golibvirt.ErrOperationInvalid) || le.Code == uint32(golibvirt.ErrNoDomain)) {
			return fmt.Errorf("%w: %w", qemu.ErrQEMUExited, err)
		}
		if errors.Is(err, ErrTimeout) {
			return &timeoutError{err: err, cmd: cmd}
		}
		return err
	}
	var r qmpReply
	if err := json.Unmarshal([]byte(res), &r); err != nil {
		return fmt.Errorf("libvirt: domain %q: QMP %s: bad reply %.200q: %w", m.d.name, cmd, res, err)
	}
	if r.Error != nil {
		return &qemu.CommandError{Command: cmd, Class: r.Error.Class, Desc: r.Error.Desc}
	}
	if out != nil && len(r.Return) > 0 {
		if err := json.Unmarshal(r.Return, out); err != nil {
			return fmt.Errorf("libvirt: domain %q: QMP %s: decode reply: %w", m.d.name, cmd, err)
		}
	}
	return nil
}

// timeoutError is a passthrough call that missed its deadline; it matches
// qemu.ErrTimeout and ErrTimeout.
type timeoutError struct {
	err error
	cmd string
}

func (e *timeoutError) Error() string { return e.err.Error() }
func (e *timeoutError) Unwrap() error { return e.err }
func (e *timeoutError) Is(target error) bool {
	return target == qemu.ErrTimeout || target == context.DeadlineExceeded
}

// ErrStandbyIncompatible reports a domain whose device state the
// directly launched standby could not load (see StandbyProblems).
var ErrStandbyIncompatible = errors.New("a backup's standby QEMU could not load this domain's device state")

// CheckStandby returns nil if StandbyProblems finds none, else an error
// (matching ErrStandbyIncompatible) that lists them.
func (d *Domain) CheckStandby() error {
	p := d.StandbyProblems()
	if len(p) == 0 {
		return nil
	}
	return fmt.Errorf("libvirt: domain %q: %w; change the domain XML (virsh edit %s): %s", d.name, ErrStandbyIncompatible, d.name, strings.Join(p, "; "))
}

// DefinedSpec is the backup's side of a libvirt VM: the machine of the
// domain name as defined in this libvirtd (its persistent definition,
// running or not: on a backup it is normally defined but inactive, since
// it runs on the primary), as the Spec its directly launched standby
// runs. The domain must pass the checks a primary's does
// (CheckSharedMemory: ErrNotSharedMemory; CheckStandby:
// ErrStandbyIncompatible) and give a valid machine description
// (qemu.Spec.ValidateMachine). Its disks (Spec.Disks) are this host's
// images of the domain's disks: each <source file> must exist with the
// primary's size (CheckCompatible compares the sizes); the standby's
// remusd serves them to it over NBD and the engine writes the replica
// there. Kernel, Initrd and Append are this
// domain's; the host-local fields (Tap, RAMPath, QMPPath, SerialPath,
// Binary) are empty for the caller to fill in. Compare the primary's
// description with it (qemu.CheckCompatible) before starting a standby.
func (c *Conn) DefinedSpec(ctx context.Context, name string) (qemu.Spec, error) {
	d, err := c.lookupDomain(ctx, name, golibvirt.DomainXMLInactive)
	if err != nil {
		return qemu.Spec{}, err
	}
	if err := d.CheckSharedMemory(); err != nil {
		return qemu.Spec{}, err
	}
	if err := d.CheckStandby(); err != nil {
		return qemu.Spec{}, err
	}
	if err := d.checkDiskFiles(); err != nil {
		return qemu.Spec{}, err
	}
	s := d.Spec()
	s.Tap = ""
	if err := s.ValidateMachine(); err != nil {
		return qemu.Spec{}, fmt.Errorf("libvirt: domain %q: %w", name, err)
	}
	return s, nil
}

// StandbyNICAddress is where the domain's NIC must sit for the direct
// standby (which puts its virtio-net-pci in the first free slot of
// pcie.0).
const StandbyNICAddress = "<address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>"

// StandbyProblems lists what in the domain the backup's directly launched
// standby (hypervisor/qemu: -machine q35 -nodefaults, one virtio-net-pci,
// one isa-serial, the disks' virtio-blk-pci at their fixed slots) would not have: device state saved by this domain's
// QEMU would not load into it ("Unknown savevm section", measured with a
// NIC behind a pcie-root-port). Empty means compatible. Conservative: it
// may list things that would load.
func (d *Domain) StandbyProblems() []string {
	var p []string
	x := d.def
	if b := d.MemoryBytes(); b%(1<<20) != 0 {
		p = append(p, fmt.Sprintf("memory %d bytes: the standby's memory is a whole number of MiB", b))
	}
	if m := x.OS.Type.Machine; m != "q35" && !strings.HasPrefix(m, "pc-q35-") {
		p = append(p, fmt.Sprintf("machine %q: the standby is q35 (use <type arch='x86_64' machine='q35'>hvm</type>)", m))
	}
	if x.OS.Type.Arch != "" && x.OS.Type.Arch != "x86_64" {
		p = append(p, fmt.Sprintf("arch %q: the standby is x86_64", x.OS.Type.Arch))
	}
	if x.CPU.Mode == "host-model" || x.CPU.Mode == "host-passthrough" || (x.CPU.Model != "" && x.CPU.Model != "qemu64") {
		p = append(p, fmt.Sprintf("cpu mode %q model %q: the standby uses QEMU's default CPU (qemu64)", x.CPU.Mode, x.CPU.Model))
	}
	if n := len(x.Devices.Interfaces); n > 1 {
		p = append(p, fmt.Sprintf("%d interfaces: the standby has one NIC", n))
	}
	for _, nic := range x.Devices.Interfaces {
		if nic.Model.Type != "virtio" {
			p = append(p, fmt.Sprintf("interface model %q: the standby's NIC is virtio (<model type='virtio'/>)", nic.Model.Type))
		}
		if a := nic.Address; a == nil || a.Type != "pci" || hexNum(a.Domain) != 0 || hexNum(a.Bus) != 0 || hexNum(a.Slot) != 1 || hexNum(a.Function) != 0 {
			p = append(p, "interface address: the standby's NIC is at 0000:00:01.0 on pcie.0; put "+StandbyNICAddress+" in the <interface> (libvirt's default puts it behind a pcie-root-port)")
		}
	}
	p = append(p, d.diskProblems()...)
	for _, o := range x.Devices.Others {
		n := o.XMLName.Local
		switch {
		case n == "emulator" || n == "audio" || n == "console":
		case n == "controller" && o.Type == "usb":
			if o.Model != "none" {
				p = append(p, fmt.Sprintf("USB controller model %q: the standby has none (add <controller type='usb' model='none'/>)", o.Model))
			}
		case n == "controller" && o.Type == "pci" && o.Model == "pcie-root":
		case n == "controller" && o.Type == "sata" && (o.Index == "" || o.Index == "0"): // built into q35
		case n == "serial" && (o.Target.Port == "" || o.Target.Port == "0") && (o.Target.Type == "" || o.Target.Type == "isa-serial"):
		case n == "input" && o.Bus == "ps2": // built into q35
		case n == "memballoon":
			if o.Model != "none" {
				p = append(p, fmt.Sprintf("memballoon model %q: the standby has none (add <memballoon model='none'/>)", o.Model))
			}
		case n == "controller":
			p = append(p, fmt.Sprintf("controller type %q model %q: the standby has no such controller", o.Type, o.Model))
		default:
			p = append(p, fmt.Sprintf("<%s type=%q>: the standby has no such device (remove it)", n, o.Type))
		}
	}
	return p
}

func hexNum(s string) int64 {
	var v int64
	if _, err := fmt.Sscan(s, &v); err != nil {
		return -1
	}
	return v
}
