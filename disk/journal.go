package disk

import (
	"context"
	"fmt"
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
// at most the server's max payload. The overdraft is InFlight such writes;
// a client with more in flight waits past it (and the engine's stop must
// time out), so the journal never holds more than Limit + overdraft.
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
}

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
}

// JournalStats are a Journal's counters.
type JournalStats struct {
	Limit, Used  int64
	Overdraft    int64         // what a pause may add to Limit
	Epoch        uint64        // the open epoch
	Blocked      uint64        // Observe calls that had to wait
	BlockedTotal time.Duration // their total wait
}

// changeOverhead is what a change costs besides its data.
const changeOverhead = 64

// JournalConfig configures a Journal.
type JournalConfig struct {
	// Limit bounds the bytes held outside a pause; at least one MaxWrite.
	Limit int64
	// MaxWrite is the largest write the server admits (its max payload).
	MaxWrite int64
	// InFlight is how many requests the client may have in flight when the
	// guest stops (default 16, QEMU's NBD client).
	InFlight int
}

// NewJournal returns a journal whose open epoch is first.
func NewJournal(cfg JournalConfig, first uint64) (*Journal, error) {
	if cfg.InFlight == 0 {
		cfg.InFlight = 16
	}
	if cfg.MaxWrite <= 0 || cfg.Limit < cfg.MaxWrite+changeOverhead || cfg.InFlight < 0 {
		return nil, fmt.Errorf("disk: journal limit %d is below one write of %d bytes", cfg.Limit, cfg.MaxWrite)
	}
	return &Journal{
		limit: cfg.Limit, overdraft: int64(cfg.InFlight) * (cfg.MaxWrite + changeOverhead),
		epoch: first, wake: make(chan struct{}),
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
	cost := int64(len(c.Data)) + changeOverhead
	j.mu.Lock()
	if j.used+cost > j.bound() {
		start := time.Now()
		j.blocked++
		for j.used+cost > j.bound() {
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
		}
		j.blockedD += time.Since(start)
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
	e := Epoch{Number: j.epoch, Changes: j.open, Bytes: j.openB}
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

// broadcast wakes every waiter; j.mu is held.
func (j *Journal) broadcast() {
	close(j.wake)
	j.wake = make(chan struct{})
}

// Stats returns the journal's counters.
func (j *Journal) Stats() JournalStats {
	j.mu.Lock()
	defer j.mu.Unlock()
	return JournalStats{Limit: j.limit, Overdraft: j.overdraft, Used: j.used, Epoch: j.epoch, Blocked: j.blocked, BlockedTotal: j.blockedD}
}
