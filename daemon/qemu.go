package daemon

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/xen"
	"github.com/remusd/remusd/outbuf"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// QemuVM describes one QEMU guest the daemon launches (or attaches to).
type QemuVM struct {
	Name      string `json:"name"`
	MemoryMiB int    `json:"memory_mib"`
	CPUs      int    `json:"cpus"`
	// Kernel, Initrd and Append boot a kernel directly.
	Kernel string `json:"kernel"`
	Initrd string `json:"initrd"`
	Append string `json:"append"`
	// UseGuestImage boots the guest built by package guestimage (kernel,
	// initramfs running remus-guestsvc) instead of Kernel/Initrd/Append,
	// with eth0 at GuestIP (CIDR), default route GuestGateway and the
	// service on GuestPort (default 7000).
	UseGuestImage bool   `json:"use_guestimage"`
	GuestIP       string `json:"guest_ip"`
	GuestGateway  string `json:"guest_gateway"`
	GuestPort     int    `json:"guest_port"`
	// Tap is the host tap device of the guest's virtio-net NIC, MAC its
	// address (must be the same on the backup's standby).
	Tap string `json:"tap"`
	MAC string `json:"mac"`
	// Bridge is the bridge the daemon attaches the tap to (the tap is then
	// a bridge port: NFQUEUE matches it with physdev). Bridged says the tap
	// is a bridge port attached by someone else.
	Bridge  string `json:"bridge"`
	Bridged bool   `json:"bridged"`
	// RunDir holds the RAM file, QMP socket and serial console (default
	// /dev/shm/remusd-<name of this host>; keep it on tmpfs).
	RunDir string `json:"run_dir"`
	// QMP and RAM attach to a QEMU launched by someone else (its QMP
	// socket and memory-backend-file path) instead of launching one.
	QMP string `json:"qmp"`
	RAM string `json:"ram"`
	// ExtraArgs are extra machine arguments. A backup's standby gets its
	// own entry's, and they must equal the primary's (device layout).
	ExtraArgs []string `json:"extra_args"`
	// Machine is the QEMU machine type (default q35; a libvirt domain's
	// versioned type such as pc-q35-7.2 when pairing with one). Accel is
	// the accelerator (default tcg; kvm where available). Both must be
	// equal on primary and backup.
	Machine string `json:"machine"`
	Accel   string `json:"accel"`
	// Binary is the QEMU binary (default qemu-system-x86_64).
	Binary string `json:"binary"`
	// Libvirt says Name is a libvirt domain (running, with shared file
	// memory backing) that the daemon drives through libvirtd (config
	// field libvirt) instead of launching QEMU; see daemon/libvirt.go.
	Libvirt bool `json:"libvirt"`
	// Disks are the VM's protected virtio-blk disks: remusd serves each
	// raw image to QEMU over NBD and replicates its writes with the epoch
	// in which they happened. On the backup, path is where the replica
	// image is created (sparse). With use_guestimage the first disk is
	// the guest's /dev/vda, an ext4 file system it mounts on /data. Not
	// with libvirt: a domain's disks come from its XML (daemon/libvirt.go).
	Disks []QemuDisk `json:"disks,omitempty"`
	// Autostart launches the VM when the daemon starts (default true),
	// unless the state directory says it was protected or took over here
	// and is gone (it may run on the other host now: `remusd start VM`
	// starts it by hand). false: the entry only describes the VM, for
	// this host to back it up (the standby is built from it) and to run it
	// after a failover.
	Autostart *bool `json:"autostart,omitempty"`
}

// QemuDisk is one protected disk of a qemu VM.
type QemuDisk struct {
	// ID names the disk (qemu.DiskIDPattern); equal on both hosts.
	ID string `json:"id"`
	// Path is the raw image on this host (absolute).
	Path string `json:"path"`
	// SizeMiB is the disk size; equal on both hosts. The primary's image
	// must have exactly this size.
	SizeMiB int64 `json:"size_mib"`
}

// autostart reports whether the VM launches at daemon start.
func (q QemuVM) autostart() bool { return q.Autostart == nil || *q.Autostart }

// StandbyConfig is how this daemon builds a protected qemu VM's hot
// standby when it is the backup.
type StandbyConfig struct {
	// Tap names the standby's tap; "%s" is replaced by the VM name
	// (default "rs-%s"). At most 15 characters after substitution.
	Tap string `json:"tap"`
	// Bridge is the bridge the daemon attaches the standby's tap to ("" =
	// none).
	Bridge string `json:"bridge"`
	// RunDir holds replica RAM files, QMP sockets and consoles (default
	// /dev/shm/remusd-<name of this host>-standby).
	RunDir string `json:"run_dir"`
	// Cold starts no hot standby: failover cold-starts QEMU on the replica.
	Cold bool `json:"cold"`
	// Binary is the QEMU binary (default qemu-system-x86_64).
	Binary string `json:"binary"`
}

var ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,15}$`)

func validIfName(s string) bool { return ifNameRE.MatchString(s) }

// validate returns one error per bad field, named with prefix f.
func (q QemuVM) validate(f string) []error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("config field %s.%s: %s", f, field, fmt.Sprintf(format, a...)))
	}
	if err := hypervisor.ValidateVMName(q.Name); err != nil {
		bad("name", "%v", err)
	}
	if q.Libvirt {
		return append(errs, q.validateLibvirt(f)...)
	}
	attach := q.QMP != "" || q.RAM != ""
	if attach {
		if q.QMP == "" {
			bad("qmp", "must be set with ram (attach to a running QEMU)")
		}
		if q.RAM == "" {
			bad("ram", "must be set with qmp (attach to a running QEMU)")
		} else if !filepath.IsAbs(q.RAM) {
			bad("ram", "%q must be absolute", q.RAM)
		}
		if q.MemoryMiB != 0 {
			bad("memory_mib", "must not be set when attaching (the RAM file's size is used)")
		}
	} else if q.MemoryMiB <= 0 || q.MemoryMiB > 1<<20 {
		bad("memory_mib", "%d out of range [1, 1048576]", q.MemoryMiB)
	}
	if q.CPUs < 0 || q.CPUs > 255 {
		bad("cpus", "%d out of range [0, 255] (0 means 1)", q.CPUs)
	}
	if q.UseGuestImage {
		if !attach && q.MemoryMiB > 0 && q.MemoryMiB < guestimage.MinMemoryMiB {
			bad("memory_mib", "%d: the guest image needs at least %d", q.MemoryMiB, guestimage.MinMemoryMiB)
		}
		for field, v := range map[string]string{"kernel": q.Kernel, "initrd": q.Initrd, "append": q.Append} {
			if v != "" {
				bad(field, "must not be set with use_guestimage (the image provides it)")
			}
		}
		if q.GuestIP != "" {
			if _, _, err := net.ParseCIDR(q.GuestIP); err != nil {
				bad("guest_ip", "%q is not an address with prefix length (e.g. 10.77.0.10/24)", q.GuestIP)
			}
		}
		if q.GuestGateway != "" && net.ParseIP(q.GuestGateway) == nil {
			bad("guest_gateway", "%q is not an IP address", q.GuestGateway)
		}
		if q.GuestPort < 0 || q.GuestPort > 65535 {
			bad("guest_port", "%d out of range [0, 65535]", q.GuestPort)
		}
	} else {
		for field, v := range map[string]string{"guest_ip": q.GuestIP, "guest_gateway": q.GuestGateway} {
			if v != "" {
				bad(field, "only valid with use_guestimage")
			}
		}
		if q.GuestPort != 0 {
			bad("guest_port", "only valid with use_guestimage")
		}
		if q.Kernel == "" && (q.Initrd != "" || q.Append != "") {
			bad("kernel", "must be set with initrd or append")
		}
		for field, v := range map[string]string{"kernel": q.Kernel, "initrd": q.Initrd} {
			if v != "" && !filepath.IsAbs(v) {
				bad(field, "%q must be absolute", v)
			}
		}
	}
	if q.Tap != "" && !validIfName(q.Tap) {
		bad("tap", "%q is not a valid interface name (1-15 characters)", q.Tap)
	}
	if q.Tap != "" && q.MAC == "" {
		bad("mac", "must be set with tap (the standby needs the same MAC)")
	}
	if q.MAC != "" {
		if hw, err := net.ParseMAC(q.MAC); err != nil || len(hw) != 6 || hw[0]&1 != 0 {
			bad("mac", "%q is not a unicast 48-bit MAC address", q.MAC)
		}
		if q.Tap == "" {
			bad("tap", "must be set with mac")
		}
	}
	if q.Bridge != "" {
		if !validIfName(q.Bridge) {
			bad("bridge", "%q is not a valid interface name", q.Bridge)
		}
		if q.Tap == "" {
			bad("bridge", "needs tap")
		}
	}
	if q.Bridged && q.Tap == "" {
		bad("bridged", "needs tap")
	}
	if q.UseGuestImage && q.GuestIP != "" && q.Tap == "" {
		bad("guest_ip", "needs tap (the guest has no NIC without it)")
	}
	if q.RunDir != "" && !filepath.IsAbs(q.RunDir) {
		bad("run_dir", "%q must be absolute", q.RunDir)
	}
	if q.Binary != "" && strings.ContainsAny(q.Binary, "\n\x00") {
		bad("binary", "%q is not a path", q.Binary)
	}
	if len(q.Disks) > 0 && attach {
		bad("disks", "only for VMs this daemon launches (remusd must serve the disks to QEMU)")
	}
	for i, d := range q.Disks {
		if !filepath.IsAbs(d.Path) || strings.ContainsAny(d.Path, ",\n\x00") {
			bad(fmt.Sprintf("disks[%d].path", i), "%q must be an absolute path without ','", d.Path)
		}
		if d.SizeMiB <= 0 || d.SizeMiB > 16<<20 {
			bad(fmt.Sprintf("disks[%d].size_mib", i), "%d out of range [1, 16777216]", d.SizeMiB)
		}
	}
	if err := q.diskSpecsValid(); err != nil {
		bad("disks", "%v", err)
	}
	return errs
}

// diskSpecs are the launch descriptions of the VM's disks.
func (q QemuVM) diskSpecs() []qemu.DiskSpec {
	var out []qemu.DiskSpec
	for _, d := range q.Disks {
		out = append(out, qemu.DiskSpec{ID: d.ID, SizeBytes: d.SizeMiB << 20, Path: d.Path})
	}
	return out
}

// diskSpecsValid checks the disks as the backend will (ids, sizes).
func (q QemuVM) diskSpecsValid() error {
	return qemu.ValidateDisks(q.diskSpecs())
}

func (s StandbyConfig) validate(f string) []error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("config field %s.%s: %s", f, field, fmt.Sprintf(format, a...)))
	}
	if s.Tap != "" {
		if strings.Count(s.Tap, "%s") > 1 || strings.Count(s.Tap, "%") != strings.Count(s.Tap, "%s") {
			bad("tap", "%q: only one %%s (the VM name) is allowed", s.Tap)
		} else if !validIfName(strings.ReplaceAll(s.Tap, "%s", "x")) {
			bad("tap", "%q does not make a valid interface name", s.Tap)
		}
	}
	if s.Bridge != "" && !validIfName(s.Bridge) {
		bad("bridge", "%q is not a valid interface name", s.Bridge)
	}
	if s.RunDir != "" && !filepath.IsAbs(s.RunDir) {
		bad("run_dir", "%q must be absolute", s.RunDir)
	}
	return errs
}

// qemuNet is where a qemu VM's NIC meets the host network.
type qemuNet struct {
	tap     string
	bridge  string // attach the tap to this bridge ("" = none)
	bridged bool   // the tap is a bridge port
}

func (q QemuVM) runDir(host string) string {
	if q.RunDir != "" {
		return q.RunDir
	}
	return filepath.Join("/dev/shm", "remusd-"+host)
}

func (s StandbyConfig) runDir(host string) string {
	if s.RunDir != "" {
		return s.RunDir
	}
	return filepath.Join("/dev/shm", "remusd-"+host+"-standby")
}

// TapFor returns the standby tap name for a VM.
func (s StandbyConfig) TapFor(vm string) string {
	p := s.Tap
	if p == "" {
		p = "rs-%s"
	}
	return strings.ReplaceAll(p, "%s", vm)
}

// qemuSpec translates a configured VM into a launch spec (img fills in the
// kernel when use_guestimage is set).
func (q QemuVM) qemuSpec(host string, img *guestimage.Image) qemu.Spec {
	dir := q.runDir(host)
	s := qemu.Spec{
		Name: q.Name, MemoryMiB: q.MemoryMiB, CPUs: q.CPUs,
		Kernel: q.Kernel, Initrd: q.Initrd, Append: q.Append,
		MAC: strings.ToLower(q.MAC), ExtraArgs: q.ExtraArgs, Machine: q.Machine, Accel: q.Accel,
		Tap:        q.Tap,
		RAMPath:    filepath.Join(dir, q.Name+".ram"),
		QMPPath:    filepath.Join(dir, q.Name+".qmp"),
		SerialPath: filepath.Join(dir, q.Name+".serial"),
		Binary:     q.Binary,
	}
	s.Disks = q.diskSpecs()
	if img != nil {
		s.Kernel, s.Initrd = img.Kernel, img.Initrd
		s.Append = guestimage.Append(q.GuestIP, q.GuestGateway, q.GuestPort)
		if len(s.Disks) > 0 {
			s.Append = guestimage.WithDisk(s.Append, "/dev/vda")
		}
	}
	if q.QMP != "" {
		s.QMPPath, s.RAMPath = q.QMP, q.RAM
	}
	return s
}

// standbySpec is the backup's spec of a VM's hot standby: the machine
// from this host's own configuration of the VM (never from the wire), its
// files in the standby run dir, its NIC on the entry's tap (or the
// standby tap pattern).
func (d *Daemon) standbySpec(q QemuVM, img *guestimage.Image) qemu.Spec {
	s := d.cfg.Standby
	spec := q.qemuSpec(d.cfg.Name, img)
	dir := s.runDir(d.cfg.Name)
	spec.RAMPath = filepath.Join(dir, q.Name+".replica.ram")
	spec.QMPPath = filepath.Join(dir, q.Name+".qmp")
	spec.SerialPath = filepath.Join(dir, q.Name+".serial")
	if spec.Binary == "" {
		spec.Binary = s.Binary
	}
	if spec.MAC != "" && spec.Tap == "" {
		spec.Tap = s.TapFor(q.Name)
	}
	return spec
}

// standbyNet is where the standby's tap attaches.
func (d *Daemon) standbyNet(q QemuVM, spec qemu.Spec) qemuNet {
	if q.Tap != "" {
		return qemuNet{tap: spec.Tap, bridge: q.Bridge, bridged: q.Bridge != "" || q.Bridged}
	}
	return qemuNet{tap: spec.Tap, bridge: d.cfg.Standby.Bridge, bridged: d.cfg.Standby.Bridge != ""}
}

// startQemu launches (or attaches to) a configured VM.
func (d *Daemon) startQemu(ctx context.Context, q QemuVM) (*qemu.Guest, bool, error) {
	var img *guestimage.Image
	if q.UseGuestImage {
		var err error
		if img, err = guestimage.Build(ctx, guestimage.Config{}); err != nil {
			return nil, false, fmt.Errorf("guest image: %w", err)
		}
	}
	if q.Libvirt {
		return d.startLibvirt(ctx, q)
	}
	spec := q.qemuSpec(d.cfg.Name, img)
	log := d.log
	if q.QMP != "" {
		g, err := qemu.Attach(ctx, q.QMP, q.RAM, log)
		if err != nil {
			return nil, false, err
		}
		spec.MemoryMiB = g.Spec().MemoryMiB
		g.SetSpec(spec)
		return g, true, nil
	}
	if err := os.MkdirAll(filepath.Dir(spec.RAMPath), 0o700); err != nil {
		return nil, false, fmt.Errorf("run dir: %w", err)
	}
	_ = os.Remove(spec.SerialPath)
	g, err := qemu.LaunchWithDisks(ctx, spec, qemu.DiskOptions{JournalBytes: d.cfg.diskJournalBytes()}, log)
	if err != nil {
		return nil, false, err
	}
	if q.Tap != "" {
		if err := setupTap(ctx, q.Tap, q.Bridge); err != nil {
			g.Close()
			return nil, false, err
		}
	}
	return g, false, nil
}

// netlinkTimeout bounds each netlink request.
const netlinkTimeout = 5 * time.Second

// setupTap brings tap up and, if bridge is set, makes it a port of bridge.
func setupTap(ctx context.Context, tap, bridge string) error {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= 0 {
		return fmt.Errorf("tap %s: %w", tap, context.DeadlineExceeded)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("tap %s: netlink: %w", tap, err)
	}
	defer h.Close()
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		return fmt.Errorf("tap %s: netlink timeout: %w", tap, err)
	}
	link, err := h.LinkByName(tap)
	if err != nil {
		return fmt.Errorf("tap %s: %w", tap, err)
	}
	if bridge != "" {
		br, err := h.LinkByName(bridge)
		if err != nil {
			return fmt.Errorf("bridge %s for tap %s: %w", bridge, tap, err)
		}
		// A Linux bridge whose address was not set explicitly takes the
		// lowest address of its ports. A tap with a lower random address
		// would move the host's own address to the tap's when it joins,
		// and away again when the VM goes (a standby replaced, an
		// unprotect): peers keep sending to the vanished address until
		// their ARP entry expires, tens of seconds in which this host is
		// unreachable (measured: 34-56 s of failed reconnects). Give the
		// tap FE as its first byte, as libvirt does, so it is never the
		// lowest. (The guest's own MAC is QEMU's NIC, not the tap's.)
		if mac := link.Attrs().HardwareAddr; len(mac) == 6 && mac[0] != 0xfe {
			hi := slices.Clone(mac)
			hi[0] = 0xfe
			if err := h.LinkSetHardwareAddr(link, hi); err != nil {
				return fmt.Errorf("tap %s: set address %s: %w", tap, hi, err)
			}
		}
		if err := h.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("attach tap %s to bridge %s: %w", tap, bridge, err)
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("tap %s up: %w", tap, err)
	}
	return nil
}

// localQEMUVersion asks the QEMU binary its version, in the form QMP
// reports it ("qemu-7.2.22"), to refuse a mismatched primary before any
// standby is started.
func localQEMUVersion(ctx context.Context, binary string) (string, error) {
	if binary == "" {
		binary = qemu.DefaultBinary
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", binary, err)
	}
	m := regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`).FindStringSubmatch(string(out))
	if m == nil {
		return "", fmt.Errorf("%s --version: no version in %q", binary, strings.TrimSpace(string(out)))
	}
	return fmt.Sprintf("qemu-%s.%s.%s", m[1], m[2], m[3]), nil
}

// openQemuBuffer opens the output buffer on a qemu VM's tap, with NFQUEUE
// queue number queue. forceOne says the mechanism tracks a single closed
// epoch (plug). Runs without d.mu (it may take seconds).
func (d *Daemon) openQemuBuffer(ctx context.Context, v *vm, interval time.Duration, queue uint16, recorded string) (outbuf.Buffer, bool, error) {
	if v.qnet.tap == "" {
		// No tap to hold output on: only a guest without a network card
		// may be protected so (its output cannot reach a client).
		nics, err := d.guestNICs(ctx, v)
		if err != nil {
			return nil, false, fmt.Errorf("cannot tell whether the guest has a network card (so whether it has output to hold): %w", err)
		}
		if nics > 0 && d.cfg.OutputBuffer != OutputNoneUnsafe {
			return nil, false, fmt.Errorf("the guest has %d network card(s) but its configuration names no tap: its output could not be held; set tap (for libvirt, the domain's <target dev=.../>), or output_buffer %s to protect without output commit", nics, OutputNoneUnsafe)
		}
		if nics > 0 {
			d.log.Warn("protecting WITHOUT output commit (output_buffer none-unsafe): the guest's NIC has no tap configured", zap.String("vm", v.name))
		} else {
			d.log.Info("qemu VM has no network card: no network output to hold", zap.String("vm", v.name))
		}
		m := outbuf.NewMemory(0, nil)
		_ = m.ReleaseAll()
		return m, false, nil
	}
	kind, unsafe, err := chooseOutputBuffer(d.cfg.OutputBuffer, d.outbufProbe())
	if err != nil {
		return nil, false, err
	}
	switch recorded {
	case "", "memory":
	case kind:
	case "plug", "nfqueue", "none":
		// A resumed protection takes over what the previous daemon left
		// on the tap (its plug or its queue rules), which holds the
		// guest's output now; another mechanism would leave that in place
		// and cut the guest off.
		d.log.Warn("resuming with the output buffer the protection ran with, not the one the configuration now selects (unprotect and protect again to change it)",
			zap.String("vm", v.name), zap.String("recorded", recorded), zap.String("configured", kind))
		kind, unsafe = recorded, recorded == "none"
	default:
		return nil, false, fmt.Errorf("state record names output buffer %q, which this daemon does not know", printable(recorded))
	}
	if unsafe {
		d.log.Warn("output buffering disabled by configuration (none-unsafe)", zap.String("vm", v.name))
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	b, err := openNetBuffer(ctx, kind, netBufferSpec{Interface: v.qnet.tap, Bridged: v.qnet.bridged, QueueNum: queue,
		Epoch: interval, Ack: d.cfg.AckTimeout.D()}, d.log.With(zap.String("vm", v.name)))
	if err != nil {
		return nil, false, err
	}
	d.log.Info("output buffer on the VM's tap", zap.String("vm", v.name), zap.String("kind", kind), zap.String("tap", v.qnet.tap),
		zap.Bool("bridged", v.qnet.bridged), zap.Uint16("queue", queue))
	return b, kind == "plug", nil
}

// newQemuReplica creates the replica and hot standby of a primary's qemu
// VM from this host's configuration of it (local). The primary's
// description is only compared with it: a mismatch is refused with the
// differences named. Runs without d.mu.
func (d *Daemon) newQemuReplica(ctx context.Context, h *remuspb.Hello, identity string, local QemuVM) (*vm, error) {
	machine, err := qemu.ParseConfig(h.BackendConfig)
	if err != nil {
		return nil, fmt.Errorf("VM %s: bad qemu backend config: %w", h.VmName, err)
	}
	if machine.Name != h.VmName {
		return nil, fmt.Errorf("VM %s: backend config names VM %q", h.VmName, printable(machine.Name))
	}
	if uint64(machine.MemoryBytes()) != h.MemoryBytes {
		return nil, fmt.Errorf("VM %s: hello says %d bytes of memory, backend config %d", h.VmName, h.MemoryBytes, machine.MemoryBytes())
	}
	ctx, cancel := context.WithTimeout(ctx, qemuStartTimeout)
	defer cancel()
	ver, err := localQEMUVersion(ctx, d.cfg.Standby.Binary)
	if err != nil {
		return nil, fmt.Errorf("VM %s: local QEMU: %w", h.VmName, err)
	}
	if ver != h.BackendVersion {
		return nil, fmt.Errorf("VM %s: QEMU version mismatch: the primary runs %s, this backup (%s) has %s; a standby cannot load device state saved by another QEMU version: install the same QEMU on both hosts",
			h.VmName, printable(h.BackendVersion), d.cfg.Name, ver)
	}
	spec, err := d.localStandbySpec(ctx, local)
	if err != nil {
		return nil, fmt.Errorf("VM %s: %w", h.VmName, err)
	}
	if err := qemu.CheckCompatible(machine, spec); err != nil {
		return nil, fmt.Errorf("VM %s: the primary's machine differs from %s's configuration of it: %w", h.VmName, d.cfg.Name, err)
	}
	if err := os.MkdirAll(filepath.Dir(spec.RAMPath), 0o700); err != nil {
		return nil, fmt.Errorf("VM %s: standby run dir: %w", h.VmName, err)
	}
	_ = os.Remove(spec.SerialPath)
	opts := []qemu.ReplicaOption{qemu.WithDiskJournal(d.cfg.diskJournalBytes())}
	if d.cfg.Standby.Cold {
		opts = append(opts, qemu.WithoutStandby())
	}
	rep, err := d.newStandby(ctx, spec, d.log, opts...)
	if err != nil {
		return nil, fmt.Errorf("VM %s: replica: %w", h.VmName, err)
	}
	qn := d.standbyNet(local, spec)
	if spec.Tap != "" && !d.cfg.Standby.Cold {
		if err := setupTap(ctx, spec.Tap, qn.bridge); err != nil {
			rep.Close()
			return nil, fmt.Errorf("VM %s: standby: %w", h.VmName, err)
		}
	}
	v := &vm{name: h.VmName, backend: qemu.BackendName, role: RoleBackup, qreplica: rep, qnet: qn}
	d.attachBackup(v, rep, identity, ver,
		func(epoch uint64, _ []byte) auditRecord { return auditRecord{Event: "commit", Epoch: epoch} },
		func(epoch uint64, _, dev []byte) auditRecord {
			// No memory hash here: it would delay the takeover.
			return auditRecord{Event: "activate", Epoch: epoch, DeviceXXH: transport.PageHash(dev)}
		})
	d.log.Info("new qemu replica", zap.String("vm", h.VmName), zap.String("owner", identity), zap.Int("memory_mib", spec.MemoryMiB), zap.String("qemu", ver),
		zap.Bool("hot_standby", !d.cfg.Standby.Cold), zap.String("tap", spec.Tap), zap.String("bridge", qn.bridge))
	return v, nil
}

// localStandbySpec builds the standby's spec from this host's own entry
// for the VM: a launch description, or a libvirt domain defined on this
// host's libvirtd.
func (d *Daemon) localStandbySpec(ctx context.Context, q QemuVM) (qemu.Spec, error) {
	if q.Libvirt {
		return d.libvirtStandbySpec(ctx, q)
	}
	var img *guestimage.Image
	if q.UseGuestImage {
		var err error
		if img, err = guestimage.Build(ctx, guestimage.Config{}); err != nil {
			return qemu.Spec{}, fmt.Errorf("guest image: %w", err)
		}
	}
	if q.QMP != "" {
		return qemu.Spec{}, fmt.Errorf("its entry attaches to a QEMU launched by someone else (qmp, ram): describe the machine (memory_mib, kernel, ...) for this host to start a standby")
	}
	return d.standbySpec(q, img), nil
}

// guestNICs counts the guest's network cards (PCI class 0x0200, Ethernet
// controller) through QMP query-pci.
func (d *Daemon) guestNICs(ctx context.Context, v *vm) (int, error) {
	d.mu.Lock()
	g := v.guest
	xnics := v.xnet.nics
	d.mu.Unlock()
	if _, ok := g.(*xen.Guest); ok {
		return xnics, nil
	}
	qg, ok := g.(*qemu.Guest)
	if !ok {
		return 0, fmt.Errorf("not a QEMU guest")
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var buses []pciBus
	if err := qg.Monitor().Execute(ctx, "query-pci", nil, &buses); err != nil {
		return 0, fmt.Errorf("query-pci: %w", err)
	}
	n := 0
	var walk func(devs []pciDevice)
	walk = func(devs []pciDevice) {
		for _, dv := range devs {
			if dv.ClassInfo.Class == 0x0200 {
				n++
			}
			if dv.PCIBridge != nil {
				walk(dv.PCIBridge.Devices)
			}
		}
	}
	for _, b := range buses {
		walk(b.Devices)
	}
	return n, nil
}

type pciBus struct {
	Devices []pciDevice `json:"devices"`
}

type pciDevice struct {
	ClassInfo struct {
		Class int `json:"class"`
	} `json:"class_info"`
	PCIBridge *struct {
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}
