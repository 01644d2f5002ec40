package transport

import (
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// PipeBufferSize bounds the bytes buffered in each direction of a Pipe;
// writers block beyond it until the reader drains.
const PipeBufferSize = 64 << 20

// Pipe returns the two ends of an in-memory, full-duplex connection. Unlike
// net.Pipe it is buffered in both directions (up to PipeBufferSize bytes
// each: a Write returns once its bytes are buffered), and it supports
// deadlines. After one end is closed, the other end reads the buffered
// bytes then io.EOF, and its writes fail with io.ErrClosedPipe; operations
// on a closed end fail with net.ErrClosed. Deadline expiry gives
// os.ErrDeadlineExceeded (a net.Error with Timeout() true).
func Pipe() (a, b net.Conn) { return newPipe(PipeBufferSize) }

// newPipe is Pipe with a given per-direction buffer bound.
func newPipe(limit int) (a, b net.Conn) {
	ab := newPipeBuf(limit)
	ba := newPipeBuf(limit)
	ca := &pipeConn{rx: ba, tx: ab, local: pipeAddr("a"), remote: pipeAddr("b"), done: make(chan struct{})}
	cb := &pipeConn{rx: ab, tx: ba, local: pipeAddr("b"), remote: pipeAddr("a"), done: make(chan struct{})}
	ca.rd.init()
	ca.wd.init()
	cb.rd.init()
	cb.wd.init()
	return ca, cb
}

// pipeAddr is the address of a Pipe end.
type pipeAddr string

func (a pipeAddr) Network() string { return "inmem" }
func (a pipeAddr) String() string  { return "inmem:" + string(a) }

// pipeBuf is one direction of a Pipe.
type pipeBuf struct {
	mu      sync.Mutex
	buf     []byte
	r       int
	limit   int
	wclosed bool          // writer end closed: reader gets EOF once drained
	rclosed bool          // reader end closed: writes fail
	changed chan struct{} // closed and replaced on every state change
}

func newPipeBuf(limit int) *pipeBuf {
	return &pipeBuf{limit: limit, changed: make(chan struct{})}
}

// notify wakes every waiter; p.mu must be held.
func (p *pipeBuf) notify() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// pipeDeadline is a settable deadline whose channel closes when it passes.
type pipeDeadline struct {
	mu     sync.Mutex
	timer  *time.Timer
	cancel chan struct{}
}

func (d *pipeDeadline) init() { d.cancel = make(chan struct{}) }

// set arms the deadline at t (zero: no deadline).
func (d *pipeDeadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil && !d.timer.Stop() {
		<-d.cancel // the timer fired: wait until it closed cancel
	}
	d.timer = nil
	closed := isClosedChan(d.cancel)
	if t.IsZero() {
		if closed {
			d.cancel = make(chan struct{})
		}
		return
	}
	if dur := time.Until(t); dur > 0 {
		if closed {
			d.cancel = make(chan struct{})
		}
		c := d.cancel
		d.timer = time.AfterFunc(dur, func() { close(c) })
		return
	}
	if !closed {
		close(d.cancel)
	}
}

// wait returns a channel closed when the deadline has passed.
func (d *pipeDeadline) wait() chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cancel
}

func isClosedChan(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// pipeConn is one end of a Pipe.
type pipeConn struct {
	rx, tx        *pipeBuf
	local, remote pipeAddr
	rd, wd        pipeDeadline
	once          sync.Once
	done          chan struct{}
}

func (c *pipeConn) Read(b []byte) (int, error) {
	for {
		if isClosedChan(c.done) {
			return 0, net.ErrClosed
		}
		dl := c.rd.wait()
		if isClosedChan(dl) {
			return 0, os.ErrDeadlineExceeded
		}
		p := c.rx
		p.mu.Lock()
		if avail := len(p.buf) - p.r; avail > 0 {
			if len(b) == 0 {
				p.mu.Unlock()
				return 0, nil
			}
			n := copy(b, p.buf[p.r:])
			p.r += n
			if p.r == len(p.buf) {
				p.buf = p.buf[:0]
				p.r = 0
			}
			p.notify()
			p.mu.Unlock()
			return n, nil
		}
		if p.wclosed {
			p.mu.Unlock()
			return 0, io.EOF
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-dl:
		case <-c.done:
		}
	}
}

func (c *pipeConn) Write(b []byte) (int, error) {
	written := 0
	for {
		if isClosedChan(c.done) {
			return written, net.ErrClosed
		}
		dl := c.wd.wait()
		if isClosedChan(dl) {
			return written, os.ErrDeadlineExceeded
		}
		p := c.tx
		p.mu.Lock()
		if p.rclosed {
			p.mu.Unlock()
			return written, io.ErrClosedPipe
		}
		if space := p.limit - (len(p.buf) - p.r); space > 0 && written < len(b) {
			k := min(space, len(b)-written)
			if p.r > 0 && len(p.buf)+k > cap(p.buf) {
				n := copy(p.buf, p.buf[p.r:])
				p.buf = p.buf[:n]
				p.r = 0
			}
			p.buf = append(p.buf, b[written:written+k]...)
			written += k
			p.notify()
		}
		if written == len(b) {
			p.mu.Unlock()
			return written, nil
		}
		ch := p.changed
		p.mu.Unlock()
		select {
		case <-ch:
		case <-dl:
		case <-c.done:
		}
	}
}

// Close closes this end: the peer drains what was written then reads
// io.EOF; the peer's writes fail.
func (c *pipeConn) Close() error {
	first := false
	c.once.Do(func() {
		first = true
		close(c.done)
		c.tx.mu.Lock()
		c.tx.wclosed = true
		c.tx.notify()
		c.tx.mu.Unlock()
		c.rx.mu.Lock()
		c.rx.rclosed = true
		c.rx.buf, c.rx.r = nil, 0 // nobody will read it
		c.rx.notify()
		c.rx.mu.Unlock()
	})
	if !first {
		return net.ErrClosed
	}
	return nil
}

func (c *pipeConn) LocalAddr() net.Addr  { return c.local }
func (c *pipeConn) RemoteAddr() net.Addr { return c.remote }

func (c *pipeConn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

func (c *pipeConn) SetReadDeadline(t time.Time) error {
	c.rd.set(t)
	return nil
}

func (c *pipeConn) SetWriteDeadline(t time.Time) error {
	c.wd.set(t)
	return nil
}

// Action is what a FaultConn does with one Write.
type Action int

// Fault actions.
const (
	// Pass writes normally.
	Pass Action = iota
	// Drop swallows the write and reports success.
	Drop
	// Truncate writes the first Fault.N bytes, then closes the connection
	// (a cut mid-frame); the Write returns ErrFaultCut.
	Truncate
	// Corrupt inverts every bit of byte Fault.N (mod len) of a copy of the
	// data and writes it (the caller's slice is not modified).
	Corrupt
	// Cut closes the connection without writing; the Write returns
	// ErrFaultCut.
	Cut
	// Delay sleeps Fault.Delay, then writes normally.
	Delay
)

var actionNames = [...]string{"Pass", "Drop", "Truncate", "Corrupt", "Cut", "Delay"}

// String returns the action's name.
func (a Action) String() string {
	if a >= 0 && int(a) < len(actionNames) {
		return actionNames[a]
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}

// Fault is a hook's verdict on one Write.
type Fault struct {
	Action Action
	N      int           // Truncate: bytes kept; Corrupt: byte offset to flip
	Delay  time.Duration // Delay: how long to sleep
}

// ErrFaultCut is returned by a FaultConn Write whose fault cut the
// connection (Truncate, Cut).
var ErrFaultCut = errors.New("transport: connection cut by fault injection")

// FaultConn wraps a net.Conn and lets a hook decide the fate of each Write.
// With a Writer on top, each Write is exactly one frame (see FrameKind).
// Writes are serialised; the hook is called with the write's index (from
// 0) and its bytes (which it must not retain or modify).
type FaultConn struct {
	net.Conn
	Hook func(i int, b []byte) Fault

	mu      sync.Mutex
	n       int
	scratch []byte
}

// NewFaultConn wraps c; a nil hook passes every write.
func NewFaultConn(c net.Conn, hook func(i int, b []byte) Fault) *FaultConn {
	return &FaultConn{Conn: c, Hook: hook}
}

// Write applies the hook's fault to b.
func (c *FaultConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := c.n
	c.n++
	var f Fault
	if c.Hook != nil {
		f = c.Hook(i, b)
	}
	switch f.Action {
	case Drop:
		return len(b), nil
	case Truncate:
		k := min(max(f.N, 0), len(b))
		n, err := c.Conn.Write(b[:k])
		_ = c.Conn.Close()
		if err != nil {
			return n, err
		}
		return n, ErrFaultCut
	case Corrupt:
		if len(b) == 0 {
			return c.Conn.Write(b)
		}
		c.scratch = append(c.scratch[:0], b...)
		off := f.N % len(b)
		if off < 0 {
			off += len(b)
		}
		c.scratch[off] ^= 0xFF
		return c.Conn.Write(c.scratch)
	case Cut:
		_ = c.Conn.Close()
		return 0, ErrFaultCut
	case Delay:
		time.Sleep(f.Delay)
	}
	return c.Conn.Write(b)
}

// Writes returns the number of Write calls seen so far.
func (c *FaultConn) Writes() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// FrameKind returns the kind of the frame starting at b (a whole frame as a
// Writer writes it), and false if b is too short or the kind is unknown.
func FrameKind(b []byte) (Kind, bool) {
	if len(b) < prefixSize {
		return 0, false
	}
	k := Kind(b[lenSize])
	return k, k.Valid()
}
