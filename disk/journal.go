package disk

import (
	"context"
	"fmt"
	"math/bits"
	"sync"
	"time"
)

// Journal is an Observer that collects an image's changes per epoch within
// a byte limit: the primary's staging of epoch N's writes until the backup
// has acknowledged N.
//
// The checkpoint engine drives it around each pause:
//
//	j.BeginPause()      // before stopping the guest: admit what is in flight
//	<stop the guest>    // QEMU drains the requests in flight
//	e := j.Cut()        // epoch N's changes, in order; epoch N+1 begins
//	<resume the guest; send e with epoch N>
//	j.Release(N)        // after the backup's ack of N: its bytes are free
//
// Observe blocks while the bytes held (changes of the open epoch and of
// cut, unreleased epochs) would exceed the limit, which stalls the guest's
// writes until an ack frees space (backpressure: a guest that writes faster
// than the link slows down instead of the buffer growing). Between
// BeginPause and Cut the limit grows by an overdraft: stopping the guest
// waits for its requests in flight, and one of them waiting for the cut
// would deadlock the checkpoint. QEMU stops the vCPUs before it drains, so
// what it has in flight then is bounded: its NBD client keeps at most 16
// requests in flight per connection (MAX_NBD_REQUESTS in block/nbd.c), each
// at most the server's max payload. The overdraft is InFlight such writes.
// Between BeginPause and the stop, though, the vCPUs still run and may
// issue more writes as earlier ones complete: a change that would exceed
// the overdraft during a pause does not wait (its wait could hold the stop
// forever) but switches the journal to tracking mode (below), so the
// journal never holds more than Limit + overdraft and never deadlocks a
// pause.
//
// # Tracking mode
//
// A journal must never block a guest whose epochs nobody releases: before
// protection starts (it is fed from the guest's boot), while the backup is
// away, while the primary runs unprotected, or during a long initial copy.
// In tracking mode Observe records only which blocks (TrackBlock bytes
// each) changed, in a bitmap, and never blocks; the engine then reads those
// blocks from the image while the guest is paused (QEMU drains its I/O on
// stop, so they are consistent) and sends them as writes. Track switches
// to it at once (the open epoch's changes become dirty blocks and their
// data is freed); SetSpill makes an Observe that would have to wait switch
// to it instead. The next Cut returns the dirty blocks (Epoch.Tracked) and
// switches back to journaling.
//
// Memory bounds: in journaling mode the data held is at most Limit +
// overdraft; in tracking mode it is the bitmap, one bit per TrackBlock of
// the highest offset changed (2 MiB for a 1 TiB image at 64 KiB blocks).
type Journal struct {
	mu        sync.Mutex
	limit     int64
	overdraft int64
	used      int64 // bytes held: open epoch plus cut, unreleased ones
	epoch     uint64
	open      []Change
	openB     int64
	sealed    []sealedEpoch // cut and unreleased, oldest first
	pausing   bool
	wake      chan struct{} // closed (and replaced) when waiters should look again
	blocked   uint64
	blockedD  time.Duration

	tracking  bool     // tracking mode: only dirty blocks are recorded
	spill     bool     // an Observe that would wait switches to tracking
	dirty     []uint64 // tracking bitmap, one bit per TrackBlock
	tracks    uint64   // switches to tracking mode so far
	trackedCh uint64   // changes observed in tracking mode
	copies    uint64   // StartCopy calls
}

// TrackBlock is the granularity of tracking mode: a change marks every
// block of this size it touches.
const TrackBlock = 64 << 10

// Extent is a byte range of an image.
type Extent struct{ Offset, Length int64 }

type sealedEpoch struct {
	n     uint64
	bytes int64
}

// Epoch is the changes of one epoch, in the order the image received them.
// Data of writes is owned by the Epoch.
type Epoch struct {
	Number  uint64
	Changes []Change
	Bytes   int64 // what the epoch holds of the journal's limit
	// Tracked: the journal was in tracking mode (since its previous Cut,
	// or since Track/Spill): Changes is empty and Dirty lists the blocks
	// changed meanwhile, ascending, coalesced, in TrackBlock units (the
	// last one cut at the highest offset changed, rounded up to a block:
	// callers clamp to the image size). The caller reads them from the
	// image while the guest is paused.
	Tracked bool
	Dirty   []Extent
	// Copies is how many times StartCopy was called before this cut: a
	// cut with fewer copies than the journal's Copies is superseded by
	// the copy of the image that began after it.
	Copies uint64
}

// JournalStats are a Journal's counters.
type JournalStats struct {
	Limit, Used  int64
	OpenBytes    int64         // of Used, the open epoch's
	Overdraft    int64         // what a pause may add to Limit
	Epoch        uint64        // the open epoch
	Blocked      uint64        // Observe calls that had to wait
	BlockedTotal time.Duration // their total wait
	Tracking     bool          // in tracking mode now
	Tracks       uint64        // switches to tracking mode so far
	DirtyBlocks  int           // blocks marked in tracking mode now
	BitmapBytes  int           // memory of the tracking bitmap
}

// ChangeOverhead is what a change costs of a journal's limit besides its
// data. It also bounds the number of changes a journal holds: at most
// (Limit + overdraft) / ChangeOverhead, which the engine checks against
// what one epoch may carry (transport.Limits.MaxEpochDiskChanges): a
// guest issuing many small trims cannot build an epoch the backup refuses.
const ChangeOverhead = 256

// JournalConfig configures a Journal.
type JournalConfig struct {
	// Limit bounds the bytes held outside a pause; at least one MaxWrite.
	Limit int64
	// MaxWrite is the largest write the server admits (its max payload).
	MaxWrite int64
	// InFlight is how many requests the client may have in flight when the
	// guest stops (default 16, QEMU's NBD client).
	InFlight int
	// Tracking starts the journal in tracking mode (see Journal): a
	// journal fed from the guest's boot, before protection starts, must
	// not block it. The checkpoint engine also switches every journal to
	// tracking mode as its first act.
	Tracking bool
}

// NewJournal returns a journal whose open epoch is first.
func NewJournal(cfg JournalConfig, first uint64) (*Journal, error) {
	if cfg.InFlight == 0 {
		cfg.InFlight = 16
	}
	if cfg.MaxWrite <= 0 || cfg.Limit < cfg.MaxWrite+ChangeOverhead || cfg.InFlight < 0 {
		return nil, fmt.Errorf("disk: journal limit %d is below one write of %d bytes", cfg.Limit, cfg.MaxWrite)
	}
	return &Journal{
		limit: cfg.Limit, overdraft: int64(cfg.InFlight) * (cfg.MaxWrite + ChangeOverhead),
		epoch: first, wake: make(chan struct{}), tracking: cfg.Tracking,
	}, nil
}

// bound is what may be held now; j.mu is held.
func (j *Journal) bound() int64 {
	if j.pausing {
		return j.limit + j.overdraft
	}
	return j.limit
}

// Observe implements Observer: it copies c into the open epoch, waiting
// first while the journal is full (see Journal).
func (j *Journal) Observe(ctx context.Context, c Change) error {
	cost := int64(len(c.Data)) + ChangeOverhead
	j.mu.Lock()
	if !j.tracking && (j.spill || j.pausing) && j.used+cost > j.bound() {
		// Spilling (nobody acknowledges), or a pause whose overdraft is
		// used up: waiting could hold the guest's stop (which drains
		// this request) forever; track dirty blocks instead.
		j.trackLocked()
	}
	if j.tracking {
		j.mark(c)
		j.mu.Unlock()
		return nil
	}
	if j.used+cost > j.bound() {
		start := time.Now()
		j.blocked++
		for !j.tracking && j.used+cost > j.bound() {
			w := j.wake
			j.mu.Unlock()
			select {
			case <-w:
			case <-ctx.Done():
				j.mu.Lock()
				j.blockedD += time.Since(start)
				j.mu.Unlock()
				return fmt.Errorf("disk: journal full: %w", ctx.Err())
			}
			j.mu.Lock()
			if !j.tracking && (j.spill || j.pausing) && j.used+cost > j.bound() {
				j.trackLocked() // see above
			}
		}
		j.blockedD += time.Since(start)
		if j.tracking { // switched while we waited
			j.mark(c)
			j.mu.Unlock()
			return nil
		}
	}
	if c.Data != nil {
		c.Data = append([]byte(nil), c.Data...)
	}
	j.open = append(j.open, c)
	j.openB += cost
	j.used += cost
	j.mu.Unlock()
	return nil
}

// BeginPause raises the bound by the overdraft until Cut.
func (j *Journal) BeginPause() {
	j.mu.Lock()
	j.pausing = true
	j.broadcast()
	j.mu.Unlock()
}

// Cut closes the open epoch and returns it; the next epoch opens and the
// limit applies again. Its bytes stay held until Release.
func (j *Journal) Cut() Epoch {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.tracking {
		e := Epoch{Number: j.epoch, Tracked: true, Dirty: j.extents(), Copies: j.copies}
		clear(j.dirty)
		j.tracking = false
		j.epoch++
		j.pausing = false
		j.broadcast()
		return e
	}
	e := Epoch{Number: j.epoch, Changes: j.open, Bytes: j.openB, Copies: j.copies}
	j.sealed = append(j.sealed, sealedEpoch{n: j.epoch, bytes: j.openB})
	j.open, j.openB = nil, 0
	j.epoch++
	j.pausing = false
	return e
}

// Release frees the bytes of every cut epoch up to and including n.
func (j *Journal) Release(n uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	i := 0
	for ; i < len(j.sealed) && j.sealed[i].n <= n; i++ {
		j.used -= j.sealed[i].bytes
	}
	if i > 0 {
		j.sealed = append(j.sealed[:0], j.sealed[i:]...)
		j.broadcast()
	}
}

// Track switches to tracking mode now: the open epoch's changes become
// dirty blocks and their data is freed; so is the accounting of the cut,
// unreleased epochs (their owner, the engine, keeps or converts them); a
// waiting Observe returns. Tracking lasts until the next Cut. Track on a
// tracking journal does nothing.
func (j *Journal) Track() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.trackLocked()
}

// StartCopy switches to tracking mode with an empty bitmap: the engine
// copies the whole image next, and only what changes from now on must
// follow the copy. (Changes of the open epoch are dropped: the copy reads
// them from the image.)
func (j *Journal) StartCopy() {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.trackLocked()
	clear(j.dirty)
	j.copies++
}

// TakeDirty returns the blocks marked since StartCopy (or the previous
// TakeDirty) and clears them, staying in tracking mode: a copy's next pass
// re-reads them while the guest runs, and the blocks changed meanwhile are
// marked again (nil if the journal is not tracking).
func (j *Journal) TakeDirty() []Extent {
	j.mu.Lock()
	defer j.mu.Unlock()
	if !j.tracking {
		return nil
	}
	e := j.extents()
	clear(j.dirty)
	return e
}

// Copies is how many times StartCopy was called.
func (j *Journal) Copies() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.copies
}

// SetSpill sets whether an Observe that would have to wait switches the
// journal to tracking mode instead (the engine turns it on while the
// backup is away, so that nothing waits for acks that cannot come).
func (j *Journal) SetSpill(on bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.spill = on
	if on && j.used > j.bound() {
		j.trackLocked()
	}
	j.broadcast()
}

// Tracks is how many times the journal switched to tracking mode; the
// engine compares it across checkpoints to learn that the epochs it holds
// are no longer accounted for here.
func (j *Journal) Tracks() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.tracks
}

// trackLocked switches to tracking mode; j.mu is held.
func (j *Journal) trackLocked() {
	if j.tracking {
		return
	}
	for _, c := range j.open {
		j.mark(c)
	}
	j.open, j.openB = nil, 0
	j.sealed = j.sealed[:0]
	j.used = 0
	j.tracking = true
	j.tracks++
	j.broadcast()
}

// mark records c's blocks as dirty; j.mu is held.
func (j *Journal) mark(c Change) {
	j.trackedCh++
	if c.Kind == KindFlush || c.Length <= 0 || c.Offset < 0 {
		return
	}
	first := c.Offset / TrackBlock
	last := (c.Offset + c.Length - 1) / TrackBlock
	if need := int(last/64) + 1; need > len(j.dirty) {
		j.dirty = append(j.dirty, make([]uint64, need-len(j.dirty))...)
	}
	for b := first; b <= last; b++ {
		j.dirty[b/64] |= 1 << (b % 64)
	}
}

// extents returns the dirty blocks as coalesced extents; j.mu is held.
func (j *Journal) extents() []Extent {
	var out []Extent
	for w, word := range j.dirty {
		for word != 0 {
			bit := int64(bits.TrailingZeros64(word))
			word &^= 1 << bit
			off := (int64(w)*64 + bit) * TrackBlock
			if n := len(out); n > 0 && out[n-1].Offset+out[n-1].Length == off {
				out[n-1].Length += TrackBlock
				continue
			}
			out = append(out, Extent{Offset: off, Length: TrackBlock})
		}
	}
	return out
}

// broadcast wakes every waiter; j.mu is held.
func (j *Journal) broadcast() {
	close(j.wake)
	j.wake = make(chan struct{})
}

// Stats returns the journal's counters.
func (j *Journal) Stats() JournalStats {
	j.mu.Lock()
	defer j.mu.Unlock()
	n := 0
	for _, w := range j.dirty {
		n += bits.OnesCount64(w)
	}
	return JournalStats{Limit: j.limit, Overdraft: j.overdraft, Used: j.used, OpenBytes: j.openB, Epoch: j.epoch, Blocked: j.blocked, BlockedTotal: j.blockedD,
		Tracking: j.tracking, Tracks: j.tracks, DirtyBlocks: n, BitmapBytes: 8 * len(j.dirty)}
}
