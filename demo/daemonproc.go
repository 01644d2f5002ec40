package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/netlab"
)

// DaemonProc is a `remusd serve` process started by StartDaemon.
type DaemonProc struct {
	Name     string
	Control  string // its control socket
	StateDir string
	LogPath  string // its stdout and stderr
	Cmd      *exec.Cmd
	done     chan struct{} // closed when the process has exited
}

// StartOptions says how to start a daemon.
type StartOptions struct {
	Exe string // the remusd binary
	Dir string // where its config file and log go
	// Netns, if set, runs the daemon inside that network namespace, in its
	// own process group (a Ctrl-C reaches only the caller, which stops the
	// daemons in order).
	Netns string
	// Wait bounds how long the control socket may take to answer
	// (default 15 s).
	Wait time.Duration
}

// StartDaemon writes cfg to Dir/NAME.json, starts `remusd serve` with it
// and waits until its control socket answers.
func StartDaemon(ctx context.Context, o StartOptions, cfg daemon.Config) (*DaemonProc, error) {
	if o.Wait <= 0 {
		o.Wait = 15 * time.Second
	}
	path := filepath.Join(o.Dir, cfg.Name+".json")
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("%s daemon config: %w", cfg.Name, err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return nil, fmt.Errorf("%s daemon config: %w", cfg.Name, err)
	}
	p := &DaemonProc{Name: cfg.Name, Control: cfg.Control, StateDir: cfg.StateDir, LogPath: filepath.Join(o.Dir, cfg.Name+".log"), done: make(chan struct{})}
	logf, err := os.Create(p.LogPath)
	if err != nil {
		return nil, fmt.Errorf("%s daemon log: %w", cfg.Name, err)
	}
	if o.Netns != "" {
		p.Cmd = netlab.Command(o.Netns, o.Exe, "serve", "--config", path, "--log-level", "info")
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	} else {
		p.Cmd = exec.Command(o.Exe, "serve", "--config", path)
	}
	p.Cmd.Env = append(os.Environ(), "REMUSD_CONTROL=")
	p.Cmd.Stdout, p.Cmd.Stderr = logf, logf
	if err := p.Cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s daemon: %w", cfg.Name, err)
	}
	go func() {
		_ = p.Cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	c := daemon.ControlClient{Path: cfg.Control, Timeout: 2 * time.Second}
	deadline := time.Now().Add(o.Wait)
	for {
		if _, err := c.Status(ctx); err == nil {
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("%s daemon exited at start (%v): %s", cfg.Name, p.Cmd.ProcessState, LogTail(p.LogPath, 15))
		case <-ctx.Done():
			p.Stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("%s daemon did not come up within %v: %s", cfg.Name, o.Wait, LogTail(p.LogPath, 15))
		}
	}
}

// Done is closed when the process has exited.
func (p *DaemonProc) Done() <-chan struct{} { return p.done }

// Stop asks the daemon to stop (SIGTERM, killed after 10 s), then kills
// the QEMU guests its state directory records (a daemon leaves its guests
// running when it stops; a demo or test ends them).
func (p *DaemonProc) Stop() {
	p.StopKeepGuests()
	_ = daemon.KillRecordedGuests(p.StateDir)
}

// StopKeepGuests asks the daemon to stop (SIGTERM) and kills it after
// 10 s, leaving its guests running (a daemon restart).
func (p *DaemonProc) StopKeepGuests() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
}

// LogTail returns the last n lines of a file ("" if unreadable).
func LogTail(path string, n int) string {
	b, _ := os.ReadFile(path)
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}
