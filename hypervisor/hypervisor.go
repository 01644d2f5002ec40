// Package hypervisor defines the narrow seam between the checkpoint engine
// and a virtual-machine backend (sim, qemu, later xen).
//
// The engine owns the epoch loop; a backend only pauses and resumes the
// guest, reports which pages were dirtied, exposes guest RAM, and saves or
// restores CPU/device state. Backends live in sub-packages.
package hypervisor

import (
	"context"

	"github.com/remusd/remusd/dirtymap"
)

// PageSize is the guest page size every backend uses.
const PageSize = 4096

// Guest is a running VM on the primary.
type Guest interface {
	// Name is the VM's name as the operator knows it.
	Name() string
	// Backend names the backend ("sim", "qemu").
	Backend() string
	// BackendVersion must be equal on primary and backup (e.g. QEMU version).
	BackendVersion() string
	// Config is the backend-specific description a backup needs to build a
	// matching replica (opaque to the engine, carried in the handshake).
	Config() []byte
	// NumPages is the number of guest pages (memory size / PageSize).
	NumPages() int

	// Pause stops the guest's vCPUs (and, for sim, its workload). It
	// returns only once no guest memory write can be in progress.
	Pause(ctx context.Context) error
	// Resume restarts a paused guest.
	Resume(ctx context.Context) error
	// HarvestDirty ORs every page written since the previous harvest into
	// dst and restarts tracking. Only valid while paused. Tracking must be
	// exact or conservative: a written page missing from dst loses data.
	HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error
	// Memory is guest RAM, NumPages()*PageSize bytes. Reading it is only
	// consistent while the guest is paused.
	Memory() []byte
	// SaveDeviceState appends the CPU/device state to dst and returns it.
	// Only valid while paused.
	SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error)
	// Close stops the guest and releases its resources.
	Close() error
}

// Replica is the backup's copy of a protected VM. The engine writes whole,
// verified epochs into Memory and hands it the matching device state; a
// partial epoch is never written.
type Replica interface {
	NumPages() int
	// Memory is the replica RAM, written only by the engine's apply step.
	Memory() []byte
	// CommitDeviceState records the device state that belongs to the RAM
	// just applied for epoch.
	CommitDeviceState(epoch uint64, state []byte) error
	// Activate starts the VM from the committed replica (failover) and
	// returns the now-running guest.
	Activate(ctx context.Context) (Guest, error)
	// Close releases the replica (and a standby VM, if any).
	Close() error
}

// LiveReader is implemented by guests whose memory can be copied while
// they run: the pre-copy ("preload") of a new protection streams guest
// memory to the backup before the first checkpoint, so that the first
// epoch carries only what changed meanwhile.
type LiveReader interface {
	// ReadLive copies pages [first, first+n) into dst (n*PageSize bytes)
	// while the guest may run. A page the guest writes meanwhile may be
	// copied before, after or (for backends that cannot exclude it) in the
	// middle of the write: the engine hashes what it copied and resends
	// every page whose content at the first checkpoint differs
	// (Rebaseliner), so a torn copy is never kept.
	ReadLive(ctx context.Context, first, n int, dst []byte) error
}

// Rebaseliner is implemented by guests that can restart dirty tracking
// from their current contents while they run: the resync after a daemon
// restart, where the backup still holds a replica and needs only the pages
// that differ from it, not a full copy.
type Rebaseliner interface {
	// Rebaseline restarts dirty tracking from the guest's current contents
	// while it runs (it may also be paused) and returns the xxhash64
	// (transport.PageHash) of every page of that baseline, NumPages()
	// values.
	//
	// Contract: if Rebaseline returns H, then for every page p, the next
	// HarvestDirty (taken while paused, as always) reports p unless the
	// page's content at that pause hashes to H[p]. So the engine may send,
	// besides that harvest's pages, exactly the pages whose H[p] differs
	// from the hash of the backup's replica page: every page the backup
	// then lacks is sent. A page written during Rebaseline may be either
	// reported or carry the hash of its final content; never neither. On
	// error tracking is left conservative (the next harvest may report
	// every page).
	Rebaseline(ctx context.Context) ([]uint64, error)
}
