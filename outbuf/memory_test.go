package outbuf

import (
	"errors"
	"fmt"
	"testing"
)

type rec struct {
	epoch uint64
	msg   string
}

func newRecorder(limit int) (*Memory, *[]rec) {
	var got []rec
	m := NewMemory(limit, func(e uint64, b []byte) { got = append(got, rec{e, string(b)}) })
	return m, &got
}

func TestMemoryHoldsUntilRelease(t *testing.T) {
	m, got := newRecorder(0)
	m.Emit([]byte("a1"))
	m.Emit([]byte("a2"))
	if err := m.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	m.Emit([]byte("b1"))
	if err := m.Checkpoint(2); err != nil {
		t.Fatal(err)
	}
	m.Emit([]byte("c1")) // open epoch 3
	if len(*got) != 0 {
		t.Fatalf("released before any ack: %v", *got)
	}
	if err := m.Release(1); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(*got) != "[{1 a1} {1 a2}]" {
		t.Fatalf("after release 1: %v", *got)
	}
	// Releasing 3 releases only checkpointed epochs: 2, not the open 3.
	if err := m.Release(3); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(*got) != "[{1 a1} {1 a2} {2 b1}]" {
		t.Fatalf("after release 3: %v", *got)
	}
	st := m.Stats()
	if st.HeldPackets != 1 || st.ReleasedPackets != 3 || st.LastReleased != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestMemoryCloseFailsClosed(t *testing.T) {
	m, got := newRecorder(0)
	m.Emit([]byte("x"))
	_ = m.Checkpoint(1)
	m.Emit([]byte("y"))
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if len(*got) != 0 {
		t.Fatalf("close released output: %v", *got)
	}
	if st := m.Stats(); st.DroppedPackets != 2 || st.HeldPackets != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := m.Release(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("release after close: %v", err)
	}
	m.Emit([]byte("z"))
	if len(*got) != 0 {
		t.Fatal("emit after close leaked")
	}
}

func TestMemoryLimitDrops(t *testing.T) {
	m, got := newRecorder(10)
	for i := 0; i < 5; i++ {
		m.Emit([]byte("abcd")) // 4 bytes: only two fit
	}
	_ = m.Checkpoint(1)
	_ = m.Release(1)
	if len(*got) != 2 || m.Stats().DroppedPackets != 3 {
		t.Fatalf("released %d, stats %+v", len(*got), m.Stats())
	}
}

func TestMemoryReleaseAll(t *testing.T) {
	m, got := newRecorder(0)
	m.Emit([]byte("a"))
	_ = m.Checkpoint(1)
	m.Emit([]byte("b"))
	if err := m.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	m.Emit([]byte("c")) // pass-through now
	if fmt.Sprint(*got) != "[{1 a} {0 b} {0 c}]" {
		t.Fatalf("%v", *got)
	}
}

func TestMemoryEpochOrder(t *testing.T) {
	m, _ := newRecorder(0)
	_ = m.Checkpoint(5)
	var ee *EpochError
	if err := m.Checkpoint(5); !errors.As(err, &ee) || ee.Last != 5 {
		t.Fatalf("repeated epoch accepted: %v", err)
	}
}
