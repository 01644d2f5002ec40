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
// BeginPause and Cut nothing blocks: stopping the guest waits for its
// requests in flight, and one of them waiting for the cut would deadlock
// the checkpoint. Those requests are bounded by the server's in-flight
// budget, so the journal holds at most its limit plus that budget.
type Journal struct {
	mu       sync.Mutex
	limit    int64
	used     int64 // bytes held: open epoch plus cut, unreleased ones
	epoch    uint64
	open     []Change
	openB    int64
	sealed   []sealedEpoch // cut and unreleased, oldest first
	pausing  bool
	wake     chan struct{} // closed (and replaced) when waiters should look again
	blocked  uint64
	blockedD time.Duration
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
	Epoch        uint64        // the open epoch
	Blocked      uint64        // Observe calls that had to wait
	BlockedTotal time.Duration // their total wait
}

// changeOverhead is what a change costs besides its data.
const changeOverhead = 64

// NewJournal returns a journal whose open epoch is first. limit must hold
// at least one largest write (maxWrite bytes).
func NewJournal(limit, maxWrite int64, first uint64) (*Journal, error) {
	if maxWrite <= 0 || limit < maxWrite+changeOverhead {
		return nil, fmt.Errorf("disk: journal limit %d is below one write of %d bytes", limit, maxWrite)
	}
	return &Journal{limit: limit, epoch: first, wake: make(chan struct{})}, nil
}

// Observe implements Observer: it copies c into the open epoch, waiting
// first while the journal is full (see Journal).
func (j *Journal) Observe(ctx context.Context, c Change) error {
	cost := int64(len(c.Data)) + changeOverhead
	j.mu.Lock()
	if !j.pausing && j.used+cost > j.limit {
		start := time.Now()
		j.blocked++
		for !j.pausing && j.used+cost > j.limit {
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

// BeginPause admits every change until Cut, whatever the limit.
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
	return JournalStats{Limit: j.limit, Used: j.used, Epoch: j.epoch, Blocked: j.blocked, BlockedTotal: j.blockedD}
}
