package qemu

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
)

// Spec describes a VM to launch. Machine fields (everything except the
// host-local paths and the tap name) must be equal on primary and standby;
// Config carries them to the backup.
type Spec struct {
	// Name is the VM's name.
	Name string `json:"name"`
	// MemoryMiB is the guest RAM size (-m and the memory backend size).
	MemoryMiB int `json:"memory_mib"`
	// CPUs is the number of vCPUs (default 1).
	CPUs int `json:"cpus,omitempty"`
	// Kernel, Initrd and Append boot a kernel directly (optional; without
	// a kernel the guest runs only its BIOS).
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Append string `json:"append,omitempty"`
	// MAC is the NIC's MAC address (with Tap; must be equal on both hosts
	// so the network keeps reaching the guest after failover).
	MAC string `json:"mac,omitempty"`
	// ExtraArgs are appended to the QEMU command line (machine devices:
	// they are part of the configuration and passed to the standby too).
	ExtraArgs []string `json:"extra_args,omitempty"`

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

// maxMemoryMiB bounds MemoryMiB (1 TiB).
const maxMemoryMiB = 1 << 20

// Validate checks the spec; errors name the offending field.
func (s Spec) Validate() error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("qemu: spec %s: %s", field, fmt.Sprintf(format, a...)))
	}
	if s.Name == "" {
		bad("Name", "empty")
	} else if strings.ContainsAny(s.Name, ",/\x00\n") {
		bad("Name", "%q contains ',', '/' or control characters", s.Name)
	}
	if s.MemoryMiB <= 0 || s.MemoryMiB > maxMemoryMiB {
		bad("MemoryMiB", "%d not in [1, %d]", s.MemoryMiB, maxMemoryMiB)
	}
	if s.CPUs < 0 || s.CPUs > 255 {
		bad("CPUs", "%d not in [0, 255] (0 means 1)", s.CPUs)
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
	if s.Tap != "" {
		if len(s.Tap) > 15 || strings.ContainsAny(s.Tap, ", /\x00") {
			bad("Tap", "%q is not a valid interface name", s.Tap)
		}
		if s.MAC == "" {
			bad("MAC", "empty but Tap set (both hosts need the same MAC)")
		}
	}
	if s.MAC != "" {
		if hw, err := net.ParseMAC(s.MAC); err != nil || len(hw) != 6 {
			bad("MAC", "%q is not a 48-bit MAC address", s.MAC)
		} else if hw[0]&1 != 0 {
			bad("MAC", "%q is a multicast address", s.MAC)
		}
		if s.Tap == "" {
			bad("Tap", "empty but MAC set")
		}
	}
	for i, a := range s.ExtraArgs {
		switch a {
		case "-incoming", "-qmp", "-machine", "-M", "-m", "-object", "-accel", "-daemonize":
			bad(fmt.Sprintf("ExtraArgs[%d]", i), "%q is set by the backend", a)
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
		"-accel", "tcg",
		"-machine", "q35,memory-backend=ram0",
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
	a = append(a, s.ExtraArgs...)
	if incoming {
		// xen-save-devices-state writes no configuration section.
		a = append(a, "-incoming", "defer", "-global", "migration.send-configuration=off")
	}
	return a
}

// Config is the machine part of the spec as JSON: what a backup needs to
// build a matching standby (see ParseConfig).
func (s Spec) Config() []byte {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err) // plain struct: cannot fail
	}
	return b
}

// ParseConfig decodes Config output into a Spec whose host-local fields
// (RAMPath, QMPPath, Tap, SerialPath, LogPath, Binary) are empty for the caller to
// fill in.
func ParseConfig(b []byte) (Spec, error) {
	var s Spec
	d := json.NewDecoder(strings.NewReader(string(b)))
	d.DisallowUnknownFields()
	if err := d.Decode(&s); err != nil {
		return Spec{}, fmt.Errorf("qemu: parse config: %w", err)
	}
	return s, nil
}
