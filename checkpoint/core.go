// Package checkpoint is the Remus epoch engine for both roles.
//
// The decisions live in I/O-free cores (PrimaryCore, BackupCore): events go
// in, actions come out, time is passed in by the caller. They can be driven
// deterministically with logical time in tests, like etcd's raft RawNode.
// The runners (Primary, Backup) perform the actions against a hypervisor
// backend, an output buffer and a transport link.
package checkpoint

import (
	"errors"
	"fmt"
	"time"
)

// ErrProtocol marks a peer that broke the replication protocol (an ack for
// an epoch never sent, an epoch out of sequence, ...). The link carrying it
// must be closed; replicated state stays at its last committed epoch.
var ErrProtocol = errors.New("replication protocol violation")

// PrimaryConfig is the primary core's configuration.
type PrimaryConfig struct {
	// Interval between checkpoints (default 25 ms).
	Interval time.Duration
	// MaxInflight is how many captured epochs may await an ack before the
	// core stops checkpointing (backpressure). Default 1.
	MaxInflight int
	// AckTimeout: an epoch unacknowledged for this long (or a link down for
	// this long) triggers the ack-timeout policy.
	AckTimeout time.Duration
	// UnprotectOnAckTimeout selects the policy: false = keep holding output
	// (the default, fail closed); true = release everything and run
	// unprotected until the backup is back.
	UnprotectOnAckTimeout bool
	// Resume continues a protection whose earlier epochs another process
	// captured (the daemon restarted while the guest ran on): the first
	// link may report any committed epoch of this protection, which becomes
	// the base of a rebuild epoch (Action.Rebuild) instead of a protocol
	// error, so that only pages differing from the backup's replica travel.
	Resume bool
}

// ActionKind enumerates what the primary core asks its runner to do.
type ActionKind int

const (
	// ActCheckpoint: pause, harvest, copy dirty pages (plus, when Resync,
	// the pages of epochs ResyncFrom..ResyncTo; when Full, every page),
	// save device state, outbuf.Checkpoint(Epoch), resume; then report
	// CheckpointDone.
	ActCheckpoint ActionKind = iota + 1
	// ActSend: encode and send captured epoch Epoch (base Base).
	ActSend
	// ActRelease: release output of all epochs <= Epoch.
	ActRelease
	// ActReleaseAll: release everything and stop buffering (unprotected).
	ActReleaseAll
	// ActDropLink: close the link (ack timeout or protocol error); the
	// runner reconnects.
	ActDropLink
)

func (k ActionKind) String() string {
	switch k {
	case ActCheckpoint:
		return "checkpoint"
	case ActSend:
		return "send"
	case ActRelease:
		return "release"
	case ActReleaseAll:
		return "release-all"
	case ActDropLink:
		return "drop-link"
	}
	return fmt.Sprintf("action(%d)", int(k))
}

// Action is one instruction from the primary core.
type Action struct {
	Kind  ActionKind
	Epoch uint64
	// Base is the epoch the backup must hold for Epoch to apply on top.
	Base uint64
	// Full: the epoch carries every page (first sync or a backup that lost
	// its replica).
	Full bool
	// ResyncFrom..ResyncTo (inclusive) are captured, unacknowledged epochs
	// whose pages must be included again (after a reconnect).
	ResyncFrom, ResyncTo uint64
	// Rebuild: the runner has no record of what changed since Base (a
	// resumed protection): it must include every page whose content differs
	// from the backup's replica at Base (compared by page hash).
	Rebuild bool
	// Hold: the output buffer runs in pass-through (the ack-timeout policy
	// released it); the runner must make it hold again while the guest is
	// paused, before Checkpoint(Epoch), so that nothing after this epoch's
	// boundary leaves before its ack.
	Hold bool
	// KeepPaused: the runner leaves the guest paused after this checkpoint
	// (the last epoch of a drain: a planned switchover).
	KeepPaused bool
	Reason     string
}

func (a Action) String() string {
	s := fmt.Sprintf("%s(%d", a.Kind, a.Epoch)
	if a.Kind == ActCheckpoint || a.Kind == ActSend {
		s += fmt.Sprintf(" base=%d", a.Base)
	}
	if a.Full {
		s += " full"
	}
	if a.ResyncTo != 0 {
		s += fmt.Sprintf(" resync=%d..%d", a.ResyncFrom, a.ResyncTo)
	}
	if a.Rebuild {
		s += " rebuild"
	}
	if a.Hold {
		s += " hold"
	}
	if a.KeepPaused {
		s += " keep-paused"
	}
	if a.Reason != "" {
		s += " " + a.Reason
	}
	return s + ")"
}

type epochState struct {
	epoch      uint64
	base       uint64
	capturedAt time.Time
	sent       bool
}

// PrimaryCore decides when to checkpoint, send, and release on the
// primary. It performs no I/O and reads no clock.
type PrimaryCore struct {
	cfg PrimaryConfig

	next      uint64 // next epoch number to capture
	acked     uint64 // last acknowledged epoch
	lastStart time.Time
	capturing bool
	curFull   bool // the capture in progress is a full epoch
	curResync bool // the capture in progress is a resync epoch
	curBase   uint64
	// unacked holds captured epochs awaiting an ack, in order.
	unacked []epochState

	linkUp      bool
	linkUpAt    time.Time
	progressAt  time.Time // last time the link made progress (a frame written)
	linkDownAt  time.Time
	needFull    bool   // next checkpoint must carry every page
	needResync  bool   // next checkpoint must include unacked epochs' pages
	resyncBase  uint64 // backup's committed epoch at reconnect
	unprotected bool
	// rearm: the output buffer was released (unprotected) and must hold
	// again at the next checkpoint.
	rearm bool
	// resume: no epoch was captured by this core yet and the first link
	// may adopt the backup's committed epoch (PrimaryConfig.Resume).
	resume bool
	// rebuild: the next resync must compare pages with the backup's
	// replica (a resumed protection has no dirty history).
	rebuild bool
	// draining: the last checkpoint of a switchover was taken; no more.
	draining bool
}

// NewPrimaryCore returns a core that starts with the link down; the first
// checkpoint after LinkUp is a full one.
func NewPrimaryCore(cfg PrimaryConfig, now time.Time) *PrimaryCore {
	if cfg.MaxInflight < 1 {
		cfg.MaxInflight = 1
	}
	return &PrimaryCore{cfg: cfg, next: 1, needFull: true, linkDownAt: now, resume: cfg.Resume}
}

// Held reports how many captured epochs the core keeps state for (awaiting
// an ack). Resync and full epochs fold the epochs they supersede, so it
// never exceeds MaxInflight + 1, whatever the backup does.
func (c *PrimaryCore) Held() int { return len(c.unacked) }

// NeedsRebuild reports whether the next resync must compare pages with the
// backup's replica (Action.Rebuild).
func (c *PrimaryCore) NeedsRebuild() bool { return c.rebuild }

// Acked is the last acknowledged epoch.
func (c *PrimaryCore) Acked() uint64 { return c.acked }

// LastCaptured is the last captured epoch (0 before the first).
func (c *PrimaryCore) LastCaptured() uint64 { return c.next - 1 }

// Unacked is the number of captured epochs awaiting an ack.
func (c *PrimaryCore) Unacked() int { return len(c.unacked) }

// Unprotected reports whether the ack-timeout policy released the guest.
func (c *PrimaryCore) Unprotected() bool { return c.unprotected }

// Connected reports the core's view of the link.
func (c *PrimaryCore) Connected() bool { return c.linkUp }

// Drain starts the last epoch of a planned switchover: a checkpoint now
// that leaves the guest paused (Action.KeepPaused), whatever the interval
// or backpressure (the staging pool holds max_inflight + 1 epochs), and
// none after it until EndDrain. ok is false if it cannot start (link down,
// a full or resync epoch due, unprotected, already draining).
func (c *PrimaryCore) Drain(now time.Time) (Action, bool) {
	if !c.linkUp || c.capturing || c.unprotected || c.draining || c.needFull || c.needResync {
		return Action{}, false
	}
	c.draining = true
	a := c.startCheckpoint(now)
	a.KeepPaused = true
	return a, true
}

// StartUnheld says the output buffer passes output until the first
// checkpoint (a new protection started live, PrimaryOptions.LiveStart):
// that checkpoint holds it again from its boundary on (Action.Hold). Only
// before the first capture.
func (c *PrimaryCore) StartUnheld() {
	if c.next == 1 && !c.capturing {
		c.rearm = true
	}
}

// EndDrain ends a drain (the switchover was abandoned): checkpoints go on.
func (c *PrimaryCore) EndDrain() { c.draining = false }

// NextCheckpoint is when the next checkpoint is due; ok is false while
// none can start (link down, a capture running, backpressure, unprotected):
// then an event, not the clock, unblocks it.
func (c *PrimaryCore) NextCheckpoint() (due time.Time, ok bool) {
	if !c.linkUp || c.capturing || c.unprotected || c.draining {
		return time.Time{}, false
	}
	if c.needFull || c.needResync {
		return c.lastStart, true
	}
	if len(c.unacked) >= c.cfg.MaxInflight {
		return time.Time{}, false
	}
	return c.lastStart.Add(c.cfg.Interval), true
}

// Tick advances time: it may start a checkpoint or fire the ack timeout.
func (c *PrimaryCore) Tick(now time.Time) []Action {
	var acts []Action
	if a, ok := c.checkAckTimeout(now); ok {
		acts = append(acts, a...)
	}
	if !c.linkUp || c.capturing || c.unprotected || c.draining {
		return acts
	}
	if len(c.unacked) >= c.cfg.MaxInflight && !c.needFull && !c.needResync {
		// Backpressure: the guest runs on, its output held. A full or
		// resync epoch supersedes the unacked ones, so it may always start.
		return acts
	}
	if !c.lastStart.IsZero() && now.Sub(c.lastStart) < c.cfg.Interval && !c.needFull && !c.needResync {
		return acts
	}
	return append(acts, c.startCheckpoint(now))
}

func (c *PrimaryCore) startCheckpoint(now time.Time) Action {
	a := Action{Kind: ActCheckpoint, Epoch: c.next}
	switch {
	case c.needFull:
		a.Full = true
		a.Base = 0
	case c.needResync:
		a.Base = c.resyncBase
		a.Rebuild = c.rebuild
		if len(c.unacked) > 0 {
			a.ResyncFrom = c.unacked[0].epoch
			a.ResyncTo = c.unacked[len(c.unacked)-1].epoch
		}
	default:
		a.Base = c.next - 1
	}
	a.Hold = c.rearm
	c.capturing = true
	c.curFull, c.curResync, c.curBase = c.needFull, !c.needFull && c.needResync, a.Base
	c.lastStart = now
	return a
}

// CheckpointDone reports that checkpoint epoch was captured (the guest is
// running again). It returns the send action.
func (c *PrimaryCore) CheckpointDone(epoch uint64, now time.Time) ([]Action, error) {
	if !c.capturing || epoch != c.next {
		return nil, fmt.Errorf("checkpoint: CheckpointDone(%d) but capturing=%v next=%d", epoch, c.capturing, c.next)
	}
	c.capturing = false
	c.next++
	c.rearm = false // the buffer holds again (Action.Hold was performed)
	if c.curFull || c.curResync {
		// A full or resync epoch carries the pages of every unacked epoch
		// and applies on the backup's committed epoch: it supersedes them.
		// Fold them into it, so that the state kept for unacked epochs is
		// bounded whatever the backup does (a backup that accepts links but
		// never commits would otherwise add one epoch per reconnect). Their
		// output is released when this epoch is acked.
		c.unacked = c.unacked[:0]
		if c.curFull {
			c.needFull, c.needResync, c.rebuild = false, false, false
		} else {
			c.needResync, c.rebuild = false, false
		}
	}
	c.unacked = append(c.unacked, epochState{epoch: epoch, base: c.curBase, capturedAt: now})
	if !c.linkUp {
		return nil, nil // its pages go in the resync epoch after reconnect
	}
	if c.needFull || c.needResync {
		// The link came back while this epoch was being captured: it is not
		// sent on its own; the resync epoch starting now includes it.
		return c.Tick(now), nil
	}
	c.unacked[len(c.unacked)-1].sent = true
	return []Action{{Kind: ActSend, Epoch: epoch, Base: c.curBase, Full: c.curFull}}, nil
}

// CheckpointFailed reports that a checkpoint could not be captured; the
// guest was resumed and the epoch number is reused.
func (c *PrimaryCore) CheckpointFailed() { c.capturing = false }

// Ack reports the backup's acknowledgement of epoch. An ack for an epoch
// that was never sent, or going backwards, is a protocol error.
func (c *PrimaryCore) Ack(epoch uint64, now time.Time) ([]Action, error) {
	if epoch <= c.acked {
		return nil, fmt.Errorf("%w: ack of epoch %d but %d already acknowledged", ErrProtocol, epoch, c.acked)
	}
	i := -1
	for j, e := range c.unacked {
		if e.epoch == epoch && e.sent {
			i = j
			break
		}
	}
	if i < 0 {
		return nil, fmt.Errorf("%w: ack of epoch %d which was never sent (last captured %d)", ErrProtocol, epoch, c.next-1)
	}
	c.acked = epoch
	c.unacked = append(c.unacked[:0], c.unacked[i+1:]...)
	acts := []Action{{Kind: ActRelease, Epoch: epoch}}
	return append(acts, c.Tick(now)...), nil
}

// Progress reports that the link moved data at time t (e.g. a frame was
// written). A big epoch that is still streaming is not a stalled backup:
// the ack timeout counts from the last progress.
func (c *PrimaryCore) Progress(t time.Time) {
	if t.After(c.progressAt) {
		c.progressAt = t
	}
}

// LinkDown reports that the link to the backup broke.
func (c *PrimaryCore) LinkDown(now time.Time) {
	if c.linkUp {
		c.linkDownAt = now
	}
	c.linkUp = false
	for i := range c.unacked {
		c.unacked[i].sent = false
	}
}

// LinkUp reports a new link; committed is the backup's last committed
// epoch for this protection (0 if it holds no replica). It decides between
// a plain continuation, a resync of unacked epochs, and a full sync.
func (c *PrimaryCore) LinkUp(committed uint64, now time.Time) ([]Action, error) {
	if c.resume && c.next == 1 && !c.capturing {
		// A resumed protection: its earlier epochs were captured by a
		// process that is gone. The backup's committed epoch becomes the
		// base; what changed since is found by comparing pages.
		c.resume = false
		if committed > 0 {
			c.next, c.acked = committed+1, committed
			c.rebuild, c.needFull = true, false
		}
	}
	last := c.next - 1
	prevAcked := c.acked
	if c.unprotected {
		// Output ran free and unacked epochs were forgotten: rebuild the
		// replica from scratch, and hold output again from the boundary of
		// that full epoch on (before its ack, nothing after it may leave).
		c.unprotected = false
		c.needFull = true
		c.rearm = true
	}
	switch {
	case committed > last:
		return nil, fmt.Errorf("%w: backup claims epoch %d committed but only %d was ever captured", ErrProtocol, committed, last)
	case committed == 0:
		c.needFull = true
	case committed < c.acked:
		// The backup lost state it had acknowledged: it must be rebuilt.
		c.needFull = true
	case committed > c.acked:
		// Acks were lost in flight: the backup holds more than we knew.
		// Those epochs' output may go now.
		c.acked = committed
		for len(c.unacked) > 0 && c.unacked[0].epoch <= committed {
			c.unacked = c.unacked[1:]
		}
	}
	var acts []Action
	if committed > prevAcked && !c.needFull {
		acts = append(acts, Action{Kind: ActRelease, Epoch: committed})
	}
	if !c.needFull {
		c.needResync = true
		c.resyncBase = committed
	}
	// Captured epochs not yet acked are superseded by the resync epoch:
	// they stay in unacked (their output is released when the resync
	// epoch, which includes their pages, is acked).
	c.linkUp = true
	c.linkUpAt = now
	if !c.capturing && !c.draining {
		acts = append(acts, c.startCheckpoint(now))
	}
	return acts, nil
}

// Unprotect releases everything held and runs unprotected until the
// backup is back (then a full epoch re-arms the buffer), as the
// ack-timeout policy unprotect does; with a witness the runner calls it
// once the primary has won the VM's record (the backup can no longer
// take over).
func (c *PrimaryCore) Unprotect(now time.Time) []Action {
	if c.unprotected {
		return nil
	}
	c.unprotected = true
	c.unacked = nil
	acts := []Action{{Kind: ActReleaseAll, Reason: "witness: running unprotected"}}
	if c.linkUp {
		acts = append(acts, Action{Kind: ActDropLink, Reason: "running unprotected"})
	}
	return acts
}

func (c *PrimaryCore) checkAckTimeout(now time.Time) ([]Action, bool) {
	if c.unprotected || c.cfg.AckTimeout <= 0 {
		return nil, false
	}
	var since time.Time
	switch {
	case !c.linkUp:
		since = c.linkDownAt
		if c.acked == 0 && c.next == 1 && !c.cfg.Resume {
			return nil, false // never protected yet: nothing is held for long
		}
	case len(c.unacked) > 0:
		// A new link gets a whole timeout to deliver, even for epochs
		// captured before it: otherwise an old epoch would drop every new
		// link at once.
		since = c.unacked[0].capturedAt
		for _, t := range []time.Time{c.linkUpAt, c.progressAt} {
			if t.After(since) {
				since = t
			}
		}
	default:
		return nil, false
	}
	if now.Sub(since) < c.cfg.AckTimeout {
		return nil, false
	}
	if c.cfg.UnprotectOnAckTimeout {
		c.unprotected = true
		c.unacked = nil
		return []Action{{Kind: ActReleaseAll, Reason: "ack timeout: running unprotected"}, {Kind: ActDropLink, Reason: "ack timeout"}}, true
	}
	if c.linkUp {
		// Hold output, and try a fresh link: a stalled backup may recover.
		c.linkUp = false
		c.linkDownAt = now
		for i := range c.unacked {
			c.unacked[i].sent = false
		}
		return []Action{{Kind: ActDropLink, Reason: "ack timeout: holding output"}}, true
	}
	return nil, false
}

// BackupCore validates the sequence of records of one link on the backup:
// an epoch is applied only when it is complete, in sequence and verified.
type BackupCore struct {
	committed uint64
	inEpoch   bool
	epoch     uint64
	base      uint64
	full      bool
	want      uint32 // pages announced
	got       uint32 // pages received
	haveDev   bool
	diskWant  uint32 // disk changes announced
	diskGot   uint32 // disk changes received
}

// NewBackupCore starts from the replica's committed epoch.
func NewBackupCore(committed uint64) *BackupCore { return &BackupCore{committed: committed} }

// Committed is the last applied epoch.
func (b *BackupCore) Committed() uint64 { return b.committed }

// InEpoch reports whether an epoch is being staged.
func (b *BackupCore) InEpoch() bool { return b.inEpoch }

// Begin starts staging epoch with the given base and page count.
func (b *BackupCore) Begin(epoch, base uint64, pages uint32, full bool, numPages int) error {
	switch {
	case b.inEpoch:
		return fmt.Errorf("%w: epoch %d begins while epoch %d is incomplete", ErrProtocol, epoch, b.epoch)
	case epoch <= b.committed:
		return fmt.Errorf("%w: epoch %d begins but %d is already committed", ErrProtocol, epoch, b.committed)
	case b.committed == 0 && !full:
		// The replica holds nothing of this protection: a partial epoch
		// would commit another protection's memory plus a few pages.
		return fmt.Errorf("%w: epoch %d is not full but the replica holds nothing of this protection yet", ErrProtocol, epoch)
	case !full && base != b.committed:
		return fmt.Errorf("%w: epoch %d applies on base %d but the replica holds %d", ErrProtocol, epoch, base, b.committed)
	case int64(pages) > int64(numPages):
		return fmt.Errorf("%w: epoch %d announces %d pages, guest has %d", ErrProtocol, epoch, pages, numPages)
	case full && int(pages) != numPages:
		return fmt.Errorf("%w: full epoch %d announces %d pages, guest has %d", ErrProtocol, epoch, pages, numPages)
	}
	b.inEpoch, b.epoch, b.base, b.full, b.want, b.got, b.haveDev = true, epoch, base, full, pages, 0, false
	b.diskWant, b.diskGot = 0, 0
	return nil
}

// BeginPreloaded starts staging the first epoch of a protection over a
// complete preload: the caller checked that every page of the replica was
// written by Preload records on this link. It applies like a full epoch
// (base 0) but carries only the pages that changed since they were
// preloaded. Only a replica with nothing committed may be preloaded.
func (b *BackupCore) BeginPreloaded(epoch uint64, pages uint32, numPages int) error {
	switch {
	case b.inEpoch:
		return fmt.Errorf("%w: epoch %d begins while epoch %d is incomplete", ErrProtocol, epoch, b.epoch)
	case b.committed != 0:
		return fmt.Errorf("%w: preloaded epoch %d but epoch %d is already committed", ErrProtocol, epoch, b.committed)
	case epoch == 0:
		return fmt.Errorf("%w: preloaded epoch 0", ErrProtocol)
	case int64(pages) > int64(numPages):
		return fmt.Errorf("%w: epoch %d announces %d pages, guest has %d", ErrProtocol, epoch, pages, numPages)
	}
	b.inEpoch, b.epoch, b.base, b.full, b.want, b.got, b.haveDev = true, epoch, 0, true, pages, 0, false
	b.diskWant, b.diskGot = 0, 0
	return nil
}

// Batch accounts for a batch of n pages of epoch starting at index first.
func (b *BackupCore) Batch(epoch uint64, first uint32, n int) error {
	switch {
	case !b.inEpoch:
		return fmt.Errorf("%w: page batch for epoch %d outside an epoch", ErrProtocol, epoch)
	case epoch != b.epoch:
		return fmt.Errorf("%w: page batch for epoch %d inside epoch %d", ErrProtocol, epoch, b.epoch)
	case first != b.got:
		return fmt.Errorf("%w: epoch %d batch starts at page %d, expected %d", ErrProtocol, epoch, first, b.got)
	case int64(b.got)+int64(n) > int64(b.want):
		return fmt.Errorf("%w: epoch %d carries more than the %d pages announced", ErrProtocol, epoch, b.want)
	}
	b.got += uint32(n)
	return nil
}

// Disks records how many disk changes the epoch just begun announced
// (EpochBegin.disk_changes), at most max.
func (b *BackupCore) Disks(epoch uint64, n uint32, max int) error {
	switch {
	case !b.inEpoch || epoch != b.epoch || b.got != 0 || b.diskGot != 0:
		return fmt.Errorf("%w: disk change count for epoch %d outside its beginning", ErrProtocol, epoch)
	case int64(n) > int64(max):
		return fmt.Errorf("%w: epoch %d announces %d disk changes, the limit is %d", ErrProtocol, epoch, n, max)
	}
	b.diskWant = n
	return nil
}

// DiskBatch accounts for a DiskWrites record of n changes of epoch
// starting at change index first. Disk changes follow every page of the
// epoch and precede its device state.
func (b *BackupCore) DiskBatch(epoch uint64, first uint32, n int) error {
	switch {
	case !b.inEpoch:
		return fmt.Errorf("%w: disk changes for epoch %d outside an epoch", ErrProtocol, epoch)
	case epoch != b.epoch:
		return fmt.Errorf("%w: disk changes for epoch %d inside epoch %d", ErrProtocol, epoch, b.epoch)
	case b.got != b.want:
		return fmt.Errorf("%w: epoch %d disk changes before its last page (%d of %d received)", ErrProtocol, epoch, b.got, b.want)
	case b.haveDev:
		return fmt.Errorf("%w: epoch %d disk changes after its device state", ErrProtocol, epoch)
	case first != b.diskGot:
		return fmt.Errorf("%w: epoch %d disk record starts at change %d, expected %d", ErrProtocol, epoch, first, b.diskGot)
	case int64(b.diskGot)+int64(n) > int64(b.diskWant):
		return fmt.Errorf("%w: epoch %d carries more than the %d disk changes announced", ErrProtocol, epoch, b.diskWant)
	}
	b.diskGot += uint32(n)
	return nil
}

// DiskEnd checks the disk change count of the epoch's end record.
func (b *BackupCore) DiskEnd(epoch uint64, n uint32) error {
	if !b.inEpoch || epoch != b.epoch || n != b.diskWant || b.diskGot != b.diskWant {
		return fmt.Errorf("%w: epoch %d ends with %d disk changes received, %d announced, %d in end record", ErrProtocol, epoch, b.diskGot, b.diskWant, n)
	}
	return nil
}

// DeviceState accounts for the epoch's device state record.
func (b *BackupCore) DeviceState(epoch uint64) error {
	switch {
	case !b.inEpoch || epoch != b.epoch:
		return fmt.Errorf("%w: device state for epoch %d outside it (staging %d, in epoch %v)", ErrProtocol, epoch, b.epoch, b.inEpoch)
	case b.haveDev:
		return fmt.Errorf("%w: epoch %d carries two device states", ErrProtocol, epoch)
	case b.diskGot != b.diskWant:
		return fmt.Errorf("%w: epoch %d device state before its last disk change (%d of %d)", ErrProtocol, epoch, b.diskGot, b.diskWant)
	}
	b.haveDev = true
	return nil
}

// End checks that epoch is complete; digestOK is the caller's verification
// of the staged pages. On success the caller applies the staged epoch and
// then calls Applied.
func (b *BackupCore) End(epoch uint64, pages uint32, digestOK bool) error {
	switch {
	case !b.inEpoch || epoch != b.epoch:
		return fmt.Errorf("%w: end of epoch %d outside it", ErrProtocol, epoch)
	case pages != b.want || b.got != b.want:
		return fmt.Errorf("%w: epoch %d ends with %d pages received, %d announced, %d in end record", ErrProtocol, epoch, b.got, b.want, pages)
	case !b.haveDev:
		return fmt.Errorf("%w: epoch %d ends without device state", ErrProtocol, epoch)
	case !digestOK:
		return fmt.Errorf("%w: epoch %d digest mismatch: staged pages differ from what the primary sent", ErrProtocol, epoch)
	}
	return nil
}

// Applied records that the staged epoch was applied: it is now committed
// and must be acknowledged.
func (b *BackupCore) Applied() uint64 {
	b.committed = b.epoch
	b.inEpoch = false
	return b.committed
}

// Discard drops a partial epoch (link lost or malformed record). It
// reports whether an epoch was being staged (a torn epoch).
func (b *BackupCore) Discard() bool {
	torn := b.inEpoch
	b.inEpoch = false
	return torn
}
