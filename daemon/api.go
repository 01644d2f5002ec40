package daemon

import (
	"context"
	"time"
)

// Service is what a running daemon offers its operators; the control
// socket serves it and the CLI calls it.
type Service interface {
	// Protect puts a running VM under protection, replicating to req.Peer.
	Protect(ctx context.Context, req ProtectRequest) error
	// Unprotect stops protecting a VM: its held output is released and
	// the link to the backup is closed cleanly.
	Unprotect(ctx context.Context, vm string) error
	// Failover makes this daemon's replica of a VM take over (backup
	// side). It is refused while the primary is connected, unless Force.
	Failover(ctx context.Context, req FailoverRequest) error
	// Forget drops this daemon's replica of vm (backup side), so that
	// another peer may protect the VM to this host.
	Forget(ctx context.Context, vm string) error
	// Start launches a configured VM that does not run here.
	Start(ctx context.Context, vm string) error
	// Stop stops a VM that runs here unprotected (the only way remusd
	// stops a guest; a daemon restart never does).
	Stop(ctx context.Context, vm string) error
	// Switchover moves a protected VM's active role to its backup with
	// no loss (planned maintenance), and protects it back towards here.
	Switchover(ctx context.Context, vm string) (SwitchoverResult, error)
	// Status reports every VM this daemon knows of.
	Status(ctx context.Context) ([]VMStatus, error)
}

// FailoverRequest asks the backup to activate its replica of VM.
type FailoverRequest struct {
	VM string `json:"vm"`
	// Force activates even though the primary is connected and healthy:
	// both copies then run. Logged loudly. With a witness it claims the
	// VM's record from whoever holds it.
	Force bool `json:"force,omitempty"`
	// claimed: the caller already won the witness record (automatic
	// takeover, handover). fromLink: a planned handover, run from the
	// replica's own link.
	claimed, fromLink bool
}

// SwitchoverResult reports a planned switchover (on the old primary).
type SwitchoverResult struct {
	VM string `json:"vm"`
	// Epoch is the last epoch: the guest was paused there and the new
	// primary started from it.
	Epoch uint64 `json:"epoch"`
	// NewPrimary is the host the VM runs on now; Generation its witness
	// record's generation (0 without a witness).
	NewPrimary string `json:"new_primary"`
	Generation uint64 `json:"generation,omitempty"`
	// PausedMs is how long the guest did not run: from the pause of the
	// last epoch to the new primary's confirmation that it runs (what a
	// client sees as a gap, plus the network's reaction to the move).
	PausedMs float64 `json:"paused_ms"`
	// DrainMs, WitnessMs and HandoverMs are its parts: the last epoch
	// captured, sent and acknowledged; the witness record written over;
	// the new primary's activation.
	DrainMs    float64 `json:"drain_ms"`
	WitnessMs  float64 `json:"witness_ms,omitempty"`
	HandoverMs float64 `json:"handover_ms"`
}

// ProtectRequest asks the daemon to protect VM. Zero fields take the
// daemon's configured defaults.
type ProtectRequest struct {
	VM string `json:"vm"`
	// Peer is the backup: a configured peer's name, or HOST:PORT (whose
	// certificate must then name a configured peer).
	Peer          string        `json:"peer"`
	EpochInterval time.Duration `json:"epoch_interval,omitempty"`
	MaxInflight   int           `json:"max_inflight,omitempty"`
}

// Roles of a VM on this daemon.
const (
	RolePrimary  = "primary"  // protected, replicating to a backup
	RoleBackup   = "backup"   // holding a replica
	RoleActive   = "active"   // a replica that took over (running, unprotected)
	RoleLocal    = "local"    // running here, not protected
	RoleStopped  = "stopped"  // configured here, not running here
	RoleStarting = "starting" // a replica being built
)

// Link states.
const (
	LinkUp         = "up"
	LinkConnecting = "connecting"
	LinkLost       = "lost" // heartbeats stopped beyond the timeout
	LinkClosed     = "closed"
	LinkNone       = "none"
)

// VMStatus is one VM's figures, shown by `remusd status` and exported as
// Prometheus metrics.
type VMStatus struct {
	VM      string `json:"vm"`
	Role    string `json:"role"`
	Backend string `json:"backend"`
	Peer    string `json:"peer,omitempty"`
	// PeerName is the peer's authenticated identity: the backup (primary
	// role) or the replica's owner (backup role).
	PeerName string `json:"peer_name,omitempty"`
	// Insecure: the replication link is plaintext and unauthenticated
	// (config insecure).
	Insecure bool   `json:"insecure,omitempty"`
	Link     string `json:"link"`
	OutBuf   string `json:"outbuf,omitempty"`
	// Unprotected: a primary that went on without its backup (ack
	// timeout, policy unprotect): its output is released unacknowledged.
	Unprotected bool `json:"unprotected,omitempty"`
	// Busy names a long operation in progress on the VM.
	Busy string `json:"busy,omitempty"`
	// StoppedWhy says why a stopped VM does not run here.
	StoppedWhy string `json:"stopped_why,omitempty"`
	// QEMUPid is the guest's QEMU process (0: not known here);
	// GuestState its run state: running, paused (QMP stop: an epoch's
	// capture, self-fencing, fencing; QEMU's own status name for others),
	// or stopped (SIGSTOP: the watchdog's stop); "" unknown (and for a
	// guest driven through libvirt, whose connection a timed-out query
	// would close).
	QEMUPid    int    `json:"qemu_pid,omitempty"`
	GuestState string `json:"guest_state,omitempty"`
	// XenDomID is a Xen VM's domain here (the standby's on a backup) and
	// XenVif the dom0 interface its output leaves by (held there while
	// protected).
	XenDomID uint32 `json:"xen_domid,omitempty"`
	XenVif   string `json:"xen_vif,omitempty"`
	// Watchdog is the watchdog's view of a protected guest: supervised,
	// or stopped (SIGSTOP, since WatchdogStoppedAtUnixMs; WatchdogError
	// says why); WatchdogError also says why it refused a guest or cannot
	// be reached.
	Watchdog                string `json:"watchdog,omitempty"`
	WatchdogError           string `json:"watchdog_error,omitempty"`
	WatchdogStoppedAtUnixMs int64  `json:"watchdog_stopped_at_unix_ms,omitempty"`

	// Epoch is the last captured epoch (primary) or committed epoch (backup).
	Epoch      uint64 `json:"epoch"`
	AckedEpoch uint64 `json:"acked_epoch"`

	EpochsCommitted uint64  `json:"epochs_committed"`
	PauseMsLast     float64 `json:"pause_ms_last"`
	PauseMsP50      float64 `json:"pause_ms_p50"`
	PauseMsP99      float64 `json:"pause_ms_p99"`
	DirtyPagesLast  uint64  `json:"dirty_pages_last"`
	// Primary only: pages and bytes of the epochs sent. WireBytesSent is
	// every byte written on the replication link (frame prefixes,
	// protobuf headers and payloads of the handshake, epochs, heartbeats);
	// EpochWireBytes the part that carried epochs (EpochBegin, PageBatch,
	// DeviceState, EpochEnd, headers included); RawBytes the page and
	// device-state bytes of those epochs, uncompressed and unframed.
	PagesSent      uint64 `json:"pages_sent"`
	WireBytesSent  uint64 `json:"wire_bytes_sent"`
	EpochWireBytes uint64 `json:"epoch_wire_bytes"`
	RawBytes       uint64 `json:"raw_bytes"`
	// CompressionRatio is RawBytes ÷ EpochWireBytes (higher is better).
	CompressionRatio float64 `json:"compression_ratio"`
	// Disks (primary): write data and changes of the last epoch and of
	// every epoch sent (uncompressed), the DiskWrites/DiskSync payloads as
	// sent, the data of the full copies made while the guest ran and how
	// long the last one took. Disks (backup): data applied by committed
	// epochs, written by the copies, and the flushes made before acks.
	// Only set for VMs with disks.
	DiskBytesLast   uint64  `json:"disk_bytes_last,omitempty"`
	DiskChangesLast uint64  `json:"disk_changes_last,omitempty"`
	DiskBytesSent   uint64  `json:"disk_bytes_sent,omitempty"`
	DiskChangesSent uint64  `json:"disk_changes_sent,omitempty"`
	DiskWireBytes   uint64  `json:"disk_wire_bytes,omitempty"`
	DiskBytesCopied uint64  `json:"disk_bytes_copied,omitempty"`
	DiskCopyMs      float64 `json:"disk_copy_ms,omitempty"`
	// DiskCopying: the primary copies its disks to the backup now (the
	// guest runs), DiskCopyDoneBytes of DiskCopyTotalBytes covered.
	DiskCopying        bool   `json:"disk_copying,omitempty"`
	DiskCopyDoneBytes  uint64 `json:"disk_copy_done_bytes,omitempty"`
	DiskCopyTotalBytes uint64 `json:"disk_copy_total_bytes,omitempty"`
	DiskBytesApplied   uint64 `json:"disk_bytes_applied,omitempty"`
	DiskBytesSynced    uint64 `json:"disk_bytes_synced,omitempty"`
	DiskFlushes        uint64 `json:"disk_flushes,omitempty"`
	// Backup only: pages of the epochs received, and every byte of the
	// frames read from the primary, headers included.
	PagesReceived     uint64 `json:"pages_received"`
	WireBytesReceived uint64 `json:"wire_bytes_received"`

	AckMsLast float64 `json:"ack_ms_last"`
	AckMsP50  float64 `json:"ack_ms_p50"`
	AckMsP99  float64 `json:"ack_ms_p99"`

	OutputHeld     uint64 `json:"output_held"`
	OutputReleased uint64 `json:"output_released"`
	OutputDropped  uint64 `json:"output_dropped"`
	// OutputHoldRepairs counts the times the output buffer found its hold
	// on the host undone by someone else and put it back (NFQUEUE rules
	// deleted or displaced): output may have left unheld before each.
	OutputHoldRepairs uint64 `json:"output_hold_repairs,omitempty"`

	TornEpochsDiscarded uint64 `json:"torn_epochs_discarded"`
	// LinksRefused counts links refused before they could change the
	// replica (another identity than its owner, an incompatible Hello).
	LinksRefused   uint64  `json:"links_refused,omitempty"`
	Reconnects     uint64  `json:"reconnects"`
	HeartbeatAgeMs float64 `json:"heartbeat_age_ms"`
	// LinkLastHeardUnixMs (backup) is when the primary was last heard on
	// the replication link; SecondPathLastHeardUnixMs when the peer (the
	// primary, on a backup; the backup, on a primary) was last heard on
	// the second heartbeat path (0: never, or no second path).
	LinkLastHeardUnixMs       int64  `json:"link_last_heard_unix_ms,omitempty"`
	SecondPathLastHeardUnixMs int64  `json:"second_path_last_heard_unix_ms,omitempty"`
	LastError                 string `json:"last_error,omitempty"`

	// Witness (with a witness configured): who holds the VM's record, at
	// which generation, and this side's view (holder, standby, fenced,
	// unreachable), with the last witness error.
	WitnessHolder     string `json:"witness_holder,omitempty"`
	WitnessGeneration uint64 `json:"witness_generation,omitempty"`
	WitnessView       string `json:"witness_view,omitempty"`
	WitnessError      string `json:"witness_error,omitempty"`
	// WitnessClaimMs is the last claim's round trip to the witness.
	WitnessClaimMs float64 `json:"witness_claim_ms,omitempty"`

	// Backup/active only.
	ActivatedAtUnixMs int64   `json:"activated_at_unix_ms,omitempty"`
	ActivationMs      float64 `json:"activation_ms,omitempty"`
	// Guest-reported detail (sim: ops executed, output sequence).
	GuestOps       uint64 `json:"guest_ops,omitempty"`
	GuestOutputSeq uint64 `json:"guest_output_seq,omitempty"`
}

// ActivationStartedAt is when this side began activating its replica
// (zero if it has not): ActivatedAtUnixMs less ActivationMs, to the
// millisecond, never later than the moment the activated guest first ran.
// A client's reply that arrives after it can only come from this side;
// replies the old primary had released before it died may still arrive
// between its death and this moment.
func (s VMStatus) ActivationStartedAt() time.Time {
	if s.ActivatedAtUnixMs == 0 {
		return time.Time{}
	}
	return time.UnixMilli(s.ActivatedAtUnixMs).Add(-time.Duration(s.ActivationMs * float64(time.Millisecond)))
}
