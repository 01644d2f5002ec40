package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// The control socket speaks newline-delimited JSON: the client writes one
// request line, the server answers with one response line. A connection
// may carry several requests in turn; the CLI sends one per connection.
//
//	{"op":"protect","protect":{"vm":"web","peer":"10.0.0.2:7788"}}
//	{"op":"unprotect","vm":"web"}
//	{"op":"failover","vm":"web"}            ("force":true activates beside a connected primary)
//	{"op":"forget","vm":"web"}
//	{"op":"start","vm":"web"}
//	{"op":"stop","vm":"web"}
//	{"op":"status"}
//
//	{"ok":true,"status":[...]}
//	{"ok":false,"error":"..."}

// Control operations.
const (
	OpProtect    = "protect"
	OpUnprotect  = "unprotect"
	OpFailover   = "failover"
	OpForget     = "forget"
	OpStart      = "start"
	OpStop       = "stop"
	OpSwitchover = "switchover"
	OpStatus     = "status"
)

const opList = "protect|unprotect|failover|forget|start|stop|switchover|status"

const (
	// ControlRequestTimeout bounds one control request on the server
	// (reading it, running it, writing the answer).
	ControlRequestTimeout = 30 * time.Second
	// DefaultControlTimeout is ControlClient's timeout when Timeout is 0.
	DefaultControlTimeout = 35 * time.Second
	// controlWriteTimeout bounds writing an answer.
	controlWriteTimeout = 5 * time.Second
	// maxControlLine bounds one request or response line.
	maxControlLine = 16 << 20
)

var (
	// ErrRemote wraps an error the daemon reported while handling a
	// control request (the request reached it and it said no).
	ErrRemote = errors.New("remusd reported an error")
	// ErrControlUnreachable wraps a failure to reach the control socket
	// (the daemon is not running, or the caller lacks permission).
	ErrControlUnreachable = errors.New("cannot reach remusd control socket")
)

// ControlRequest is one request line on the control socket.
type ControlRequest struct {
	Op      string          `json:"op"`
	Protect *ProtectRequest `json:"protect,omitempty"`
	VM      string          `json:"vm,omitempty"`
	// Force is failover's --force.
	Force bool `json:"force,omitempty"`
}

// ControlResponse is one response line on the control socket.
type ControlResponse struct {
	OK         bool              `json:"ok"`
	Error      string            `json:"error,omitempty"`
	Status     []VMStatus        `json:"status,omitempty"`
	Switchover *SwitchoverResult `json:"switchover,omitempty"`
}

// RemoteError is an error text returned by the daemon. It matches
// ErrRemote with errors.Is and prints the daemon's text unchanged.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return e.Msg }

// Unwrap makes errors.Is(err, ErrRemote) true.
func (e *RemoteError) Unwrap() error { return ErrRemote }

// ControlServer serves a Service on a local unix socket.
type ControlServer struct {
	path string
	ln   *net.UnixListener
	svc  Service
	log  *zap.Logger
	fi   os.FileInfo // the socket file we created, to remove only our own

	reqTimeout time.Duration
}

// ListenControl prepares the control socket at path: it creates the
// parent directory (mode 0700) if missing, removes a stale socket left by
// a dead daemon (only if it is a socket and nothing answers on it),
// listens, and restricts the socket to its owner (mode 0600). Call Serve
// to answer requests.
func ListenControl(path string, svc Service, log *zap.Logger) (*ControlServer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if svc == nil {
		return nil, errors.New("control: nil Service")
	}
	if path == "" {
		return nil, errors.New("control: empty socket path")
	}
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("control: create socket directory: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	if err := removeStaleSocket(path, log); err != nil {
		return nil, err
	}

	// Listen on a private name, restrict it, then move it into place, so
	// the socket is never reachable at path with looser permissions.
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".tmp"+strconv.Itoa(os.Getpid()))
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // Serve removes the final path itself
	fail := func(err error) (*ControlServer, error) {
		ln.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(fmt.Errorf("control: chmod socket: %w", err))
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("control: move socket into place at %s: %w", path, err))
	}
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("control: %w", err)
	}
	log.Info("control socket listening", zap.String("path", path))
	return &ControlServer{path: path, ln: ln, svc: svc, log: log, fi: fi, reqTimeout: ControlRequestTimeout}, nil
}

// removeStaleSocket removes path if it is a socket nobody answers on.
func removeStaleSocket(path string, log *zap.Logger) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("control: %s exists and is not a socket; refusing to replace it", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control: another process is serving %s (is remusd already running?)", path)
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, os.ErrNotExist) {
		log.Info("removing stale control socket", zap.String("path", path))
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("control: remove stale socket: %w", err)
		}
		return nil
	}
	return fmt.Errorf("control: cannot tell whether %s is in use: %w", path, err)
}

// Path is the socket's path.
func (s *ControlServer) Path() string { return s.path }

// Serve answers control requests until ctx is done, then closes the
// listener, waits for requests in progress (their context is cancelled)
// and removes the socket file. It returns nil after ctx is done, or the
// listener's error.
func (s *ControlServer) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var closeOnce sync.Once
	closeLn := func() { closeOnce.Do(func() { s.ln.Close() }) }
	stop := context.AfterFunc(ctx, closeLn)
	defer func() {
		stop()
		closeLn()
		cancel()
		wg.Wait()
		s.removeSocket()
	}()

	var backoff time.Duration
	for {
		conn, err := s.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("control accept", zap.Error(err), zap.Duration("retry_in", backoff))
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return fmt.Errorf("control: accept: %w", err)
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, conn)
		}()
	}
}

func (s *ControlServer) removeSocket() {
	fi, err := os.Lstat(s.path)
	if err != nil {
		return
	}
	if s.fi != nil && !os.SameFile(fi, s.fi) {
		s.log.Warn("control socket was replaced; leaving it", zap.String("path", s.path))
		return
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("remove control socket", zap.String("path", s.path), zap.Error(err))
	}
}

func (s *ControlServer) serveConn(ctx context.Context, conn *net.UnixConn) {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	r := bufio.NewReaderSize(conn, 64<<10)
	enc := json.NewEncoder(conn)
	for {
		if ctx.Err() != nil {
			return
		}
		conn.SetDeadline(time.Now().Add(s.reqTimeout))
		line, err := readLine(r, maxControlLine)
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				s.log.Debug("control read", zap.Error(err))
				if errors.Is(err, errLineTooLong) {
					_ = enc.Encode(ControlResponse{Error: err.Error()})
				}
			}
			return
		}
		if len(strings.TrimSpace(string(line))) == 0 {
			continue
		}
		resp := s.handle(ctx, line)
		// The read deadline may have passed while a slow operation ran
		// (it overran its context): the answer still gets its chance.
		conn.SetDeadline(time.Now().Add(controlWriteTimeout))
		if err := enc.Encode(resp); err != nil {
			s.log.Debug("control write", zap.Error(err))
			return
		}
	}
}

func (s *ControlServer) handle(ctx context.Context, line []byte) (resp ControlResponse) {
	var req ControlRequest
	dec := json.NewDecoder(strings.NewReader(string(line)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		s.log.Warn("malformed control request", zap.Error(err))
		return ControlResponse{Error: fmt.Sprintf("malformed control request: %v", err)}
	}
	ctx, cancel := context.WithTimeout(ctx, s.reqTimeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("control request panicked", zap.String("op", req.Op), zap.Any("panic", p),
				zap.ByteString("stack", debug.Stack()))
			resp = ControlResponse{Error: fmt.Sprintf("internal error handling %s: %v", req.Op, p)}
		}
	}()
	start := time.Now()
	var err error
	var st []VMStatus
	var sw *SwitchoverResult
	if req.Force && req.Op != OpFailover {
		return ControlResponse{Error: `"force" applies only to failover`}
	}
	switch req.Op {
	case OpProtect:
		if req.Protect == nil {
			err = errors.New(`protect: missing "protect" object`)
		} else {
			err = s.svc.Protect(ctx, *req.Protect)
		}
	case OpUnprotect:
		if req.VM == "" {
			err = errors.New(`unprotect: missing "vm"`)
		} else {
			err = s.svc.Unprotect(ctx, req.VM)
		}
	case OpFailover:
		if req.VM == "" {
			err = errors.New(`failover: missing "vm"`)
		} else {
			err = s.svc.Failover(ctx, FailoverRequest{VM: req.VM, Force: req.Force})
		}
	case OpForget, OpStart, OpStop:
		op := map[string]func(context.Context, string) error{OpForget: s.svc.Forget, OpStart: s.svc.Start, OpStop: s.svc.Stop}[req.Op]
		if req.VM == "" {
			err = fmt.Errorf(`%s: missing "vm"`, req.Op)
		} else {
			err = op(ctx, req.VM)
		}
	case OpSwitchover:
		if req.VM == "" {
			err = errors.New(`switchover: missing "vm"`)
		} else {
			var r SwitchoverResult
			r, err = s.svc.Switchover(ctx, req.VM)
			sw = &r
		}
	case OpStatus:
		st, err = s.svc.Status(ctx)
	case "":
		err = errors.New(`control request has no "op" (want ` + opList + `)`)
	default:
		err = fmt.Errorf("unknown control op %q (want %s)", req.Op, opList)
	}
	if req.Op != OpStatus {
		vm := req.VM
		if req.Protect != nil {
			vm = req.Protect.VM
		}
		s.log.Info("control request", zap.String("op", req.Op), zap.String("vm", vm),
			zap.Duration("took", time.Since(start)), zap.Error(err))
	}
	if err != nil {
		return ControlResponse{Error: err.Error(), Switchover: sw}
	}
	return ControlResponse{OK: true, Status: st, Switchover: sw}
}

var errLineTooLong = errors.New("control line too long")

// readLine reads one '\n'-terminated line of at most limit bytes. A final
// line without '\n' is returned as is.
func readLine(r *bufio.Reader, limit int) ([]byte, error) {
	var buf []byte
	for {
		chunk, err := r.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > limit {
			return nil, errLineTooLong
		}
		switch {
		case err == nil:
			return buf, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(buf) > 0:
			return buf, nil
		default:
			return nil, err
		}
	}
}

// ControlClient calls a daemon's Service over its control socket.
type ControlClient struct {
	// Path is the control socket ("" = DefaultConfig().Control).
	Path string
	// Timeout bounds each call (0 = DefaultControlTimeout). A deadline
	// on the call's context also applies.
	Timeout time.Duration
}

var _ Service = ControlClient{}

// Protect implements Service.
func (c ControlClient) Protect(ctx context.Context, req ProtectRequest) error {
	_, err := c.call(ctx, ControlRequest{Op: OpProtect, Protect: &req})
	return err
}

// Unprotect implements Service.
func (c ControlClient) Unprotect(ctx context.Context, vm string) error {
	_, err := c.call(ctx, ControlRequest{Op: OpUnprotect, VM: vm})
	return err
}

// Failover implements Service.
func (c ControlClient) Failover(ctx context.Context, req FailoverRequest) error {
	_, err := c.call(ctx, ControlRequest{Op: OpFailover, VM: req.VM, Force: req.Force})
	return err
}

// Forget implements Service.
func (c ControlClient) Forget(ctx context.Context, vm string) error {
	_, err := c.call(ctx, ControlRequest{Op: OpForget, VM: vm})
	return err
}

// Start implements Service.
func (c ControlClient) Start(ctx context.Context, vm string) error {
	_, err := c.call(ctx, ControlRequest{Op: OpStart, VM: vm})
	return err
}

// Stop implements Service.
func (c ControlClient) Stop(ctx context.Context, vm string) error {
	_, err := c.call(ctx, ControlRequest{Op: OpStop, VM: vm})
	return err
}

// Switchover implements Service.
func (c ControlClient) Switchover(ctx context.Context, vm string) (SwitchoverResult, error) {
	resp, err := c.call(ctx, ControlRequest{Op: OpSwitchover, VM: vm})
	if resp.Switchover != nil {
		return *resp.Switchover, err
	}
	return SwitchoverResult{VM: vm}, err
}

// Status implements Service.
func (c ControlClient) Status(ctx context.Context) ([]VMStatus, error) {
	resp, err := c.call(ctx, ControlRequest{Op: OpStatus})
	if err != nil {
		return nil, err
	}
	if resp.Status == nil {
		return []VMStatus{}, nil
	}
	return resp.Status, nil
}

// VMStatus returns the status of one VM, or an error naming it when the
// daemon does not know it.
func (c ControlClient) VMStatus(ctx context.Context, vm string) (VMStatus, error) {
	all, err := c.Status(ctx)
	if err != nil {
		return VMStatus{}, err
	}
	for _, s := range all {
		if s.VM == vm {
			return s, nil
		}
	}
	return VMStatus{}, fmt.Errorf("VM %s: %w on this daemon", vm, ErrUnknownVM)
}

func (c ControlClient) path() string {
	if c.Path != "" {
		return c.Path
	}
	return DefaultConfig().Control
}

func (c ControlClient) call(ctx context.Context, req ControlRequest) (ControlResponse, error) {
	path := c.path()
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultControlTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrPermission):
			return ControlResponse{}, fmt.Errorf("%w %s: permission denied (the socket is root-only; run as root): %w",
				ErrControlUnreachable, path, err)
		case ctx.Err() != nil:
			return ControlResponse{}, fmt.Errorf("%w %s: %w", ErrControlUnreachable, path, err)
		default:
			return ControlResponse{}, fmt.Errorf("%w %s: is `remusd serve` running? (set --control or REMUSD_CONTROL if it uses another path): %w",
				ErrControlUnreachable, path, err)
		}
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	b, err := json.Marshal(req)
	if err != nil {
		return ControlResponse{}, fmt.Errorf("control: encode request: %w", err)
	}
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return ControlResponse{}, c.ioErr(ctx, "send request", err)
	}
	line, err := readLine(bufio.NewReader(conn), maxControlLine)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return ControlResponse{}, fmt.Errorf("control %s: daemon closed the connection without answering", path)
		}
		return ControlResponse{}, c.ioErr(ctx, "read response", err)
	}
	var resp ControlResponse
	if err := json.Unmarshal(line, &resp); err != nil {
		return ControlResponse{}, fmt.Errorf("control %s: malformed response: %w", path, err)
	}
	if !resp.OK {
		msg := resp.Error
		if msg == "" {
			msg = "request failed (no detail given)"
		}
		return resp, &RemoteError{Msg: msg}
	}
	return resp, nil
}

func (c ControlClient) ioErr(ctx context.Context, what string, err error) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("control %s: %s: %w", c.path(), what, ctx.Err())
	}
	if errors.Is(err, os.ErrDeadlineExceeded) || ctx.Err() != nil {
		return fmt.Errorf("control %s: %s: timed out waiting for the daemon: %w", c.path(), what, context.DeadlineExceeded)
	}
	// The socket's bound name may differ from Path (it is renamed into
	// place), so leave the addresses out.
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		err = oe.Err
	}
	return fmt.Errorf("control %s: %s: %w", c.path(), what, err)
}
