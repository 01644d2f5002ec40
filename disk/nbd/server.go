// Package nbd is a small, spec-driven NBD server (NetworkBlockDevice/nbd,
// doc/proto.md) that serves one export backed by a disk.Backend and reports
// every change to a disk.Observer: the primary's block seam for protected
// guests whose disks QEMU reaches with its NBD client
// (-blockdev driver=nbd,server.type=unix,...).
//
// Supported: fixed newstyle handshake (NBD_FLAG_NO_ZEROES too); options
// NBD_OPT_EXPORT_NAME, NBD_OPT_GO and NBD_OPT_INFO (NBD_INFO_EXPORT,
// NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION),
// NBD_OPT_LIST and NBD_OPT_ABORT; every other option (TLS, structured
// replies, metadata contexts, extended headers, unknown ones) gets
// NBD_REP_ERR_UNSUP. Simple replies only. Commands READ, WRITE (with FUA),
// FLUSH, TRIM, WRITE_ZEROES (with FUA and NO_HOLE) and DISC; anything else
// gets NBD_EINVAL.
//
// Everything a client sends is checked before it reaches an allocation:
// option data is bounded (MaxOptionData), request payloads by MaxPayload,
// offsets and lengths against the export size without overflow. Each
// connection has a byte budget for requests in flight (MaxInFlightBytes),
// and the number of connections is bounded (MaxConns), so the server's
// memory is bounded whatever clients send: at most about
// MaxConns × MaxInFlightBytes of request buffers.
//
// A connection's reader applies WRITE, TRIM and WRITE_ZEROES itself, in
// the order they arrive (the flush of a FUA change runs aside); READ and
// FLUSH run in goroutines of their own, so replies may come out of order,
// as the spec allows.
package nbd

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
)

// Config configures a Server. The zero value of a field selects its
// default.
type Config struct {
	// Name is the export's name. Clients reach it by this name or by the
	// empty name (the default export).
	Name string
	// Description is shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
	Description string
	// ReadOnly exports the image read-only (writes fail with NBD_EPERM).
	ReadOnly bool
	// MinBlockSize is the advertised minimum block size (alignment of
	// offsets and lengths); a power of two up to 64 KiB. Default 1.
	MinBlockSize uint32
	// PreferredBlockSize is advertised to clients. Default 4096.
	PreferredBlockSize uint32
	// MaxPayload bounds READ and WRITE lengths. Default and maximum 32 MiB
	// (the spec's interoperable maximum).
	MaxPayload uint32
	// MaxInFlightBytes bounds the request buffers of one connection; a
	// client that sends more waits (TCP flow control) until replies free
	// space. Default 64 MiB; at least MaxPayload.
	MaxInFlightBytes int64
	// MaxConns bounds concurrent connections; more are closed at once.
	// Default 4 (QEMU uses one; nbdcopy up to four with multi-conn).
	MaxConns int
	// HandshakeTimeout bounds the handshake of a connection. Default 10 s.
	HandshakeTimeout time.Duration
	// ShutdownGrace is how long a connection waits for its requests in
	// flight when the server stops, before it closes. Default 5 s.
	ShutdownGrace time.Duration
}

const (
	defaultMaxPayload = 32 << 20
	// MaxOptionData bounds the data of one handshake option the server
	// reads; longer option data is discarded unread.
	MaxOptionData = 64 << 10
	// maxOptions bounds the options of one handshake (a client looping
	// forever in the handshake is cut off).
	maxOptions = 1024
	// requestOverhead is what every request costs in the in-flight budget
	// besides its payload, so that zero-length requests are bounded too.
	requestOverhead = 1 << 10
)

func (c Config) withDefaults() Config {
	if c.MinBlockSize == 0 {
		c.MinBlockSize = 1
	}
	if c.PreferredBlockSize == 0 {
		c.PreferredBlockSize = 4096
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = defaultMaxPayload
	}
	if c.MaxInFlightBytes == 0 {
		c.MaxInFlightBytes = 64 << 20
	}
	if c.MaxConns == 0 {
		c.MaxConns = 4
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.ShutdownGrace == 0 {
		c.ShutdownGrace = 5 * time.Second
	}
	return c
}

// Validate checks the configuration (after defaults) against the spec's
// size constraints.
func (c Config) Validate() error {
	c = c.withDefaults()
	pow2 := func(v uint32) bool { return v != 0 && v&(v-1) == 0 }
	switch {
	case len(c.Name) > maxString || checkString([]byte(c.Name)) != nil:
		return fmt.Errorf("nbd: export name: at most %d bytes, no NUL", maxString)
	case len(c.Description) > maxString || checkString([]byte(c.Description)) != nil:
		return fmt.Errorf("nbd: description: at most %d bytes, no NUL", maxString)
	case !pow2(c.MinBlockSize) || c.MinBlockSize > 64<<10:
		return fmt.Errorf("nbd: min block size %d: a power of two up to 65536", c.MinBlockSize)
	case !pow2(c.PreferredBlockSize) || c.PreferredBlockSize < max(c.MinBlockSize, 512):
		return fmt.Errorf("nbd: preferred block size %d: a power of two, at least 512 and the minimum", c.PreferredBlockSize)
	case c.MaxPayload < c.PreferredBlockSize || c.MaxPayload > defaultMaxPayload || c.MaxPayload%c.MinBlockSize != 0:
		return fmt.Errorf("nbd: max payload %d: between the preferred block size and %d, a multiple of the minimum", c.MaxPayload, defaultMaxPayload)
	case c.MaxInFlightBytes < int64(c.MaxPayload)+requestOverhead:
		return fmt.Errorf("nbd: max in-flight bytes %d: at least max payload + %d", c.MaxInFlightBytes, requestOverhead)
	case c.MaxConns < 1:
		return fmt.Errorf("nbd: max conns %d", c.MaxConns)
	case c.HandshakeTimeout < 0 || c.ShutdownGrace < 0:
		return errors.New("nbd: negative timeout")
	}
	return nil
}

// Server serves one export. It is safe for concurrent use; Serve may be
// called for several listeners.
type Server struct {
	cfg     Config
	backend disk.Backend
	obs     disk.Observer
	log     *zap.Logger
	lim     limits
	tflags  uint16

	// changeMu serialises changes and their observation, so the observer
	// sees them in the order the image received them.
	changeMu sync.Mutex
	conns    chan struct{} // one token per open connection
	pools    [26]sync.Pool // request buffers by power-of-two size class
}

// New returns a server for backend. obs may be nil (nothing observes the
// changes); log may be nil.
func New(cfg Config, backend disk.Backend, obs disk.Observer, log *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if backend == nil {
		return nil, errors.New("nbd: no backend")
	}
	if log == nil {
		log = zap.NewNop()
	}
	cfg = cfg.withDefaults()
	size := backend.Size()
	if size < 0 {
		return nil, fmt.Errorf("nbd: backend size %d", size)
	}
	if size%int64(cfg.MinBlockSize) != 0 {
		return nil, fmt.Errorf("nbd: export size %d is not a multiple of the min block size %d", size, cfg.MinBlockSize)
	}
	tflags := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagWriteZeroes | tflagCanMultiConn)
	if cfg.ReadOnly {
		tflags |= tflagReadOnly
	}
	return &Server{
		cfg: cfg, backend: backend, obs: obs, log: log,
		lim:    limits{size: uint64(size), minBlock: cfg.MinBlockSize, maxPayload: cfg.MaxPayload, readOnly: cfg.ReadOnly},
		tflags: tflags,
		conns:  make(chan struct{}, cfg.MaxConns),
	}, nil
}

// ListenUnix listens on a unix socket at path, replacing a stale socket
// file (never any other kind of file).
func ListenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("nbd: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("nbd: remove stale socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nbd: listen: %w", err)
	}
	return ln, nil
}

// Serve accepts connections on ln until ctx ends or ln fails, then closes
// ln and returns after every connection it accepted has ended. It returns
// nil when ctx ended.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer ln.Close()
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		select {
		case s.conns <- struct{}{}:
		default:
			s.log.Warn("nbd: too many connections, closing one", zap.Int("max", s.cfg.MaxConns))
			nc.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.conns }()
			if err := s.serveConn(ctx, nc); err != nil {
				s.log.Info("nbd: connection ended", zap.Error(err))
			}
		}()
	}
}

// ServeConn serves one connection until the client disconnects or ctx
// ends, and closes it. It returns nil after a clean disconnect
// (NBD_CMD_DISC or NBD_OPT_ABORT) or when ctx ended.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	select {
	case s.conns <- struct{}{}:
	default:
		nc.Close()
		return fmt.Errorf("nbd: more than %d connections", s.cfg.MaxConns)
	}
	defer func() { <-s.conns }()
	return s.serveConn(ctx, nc)
}

func (s *Server) serveConn(ctx context.Context, nc net.Conn) error {
	defer nc.Close()
	c := newConn(s, nc)
	err := c.run(ctx)
	if ctx.Err() != nil || errors.Is(err, errClean) {
		return nil
	}
	return err
}

// getBuf returns a buffer of n bytes from the pool (n <= MaxPayload).
func (s *Server) getBuf(n int) *[]byte {
	class := sizeClass(n)
	if p, ok := s.pools[class].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<class)
	return &b
}

func (s *Server) putBuf(p *[]byte) {
	if p == nil {
		return
	}
	s.pools[sizeClass(cap(*p))].Put(p)
}

// sizeClass is the smallest class c >= 12 with n <= 1<<c.
func sizeClass(n int) int {
	if n <= 1<<12 {
		return 12
	}
	return bits.Len(uint(n - 1))
}

// change applies op to the backend and reports c to the observer, both
// under changeMu.
func (s *Server) change(ctx context.Context, c disk.Change, op func() error) error {
	s.changeMu.Lock()
	defer s.changeMu.Unlock()
	if err := op(); err != nil {
		return err
	}
	if s.obs == nil {
		return nil
	}
	if err := s.obs.Observe(ctx, c); err != nil {
		return fmt.Errorf("%w: %w", errObserver, err)
	}
	return nil
}

var errObserver = errors.New("nbd: observer")

// errnoOf maps a backend or observer error to an NBD error value.
func errnoOf(ctx context.Context, err error) uint32 {
	switch {
	case ctx.Err() != nil:
		return errShutdown
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EBADF):
		return errPerm
	}
	return errIO
}
