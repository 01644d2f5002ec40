package disk

import (
	"context"
	"errors"
	"testing"
	"time"
)

func write(off int64, n int, b byte) Change {
	d := make([]byte, n)
	for i := range d {
		d[i] = b
	}
	return Change{Kind: KindWrite, Offset: off, Length: int64(n), Data: d}
}

func TestJournalEpochsInOrder(t *testing.T) {
	ctx := context.Background()
	j, err := NewJournal(JournalConfig{Limit: 1 << 20, MaxWrite: 4096}, 7)
	if err != nil {
		t.Fatal(err)
	}
	c := write(0, 10, 1)
	j.Observe(ctx, c)
	c.Data[0] = 9 // the journal kept a copy
	j.Observe(ctx, Change{Kind: KindTrim, Offset: 4096, Length: 4096})
	e := j.Cut()
	j.Observe(ctx, Change{Kind: KindFlush})
	e2 := j.Cut()
	if e.Number != 7 || len(e.Changes) != 2 || e.Changes[0].Data[0] != 1 || e.Changes[1].Kind != KindTrim {
		t.Fatalf("epoch %+v", e)
	}
	if e2.Number != 8 || len(e2.Changes) != 1 || e2.Changes[0].Kind != KindFlush {
		t.Fatalf("epoch %+v", e2)
	}
	if s := j.Stats(); s.Used != e.Bytes+e2.Bytes || s.Epoch != 9 {
		t.Fatalf("stats %+v", s)
	}
	j.Release(7)
	if s := j.Stats(); s.Used != e2.Bytes {
		t.Fatalf("after releasing 7: %+v", s)
	}
	j.Release(100)
	if s := j.Stats(); s.Used != 0 {
		t.Fatalf("after releasing all: %+v", s)
	}
}

func TestJournalLimit(t *testing.T) {
	if _, err := NewJournal(JournalConfig{Limit: 4096, MaxWrite: 4096}, 1); err == nil {
		t.Fatal("a limit that cannot hold one write was accepted")
	}
}

func observeAsync(j *Journal, ctx context.Context, c Change) chan error {
	ch := make(chan error, 1)
	go func() { ch <- j.Observe(ctx, c) }()
	return ch
}

func blocked(t *testing.T, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("Observe returned (%v) though the journal is full", err)
	case <-time.After(100 * time.Millisecond):
	}
}

func done(t *testing.T, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Observe still blocked")
	}
}

// TestJournalBackpressure: a full journal blocks until an ack frees space;
// BeginPause admits an overdraft so that the guest can be stopped; a
// change past the overdraft during a pause does not wait (it could hold
// the stop forever) but switches the journal to tracking mode.
func TestJournalBackpressure(t *testing.T) {
	ctx := context.Background()
	limit := int64(2 * (4096 + ChangeOverhead))
	j, _ := NewJournal(JournalConfig{Limit: limit, MaxWrite: 4096, InFlight: 2}, 1)
	done(t, observeAsync(j, ctx, write(0, 4096, 1)))
	done(t, observeAsync(j, ctx, write(4096, 4096, 2)))
	third := observeAsync(j, ctx, write(8192, 4096, 3))
	blocked(t, third) // full with the open epoch: waits for the pause

	j.BeginPause()
	done(t, third) // admitted while pausing (QEMU drains it)
	done(t, observeAsync(j, ctx, write(0, 4096, 4)))
	e1 := j.Cut()
	if len(e1.Changes) != 4 || e1.Tracked || j.Stats().Used != e1.Bytes {
		t.Fatalf("epoch 1 has %d changes, used %d", len(e1.Changes), j.Stats().Used)
	}
	over := observeAsync(j, ctx, write(0, 4096, 5))
	blocked(t, over) // epoch 1 unacknowledged: full
	j.Release(1)
	done(t, over)
	if s := j.Stats(); s.Blocked != 2 || s.Used != 4096+ChangeOverhead {
		t.Fatalf("stats %+v", s)
	}

	// Past the overdraft in a pause: tracking, no wait.
	j.BeginPause()
	for i := 0; i < 4; i++ {
		done(t, observeAsync(j, ctx, write(int64(i)*TrackBlock, 4096, 6)))
	}
	if s := j.Stats(); !s.Tracking || s.Used != 0 || s.Tracks != 1 {
		t.Fatalf("past the overdraft: %+v", s)
	}
	e2 := j.Cut()
	if !e2.Tracked || len(e2.Dirty) != 1 || e2.Dirty[0] != (Extent{0, 4 * TrackBlock}) {
		t.Fatalf("tracked cut %+v", e2)
	}

	// A waiter gives up with its context.
	j2, _ := NewJournal(JournalConfig{Limit: limit, MaxWrite: 4096}, 1)
	j2.Observe(ctx, write(0, 4096, 1))
	j2.Observe(ctx, write(0, 4096, 1))
	cctx, cancel := context.WithCancel(ctx)
	ch := observeAsync(j2, cctx, write(0, 4096, 1))
	blocked(t, ch)
	cancel()
	if err := <-ch; !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v", err)
	}
}

// TestJournalTracking: a journal started in tracking mode (fed from the
// guest's boot) never blocks and holds no data; its cut is the dirty
// blocks; the next epoch journals again. Track converts the open epoch;
// SetSpill turns a wait into tracking; StartCopy forgets what the copy
// will read and counts copies.
func TestJournalTracking(t *testing.T) {
	ctx := context.Background()
	j, err := NewJournal(JournalConfig{Limit: 2 * (4096 + ChangeOverhead), MaxWrite: 4096, Tracking: true}, 1)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ { // far beyond the limit: no wait
		done(t, observeAsync(j, ctx, write(int64(i%10)*4096, 4096, byte(i))))
	}
	done(t, observeAsync(j, ctx, Change{Kind: KindTrim, Offset: 5 * TrackBlock, Length: TrackBlock + 1}))
	done(t, observeAsync(j, ctx, Change{Kind: KindFlush}))
	if s := j.Stats(); !s.Tracking || s.Used != 0 || s.DirtyBlocks != 3 || s.BitmapBytes != 8 {
		t.Fatalf("tracking stats %+v", s)
	}
	e := j.Cut()
	if !e.Tracked || len(e.Changes) != 0 || len(e.Dirty) != 2 || e.Dirty[0] != (Extent{0, TrackBlock}) || e.Dirty[1] != (Extent{5 * TrackBlock, 2 * TrackBlock}) {
		t.Fatalf("tracked cut %+v", e)
	}
	// Journaling again.
	j.Observe(ctx, write(3*TrackBlock, 100, 1))
	if s := j.Stats(); s.Tracking || s.Used != 100+ChangeOverhead {
		t.Fatalf("after the cut %+v", s)
	}
	j.Track()
	if s := j.Stats(); !s.Tracking || s.Used != 0 || s.DirtyBlocks != 1 || s.Tracks != 1 {
		t.Fatalf("after Track %+v", s)
	}
	if e := j.Cut(); !e.Tracked || len(e.Dirty) != 1 || e.Dirty[0].Offset != 3*TrackBlock {
		t.Fatalf("cut after Track %+v", e)
	}

	// Spill: a change that would wait switches to tracking instead.
	j.Observe(ctx, write(0, 4096, 1))
	j.Observe(ctx, write(0, 4096, 1))
	j.SetSpill(true)
	done(t, observeAsync(j, ctx, write(TrackBlock, 4096, 1)))
	if s := j.Stats(); !s.Tracking || s.Tracks != 2 || s.DirtyBlocks != 2 {
		t.Fatalf("after spill %+v", s)
	}
	// A waiter is let go by SetSpill.
	j.SetSpill(false)
	j.Cut()
	j.Observe(ctx, write(0, 4096, 1))
	j.Observe(ctx, write(0, 4096, 1))
	w := observeAsync(j, ctx, write(0, 4096, 1))
	blocked(t, w)
	j.SetSpill(true)
	done(t, w)

	// StartCopy: tracking from an empty bitmap, one more copy.
	j.StartCopy()
	if s := j.Stats(); !s.Tracking || s.DirtyBlocks != 0 || j.Copies() != 1 {
		t.Fatalf("after StartCopy %+v, copies %d", s, j.Copies())
	}
	j.Observe(ctx, write(7*TrackBlock, 1, 1))
	if e := j.Cut(); e.Copies != 1 || len(e.Dirty) != 1 {
		t.Fatalf("cut after the copy %+v", e)
	}
}
