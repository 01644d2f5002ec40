// Package outbuf holds a protected guest's outbound output per epoch and
// releases it only when the backup has acknowledged the epoch that produced
// it (invariant 1, output commit).
//
// Epoch numbering: output emitted after the checkpoint of epoch N-1 and
// before the checkpoint of epoch N belongs to epoch N; Checkpoint(N) is
// called while the guest is paused for epoch N and closes that epoch.
package outbuf

import "errors"

// Buffer is one guest's output buffer.
type Buffer interface {
	// Kind names the mechanism ("memory", "plug", "nfqueue", "none").
	Kind() string
	// Checkpoint closes epoch: output emitted so far belongs to it.
	Checkpoint(epoch uint64) error
	// Release lets out all output of epochs <= epoch. Epochs not yet
	// checkpointed are not touched.
	Release(epoch uint64) error
	// ReleaseAll lets out everything held, including the open epoch, and
	// stops buffering (failover or unprotected mode).
	ReleaseAll() error
	// Hold ends the pass-through that ReleaseAll started: output from now
	// on is held again and belongs to the next checkpointed epoch. It is a
	// no-op while the buffer holds. Protection that resumes after running
	// unprotected calls it before the first epoch the backup will commit.
	Hold() error
	// Close drops whatever is still held: the buffer fails closed. What
	// the guest sends afterwards is no longer buffered, so a guest that
	// keeps running must be paused or stopped first, or use Detach.
	Close() error
	// Detach lets go of the buffer but leaves the host holding (or
	// dropping) the guest's output, so that a guest that keeps running
	// while its daemon restarts sends nothing unacknowledged. Held output
	// may be dropped. The next daemon re-opens the buffer on the same
	// interface.
	Detach() error
	// Stats reports counters.
	Stats() Stats
}

// Stats are an output buffer's counters.
type Stats struct {
	HeldPackets     uint64 // currently held
	HeldBytes       uint64
	ReleasedPackets uint64
	ReleasedBytes   uint64
	DroppedPackets  uint64 // dropped (limit reached or closed with output held)
	LastReleased    uint64 // last released epoch
	// HoldRepairs counts the times the buffer found the host's hold undone
	// by someone else (a firewall reload, another tool's rule put ahead of
	// its own) and put it back. Output may have left unheld before each.
	HoldRepairs uint64
}

// ErrClosed is returned by a Buffer used after Close.
var ErrClosed = errors.New("outbuf: closed")
