package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// fakeService records calls and returns canned answers.
type fakeService struct {
	mu        sync.Mutex
	protected []ProtectRequest
	unprot    []string
	failed    []string
	ops       []string
	status    []VMStatus
	err       error
	block     chan struct{} // if set, Status waits for it or ctx
	overrun   time.Duration // Start takes this long whatever its ctx says
}

func (f *fakeService) Protect(ctx context.Context, req ProtectRequest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.protected = append(f.protected, req)
	return f.err
}

func (f *fakeService) Unprotect(ctx context.Context, vm string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unprot = append(f.unprot, vm)
	return f.err
}

func (f *fakeService) Failover(ctx context.Context, req FailoverRequest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if req.VM == "panic" {
		panic("boom")
	}
	vm := req.VM
	if req.Force {
		vm += " (forced)"
	}
	f.failed = append(f.failed, vm)
	return f.err
}

func (f *fakeService) Forget(ctx context.Context, vm string) error { return f.vmOp("forget", vm) }
func (f *fakeService) Start(ctx context.Context, vm string) error {
	time.Sleep(f.overrun)
	return f.vmOp("start", vm)
}
func (f *fakeService) Stop(ctx context.Context, vm string) error { return f.vmOp("stop", vm) }

func (f *fakeService) vmOp(op, vm string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ops = append(f.ops, op+" "+vm)
	return f.err
}

func (f *fakeService) Status(ctx context.Context) ([]VMStatus, error) {
	if f.block != nil {
		select {
		case <-f.block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status, f.err
}

// sockPath returns a short socket path (sun_path is 108 bytes).
func sockPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "remusd-ctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "run", "control.sock")
}

// startControl serves svc on a temp socket until the test ends.
func startControl(t *testing.T, svc Service) (path string, stop func()) {
	t.Helper()
	path = sockPath(t)
	s, err := ListenControl(path, svc, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("Serve did not stop after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return path, stop
}

func TestControlRoundTrip(t *testing.T) {
	want := []VMStatus{{VM: "web", Role: RolePrimary, Link: LinkUp, Epoch: 42, AckedEpoch: 41, CompressionRatio: 3.5}}
	f := &fakeService{status: want}
	path, _ := startControl(t, f)
	c := ControlClient{Path: path, Timeout: 5 * time.Second}
	ctx := context.Background()

	req := ProtectRequest{VM: "web", Peer: "10.0.0.2:7788", EpochInterval: 40 * time.Millisecond, MaxInflight: 2}
	if err := c.Protect(ctx, req); err != nil {
		t.Fatalf("Protect: %v", err)
	}
	if err := c.Unprotect(ctx, "db"); err != nil {
		t.Fatalf("Unprotect: %v", err)
	}
	if err := c.Failover(ctx, FailoverRequest{VM: "cache"}); err != nil {
		t.Fatalf("Failover: %v", err)
	}
	got, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if len(got) != 1 || got[0] != want[0] {
		t.Fatalf("Status = %+v, want %+v", got, want)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.protected) != 1 || f.protected[0] != req {
		t.Errorf("protected = %+v, want %+v", f.protected, req)
	}
	if len(f.unprot) != 1 || f.unprot[0] != "db" {
		t.Errorf("unprotected = %v", f.unprot)
	}
	if len(f.failed) != 1 || f.failed[0] != "cache" {
		t.Errorf("failed over = %v", f.failed)
	}
}

func TestControlEmptyStatus(t *testing.T) {
	path, _ := startControl(t, &fakeService{})
	got, err := ControlClient{Path: path}.Status(context.Background())
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("Status = %#v, %v; want empty non-nil", got, err)
	}
}

func TestControlErrorsPropagate(t *testing.T) {
	f := &fakeService{err: errors.New(`vm "web" is not running`)}
	path, _ := startControl(t, f)
	c := ControlClient{Path: path}
	ctx := context.Background()
	for name, call := range map[string]func() error{
		"protect":   func() error { return c.Protect(ctx, ProtectRequest{VM: "web", Peer: "x:1"}) },
		"unprotect": func() error { return c.Unprotect(ctx, "web") },
		"failover":  func() error { return c.Failover(ctx, FailoverRequest{VM: "web"}) },
		"status":    func() error { _, err := c.Status(ctx); return err },
	} {
		err := call()
		if !errors.Is(err, ErrRemote) {
			t.Errorf("%s: err = %v, want ErrRemote", name, err)
			continue
		}
		if err.Error() != `vm "web" is not running` {
			t.Errorf("%s: err text = %q", name, err.Error())
		}
	}
	// A panicking Service answers with an error and the server survives.
	if err := c.Failover(ctx, FailoverRequest{VM: "panic"}); !errors.Is(err, ErrRemote) || !strings.Contains(err.Error(), "boom") {
		t.Errorf("panic: err = %v", err)
	}
	if _, err := c.Status(ctx); !errors.Is(err, ErrRemote) {
		t.Errorf("after panic: err = %v", err)
	}
}

func TestControlSocketMode(t *testing.T) {
	path, _ := startControl(t, &fakeService{})
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("%s is %v, not a socket", path, fi.Mode())
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("socket mode = %o, want 600", perm)
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if perm := di.Mode().Perm(); perm != 0o700 {
		t.Errorf("created dir mode = %o, want 700", perm)
	}
	// No leftover temporary socket next to it.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("socket dir holds %d entries, want 1", len(ents))
	}
}

// rawRequest sends one raw line and decodes the response.
func rawRequest(t *testing.T, path, line string) ControlResponse {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte(line + "\n")); err != nil {
		t.Fatal(err)
	}
	b, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		t.Fatalf("read response to %q: %v", line, err)
	}
	var resp ControlResponse
	if err := json.Unmarshal(b, &resp); err != nil {
		t.Fatalf("response %q: %v", b, err)
	}
	return resp
}

func TestControlBadRequests(t *testing.T) {
	f := &fakeService{status: []VMStatus{{VM: "a"}}}
	path, _ := startControl(t, f)
	for _, tc := range []struct{ line, want string }{
		{`{"op":"status"`, "malformed"},
		{`not json`, "malformed"},
		{`{"op":"status","bogus":1}`, "bogus"},
		{`{"op":"reboot"}`, `unknown control op "reboot"`},
		{`{}`, `no "op"`},
		{`{"op":"protect"}`, `missing "protect"`},
		{`{"op":"unprotect"}`, `missing "vm"`},
		{`{"op":"failover"}`, `missing "vm"`},
	} {
		resp := rawRequest(t, path, tc.line)
		if resp.OK || !strings.Contains(resp.Error, tc.want) {
			t.Errorf("%s -> %+v, want error containing %q", tc.line, resp, tc.want)
		}
	}
	// The server is still serving.
	if resp := rawRequest(t, path, `{"op":"status"}`); !resp.OK || len(resp.Status) != 1 {
		t.Errorf("status after bad requests: %+v", resp)
	}
	// Several requests on one connection, blank lines ignored.
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	conn.Write([]byte("garbage\n\n{\"op\":\"status\"}\n"))
	r := bufio.NewReader(conn)
	for i, wantOK := range []bool{false, true} {
		b, err := r.ReadBytes('\n')
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		var resp ControlResponse
		if err := json.Unmarshal(b, &resp); err != nil || resp.OK != wantOK {
			t.Errorf("response %d = %s (%v), want ok=%v", i, b, err, wantOK)
		}
	}
}

func TestControlServeStopsAndRemovesSocket(t *testing.T) {
	f := &fakeService{block: make(chan struct{})}
	path, stop := startControl(t, f)
	// A request in progress is cancelled by shutdown.
	errc := make(chan error, 1)
	go func() { _, err := (ControlClient{Path: path}).Status(context.Background()); errc <- err }()
	time.Sleep(50 * time.Millisecond)
	stop()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still present after Serve returned: %v", err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Error("in-flight Status succeeded after shutdown")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("in-flight request not ended by shutdown")
	}
	// With nothing serving, the client says so clearly.
	_, err := ControlClient{Path: path}.Status(context.Background())
	if !errors.Is(err, ErrControlUnreachable) || !strings.Contains(err.Error(), "is `remusd serve` running?") ||
		!strings.Contains(err.Error(), path) {
		t.Errorf("err = %v", err)
	}
}

func TestListenControlStaleSocket(t *testing.T) {
	path := sockPath(t)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	// A socket left by a dead process: bound, then closed without unlink.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket missing: %v", err)
	}
	s, err := ListenControl(path, &fakeService{}, nil)
	if err != nil {
		t.Fatalf("ListenControl over stale socket: %v", err)
	}
	// A live socket is not taken over.
	if _, err := ListenControl(path, &fakeService{}, nil); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second ListenControl: err = %v, want already running", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Serve(ctx); err != nil {
		t.Fatal(err)
	}
	// A regular file is never removed.
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenControl(path, &fakeService{}, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("ListenControl over a file: err = %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "x" {
		t.Errorf("file was touched: %q %v", b, err)
	}
}

// TestControlAnswerAfterOverrun: an operation that overruns the server's
// request timeout (a libxc call abandoned at its deadline, then cleanup)
// still gets its answer to a client that waits longer, instead of a
// connection closed without one.
func TestControlAnswerAfterOverrun(t *testing.T) {
	f := &fakeService{overrun: 300 * time.Millisecond, err: errors.New("xen: suspend on domain 3: context deadline exceeded")}
	s, err := ListenControl(sockPath(t), f, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	s.reqTimeout = 100 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	err = ControlClient{Path: s.path, Timeout: 5 * time.Second}.Start(context.Background(), "web")
	if err == nil || !strings.Contains(err.Error(), "suspend on domain 3") {
		t.Fatalf("Start: %v, want the operation's own error", err)
	}
}

func TestControlClientTimeout(t *testing.T) {
	f := &fakeService{block: make(chan struct{})}
	defer close(f.block)
	path, _ := startControl(t, f)
	start := time.Now()
	_, err := ControlClient{Path: path, Timeout: 200 * time.Millisecond}.Status(context.Background())
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Errorf("err = %v, want timeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("timeout took %v", d)
	}
}

func (f *fakeService) Switchover(ctx context.Context, vm string) (SwitchoverResult, error) {
	return SwitchoverResult{VM: vm, NewPrimary: "b", Epoch: 7}, f.vmOp("switchover", vm)
}
