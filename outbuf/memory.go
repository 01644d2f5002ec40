package outbuf

import (
	"strconv"
	"sync"
)

// Memory is the in-memory output buffer used by the sim backend: the
// guest's output messages stand in for network packets.
type Memory struct {
	mu       sync.Mutex
	limit    int // bytes held at most; beyond it new output is dropped
	sink     func(epoch uint64, msg []byte)
	open     [][]byte
	closed   []held // checkpointed, not yet released, ascending epochs
	passThru bool   // after ReleaseAll: output goes straight out
	isClosed bool
	stats    Stats
}

type held struct {
	epoch uint64
	msgs  [][]byte
}

var _ Buffer = (*Memory)(nil)

// NewMemory returns a buffer holding at most limitBytes (0 = 64 MiB) that
// hands released output to sink, in order. sink is called with the
// buffer's lock held and must not call back into it.
func NewMemory(limitBytes int, sink func(epoch uint64, msg []byte)) *Memory {
	if limitBytes <= 0 {
		limitBytes = 64 << 20
	}
	if sink == nil {
		sink = func(uint64, []byte) {}
	}
	return &Memory{limit: limitBytes, sink: sink}
}

// Kind implements Buffer.
func (m *Memory) Kind() string { return "memory" }

// Emit is the guest sending one message. It is held until the epoch it
// belongs to is released; it is dropped if the buffer is full or closed.
func (m *Memory) Emit(msg []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.isClosed:
		m.stats.DroppedPackets++
		return
	case m.passThru:
		m.stats.ReleasedPackets++
		m.stats.ReleasedBytes += uint64(len(msg))
		m.sink(0, msg)
		return
	case m.stats.HeldBytes+uint64(len(msg)) > uint64(m.limit):
		m.stats.DroppedPackets++
		return
	}
	m.open = append(m.open, append([]byte(nil), msg...))
	m.stats.HeldPackets++
	m.stats.HeldBytes += uint64(len(msg))
}

// Checkpoint implements Buffer.
func (m *Memory) Checkpoint(epoch uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isClosed {
		return ErrClosed
	}
	if m.passThru {
		return nil
	}
	if n := len(m.closed); n > 0 && m.closed[n-1].epoch >= epoch {
		// Epoch numbers only grow; a repeated number would mis-attribute output.
		return &EpochError{Op: "checkpoint", Epoch: epoch, Last: m.closed[n-1].epoch}
	}
	m.closed = append(m.closed, held{epoch: epoch, msgs: m.open})
	m.open = nil
	return nil
}

// Release implements Buffer.
func (m *Memory) Release(epoch uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isClosed {
		return ErrClosed
	}
	i := 0
	for ; i < len(m.closed) && m.closed[i].epoch <= epoch; i++ {
		m.flush(m.closed[i])
	}
	m.closed = m.closed[i:]
	if epoch > m.stats.LastReleased {
		m.stats.LastReleased = epoch
	}
	return nil
}

func (m *Memory) flush(h held) {
	for _, msg := range h.msgs {
		m.sink(h.epoch, msg)
		m.stats.HeldPackets--
		m.stats.HeldBytes -= uint64(len(msg))
		m.stats.ReleasedPackets++
		m.stats.ReleasedBytes += uint64(len(msg))
	}
}

// ReleaseAll implements Buffer.
func (m *Memory) ReleaseAll() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isClosed {
		return ErrClosed
	}
	for _, h := range m.closed {
		m.flush(h)
	}
	m.closed = nil
	m.flush(held{epoch: 0, msgs: m.open})
	m.open = nil
	m.passThru = true
	return nil
}

// Hold implements Buffer: output is held again after ReleaseAll.
func (m *Memory) Hold() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isClosed {
		return ErrClosed
	}
	m.passThru = false
	return nil
}

// Detach implements Buffer: the buffer lives in this process, so detaching
// is closing it (held output is dropped).
func (m *Memory) Detach() error { return m.Close() }

// PassThrough reports whether the buffer lets output out unheld (after
// ReleaseAll, before Hold).
func (m *Memory) PassThrough() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.passThru
}

// Close implements Buffer: held output is dropped, never released.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isClosed {
		return nil
	}
	m.isClosed = true
	n := uint64(len(m.open))
	for _, h := range m.closed {
		n += uint64(len(h.msgs))
	}
	m.stats.DroppedPackets += n
	m.stats.HeldPackets, m.stats.HeldBytes = 0, 0
	m.open, m.closed = nil, nil
	return nil
}

// Stats implements Buffer.
func (m *Memory) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stats
}

// EpochError reports an epoch out of order.
type EpochError struct {
	Op          string
	Epoch, Last uint64
}

func (e *EpochError) Error() string {
	return "outbuf: " + e.Op + " of epoch " + strconv.FormatUint(e.Epoch, 10) + " after epoch " + strconv.FormatUint(e.Last, 10)
}
