package sim

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
)

// Replica is the backup's copy of a simulated guest: zeroed RAM the engine
// writes epochs into, plus the last committed device state.
type Replica struct {
	name string
	cfg  Config
	log  *zap.Logger
	mem  []byte
	disk *disk.Memory // Config.DiskBytes; nil: none

	mu        sync.Mutex
	epoch     uint64
	state     []byte // nil until the first commit
	activated bool
	closed    bool
	output    func(seq uint64, msg []byte)
}

// SetOutput sets the output callback the activated guest starts with, so
// that its first message is not lost.
func (r *Replica) SetOutput(fn func(seq uint64, msg []byte)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.output = fn
}

// NewReplica allocates (and pre-faults) zeroed memory for cfg. log may be nil.
func NewReplica(name string, cfg Config, log *zap.Logger) (*Replica, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	mem := make([]byte, cfg.MemoryBytes)
	for i := 0; i < len(mem); i += pageSize {
		mem[i] = 0 // take first-touch faults now, not during apply
	}
	r := &Replica{
		name: name,
		cfg:  cfg,
		log:  log.With(zap.String("vm", name), zap.String("backend", BackendName)),
		mem:  mem,
	}
	if cfg.DiskBytes > 0 {
		r.disk = disk.NewMemory(int(cfg.DiskBytes))
	}
	return r, nil
}

// ReplicaDisks implements hypervisor.DiskReplica.
func (r *Replica) ReplicaDisks() []hypervisor.ReplicaDisk {
	if r.disk == nil {
		return nil
	}
	return []hypervisor.ReplicaDisk{{ID: DiskID, Image: r.disk}}
}

// Disk returns the replica's disk (nil: none).
func (r *Replica) Disk() *disk.Memory { return r.disk }

// NumPages returns the number of guest pages.
func (r *Replica) NumPages() int { return len(r.mem) / pageSize }

// Memory returns the replica RAM. After Activate it belongs to the running
// guest and must not be written.
func (r *Replica) Memory() []byte { return r.mem }

// CommitDeviceState validates state (length, magic, version, checksum and
// that it belongs to this configuration) and records a copy of it as the
// state for epoch.
func (r *Replica) CommitDeviceState(epoch uint64, state []byte) error {
	info, err := DecodeDeviceState(state)
	if err != nil {
		return fmt.Errorf("sim: replica %q: commit epoch %d: %w", r.name, epoch, err)
	}
	if err := info.matches(r.cfg); err != nil {
		return fmt.Errorf("sim: replica %q: commit epoch %d: %w", r.name, epoch, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.activated {
		return fmt.Errorf("sim: replica %q: commit epoch %d: %w", r.name, epoch, errReplicaDone(r.activated))
	}
	r.state = append(r.state[:0], state...)
	r.epoch = epoch
	return nil
}

// DeviceState returns the last committed epoch and a copy of its device
// state (nil if none was committed).
func (r *Replica) DeviceState() (epoch uint64, state []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == nil {
		return 0, nil
	}
	return r.epoch, append([]byte(nil), r.state...)
}

// Activate starts a guest from the replica memory and the committed device
// state. The guest takes over the replica memory. It fails if no device
// state was committed, and may succeed only once.
func (r *Replica) Activate(ctx context.Context) (hypervisor.Guest, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sim: replica %q: activate: %w", r.name, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.activated {
		return nil, fmt.Errorf("sim: replica %q: activate: %w", r.name, errReplicaDone(r.activated))
	}
	if r.state == nil {
		return nil, fmt.Errorf("sim: replica %q: activate: no device state committed", r.name)
	}
	opts := []Option{WithOutput(r.output)}
	if r.disk != nil {
		opts = append(opts, WithDiskImage(r.disk))
	}
	g, err := Restore(r.name, r.cfg, r.mem, r.state, r.log, opts...)
	if err != nil {
		return nil, fmt.Errorf("sim: replica %q: activate epoch %d: %w", r.name, r.epoch, err)
	}
	r.activated = true
	r.log.Info("sim replica activated", zap.Uint64("epoch", r.epoch))
	return g, nil
}

// Close releases the replica. It does not stop a guest Activate returned.
func (r *Replica) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return nil
}

func errReplicaDone(activated bool) error {
	if activated {
		return errors.New("already activated")
	}
	return errors.New("replica closed")
}
