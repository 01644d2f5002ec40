package watchdog

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/internal/peercred"
)

// ErrRunning: another watchdog holds the state directory's lock.
var ErrRunning = errors.New("watchdog: another watchdog runs for this state directory")

// ServerOptions configure Serve.
type ServerOptions struct {
	// StateDir is the daemon's state directory: the socket, lock and pid
	// file live there.
	StateDir string
	// Procs validates and signals processes (default: LinuxProcs over
	// Binaries).
	Procs Procs
	// Binaries are the QEMU binaries a supervised process may run (for
	// the default Procs; default qemu-system-x86_64 from PATH).
	Binaries []string
	// XenDomains are the Xen domains (by name) it may pause (for the
	// default Procs, through Xen: HostXen, or XenOps if set). With some, a
	// host without any of Binaries is no error.
	XenDomains []string
	XenOps     XenOps
	// IdleExit: exit once nothing has been supervised and no daemon has
	// been connected for this long (0: never).
	IdleExit time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	Log *zap.Logger
	// Ready, if set, is called once the socket accepts connections.
	Ready func()
}

// Server is a running watchdog.
type Server struct {
	o    ServerOptions
	log  *zap.Logger
	mu   sync.Mutex
	core *Core
	// conns counts connected daemons; idleSince is when the watchdog last
	// became idle (no connection, nothing supervised).
	conns     int
	idleSince time.Time
	nextID    uint64
	wake      chan struct{}
	// xen: the Xen domains' procs (nil: none); xenSaved: the Xen pauses
	// as last written to StateDir/XenStateName.
	xen      *XenProcs
	xenSaved []byte
	// xenKept: recorded pauses this watchdog could not restore and that
	// are not proven stale: kept in the record.
	xenKept []HeldXen
}

// Serve runs the watchdog until ctx is done (or, with IdleExit, it has
// been idle that long). It takes the state directory's lock (ErrRunning
// if another watchdog holds it), listens on StateDir/watchdog.sock (mode
// 0600) and writes its pid to StateDir/watchdog.pid. On return the
// guests it stopped stay stopped.
func Serve(ctx context.Context, o ServerOptions) error {
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.StateDir == "" || !filepath.IsAbs(o.StateDir) {
		return fmt.Errorf("watchdog: state directory %q must be an absolute path", o.StateDir)
	}
	sock := filepath.Join(o.StateDir, SocketName)
	if len(sock) > 107 {
		return fmt.Errorf("watchdog: socket path %s is longer than a unix socket path may be (107)", sock)
	}
	var xenProcs *XenProcs
	if o.Procs == nil {
		var tp targetProcs
		p, err := NewLinuxProcs(o.Binaries)
		switch {
		case err == nil:
			tp.qemu = p
			o.Log.Info("watchdog: QEMU binaries it may stop", zap.Strings("binaries", p.Binaries()))
		case len(o.XenDomains) == 0:
			return err
		default:
			o.Log.Warn("watchdog: no QEMU binary resolves: it supervises Xen domains only", zap.Error(err))
		}
		if len(o.XenDomains) > 0 {
			ops := o.XenOps
			if ops == nil {
				ops = HostXen{}
			}
			x, err := NewXenProcs(ops, o.XenDomains)
			if err != nil {
				return err
			}
			tp.xen, xenProcs = x, x
			o.Log.Info("watchdog: Xen domains it may pause", zap.Strings("domains", x.Domains()))
		}
		o.Procs = tp
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return fmt.Errorf("watchdog: state dir: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(o.StateDir, LockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("watchdog: lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return ErrRunning
		}
		return fmt.Errorf("watchdog: lock: %w", err)
	}
	// Holding the lock: a socket file left over is a dead watchdog's.
	_ = os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return fmt.Errorf("watchdog: listen: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(sock, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("watchdog: socket mode: %w", err)
	}
	pidPath := filepath.Join(o.StateDir, PidName)
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("watchdog: pid file: %w", err)
	}
	s := &Server{o: o, log: o.Log, core: NewCore(o.Now, o.Procs, o.Log), wake: make(chan struct{}, 1), idleSince: o.Now(), xen: xenProcs}
	s.restoreXen()
	defer func() {
		// Remove the socket while still holding the lock: a daemon then
		// finds no watchdog and starts one, which takes the lock after us.
		_ = os.Remove(sock)
		_ = os.Remove(pidPath)
		s.mu.Lock()
		s.core.Close()
		s.mu.Unlock()
	}()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		ln.Close()
	}()
	conns := map[*net.UnixConn]bool{}
	var cmu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.timerLoop(ctx, cancel)
	}()
	s.log.Info("watchdog serving", zap.String("socket", sock), zap.Int("pid", os.Getpid()), zap.Duration("idle_exit", o.IdleExit))
	if o.Ready != nil {
		o.Ready()
	}
	var err2 error
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() == nil {
				err2 = fmt.Errorf("watchdog: accept: %w", err)
			}
			break
		}
		peer, err := checkPeer(c)
		if err != nil {
			s.log.Warn("refused a connection", zap.Error(err))
			c.Close()
			continue
		}
		cmu.Lock()
		conns[c] = true
		cmu.Unlock()
		s.mu.Lock()
		s.conns++ // before the goroutine: an idle check must not miss it
		s.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, c, peer)
			cmu.Lock()
			delete(conns, c)
			cmu.Unlock()
		}()
	}
	cancel()
	cmu.Lock()
	for c := range conns {
		c.Close()
	}
	cmu.Unlock()
	wg.Wait()
	return err2
}

// checkPeer admits only a process of the watchdog's own user (root, for
// a root daemon): the socket's mode says the same, this makes sure. It
// returns the peer's pid.
func checkPeer(c *net.UnixConn) (int, error) {
	cred, err := peercred.Of(c)
	if err != nil {
		return 0, err
	}
	if int(cred.Uid) != os.Geteuid() {
		return 0, fmt.Errorf("peer pid %d runs as uid %d, not %d", cred.Pid, cred.Uid, os.Geteuid())
	}
	return int(cred.Pid), nil
}

// deathWait is how long the end of a connection without a restart notice
// waits for the daemon's process to exit: a dying process closes its
// sockets a moment before it counts as exited. A daemon that lives on
// (it closed the connection to open another) keeps its deadlines.
const deathWait = time.Second

// exitedWithin reports whether the process behind pidfd fd exits within d.
func exitedWithin(fd int, d time.Duration) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	end := time.Now().Add(d)
	for {
		left := time.Until(end)
		if left < 0 {
			left = 0
		}
		n, err := unix.Poll(fds, int(left.Milliseconds()))
		if err == unix.EINTR {
			continue
		}
		return err != nil || n > 0
	}
}

func (s *Server) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// timerLoop runs the core's ticks at its deadlines, and ends the server
// when it has been idle for IdleExit.
func (s *Server) timerLoop(ctx context.Context, stop context.CancelFunc) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		}
		s.mu.Lock()
		next := s.core.Tick()
		s.saveXen()
		now := s.o.Now()
		idle := s.conns == 0 && s.core.Idle()
		if !idle {
			s.idleSince = time.Time{}
		} else if s.idleSince.IsZero() {
			s.idleSince = now
		}
		exit := idle && s.o.IdleExit > 0 && now.Sub(s.idleSince) >= s.o.IdleExit
		if idle && s.o.IdleExit > 0 && s.idleSince.Add(s.o.IdleExit).Before(next) {
			next = s.idleSince.Add(s.o.IdleExit)
		}
		s.mu.Unlock()
		if exit {
			s.log.Info("watchdog idle: exiting", zap.Duration("idle_for", s.o.IdleExit))
			stop()
			return
		}
		t.Reset(max(next.Sub(now), time.Millisecond))
	}
}

// serveConn answers one daemon's (process peer's) requests, one line
// each.
func (s *Server) serveConn(ctx context.Context, c *net.UnixConn, peer int) {
	defer c.Close()
	// A pidfd of the peer, opened while it is connected (so it is that
	// process): its death decides what the connection's end means.
	pfd, perr := unix.PidfdOpen(peer, 0)
	if perr == nil {
		defer unix.Close(pfd)
	}
	s.mu.Lock()
	s.nextID++
	id := s.nextID
	s.mu.Unlock()
	restart := false
	defer func() {
		dead := !restart && (perr != nil || exitedWithin(pfd, deathWait))
		s.mu.Lock()
		s.conns--
		if dead {
			s.core.Disconnected(id, false)
		}
		s.mu.Unlock()
		s.poke()
		s.log.Info("daemon disconnected", zap.Uint64("conn", id), zap.Int("daemon_pid", peer), zap.Bool("restart_announced", restart), zap.Bool("daemon_exited", dead))
	}()
	r := bufio.NewReaderSize(c, 64<<10)
	enc := json.NewEncoder(c)
	for ctx.Err() == nil {
		line, err := readLine(r, maxLine)
		if err != nil {
			return
		}
		var req Request
		var rep Reply
		if err := json.Unmarshal(line, &req); err != nil {
			rep = Reply{Error: "bad request: " + err.Error()}
		} else {
			rep = s.handle(id, req)
			if req.Op == OpRestart && rep.OK {
				restart = true
			}
		}
		_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if err := enc.Encode(rep); err != nil {
			return
		}
	}
}

func (s *Server) handle(id uint64, req Request) Reply {
	defer s.poke()
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.saveXen()
	switch req.Op {
	case OpHello:
		if req.Version != ProtocolVersion {
			return Reply{Error: fmt.Sprintf("protocol version %d, this watchdog speaks %d: stop it (it is restarted by the daemon)", req.Version, ProtocolVersion)}
		}
		s.log.Info("daemon connected", zap.Uint64("conn", id), zap.Int("daemon_pid", req.DaemonPid))
		return Reply{OK: true, WatchdogPid: os.Getpid(), Stopped: s.core.Stopped()}
	case OpPet:
		if len(req.VMs) > maxVMs {
			return Reply{Error: fmt.Sprintf("%d VMs in one pet, at most %d", len(req.VMs), maxVMs)}
		}
		return s.core.Pet(id, req.VMs)
	case OpCont:
		// Recorded as let go before the unpause: a watchdog that dies in
		// between leaves an extra pause (closed), never a record of a
		// reference it no longer holds.
		s.saveXenWithout(req.VM)
		if err := s.core.Cont(req.VM, durationNs(req.ValidForNs), req.Release); err != nil {
			return Reply{Error: err.Error(), Stopped: s.core.Stopped()}
		}
		return Reply{OK: true, Stopped: s.core.Stopped()}
	case OpRestart:
		if req.GraceNs < 0 {
			return Reply{Error: "negative restart grace"}
		}
		s.core.Restart(id, req.Names, durationNs(req.GraceNs))
		return Reply{OK: true}
	}
	return Reply{Error: fmt.Sprintf("unknown op %q", req.Op)}
}

// readLine reads one '\n'-terminated line of at most limit bytes.
func readLine(r *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > limit {
			return nil, fmt.Errorf("watchdog: request longer than %d bytes", limit)
		}
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

// maxXenState bounds the Xen pause record read at start.
const maxXenState = 1 << 20

// restoreXen supervises, as stopped, the Xen domains a previous watchdog
// recorded holding paused (see XenStateName), then rewrites the record:
// entries restored, and those that could not be but are not proven stale
// (kept for good: a later watchdog may know better). An unreadable or
// malformed record is set aside (renamed .bad), never deleted.
func (s *Server) restoreXen() {
	path := filepath.Join(s.o.StateDir, XenStateName)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var b []byte
	if err == nil {
		b, err = io.ReadAll(io.LimitReader(f, maxXenState+1))
		f.Close()
	}
	var held []HeldXen
	bad := ""
	switch {
	case err != nil:
		bad = "unreadable: " + err.Error()
	case len(b) > maxXenState:
		bad = fmt.Sprintf("larger than %d bytes", maxXenState)
	case json.Unmarshal(b, &held) != nil:
		bad = "malformed"
	}
	if bad != "" {
		s.log.Error("the Xen pause record a previous watchdog left is "+bad+": set aside; a domain it held paused stays paused, unknown to this watchdog (xl list; xl unpause once its daemon agrees)",
			zap.String("file", path), zap.String("set_aside_as", path+".bad"))
		if err := os.Rename(path, path+".bad"); err != nil {
			s.log.Error("cannot set the Xen pause record aside", zap.Error(err))
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, h := range held {
		if s.xen == nil {
			s.log.Error("a previous watchdog held a Xen domain paused, and this one supervises no Xen domains: it stays paused (kept in the record)", zap.String("vm", h.VM), zap.Uint32("domid", h.DomID))
			s.xenKept = append(s.xenKept, h)
			continue
		}
		err := s.core.RestoreXen(s.xen, h)
		switch {
		case err == nil:
		case errors.Is(err, errStale):
			s.log.Warn("a recorded Xen pause is stale: dropped", zap.String("vm", h.VM), zap.Uint32("domid", h.DomID), zap.Error(err))
		default:
			s.log.Error("a recorded Xen pause cannot be restored: kept in the record; the domain stays paused", zap.String("vm", h.VM), zap.Uint32("domid", h.DomID), zap.Error(err))
			s.xenKept = append(s.xenKept, h)
		}
	}
	s.saveXen()
}

// saveXenWithout records the Xen pauses held but vm's (s.mu held).
func (s *Server) saveXenWithout(vm string) {
	s.writeXen(slices.DeleteFunc(s.core.XenHeld(), func(h HeldXen) bool { return h.VM == vm }))
}

// saveXen records the Xen domains held paused, if that changed (s.mu
// held). The write is atomic (a temporary file renamed).
func (s *Server) saveXen() { s.writeXen(s.core.XenHeld()) }

func (s *Server) writeXen(held []HeldXen) {
	held = append(held, s.xenKept...)
	b, err := json.Marshal(held)
	if err != nil || bytes.Equal(b, s.xenSaved) {
		return
	}
	path := filepath.Join(s.o.StateDir, XenStateName)
	if len(held) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Error("cannot remove the Xen pause record", zap.Error(err))
			return
		}
		s.xenSaved = b
		return
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		s.log.Error("cannot record the Xen pauses held", zap.Error(err))
		return
	}
	if err := os.Rename(tmp, path); err != nil {
		s.log.Error("cannot record the Xen pauses held", zap.Error(err))
		return
	}
	s.xenSaved = b
}
