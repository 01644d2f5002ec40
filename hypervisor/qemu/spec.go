package qemu

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/remusd/remusd/hypervisor"
)

// Spec describes a VM to launch.
//
// Machine fields (Name, MemoryMiB, CPUs, MAC, Machine, Accel, ExtraArgs)
// decide QEMU's device model: a standby loads the primary's device state
// only if they are equal on both hosts (CheckCompatible). Kernel, Initrd
// and Append are the host's own boot files and the remaining fields are
// host-local; Config carries the machine fields (and, for older backups,
// the boot files) to the backup.
//
// Trust policy. A Spec given to Launch or NewReplica comes from this
// host's own configuration (a root-owned file, or libvirt's definition on
// this host): it is trusted, and Validate only refuses what would break
// the backend (options it sets itself, malformed values). A machine
// description received from a peer (ParseConfig) is data: it is checked
// against the local Spec with CheckCompatible and never becomes a QEMU
// argument or a path.
type Spec struct {
	// Name is the VM's name (hypervisor.ValidateVMName).
	Name string `json:"name"`
	// MemoryMiB is the guest RAM size (-m and the memory backend size).
	MemoryMiB int `json:"memory_mib"`
	// CPUs is the number of vCPUs (default 1).
	CPUs int `json:"cpus,omitempty"`
	// Kernel, Initrd and Append boot a kernel directly (optional; without
	// a kernel the guest runs only its BIOS). They are this host's files:
	// a backup's standby gets the backup's own (what the guest boots if it
	// resets after a failover); an activated standby resumes the guest
	// from its checkpoint and does not boot them.
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
	// MAC is the NIC's MAC address (with Tap; must be equal on both hosts
	// so the network keeps reaching the guest after failover).
	MAC string `json:"mac,omitempty"`
	// Machine is the QEMU machine type: "q35" (the default, QEMU's alias
	// of its newest pc-q35-X.Y) or a versioned "pc-q35-X.Y" (libvirt
	// domains name one).
	Machine string `json:"machine,omitempty"`
	// Accel is the accelerator: "tcg" (the default) or "kvm".
	Accel string `json:"accel,omitempty"`
	// ExtraArgs are appended to the QEMU command line: machine devices,
	// part of the device layout, so the backup's own configuration of the
	// VM must list the same ones (CheckCompatible).
	ExtraArgs []string `json:"extra_args,omitempty"`
	// Disks are the guest's protected virtio-blk disks, served by remusd
	// over NBD (see DiskSpec): their IDs and sizes are machine fields,
	// their paths host-local.
	Disks []DiskSpec `json:"disks,omitempty"`

	// Host-local fields (not in Config).

	// Tap is the host tap device for the NIC (optional: no NIC without it).
	Tap string `json:"-"`
	// RAMPath is the guest RAM file (put it on tmpfs, e.g. /dev/shm). It
	// is created (or resized) to MemoryMiB.
	RAMPath string `json:"-"`
	// QMPPath is the QMP unix socket QEMU listens on.
	QMPPath string `json:"-"`
	// SerialPath receives the serial console (optional: discarded).
	SerialPath string `json:"-"`
	// LogPath receives QEMU's stdout and stderr, appended (optional:
	// NAME.qemu.log beside QMPPath; see LogFile). A file, not a pipe, so
	// that QEMU outlives the remusd that started it.
	LogPath string `json:"-"`
	// Binary is the QEMU binary (default qemu-system-x86_64).
	Binary string `json:"-"`
}

// DefaultBinary is the QEMU binary Launch runs when Spec.Binary is empty.
const DefaultBinary = "qemu-system-x86_64"

// DefaultMachine and DefaultAccel are what an empty Spec.Machine and
// Spec.Accel mean.
const (
	DefaultMachine = "q35"
	DefaultAccel   = "tcg"
)

// Limits on the machine fields (also on a peer's description).
const (
	maxMemoryMiB     = 1 << 20 // 1 TiB
	maxCPUs          = 255
	maxExtraArgs     = 256
	maxExtraArgBytes = 4096
	// maxConfigBytes bounds the JSON ParseConfig accepts.
	maxConfigBytes = 64 << 10
)

// machineRE is the machine types the backend launches (the standby's
// device model is q35's: see hypervisor/libvirt StandbyProblems).
var machineRE = regexp.MustCompile(`^(q35|pc-q35-[0-9]{1,3}\.[0-9]{1,3})$`)

// backendOptions are QEMU options the backend sets itself (or that would
// override them: -readconfig can set any of them); ExtraArgs must not
// hold them. The Spec's own fields (-name, -smp, -kernel, ...) are set
// through those fields, so CheckCompatible sees them.
var backendOptions = map[string]bool{
	"-incoming": true, "-qmp": true, "-qmp-pretty": true, "-machine": true, "-M": true, "-m": true,
	"-object": true, "-accel": true, "-enable-kvm": true, "-daemonize": true, "-name": true, "-smp": true,
	"-kernel": true, "-initrd": true, "-append": true, "-nodefaults": true, "-readconfig": true,
}

// ValidateMachine checks the machine fields (those Config sends); errors
// name the field. ParseConfig applies it to a peer's description.
func (s Spec) ValidateMachine() error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("qemu: spec %s: %s", field, fmt.Sprintf(format, a...)))
	}
	if err := hypervisor.ValidateVMName(s.Name); err != nil {
		bad("Name", "%v", err)
	}
	if s.MemoryMiB <= 0 || s.MemoryMiB > maxMemoryMiB {
		bad("MemoryMiB", "%d not in [1, %d]", s.MemoryMiB, maxMemoryMiB)
	}
	if s.CPUs < 0 || s.CPUs > maxCPUs {
		bad("CPUs", "%d not in [0, %d] (0 means 1)", s.CPUs, maxCPUs)
	}
	if s.MAC != "" {
		if hw, err := net.ParseMAC(s.MAC); err != nil || len(hw) != 6 {
			bad("MAC", "%q is not a 48-bit MAC address", s.MAC)
		} else if hw[0]&1 != 0 {
			bad("MAC", "%q is a multicast address", s.MAC)
		}
	}
	if s.Machine != "" && !machineRE.MatchString(s.Machine) {
		bad("Machine", "%q is not supported (want q35 or pc-q35-X.Y)", s.Machine)
	}
	if s.Accel != "" && s.Accel != "tcg" && s.Accel != "kvm" {
		bad("Accel", "%q is not supported (want tcg or kvm)", s.Accel)
	}
	if len(s.ExtraArgs) > maxExtraArgs {
		bad("ExtraArgs", "%d arguments, at most %d", len(s.ExtraArgs), maxExtraArgs)
	}
	errs = append(errs, validateDisks(s.Disks)...)
	for i, a := range s.ExtraArgs {
		if len(a) > maxExtraArgBytes {
			bad(fmt.Sprintf("ExtraArgs[%d]", i), "%d bytes, at most %d", len(a), maxExtraArgBytes)
		} else if !utf8.ValidString(a) || strings.ContainsRune(a, 0) {
			bad(fmt.Sprintf("ExtraArgs[%d]", i), "%q is not valid UTF-8 or holds NUL", a)
		}
	}
	return errors.Join(errs...)
}

// Validate checks a spec to launch (machine fields and host-local ones);
// errors name the offending field. The spec is trusted local
// configuration (see Spec): Validate refuses what would break the
// backend, not what root may choose to attach.
func (s Spec) Validate() error {
	var errs []error
	if err := s.ValidateMachine(); err != nil {
		errs = append(errs, err)
	}
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("qemu: spec %s: %s", field, fmt.Sprintf(format, a...)))
	}
	if s.Kernel == "" && (s.Initrd != "" || s.Append != "") {
		bad("Kernel", "empty but Initrd or Append set")
	}
	for field, p := range map[string]string{"Kernel": s.Kernel, "Initrd": s.Initrd, "RAMPath": s.RAMPath, "QMPPath": s.QMPPath, "SerialPath": s.SerialPath} {
		if strings.Contains(p, ",") {
			bad(field, "%q contains ',' (QEMU option syntax)", p)
		}
	}
	if s.RAMPath == "" {
		bad("RAMPath", "empty")
	} else if !filepath.IsAbs(s.RAMPath) {
		bad("RAMPath", "%q is not absolute", s.RAMPath)
	}
	if s.QMPPath == "" {
		bad("QMPPath", "empty")
	} else if len(s.QMPPath) > 107 {
		bad("QMPPath", "%q longer than a unix socket path may be (107)", s.QMPPath)
	}
	errs = append(errs, validateDiskPaths(s.Disks, s.QMPPath)...)
	if s.Tap != "" {
		if len(s.Tap) > 15 || strings.ContainsAny(s.Tap, ", /\x00") {
			bad("Tap", "%q is not a valid interface name", s.Tap)
		}
		if s.MAC == "" {
			bad("MAC", "empty but Tap set (both hosts need the same MAC)")
		}
	}
	if s.MAC != "" && s.Tap == "" {
		bad("Tap", "empty but MAC set")
	}
	for i, a := range s.ExtraArgs {
		// QEMU accepts --opt for -opt.
		if opt := "-" + strings.TrimLeft(a, "-"); strings.HasPrefix(a, "-") && backendOptions[opt] {
			bad(fmt.Sprintf("ExtraArgs[%d]", i), "%q is set by the backend (or through a Spec field)", a)
		}
	}
	return errors.Join(errs...)
}

// LogFile is where QEMU's stdout and stderr go: LogPath, or NAME.qemu.log
// in QMPPath's directory.
func (s Spec) LogFile() string {
	if s.LogPath != "" {
		return s.LogPath
	}
	return filepath.Join(filepath.Dir(s.QMPPath), s.Name+".qemu.log")
}

func (s Spec) cpus() int { return max(s.CPUs, 1) }

func (s Spec) machine() string {
	if s.Machine == "" {
		return DefaultMachine
	}
	return s.Machine
}

func (s Spec) accel() string {
	if s.Accel == "" {
		return DefaultAccel
	}
	return s.Accel
}

func (s Spec) binary() string {
	if s.Binary == "" {
		return DefaultBinary
	}
	return s.Binary
}

// MemoryBytes is the guest RAM size in bytes.
func (s Spec) MemoryBytes() int64 { return int64(s.MemoryMiB) << 20 }

// Args is the QEMU command line (without the binary). incoming adds
// -incoming defer and the settings a device-state-only stream needs.
func (s Spec) Args(incoming bool) []string {
	mem := strconv.Itoa(s.MemoryMiB) + "M"
	a := []string{
		"-name", s.Name,
		"-accel", s.accel(),
		"-machine", s.machine() + ",memory-backend=ram0",
		"-m", mem,
		"-object", "memory-backend-file,id=ram0,size=" + mem + ",mem-path=" + s.RAMPath + ",share=on",
		"-smp", strconv.Itoa(s.cpus()),
		"-nodefaults",
		"-nographic",
		"-qmp", "unix:" + s.QMPPath + ",server=on,wait=off",
	}
	if s.SerialPath != "" {
		a = append(a, "-serial", "file:"+s.SerialPath)
	} else {
		a = append(a, "-serial", "null")
	}
	if s.Kernel != "" {
		a = append(a, "-kernel", s.Kernel)
		if s.Initrd != "" {
			a = append(a, "-initrd", s.Initrd)
		}
		if s.Append != "" {
			a = append(a, "-append", s.Append)
		}
	}
	if s.Tap != "" {
		a = append(a,
			"-netdev", "tap,id=n0,ifname="+s.Tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=n0,mac="+s.MAC)
	}
	a = append(a, s.diskArgs()...)
	a = append(a, s.ExtraArgs...)
	if incoming {
		// xen-save-devices-state writes no configuration section.
		a = append(a, "-incoming", "defer", "-global", "migration.send-configuration=off")
	}
	return a
}

// Config is the machine part of the spec as JSON, for the handshake: the
// backup checks it against its own configuration of the VM (ParseConfig,
// CheckCompatible). It also carries Kernel, Initrd and Append, which
// backups before the standby was built from local configuration used;
// ParseConfig drops them.
func (s Spec) Config() []byte {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err) // plain struct: cannot fail
	}
	return b
}

// ParseConfig strictly decodes a peer's Config output: unknown fields,
// trailing data, more than 64 KiB and every value ValidateMachine refuses
// (name, memory and vCPU bounds, MAC syntax, machine type and accelerator
// outside the allowlist, oversized ExtraArgs) are errors.
//
// The result is a description to compare, not a spec to run: pass it to
// CheckCompatible against this host's own Spec of the VM and never to
// Launch, NewReplica or Args (its ExtraArgs are data for that comparison;
// QEMU options from a peer would let it attach any host file or device to
// a QEMU running as root). The host-local fields (RAMPath, QMPPath, Tap,
// SerialPath, Binary) and the boot files (Kernel, Initrd, Append: paths
// on the peer's host, and LogPath) are empty.
func ParseConfig(b []byte) (Spec, error) {
	if len(b) > maxConfigBytes {
		return Spec{}, fmt.Errorf("qemu: parse config: %d bytes, at most %d", len(b), maxConfigBytes)
	}
	var s Spec
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&s); err != nil {
		return Spec{}, fmt.Errorf("qemu: parse config: %w", err)
	}
	if _, err := d.Token(); err != io.EOF {
		return Spec{}, errors.New("qemu: parse config: data after the JSON object")
	}
	if err := s.ValidateMachine(); err != nil {
		return Spec{}, fmt.Errorf("qemu: parse config: %w", err)
	}
	s.Kernel, s.Initrd, s.Append = "", "", ""
	return s, nil
}
