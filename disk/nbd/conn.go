package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
)

// errClean ends a connection the client closed by the protocol's rules
// (NBD_OPT_ABORT, NBD_CMD_DISC).
var errClean = errors.New("nbd: client disconnected")

type conn struct {
	s   *Server
	nc  net.Conn
	r   *bufio.Reader
	log *zap.Logger

	wmu    sync.Mutex // one reply at a time
	wbuf   []byte     // header scratch, under wmu
	broken bool       // a reply failed; under wmu

	budget *budget
}

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{
		s: s, nc: nc, r: bufio.NewReaderSize(nc, 64<<10),
		log:    s.log.With(zap.String("remote", nc.RemoteAddr().String())),
		budget: newBudget(s.cfg.MaxInFlightBytes),
	}
}

func (c *conn) run(ctx context.Context) error {
	// A server that stops unblocks the reader; requests in flight get
	// ShutdownGrace to finish (see transmit).
	stop := context.AfterFunc(ctx, func() { c.nc.SetReadDeadline(time.Now()) })
	defer stop()
	if err := c.nc.SetDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout)); err != nil {
		return fmt.Errorf("nbd: set handshake deadline: %w", err)
	}
	if ctx.Err() != nil {
		return nil
	}
	err := c.handshake()
	if err != nil {
		return err
	}
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		return fmt.Errorf("nbd: clear handshake deadline: %w", err)
	}
	if ctx.Err() != nil { // AfterFunc may have run before the deadline was cleared
		return nil
	}
	c.log.Debug("nbd: transmission")
	return c.transmit(ctx)
}

// handshake runs the fixed newstyle negotiation; it returns nil when the
// client enters the transmission phase.
func (c *conn) handshake() error {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicNBD)
	binary.BigEndian.PutUint64(hello[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return fmt.Errorf("nbd: send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return fmt.Errorf("nbd: read client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(cf[:])
	if cflags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		return fmt.Errorf("%w: unknown client flags %#x", errProtocol, cflags)
	}
	noZeroes := cflags&clientNoZeroes != 0

	var hdr [optHeaderSize]byte
	for range maxOptions {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return fmt.Errorf("nbd: read option: %w", err)
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != magicIHaveOpt {
			return fmt.Errorf("%w: option magic %#x", errProtocol, m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		done, err := c.option(opt, length, noZeroes)
		if err != nil || done {
			return err
		}
	}
	return fmt.Errorf("%w: more than %d options", errProtocol, maxOptions)
}

// option handles one option whose header has been read. done means the
// transmission phase begins.
func (c *conn) option(opt, length uint32, noZeroes bool) (done bool, err error) {
	known := opt == optExportName || opt == optAbort || opt == optList || opt == optInfo || opt == optGo
	if !known {
		if err := c.discard(int64(length)); err != nil {
			return false, err
		}
		return false, c.optReply(opt, repErrUnsup, nil)
	}
	if opt == optAbort {
		if err := c.discard(int64(length)); err != nil {
			return false, err
		}
		c.optReply(opt, repAck, nil) // the client may already be gone
		return false, errClean
	}
	if length > MaxOptionData {
		if opt == optExportName { // no way to reply with an error
			return false, fmt.Errorf("%w: export name of %d bytes", errProtocol, length)
		}
		if err := c.discard(int64(length)); err != nil {
			return false, err
		}
		return false, c.optReply(opt, repErrTooBig, nil)
	}
	data := make([]byte, length) // bounded by MaxOptionData
	if _, err := io.ReadFull(c.r, data); err != nil {
		return false, fmt.Errorf("nbd: read option data: %w", err)
	}
	switch opt {
	case optExportName:
		if checkString(data) != nil || !c.isExport(string(data)) {
			return false, fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME of an unknown export %q", truncate(data))
		}
		b := binary.BigEndian.AppendUint64(nil, c.s.lim.size)
		b = binary.BigEndian.AppendUint16(b, c.s.tflags)
		if !noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		if _, err := c.nc.Write(b); err != nil {
			return false, fmt.Errorf("nbd: send export: %w", err)
		}
		return true, nil
	case optList:
		if length != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		}
		d := binary.BigEndian.AppendUint32(nil, uint32(len(c.s.cfg.Name)))
		d = append(d, c.s.cfg.Name...)
		d = append(d, c.s.cfg.Description...)
		if err := c.optReply(opt, repServer, d); err != nil {
			return false, err
		}
		return false, c.optReply(opt, repAck, nil)
	}
	// NBD_OPT_INFO, NBD_OPT_GO
	g, err := parseGo(data)
	if err != nil {
		return false, c.optReply(opt, repErrInvalid, []byte(err.Error()))
	}
	if !c.isExport(g.name) {
		return false, c.optReply(opt, repErrUnknown, []byte("no such export"))
	}
	var wantName, wantDesc, wantBlock bool
	for _, t := range g.infos {
		switch t {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		case infoBlockSize:
			wantBlock = true
		}
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, c.s.lim.size)
	info = binary.BigEndian.AppendUint16(info, c.s.tflags)
	if err := c.optReply(opt, repInfo, info); err != nil {
		return false, err
	}
	// Sent whether asked or not: the spec lets a server volunteer it, and a
	// client that did not ask is held to the defaults only if they apply.
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, c.s.cfg.MinBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, c.s.cfg.PreferredBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, c.s.cfg.MaxPayload)
	if err := c.optReply(opt, repInfo, bs); err != nil {
		return false, err
	}
	if wantName {
		if err := c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), c.s.cfg.Name...)); err != nil {
			return false, err
		}
	}
	if wantDesc && c.s.cfg.Description != "" {
		if err := c.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), c.s.cfg.Description...)); err != nil {
			return false, err
		}
	}
	if opt == optGo && c.s.cfg.MinBlockSize > 1 && !wantBlock {
		return false, c.optReply(opt, repErrBlockSize, []byte("request NBD_INFO_BLOCK_SIZE: the minimum block size is not 1"))
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	return opt == optGo, nil
}

func (c *conn) isExport(name string) bool { return name == "" || name == c.s.cfg.Name }

func truncate(b []byte) string {
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

func (c *conn) optReply(opt, typ uint32, data []byte) error {
	if _, err := c.nc.Write(appendOptReply(nil, opt, typ, data)); err != nil {
		return fmt.Errorf("nbd: send option reply: %w", err)
	}
	return nil
}

// discard reads and drops n bytes through a small buffer.
func (c *conn) discard(n int64) error {
	if _, err := c.r.Discard(int(min(n, 1<<62))); err != nil {
		return fmt.Errorf("nbd: discard %d bytes: %w", n, err)
	}
	return nil
}

// transmit runs the transmission phase: the reader (this goroutine) checks
// each request, reads a write's payload into a buffer it has budget for,
// and hands the request to a goroutine that carries it out and replies.
func (c *conn) transmit(ctx context.Context) (err error) {
	var wg sync.WaitGroup
	defer func() {
		if err != nil && !errors.Is(err, errClean) {
			// A hard disconnect: what is in flight completes on the image
			// (and is observed), but its replies cannot block.
			c.nc.SetWriteDeadline(time.Now())
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			t := time.NewTimer(c.s.cfg.ShutdownGrace)
			select {
			case <-done:
			case <-t.C:
				c.nc.SetDeadline(time.Now()) // replies can no longer block
				<-done
			}
			t.Stop()
		}
	}()
	var hdr [requestSize]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("nbd: read request: %w", err)
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			c.log.Warn("nbd: bad request, disconnecting", zap.Error(err))
			return err
		}
		v := c.s.lim.check(req)
		if v.disconnect {
			c.log.Warn("nbd: write payload over the maximum, disconnecting", zap.Uint32("length", req.length))
			return fmt.Errorf("%w: write of %d bytes", errProtocol, req.length)
		}
		if req.typ == cmdDisc {
			return errClean
		}
		if v.errno != 0 {
			if err := c.discard(int64(v.payload)); err != nil {
				return err
			}
			c.reply(req.cookie, v.errno, nil)
			continue
		}
		cost := int64(requestOverhead)
		if req.typ == cmdRead || req.typ == cmdWrite {
			cost += int64(req.length)
		}
		if err := c.budget.acquire(ctx, cost); err != nil {
			return nil // server stopping
		}
		var buf *[]byte
		if req.typ == cmdWrite {
			buf = c.s.getBuf(int(req.length))
			if _, err := io.ReadFull(c.r, *buf); err != nil {
				c.s.putBuf(buf)
				c.budget.release(cost)
				return fmt.Errorf("nbd: read write payload: %w", err)
			}
		}
		if req.typ == cmdRead || req.typ == cmdFlush {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.budget.release(cost)
				c.do(ctx, req)
			}()
			continue
		}
		// Changes are applied here, in the order they arrive: no hand-off
		// to another goroutine on the latency path, and a blocked observer
		// stops this connection's reader (backpressure). Only the flush of
		// a FUA change runs aside.
		err = c.apply(ctx, req, buf)
		c.s.putBuf(buf)
		if err == nil && req.flags&cmdFlagFUA != 0 && req.length > 0 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.budget.release(cost)
				c.finish(ctx, req, c.s.backend.Flush(ctx))
			}()
			continue
		}
		c.finish(ctx, req, err)
		c.budget.release(cost)
	}
}

// apply carries out a checked WRITE, TRIM or WRITE_ZEROES on the backend
// and reports it to the observer.
func (c *conn) apply(ctx context.Context, req request, buf *[]byte) error {
	s := c.s
	off, n := int64(req.offset), int64(req.length)
	if n == 0 {
		return nil
	}
	fua := req.flags&cmdFlagFUA != 0
	switch req.typ {
	case cmdWrite:
		data := *buf
		return s.change(ctx, disk.Change{Kind: disk.KindWrite, Offset: off, Length: n, Data: data, FUA: fua},
			func() error { return s.backend.WriteAt(ctx, data, off) })
	case cmdTrim:
		return s.change(ctx, disk.Change{Kind: disk.KindTrim, Offset: off, Length: n, FUA: fua},
			func() error { return s.backend.Trim(ctx, off, n) })
	case cmdWriteZeroes:
		noHole := req.flags&cmdFlagNoHole != 0
		return s.change(ctx, disk.Change{Kind: disk.KindZero, Offset: off, Length: n, FUA: fua, NoHole: noHole},
			func() error { return s.backend.WriteZeroes(ctx, off, n, noHole) })
	}
	return fmt.Errorf("nbd: apply command %d", req.typ)
}

// finish replies to a request without read data.
func (c *conn) finish(ctx context.Context, req request, err error) {
	if err != nil {
		c.log.Warn("nbd: request failed", zap.Uint16("command", req.typ), zap.Uint64("offset", req.offset), zap.Uint32("length", req.length), zap.Error(err))
		c.reply(req.cookie, errnoOf(ctx, err), nil)
		return
	}
	c.reply(req.cookie, 0, nil)
}

// do carries out a checked READ or FLUSH and replies.
func (c *conn) do(ctx context.Context, req request) {
	s := c.s
	off, n := int64(req.offset), int64(req.length)
	if req.typ == cmdFlush {
		err := s.backend.Flush(ctx)
		if err == nil {
			// Every change replied to before this flush was received was
			// observed before this marker.
			err = s.change(ctx, disk.Change{Kind: disk.KindFlush}, func() error { return nil })
		}
		c.finish(ctx, req, err)
		return
	}
	rb := s.getBuf(int(n))
	defer s.putBuf(rb)
	var err error
	if n > 0 {
		err = s.backend.ReadAt(ctx, *rb, off)
	}
	if err != nil {
		c.log.Warn("nbd: read failed", zap.Int64("offset", off), zap.Int64("length", n), zap.Error(err))
		c.reply(req.cookie, errnoOf(ctx, err), nil)
		return
	}
	c.reply(req.cookie, 0, *rb)
}

// reply sends a simple reply (with data for a successful read). A failed
// send stops the connection: the reader is unblocked and sees an error.
func (c *conn) reply(cookie uint64, errno uint32, data []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.broken {
		return
	}
	c.wbuf = appendSimpleReply(c.wbuf[:0], errno, cookie)
	bufs := net.Buffers{c.wbuf, data}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		c.broken = true
		c.log.Debug("nbd: send reply", zap.Error(err))
		c.nc.SetDeadline(time.Now())
	}
}

// budget bounds the bytes of a connection's requests in flight. Only the
// connection's reader acquires, so a single wake-up token cannot be lost.
type budget struct {
	mu   sync.Mutex
	free int64
	wake chan struct{}
}

func newBudget(n int64) *budget { return &budget{free: n, wake: make(chan struct{}, 1)} }

func (b *budget) acquire(ctx context.Context, n int64) error {
	for {
		b.mu.Lock()
		if b.free >= n {
			b.free -= n
			b.mu.Unlock()
			return nil
		}
		b.mu.Unlock()
		select {
		case <-b.wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.free += n
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}
