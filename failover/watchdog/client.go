package watchdog

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// DefaultCallTimeout bounds one request when ctx has no deadline.
const DefaultCallTimeout = 2 * time.Second

// Client is the daemon's end of the channel. Safe for concurrent use
// (requests are serialized).
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// Dial connects to the watchdog of stateDir.
func Dial(ctx context.Context, stateDir string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", filepath.Join(stateDir, SocketName))
	if err != nil {
		return nil, fmt.Errorf("watchdog: %w", err)
	}
	return &Client{conn: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

// Close ends the connection. Without a Restart before it, the watchdog
// takes it for the daemon's death.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) call(ctx context.Context, req Request) (Reply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(DefaultCallTimeout)
	}
	_ = c.conn.SetDeadline(dl)
	b, err := json.Marshal(req)
	if err != nil {
		return Reply{}, fmt.Errorf("watchdog %s: %w", req.Op, err)
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return Reply{}, fmt.Errorf("watchdog %s: %w", req.Op, err)
	}
	line, err := readLine(c.r, maxLine)
	if err != nil {
		return Reply{}, fmt.Errorf("watchdog %s: %w", req.Op, err)
	}
	var rep Reply
	if err := json.Unmarshal(line, &rep); err != nil {
		return Reply{}, fmt.Errorf("watchdog %s: bad reply: %w", req.Op, err)
	}
	if !rep.OK {
		return rep, fmt.Errorf("watchdog %s: %s", req.Op, rep.Error)
	}
	return rep, nil
}

// Hello introduces the daemon; the reply lists the guests the watchdog
// holds stopped.
func (c *Client) Hello(ctx context.Context) (Reply, error) {
	return c.call(ctx, Request{Op: OpHello, Version: ProtocolVersion, DaemonPid: os.Getpid()})
}

// Pet sends every VM the daemon vouches for now.
func (c *Client) Pet(ctx context.Context, vms []PetVM) (Reply, error) {
	if vms == nil {
		vms = []PetVM{}
	}
	return c.call(ctx, Request{Op: OpPet, VMs: vms})
}

// Cont lifts the stop of vm; it stays supervised for validFor (or is
// released).
func (c *Client) Cont(ctx context.Context, vm string, validFor time.Duration, release bool) (Reply, error) {
	return c.call(ctx, Request{Op: OpCont, VM: vm, ValidForNs: int64(validFor), Release: release})
}

// Restart announces a clean restart: names get grace.
func (c *Client) Restart(ctx context.Context, names []string, grace time.Duration) error {
	_, err := c.call(ctx, Request{Op: OpRestart, Names: names, GraceNs: int64(grace)})
	return err
}

// SpawnOptions say how the daemon starts a watchdog.
type SpawnOptions struct {
	// Exe is the remusd binary; it runs `Exe watchdog --state-dir ...`.
	Exe      string
	StateDir string
	// Binaries are the QEMU binaries the watchdog may stop.
	Binaries []string
	// XenDomains are the Xen domains (by name) it may pause.
	XenDomains []string
	// IdleExit is passed as --idle-exit (0: the command's default).
	IdleExit time.Duration
}

// Spawn starts a watchdog process, detached from the caller: its own
// session (no signal from the daemon's terminal or process group reaches
// it), stdin /dev/null, output appended to StateDir/watchdog.log, no
// systemd notification socket. It outlives the daemon, as QEMU guests do.
// It returns the child's pid; the child is reaped if it exits while the
// caller lives.
func Spawn(o SpawnOptions) (int, error) {
	if !filepath.IsAbs(o.Exe) {
		return 0, fmt.Errorf("watchdog: executable %q must be an absolute path", o.Exe)
	}
	args := []string{"watchdog", "--state-dir", o.StateDir}
	for _, b := range o.Binaries {
		args = append(args, "--qemu-binary", b)
	}
	for _, d := range o.XenDomains {
		args = append(args, "--xen-domain", d)
	}
	if o.IdleExit > 0 {
		args = append(args, "--idle-exit", o.IdleExit.String())
	}
	lf, err := os.OpenFile(filepath.Join(o.StateDir, LogName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return 0, fmt.Errorf("watchdog: log: %w", err)
	}
	defer lf.Close()
	cmd := exec.Command(o.Exe, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "NOTIFY_SOCKET=") && !strings.HasPrefix(kv, "LISTEN_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("watchdog: start %s: %w", o.Exe, err)
	}
	pid := cmd.Process.Pid
	go func() { _ = cmd.Wait() }()
	return pid, nil
}

// Connect returns a client of stateDir's watchdog, starting one (Spawn)
// if none answers and spawn.Exe is set. It waits for a started watchdog
// until ctx is done.
func Connect(ctx context.Context, spawn SpawnOptions, log *zap.Logger) (*Client, Reply, error) {
	if log == nil {
		log = zap.NewNop()
	}
	try := func() (*Client, Reply, error) {
		c, err := Dial(ctx, spawn.StateDir)
		if err != nil {
			return nil, Reply{}, err
		}
		rep, err := c.Hello(ctx)
		if err != nil {
			c.Close()
			return nil, rep, err
		}
		return c, rep, nil
	}
	c, rep, err := try()
	if err == nil || spawn.Exe == "" {
		return c, rep, err
	}
	pid, serr := Spawn(spawn)
	if serr != nil {
		return nil, Reply{}, errors.Join(err, serr)
	}
	log.Info("started a watchdog", zap.Int("pid", pid), zap.String("log", filepath.Join(spawn.StateDir, LogName)))
	for {
		select {
		case <-ctx.Done():
			return nil, Reply{}, fmt.Errorf("watchdog (pid %d) did not answer: %w (last: %w)", pid, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
		if c, rep, err = try(); err == nil {
			return c, rep, nil
		}
	}
}
