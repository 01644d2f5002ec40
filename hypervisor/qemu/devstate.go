package qemu

import (
	"encoding/binary"
	"fmt"
)

// maxDeviceState bounds a device-state blob (QEMU's is ~80 KB for a small
// q35 guest).
const maxDeviceState = 16 << 20

const (
	qemuVMFileMagic   = 0x5145564d // "QEVM"
	qemuVMFileVersion = 3
)

// checkDeviceState verifies that b looks like a QEMU migration stream
// header (as xen-save-devices-state writes it) of a sane size. It does not
// prove the state fits a given RAM image: see Replica.CommitDeviceState.
func checkDeviceState(b []byte) error {
	if len(b) < 8 {
		return fmt.Errorf("device state of %d bytes is too short", len(b))
	}
	if len(b) > maxDeviceState {
		return fmt.Errorf("device state of %d bytes exceeds the %d limit", len(b), maxDeviceState)
	}
	if m := binary.BigEndian.Uint32(b); m != qemuVMFileMagic {
		return fmt.Errorf("device state has magic %#x, want %#x (QEVM)", m, qemuVMFileMagic)
	}
	if v := binary.BigEndian.Uint32(b[4:]); v != qemuVMFileVersion {
		return fmt.Errorf("device state has stream version %d, want %d", v, qemuVMFileVersion)
	}
	return nil
}
