package hypervisor

import "github.com/remusd/remusd/disk"

// Disk is one protected disk of a guest on the primary, as the checkpoint
// engine sees it (issue 11). The guest reaches Image only through a block
// server remusd controls (disk/nbd), which reports every completed change
// to Journal before it replies to the guest.
type Disk struct {
	// ID names the disk within its VM ("disk0"); it is checked with
	// ValidateName and must be the same on primary and backup.
	ID string
	// Image is the primary's local image; the engine reads it for the
	// initial sync and for resyncs that cannot be served from the journal.
	Image disk.Backend
	// Journal collects the changes of each epoch; the engine cuts it at
	// every checkpoint (BeginPause before Pause, Cut once paused) and
	// releases an epoch once the backup acknowledged it.
	Journal *disk.Journal
}

// DiskGuest is implemented by guests that have protected disks. A guest
// that does not implement it (or returns none) is protected memory-only.
type DiskGuest interface {
	Disks() []Disk
}

// ReplicaDisk is the backup's copy of one protected disk: the engine
// applies each committed epoch's changes to Image in the same commit step
// as the epoch's memory, and makes them durable before it acknowledges.
type ReplicaDisk struct {
	ID    string
	Image disk.Backend
}

// DiskReplica is implemented by replicas that hold disks. The backup
// refuses a primary whose disks (IDs and sizes) differ from the replica's.
type DiskReplica interface {
	ReplicaDisks() []ReplicaDisk
}
