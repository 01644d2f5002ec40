package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/hypervisor"
)

// Replica is the backup's copy of a QEMU guest: a RAM file (mapped
// read-write; the engine writes verified epochs into Memory) and, unless
// disabled, a hot standby QEMU started with the same machine configuration
// plus -incoming defer on that same file. The standby does not run guest
// code, and device state restores onto whatever the RAM file holds at
// activation, so the standby may start before any epoch is written.
//
// Epoch/state pairing: the engine calls CommitDeviceState and writes that
// epoch's pages under one lock, and Activate only after that lock is
// released with the replica marked activated, so the state Activate loads
// always belongs to the RAM in the file. The replica itself guarantees that
// a state it refuses (not a QEMU stream, too large, a closed or activated
// replica) never replaces the committed one, that the (epoch, state) pair
// is swapped atomically, and that nothing is committed after Activate
// began. Loading a state onto RAM of a different epoch would fail in QEMU
// ("VQ 0 size ... < last_avail_idx") and kill the standby.
type Replica struct {
	spec    Spec
	base    *zap.Logger // for the QEMU processes the replica starts
	log     *zap.Logger
	ram     *ramFile
	standby *Guest   // nil: cold start on Activate
	disks   *diskSet // replica images served to the standby (nil after activation)

	mu        sync.Mutex
	epoch     uint64
	state     []byte // nil until the first commit
	activated bool
	closed    bool
	lastAct   ActivationInfo
}

// ReplicaOption configures NewReplica.
type ReplicaOption func(*replicaOptions)

type replicaOptions struct {
	noStandby   bool
	diskJournal int64
}

// WithDiskJournal bounds the journal of each disk of the activated guest
// (see DiskOptions.JournalBytes).
func WithDiskJournal(bytes int64) ReplicaOption {
	return func(o *replicaOptions) { o.diskJournal = bytes }
}

// WithoutStandby makes the replica start no standby: Activate cold-starts
// QEMU on the replica RAM file.
func WithoutStandby() ReplicaOption { return func(o *replicaOptions) { o.noStandby = true } }

// ActivationInfo describes the last Activate.
type ActivationInfo struct {
	Epoch    uint64
	Cold     bool          // a fresh QEMU was started (no live standby)
	Probe    time.Duration // checking the hot standby is alive
	Start    time.Duration // starting QEMU (cold start only)
	Incoming time.Duration // getfd + migrate-incoming until running
	Announce time.Duration // announce-self
	Total    time.Duration
}

// NewReplica creates the replica RAM file at spec.RAMPath (zeroed,
// spec.MemoryMiB, pre-faulted), maps it read-write and starts the hot
// standby QEMU on it. log may be nil.
func NewReplica(ctx context.Context, spec Spec, log *zap.Logger, opts ...ReplicaOption) (*Replica, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	var o replicaOptions
	for _, f := range opts {
		f(&o)
	}
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := withStartTimeout(ctx)
	defer cancel()
	if err := createRAM(spec.RAMPath, spec.MemoryBytes(), true); err != nil {
		return nil, err
	}
	// The replica disks are served before the standby starts: its NBD
	// client connects when QEMU opens the block nodes. The engine writes
	// committed epochs to the images directly; the standby reads them only
	// once activated.
	disks, err := startDisks(spec, DiskOptions{JournalBytes: o.diskJournal, Create: true}, log)
	if err != nil {
		os.Remove(spec.RAMPath)
		return nil, fmt.Errorf("qemu: replica %q: %w", spec.Name, err)
	}
	ram, err := mapRAM(spec.RAMPath, spec.MemoryBytes(), true)
	if err != nil {
		disks.close()
		os.Remove(spec.RAMPath)
		return nil, err
	}
	// Take the first-touch faults now, not during the first apply.
	for i := 0; i < len(ram.mem); i += pageSize {
		ram.mem[i] = 0
	}
	r := &Replica{
		spec:  spec,
		base:  log,
		log:   log.With(zap.String("vm", spec.Name), zap.String("backend", BackendName)),
		ram:   ram,
		disks: disks,
	}
	if !o.noStandby {
		start := time.Now()
		g, err := launch(ctx, spec, true, log)
		if err != nil {
			r.Close()
			return nil, fmt.Errorf("qemu: replica %q: start standby: %w", spec.Name, err)
		}
		r.standby = g
		r.log.Info("qemu standby started", zap.String("version", g.version), zap.Int("pid", g.Pid()), zap.Duration("took", time.Since(start)))
	}
	return r, nil
}

// ReplicaDisks returns the replica's disk images (hypervisor.DiskReplica).
func (r *Replica) ReplicaDisks() []hypervisor.ReplicaDisk { return r.disks.replicaDisks() }

// NumPages returns the number of guest pages.
func (r *Replica) NumPages() int { return len(r.ram.mem) / pageSize }

// Memory is the replica RAM (the shared mapping of the RAM file the standby
// uses). After Activate it belongs to the running guest.
func (r *Replica) Memory() []byte { return r.ram.mem }

// BackendVersion is the standby QEMU's version ("" without a standby).
func (r *Replica) BackendVersion() string {
	if r.standby == nil {
		return ""
	}
	return r.standby.version
}

// Standby returns the hot standby (nil if none was started). Its state is
// "inmigrate" until Activate.
func (r *Replica) Standby() *Guest { return r.standby }

// Committed returns the epoch of the committed device state (0 = none).
func (r *Replica) Committed() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.epoch
}

// LastActivation describes the last successful Activate.
func (r *Replica) LastActivation() ActivationInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lastAct
}

// CommitDeviceState records a copy of state as the device state of epoch,
// replacing the previous one. state must be a QEMU migration stream (QEVM
// header) within size limits; a refused state leaves the replica at its
// previous epoch.
func (r *Replica) CommitDeviceState(epoch uint64, state []byte) error {
	if err := checkDeviceState(state); err != nil {
		return fmt.Errorf("qemu: replica %q: commit epoch %d: %w", r.spec.Name, epoch, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.activated {
		return fmt.Errorf("qemu: replica %q: commit epoch %d: %s", r.spec.Name, epoch, r.doneReason())
	}
	r.state = append(r.state[:0], state...)
	r.epoch = epoch
	return nil
}

func (r *Replica) doneReason() string {
	if r.activated {
		return "replica already activated"
	}
	return "replica closed"
}

// Activate starts the VM from the replica RAM and the committed device
// state: migrate-incoming on the hot standby (or, if it is gone, on a QEMU
// cold-started on the RAM file), waits until it runs, announces it on the
// network (announce-self) and returns it. It may succeed only once.
func (r *Replica) Activate(ctx context.Context) (hypervisor.Guest, error) {
	g, err := r.activate(ctx)
	if err != nil {
		return nil, err
	}
	return g, nil
}

// ActivateGuest is Activate returning the concrete type.
func (r *Replica) ActivateGuest(ctx context.Context) (*Guest, error) { return r.activate(ctx) }

func (r *Replica) activate(ctx context.Context) (*Guest, error) {
	start := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.activated {
		return nil, fmt.Errorf("qemu: replica %q: activate: %s", r.spec.Name, r.doneReason())
	}
	if r.state == nil {
		return nil, fmt.Errorf("qemu: replica %q: activate: no device state committed", r.spec.Name)
	}
	epoch := r.epoch
	ctx, cancel := withStartTimeout(ctx)
	defer cancel()
	info := ActivationInfo{Epoch: epoch}

	g := r.standby
	if g != nil {
		t := time.Now()
		st, err := g.q.Status(ctx)
		info.Probe = time.Since(t)
		if err != nil || st.Status != "inmigrate" {
			r.log.Warn("hot standby unusable: cold start", zap.Any("status", st), zap.Error(err))
			g.Close()
			r.standby, g = nil, nil
		}
	}
	if g == nil {
		info.Cold = true
		t := time.Now()
		var err error
		g, err = launch(ctx, r.spec, true, r.base)
		if err != nil {
			return nil, fmt.Errorf("qemu: replica %q: activate epoch %d: cold start: %w", r.spec.Name, epoch, err)
		}
		info.Start = time.Since(t)
	}
	// From here on the standby is consumed: whatever happens, no later
	// commit may change the state it was given.
	r.activated = true
	r.standby = nil
	if err := r.migrateIncoming(ctx, g, r.state, &info); err != nil {
		g.Close()
		return nil, fmt.Errorf("qemu: replica %q: activate epoch %d: %w", r.spec.Name, epoch, err)
	}
	g.paused = false
	// The guest now owns the RAM mapping (and the file: Close removes it).
	g.ram.unmap()
	g.ram = r.ram
	r.ram = &ramFile{path: r.ram.path}
	g.removeRAM = true
	// ... and the disks' servers: its writes are journaled from now on,
	// for a re-protection.
	g.disks, r.disks = r.disks, nil
	info.Total = time.Since(start)
	r.lastAct = info
	r.log.Info("qemu replica activated", zap.Uint64("epoch", epoch), zap.Bool("cold", info.Cold),
		zap.Duration("probe", info.Probe), zap.Duration("start", info.Start), zap.Duration("incoming", info.Incoming),
		zap.Duration("announce", info.Announce), zap.Duration("total", info.Total))
	return g, nil
}

// migrateIncoming feeds state to g (-incoming defer) through a memfd passed
// with getfd, waits until the VM runs and announces it.
func (r *Replica) migrateIncoming(ctx context.Context, g *Guest, state []byte, info *ActivationInfo) error {
	t := time.Now()
	fd, err := unix.MemfdCreate("remusd-devstate", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "remusd-devstate")
	defer f.Close()
	if _, err := f.Write(state); err != nil {
		return fmt.Errorf("memfd write: %w", err)
	}
	if _, err := f.Seek(0, 0); err != nil {
		return fmt.Errorf("memfd seek: %w", err)
	}
	const fdName = "remusd-devstate"
	if err := g.q.ExecuteWithFD(ctx, "getfd", map[string]any{"fdname": fdName}, nil, int(f.Fd())); err != nil {
		return g.qmpErr("getfd", err)
	}
	if err := g.q.Execute(ctx, "migrate-incoming", map[string]any{"uri": "fd:" + fdName}, nil); err != nil {
		return g.qmpErr("migrate-incoming", err)
	}
	if err := waitRunning(ctx, g); err != nil {
		return err
	}
	info.Incoming = time.Since(t)
	t = time.Now()
	defer func() { info.Announce = time.Since(t) }()
	announce := map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100}
	if err := g.q.Execute(ctx, "announce-self", announce, nil); err != nil {
		return g.qmpErr("announce-self", err)
	}
	return nil
}

// waitRunning polls until the incoming migration finished and the VM runs.
func waitRunning(ctx context.Context, g *Guest) error {
	for {
		st, err := g.q.Status(ctx)
		if err != nil {
			return g.qmpErr("wait for incoming migration", err)
		}
		if st.Running {
			return nil
		}
		if st.Status != "inmigrate" {
			var mig struct {
				Status    string `json:"status"`
				ErrorDesc string `json:"error-desc"`
			}
			_ = g.q.Execute(ctx, "query-migrate", nil, &mig)
			return fmt.Errorf("incoming migration ended in VM status %q (migration %q %s)", st.Status, mig.Status, mig.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for incoming migration: %w", ctx.Err())
		case <-g.q.Done():
		case <-time.After(time.Millisecond):
		}
	}
}

// Close stops the standby, unmaps the RAM and removes the RAM file (unless
// an activated guest owns it).
func (r *Replica) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	if r.standby != nil {
		r.standby.Close()
		r.standby = nil
	}
	var err error
	if r.ram.mem != nil {
		err = r.ram.unmap()
		os.Remove(r.spec.RAMPath)
	}
	return errors.Join(err, r.disks.close())
}
