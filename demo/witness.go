package demo

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/netlab"
)

// WitnessProc is a `remusd witness serve` process (a single-member etcd
// on a third host) started by StartWitness.
type WitnessProc struct {
	URL     string // its client URL, the daemons' witness endpoint
	LogPath string
	pid     int
	done    chan struct{}
}

// StartWitness starts `remusd witness serve` on host:port (inside network
// namespace ns if set), with its data and log in dir, and waits until it
// accepts connections.
func StartWitness(ctx context.Context, exe, ns, host string, port int, dir string) (*WitnessProc, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	logPath := filepath.Join(dir, "witness.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	args := []string{"witness", "serve", "--host", host, "--port", fmt.Sprint(port), "--data-dir", filepath.Join(dir, "data")}
	cmd := exec.Command(exe, args...)
	if ns != "" {
		cmd = netlab.Command(ns, exe, args...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("witness: start: %w", err)
	}
	w := &WitnessProc{URL: fmt.Sprintf("http://%s", net.JoinHostPort(host, fmt.Sprint(port))), LogPath: logPath, pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(w.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(logPath)
		if strings.Contains(string(b), "witness serving") {
			return w, nil
		}
		select {
		case <-w.done:
			return nil, fmt.Errorf("witness exited at start: %s", LogTail(logPath, 10))
		case <-ctx.Done():
			w.Stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			w.Stop()
			return nil, fmt.Errorf("witness not serving after 30 s: %s", LogTail(logPath, 10))
		}
	}
}

// Config is the daemons' witness configuration for this member.
func (w *WitnessProc) Config() *daemon.WitnessConfig {
	return &daemon.WitnessConfig{Endpoints: []string{w.URL}}
}

// Stop stops the witness (SIGTERM, SIGKILL after 5 s).
func (w *WitnessProc) Stop() {
	select {
	case <-w.done:
		return
	default:
	}
	_ = syscall.Kill(w.pid, syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(w.pid, syscall.SIGKILL)
		<-w.done
	}
}

// Pid is the witness process's id (to signal it: a crash, a pause).
func (w *WitnessProc) Pid() int { return w.pid }

// Kill SIGKILLs the witness (a crash, no clean shutdown) and waits until
// it has exited.
func (w *WitnessProc) Kill() {
	select {
	case <-w.done:
		return
	default:
	}
	_ = syscall.Kill(w.pid, syscall.SIGKILL)
	<-w.done
}

// Done is closed when the witness process has exited.
func (w *WitnessProc) Done() <-chan struct{} { return w.done }
