package plug

import (
	"math/rand/v2"
	"slices"
	"testing"
)

type simOut struct{ got []uint64 }

func (s *simOut) sink(tag uint64) { s.got = append(s.got, tag) }

func (s *simOut) take() []uint64 {
	g := s.got
	s.got = nil
	return g
}

func mustChange(t *testing.T, k *SimKernel, a uint32) {
	t.Helper()
	if err := k.Change(a); err != nil {
		t.Fatal(err)
	}
}

func enqueue(k *SimKernel, tags ...uint64) {
	for _, tag := range tags {
		k.Enqueue(tag)
	}
}

func wantOut(t *testing.T, s *simOut, want ...uint64) {
	t.Helper()
	if got := s.take(); !slices.Equal(got, want) {
		t.Fatalf("released %v, want %v", got, want)
	}
}

// TestSimKernelEpochs: the use sch_plug documents, one closed epoch at a
// time, releases exactly the closed epoch.
func TestSimKernelEpochs(t *testing.T) {
	var s simOut
	k := NewSimKernel(0, s.sink)
	enqueue(k, 11, 12, 13) // epoch 1
	wantOut(t, &s)
	mustChange(t, k, SimBuffer) // close epoch 1
	enqueue(k, 21, 22)          // epoch 2
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s, 11, 12, 13)
	mustChange(t, k, SimBuffer) // close epoch 2
	enqueue(k, 31)
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s, 21, 22)
	// RELEASE_ONE with nothing closed releases nothing.
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s)
	if st := k.State(); !slices.Equal(st.Queue, []uint64{31}) || st.PktsCurrentEpoch != 1 || !st.Throttled {
		t.Fatalf("state %+v", st)
	}
}

// TestSimKernelSecondBufferTrap: BUFFER while a closed epoch is pending
// (BUFFER, BUFFER, RELEASE_ONE) loses the first boundary: RELEASE_ONE lets
// out as many packets as the second epoch had, counted from the head.
func TestSimKernelSecondBufferTrap(t *testing.T) {
	// The second epoch is the larger: all of the first epoch and part of
	// the second leave on the first epoch's release.
	var s simOut
	k := NewSimKernel(0, s.sink)
	enqueue(k, 11)
	mustChange(t, k, SimBuffer)
	enqueue(k, 21, 22, 23)
	mustChange(t, k, SimBuffer)
	enqueue(k, 31)
	mustChange(t, k, SimReleaseOne) // meant for epoch 1
	wantOut(t, &s, 11, 21, 22)

	// The second epoch is the smaller: part of the first epoch is
	// stranded, and no later RELEASE_ONE accounts for it.
	s = simOut{}
	k = NewSimKernel(0, s.sink)
	enqueue(k, 11, 12, 13)
	mustChange(t, k, SimBuffer)
	enqueue(k, 21)
	mustChange(t, k, SimBuffer)
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s, 11)
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s)
}

// TestSimKernelReleaseIndefinite: everything goes, then pass-through until
// BUFFER, which holds again from an empty epoch.
func TestSimKernelReleaseIndefinite(t *testing.T) {
	var s simOut
	k := NewSimKernel(0, s.sink)
	enqueue(k, 1, 2)
	mustChange(t, k, SimBuffer)
	enqueue(k, 3)
	mustChange(t, k, SimReleaseIndefinite)
	wantOut(t, &s, 1, 2, 3)
	enqueue(k, 4)
	wantOut(t, &s, 4)
	mustChange(t, k, SimBuffer)
	enqueue(k, 5)
	wantOut(t, &s)
	mustChange(t, k, SimReleaseOne) // the epoch closed by that BUFFER was empty
	wantOut(t, &s)
	mustChange(t, k, SimBuffer)
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s, 5)
	if err := k.Change(99); err == nil {
		t.Fatal("invalid action accepted")
	}
}

func TestSimKernelLimitDrops(t *testing.T) {
	var s simOut
	k := NewSimKernel(2, s.sink)
	if !k.Enqueue(1) || !k.Enqueue(2) || k.Enqueue(3) {
		t.Fatal("limit of 2 packets not enforced")
	}
	mustChange(t, k, SimBuffer)
	mustChange(t, k, SimReleaseOne)
	wantOut(t, &s, 1, 2)
}

// TestSimulatedBufferMerges runs the real Buffer over the model: a
// checkpoint while an epoch is pending merges, and releases never let out
// output of an epoch beyond the one released.
func TestSimulatedBufferMerges(t *testing.T) {
	var s simOut
	k := NewSimKernel(0, s.sink)
	b := NewSimulated(k, nil)
	enqueue(k, 1, 1)
	if err := b.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	enqueue(k, 2, 2, 2)
	if err := b.Checkpoint(2); err != nil { // merged: no second BUFFER
		t.Fatal(err)
	}
	enqueue(k, 3)
	if err := b.Release(1); err != nil {
		t.Fatal(err)
	}
	wantOut(t, &s, 1, 1)
	if err := b.Release(2); err != nil { // no boundary after epoch 2 yet
		t.Fatal(err)
	}
	wantOut(t, &s)
	if err := b.Checkpoint(3); err != nil {
		t.Fatal(err)
	}
	enqueue(k, 4)
	if err := b.Release(3); err != nil {
		t.Fatal(err)
	}
	wantOut(t, &s, 2, 2, 2, 3)
	if st := b.Stats(); st.LastReleased != 3 || st.HeldPackets != 1 || st.ReleasedPackets != 6 {
		t.Fatalf("stats %+v", st)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if st := b.Stats(); st.DroppedPackets != 1 || st.HeldPackets != 0 {
		t.Fatalf("after close: %+v", st)
	}
}

// TestSimulatedBufferRandomized drives the real Buffer over the model with
// random checkpoints, releases, release-all and hold, tagging each packet
// with its epoch: outside pass-through, no packet leaves before a Release
// of its epoch, and none is lost or reordered.
func TestSimulatedBufferRandomized(t *testing.T) {
	for seed := uint64(1); seed <= 300; seed++ {
		rng := rand.New(rand.NewPCG(seed, 3))
		var released uint64 // highest epoch passed to Release
		passThru := false
		var last uint64 // last tag seen (tags grow)
		var sent, got int
		k := NewSimKernel(0, func(tag uint64) {
			got++
			if tag <= last {
				t.Fatalf("seed %d: tag %x after %x: reordered", seed, tag, last)
			}
			last = tag
			if e := tag >> 32; !passThru && e > released {
				t.Fatalf("seed %d: packet of epoch %d released, only epochs <= %d acknowledged", seed, e, released)
			}
		})
		b := NewSimulated(k, nil)
		epoch := uint64(1) // the open epoch
		var seq uint64
		for step := 0; step < 300; step++ {
			switch r := rng.IntN(10); {
			case r < 5:
				seq++
				sent++
				k.Enqueue(epoch<<32 | seq)
			case r < 7:
				if err := b.Checkpoint(epoch); err != nil {
					t.Fatal(err)
				}
				epoch++
			case r < 9:
				// The backup acknowledges a checkpointed epoch.
				if e := released + uint64(rng.IntN(3)); e < epoch && e > released {
					released = e
					if err := b.Release(e); err != nil {
						t.Fatal(err)
					}
				}
			case rng.IntN(4) == 0:
				passThru = true
				if err := b.ReleaseAll(); err != nil {
					t.Fatal(err)
				}
			default:
				if err := b.Hold(); err != nil {
					t.Fatal(err)
				}
				if passThru {
					// Everything so far went out; the open epoch holds.
					passThru = false
					released = epoch - 1
				}
			}
		}
		passThru = true
		if err := b.ReleaseAll(); err != nil {
			t.Fatal(err)
		}
		if got != sent {
			t.Fatalf("seed %d: %d packets sent, %d released", seed, sent, got)
		}
	}
}
