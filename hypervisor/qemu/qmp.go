// Package qemu is the QEMU backend: it drives a qemu-system-x86_64 process
// over QMP and reads guest RAM from a shared file mapping
// (memory-backend-file,share=on) that both QEMU and remusd map.
//
// Primary: Pause = QMP stop, HarvestDirty = compare every page against a
// shadow copy (exact: QEMU 7.2 exposes no RAM dirty bitmap over QMP),
// SaveDeviceState = xen-save-devices-state (live=false), Resume = cont.
//
// Backup: a Replica owns a RAM file the engine writes verified epochs into
// and a hot standby QEMU started with the same machine configuration plus
// -incoming defer on that same file. Activate feeds the committed device
// state to migrate-incoming; the standby then runs on the replica RAM.
package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultQMPTimeout bounds a QMP command whose context has no deadline.
const DefaultQMPTimeout = 5 * time.Second

// eventBuffer is how many asynchronous events are kept before the oldest
// is dropped.
const eventBuffer = 256

// ErrQEMUExited reports that the QMP connection closed: QEMU exited (or
// closed its monitor). Test with errors.Is.
var ErrQEMUExited = errors.New("QEMU exited")

// ErrTimeout reports a QMP command that got no answer in time.
var ErrTimeout = errors.New("QMP command timed out")

// CommandError is an error QEMU returned for a command.
type CommandError struct {
	Command string
	Class   string
	Desc    string
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("qmp: %s failed: %s: %s", e.Command, e.Class, e.Desc)
}

// TimeoutError is returned when a command got no answer before its
// deadline. It matches ErrTimeout with errors.Is.
type TimeoutError struct {
	Command string
	After   time.Duration
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("QMP command %s timed out after %v (QEMU hung?)", e.Command, e.After.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrTimeout) and context.DeadlineExceeded true.
func (e *TimeoutError) Is(target error) bool {
	return target == ErrTimeout || target == context.DeadlineExceeded
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// Version is QEMU's version from the QMP greeting or query-version.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string { return fmt.Sprintf("qemu-%d.%d.%d", v.Major, v.Minor, v.Micro) }

type qmpVersion struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

func (q qmpVersion) version() Version {
	return Version{Major: q.QEMU.Major, Minor: q.QEMU.Minor, Micro: q.QEMU.Micro, Package: q.Package}
}

type greeting struct {
	QMP *struct {
		Version      qmpVersion `json:"version"`
		Capabilities []string   `json:"capabilities"`
	} `json:"QMP"`
}

// message is any line QEMU sends after the greeting.
type message struct {
	ID     json.RawMessage `json:"id,omitempty"`
	Return json.RawMessage `json:"return,omitempty"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error,omitempty"`
	Event string `json:"event,omitempty"`
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        uint64 `json:"id"`
}

type response struct {
	ret json.RawMessage
	err *CommandError
}

// QMP is a client for one QMP monitor. Commands may be issued concurrently;
// answers are matched to commands by id. Safe for concurrent use.
type QMP struct {
	conn     net.Conn
	greeting Version

	wmu    sync.Mutex // serialises writes
	mu     sync.Mutex
	nextID uint64
	wait   map[uint64]chan response
	dead   error // set once the reader stopped

	events  chan Event
	dropped atomic.Uint64
	done    chan struct{}
}

// DialQMP connects to the QMP unix socket at path, reads the greeting and
// negotiates capabilities. The whole handshake is bounded by ctx (or
// DefaultQMPTimeout if ctx has no deadline).
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	q, err := NewQMP(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("qmp: %s: %w", path, err)
	}
	return q, nil
}

// NewQMP runs the QMP handshake on an established connection (tests use
// net.Pipe) and takes ownership of conn.
func NewQMP(ctx context.Context, conn net.Conn) (*QMP, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	dl, _ := ctx.Deadline()
	_ = conn.SetReadDeadline(dl)
	r := bufio.NewReaderSize(conn, 64<<10)
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		if isTimeout(err) {
			return nil, fmt.Errorf("no QMP greeting within %v: %w", time.Until(dl), ErrTimeout)
		}
		return nil, fmt.Errorf("reading QMP greeting: %w (%w)", ErrQEMUExited, err)
	}
	var g greeting
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("bad QMP greeting %q", truncate(line, 200))
	}
	_ = conn.SetReadDeadline(time.Time{})
	q := &QMP{
		conn:     conn,
		greeting: g.QMP.Version.version(),
		wait:     make(map[uint64]chan response),
		events:   make(chan Event, eventBuffer),
		done:     make(chan struct{}),
	}
	go q.readLoop(r)
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

// Greeting returns the version QEMU announced in its greeting.
func (q *QMP) Greeting() Version { return q.greeting }

// Events returns the channel of asynchronous events. When nobody drains it,
// the oldest events are dropped (see DroppedEvents). It is closed when the
// connection ends.
func (q *QMP) Events() <-chan Event { return q.events }

// DroppedEvents is the number of events dropped because the buffer was full.
func (q *QMP) DroppedEvents() uint64 { return q.dropped.Load() }

// Done is closed when the connection ends (QEMU exited or Close).
func (q *QMP) Done() <-chan struct{} { return q.done }

// Err returns why the connection ended, or nil while it is up.
func (q *QMP) Err() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.dead
}

// Close closes the connection.
func (q *QMP) Close() error {
	err := q.conn.Close()
	<-q.done
	return err
}

func (q *QMP) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if len(line) > 0 {
			q.dispatch(line)
		}
		if err != nil {
			break
		}
	}
	dead := fmt.Errorf("%w (QMP connection closed: %v)", ErrQEMUExited, err)
	q.mu.Lock()
	q.dead = dead
	waiters := q.wait
	q.wait = nil
	q.mu.Unlock()
	for _, ch := range waiters {
		close(ch)
	}
	close(q.events)
	close(q.done)
}

func (q *QMP) dispatch(line []byte) {
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return // not JSON: ignore (QEMU never sends such lines)
	}
	if m.Event != "" {
		var ev Event
		if json.Unmarshal(line, &ev) != nil {
			return
		}
		for {
			select {
			case q.events <- ev:
				return
			default:
			}
			select { // full: drop the oldest
			case <-q.events:
				q.dropped.Add(1)
			default:
			}
		}
	}
	id, err := strconv.ParseUint(string(m.ID), 10, 64)
	if err != nil {
		return // an answer to nothing we sent
	}
	q.mu.Lock()
	ch := q.wait[id]
	delete(q.wait, id)
	q.mu.Unlock()
	if ch == nil {
		return // its command already timed out
	}
	var resp response
	if m.Error != nil {
		resp.err = &CommandError{Class: m.Error.Class, Desc: m.Error.Desc}
	} else {
		resp.ret = m.Return
	}
	ch <- resp // buffered
}

// Execute runs cmd with args (nil for none; anything encoding/json
// marshals to an object) and decodes the "return" value into out (nil to
// ignore it). The call is bounded by ctx, or DefaultQMPTimeout if ctx has
// no deadline. Errors: *CommandError for a QMP error, *TimeoutError
// (errors.Is ErrTimeout) when QEMU did not answer in time, ErrQEMUExited
// when the connection closed.
func (q *QMP) Execute(ctx context.Context, cmd string, args any, out any) error {
	return q.execute(ctx, cmd, args, out, -1)
}

// ExecuteWithFD is Execute that passes fd to QEMU with SCM_RIGHTS along
// with the command (for getfd and add-fd). It needs a unix socket.
func (q *QMP) ExecuteWithFD(ctx context.Context, cmd string, args any, out any, fd int) error {
	if _, ok := q.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp: %s: passing a file descriptor needs a unix socket", cmd)
	}
	return q.execute(ctx, cmd, args, out, fd)
}

func (q *QMP) execute(ctx context.Context, cmd string, args any, out any, fd int) error {
	start := time.Now()
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	ch := make(chan response, 1)
	q.mu.Lock()
	if q.dead != nil {
		err := q.dead
		q.mu.Unlock()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	q.nextID++
	id := q.nextID
	q.wait[id] = ch
	q.mu.Unlock()
	forget := func() {
		q.mu.Lock()
		if q.wait != nil {
			delete(q.wait, id)
		}
		q.mu.Unlock()
	}
	b, err := json.Marshal(request{Execute: cmd, Arguments: args, ID: id})
	if err != nil {
		forget()
		return fmt.Errorf("qmp: %s: encoding arguments: %w", cmd, err)
	}
	b = append(b, '\n')
	if err := q.write(ctx, b, fd); err != nil {
		forget()
		if isTimeout(err) {
			return &TimeoutError{Command: cmd, After: time.Since(start)}
		}
		return fmt.Errorf("qmp: %s: %w (write: %v)", cmd, ErrQEMUExited, err)
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			return fmt.Errorf("qmp: %s: %w", cmd, q.Err())
		}
		if resp.err != nil {
			resp.err.Command = cmd
			return resp.err
		}
		if out != nil {
			if err := json.Unmarshal(resp.ret, out); err != nil {
				return fmt.Errorf("qmp: %s: decoding return value: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return &TimeoutError{Command: cmd, After: time.Since(start)}
		}
		return fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (q *QMP) write(ctx context.Context, b []byte, fd int) error {
	q.wmu.Lock()
	defer q.wmu.Unlock()
	dl, _ := ctx.Deadline()
	_ = q.conn.SetWriteDeadline(dl)
	defer q.conn.SetWriteDeadline(time.Time{})
	if fd >= 0 {
		uc := q.conn.(*net.UnixConn)
		n, _, err := uc.WriteMsgUnix(b, unix.UnixRights(fd), nil)
		if err != nil {
			return err
		}
		b = b[n:]
		if len(b) == 0 {
			return nil
		}
	}
	_, err := q.conn.Write(b)
	return err
}

// Version asks QEMU for its version (query-version).
func (q *QMP) Version(ctx context.Context) (Version, error) {
	var v qmpVersion
	if err := q.Execute(ctx, "query-version", nil, &v); err != nil {
		return Version{}, err
	}
	return v.version(), nil
}

// Status is the answer of query-status.
type Status struct {
	Running    bool   `json:"running"`
	Status     string `json:"status"`
	Singlestep bool   `json:"singlestep"`
}

// Status returns the VM run state (query-status).
func (q *QMP) Status(ctx context.Context) (Status, error) {
	var s Status
	err := q.Execute(ctx, "query-status", nil, &s)
	return s, err
}

func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultQMPTimeout)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
