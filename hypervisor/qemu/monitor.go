package qemu

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor"
)

// Monitor is a QMP command channel to one QEMU: *QMP (its socket) or
// another transport, e.g. libvirt's monitor passthrough
// (hypervisor/libvirt). Execute sends cmd with args (nil = none) and
// decodes the "return" value into out (nil = discard); it must bound the
// call by ctx's deadline or a default one and report QEMU's own errors as
// *CommandError.
type Monitor interface {
	Execute(ctx context.Context, cmd string, args any, out any) error
	// Done is closed when the monitor is gone (QEMU exited, connection
	// lost, or Close).
	Done() <-chan struct{}
	// Close releases the monitor (QEMU keeps running).
	Close() error
}

var _ Monitor = (*QMP)(nil)

// monitorVersion asks QEMU for its version (query-version).
func monitorVersion(ctx context.Context, m Monitor) (Version, error) {
	var v qmpVersion
	if err := m.Execute(ctx, "query-version", nil, &v); err != nil {
		return Version{}, err
	}
	return v.version(), nil
}

// monitorStatus returns the VM run state (query-status).
func monitorStatus(ctx context.Context, m Monitor) (Status, error) {
	var s Status
	err := m.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// MonitorGuestOptions configure NewMonitorGuest.
type MonitorGuestOptions struct {
	// Spec is the machine description Config reports (the standby is built
	// from it). Name, RAMPath and MemoryMiB are filled in when empty.
	Spec Spec
	// StateDir is where QEMU writes the saved device state (it must be
	// writable by the QEMU process). Default: a private directory next to
	// the RAM file. NewMonitorGuest does not remove a given StateDir.
	StateDir string
	// Disks is the block seam of a QEMU someone else launched (nil: the
	// guest has no protected disks): hypervisor/libvirt builds it live over
	// QMP. The guest reports its disks (Disks), checks it at every harvest
	// and closes it with the guest.
	Disks DiskSeam
	Log   *zap.Logger
}

// DiskSeam is the protected disks of a guest whose block seam was built
// by someone other than Launch (e.g. a write-blocking mirror to remusd's
// NBD server, set up over QMP on a running QEMU).
type DiskSeam interface {
	// Disks are the protected disks (hypervisor.DiskGuest).
	Disks() []hypervisor.Disk
	// Check is called by HarvestDirty, i.e. once per checkpoint while the
	// guest is paused (its I/O drained). An error means some completed
	// write may not have reached a Journal: the harvest fails with it, and
	// the engine resumes the guest and fails the epoch.
	Check(ctx context.Context) error
	// Close stops the seam with the guest: stop says QEMU is quit (Close),
	// else it keeps running (Detach) and the seam must leave it able to
	// do I/O, for the next daemon to take the seam over.
	Close(stop bool) error
}

// NewMonitorGuest builds a Guest for a QEMU someone else launched, driven
// through m, whose RAM is the file ramPath (memory-backend-file,share=on),
// mapped read-only here. The guest owns m: Detach and Close close it
// (Close also sends quit). name is the VM name.
func NewMonitorGuest(ctx context.Context, m Monitor, name, ramPath string, opts MonitorGuestOptions) (*Guest, error) {
	ram, err := mapRAM(ramPath, 0, false)
	if err != nil {
		return nil, err
	}
	spec := opts.Spec
	if spec.Name == "" {
		spec.Name = name
	}
	spec.RAMPath = ramPath
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = int(int64(len(ram.mem)) >> 20)
	}
	if int64(spec.MemoryMiB)<<20 != int64(len(ram.mem)) {
		ram.unmap()
		return nil, fmt.Errorf("qemu: guest %q: spec says %d MiB, RAM file %s holds %d bytes", name, spec.MemoryMiB, ramPath, len(ram.mem))
	}
	g, err := newGuestMonitor(ctx, spec, m, nil, ram, nil, opts.StateDir, opts.Log)
	if err != nil {
		ram.unmap()
		return nil, err
	}
	g.seam = opts.Disks
	return g, nil
}

// stateDirFor makes the private device-state directory of a guest.
func stateDirFor(spec Spec) (string, bool, error) {
	dir, err := os.MkdirTemp(dirOf(spec.RAMPath), "."+spec.Name+"-state-")
	if err != nil {
		dir, err = os.MkdirTemp("", "remusd-qemu-state-")
		if err != nil {
			return "", false, fmt.Errorf("qemu: state dir: %w", err)
		}
	}
	return dir, true, nil
}

func dirOf(path string) string { return filepath.Dir(path) }
