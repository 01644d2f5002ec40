package qemu

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
)

// ErrIncompatible matches an *IncompatibleError.
var ErrIncompatible = errors.New("machine descriptions differ")

// Mismatch is one machine field on which the primary's description and
// the backup's own configuration differ (values as the error prints them).
type Mismatch struct {
	Field   string // the Config (JSON) field name, e.g. "memory_mib"
	Primary string
	Local   string
}

func (m Mismatch) String() string {
	return fmt.Sprintf("%s: primary %s, this backup %s", m.Field, m.Primary, m.Local)
}

// IncompatibleError lists every machine field on which a primary and this
// backup differ. It matches ErrIncompatible.
type IncompatibleError struct {
	VM         string
	Mismatches []Mismatch
}

func (e *IncompatibleError) Error() string {
	parts := make([]string, len(e.Mismatches))
	for i, m := range e.Mismatches {
		parts[i] = m.String()
	}
	return fmt.Sprintf("qemu: VM %q: the primary's machine differs from this backup's configuration of it (a standby built from it could not load the primary's device state): %s",
		e.VM, strings.Join(parts, "; "))
}

// Is makes errors.Is(err, ErrIncompatible) true.
func (e *IncompatibleError) Is(target error) bool { return target == ErrIncompatible }

// CheckCompatible compares the primary's machine description (ParseConfig
// of its handshake) with local, this backup's own Spec of the VM, on every
// field QEMU's device model (and so a device-state load) depends on: name,
// memory size, vCPUs, NIC present or not and its MAC, machine type,
// accelerator, the disks (IDs and sizes) and ExtraArgs (the same list in the same order: they come
// from each host's own configuration). Defaults are resolved first (0
// vCPUs = 1, "" machine = "q35", "" accelerator = "tcg", MACs compared as
// addresses), but the alias "q35" is not equated with a versioned
// "pc-q35-X.Y": configure the same machine type on both hosts.
//
// Not compared: Kernel, Initrd and Append (each host boots its own files;
// the standby resumes from a checkpoint, and boots the backup's kernel
// only when the guest resets after a failover) and the host-local fields.
// The QEMU version is not in a Spec: the caller compares it (a device
// state loads only into the same QEMU version).
//
// nil means compatible; otherwise an *IncompatibleError names every
// difference with both values, e.g. "memory_mib: primary 256, this backup
// 128".
func CheckCompatible(primary, local Spec) error {
	var ms []Mismatch
	diff := func(field, p, l string) {
		if p != l {
			ms = append(ms, Mismatch{Field: field, Primary: p, Local: l})
		}
	}
	diff("name", strconv.Quote(primary.Name), strconv.Quote(local.Name))
	diff("memory_mib", strconv.Itoa(primary.MemoryMiB), strconv.Itoa(local.MemoryMiB))
	diff("cpus", strconv.Itoa(primary.cpus()), strconv.Itoa(local.cpus()))
	diff("mac", macString(primary.MAC), macString(local.MAC))
	diff("machine", strconv.Quote(primary.machine()), strconv.Quote(local.machine()))
	diff("accel", strconv.Quote(primary.accel()), strconv.Quote(local.accel()))
	if p, l, same := diskDiff(primary.Disks, local.Disks); !same {
		ms = append(ms, Mismatch{Field: "disks", Primary: p, Local: l})
	}
	if !slices.Equal(primary.ExtraArgs, local.ExtraArgs) {
		ms = append(ms, Mismatch{Field: "extra_args", Primary: argsString(primary.ExtraArgs), Local: argsString(local.ExtraArgs)})
	}
	if len(ms) == 0 {
		return nil
	}
	return &IncompatibleError{VM: local.Name, Mismatches: ms}
}

// macString is a MAC in canonical form, "none (no NIC)" for none, or the
// quoted text when it does not parse.
func macString(mac string) string {
	if mac == "" {
		return "none (no NIC)"
	}
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return strconv.Quote(mac)
	}
	return hw.String()
}

func argsString(a []string) string {
	if len(a) == 0 {
		return "none"
	}
	return fmt.Sprintf("%q", a)
}
