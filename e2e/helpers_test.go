package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/internal/pki"
	"github.com/remusd/remusd/netlab"
	"github.com/remusd/remusd/transport"
)

// binPath is the remusd binary TestMain builds.
var binPath string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "remusd-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	binPath = filepath.Join(dir, "remusd")
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goTool, "build", "-o", binPath, "./cmd/remusd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build ./cmd/remusd: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

// moduleRoot walks up from the working directory to the directory holding go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// shortTempDir returns a short temporary directory (unix socket paths are
// limited to ~108 bytes), removed at the end of the test.
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rde2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// cliResult is the outcome of one CLI run.
type cliResult struct {
	code           int
	stdout, stderr string
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// runCLI runs the remusd binary with args to completion (bounded).
func runCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	cmd.Env = append(os.Environ(), "REMUSD_CONTROL=") // no inherited control path
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatalf("start remusd %v: %v", args, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("remusd %v did not finish within 60s", args)
	}
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("remusd %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return cliResult{code: code, stdout: out.String(), stderr: errb.String()}
}

// daemonProc is one `remusd serve` process.
type daemonProc struct {
	t       *testing.T
	name    string
	cmd     *exec.Cmd
	logPath string
	control string
	done    chan struct{}
	mu      sync.Mutex
	waitErr error
}

// writeConfig writes cfg as JSON to dir/name.json.
func writeConfig(t *testing.T, dir, name string, cfg any) string {
	t.Helper()
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name+".json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startDaemon starts `remusd serve --config FILE` with its stderr (JSON
// logs) in dir/name.log, waits until its control socket answers and
// registers cleanup (SIGTERM, then SIGKILL).
func startDaemon(t *testing.T, dir, name string, cfg daemon.Config) *daemonProc {
	t.Helper()
	return startDaemonIn(t, dir, name, "", cfg)
}

// startDaemonIn is startDaemon inside network namespace ns ("" = here);
// the daemon's QEMUs inherit the namespace.
func startDaemonIn(t *testing.T, dir, name, ns string, cfg daemon.Config) *daemonProc {
	t.Helper()
	cfgPath := writeConfig(t, dir, name, cfg)
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binPath, "serve", "--config", cfgPath, "--log-level", "debug")
	wait := 20 * time.Second
	if ns != "" {
		root, err := moduleRoot()
		if err != nil {
			t.Fatal(err)
		}
		cmd = netlab.Command(ns, binPath, "serve", "--config", cfgPath, "--log-level", "debug")
		cmd.Dir = root         // guestimage builds remus-guestsvc from this checkout
		wait = 3 * time.Minute // it may build and boot a guest first
	}
	cmd.Env = append(os.Environ(), "REMUSD_CONTROL=")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	d := &daemonProc{t: t, name: name, cmd: cmd, logPath: logPath, control: cfg.Control, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		logf.Close()
		d.mu.Lock()
		d.waitErr = err
		d.mu.Unlock()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			d.dumpLog()
		}
	})
	waitFor(t, wait, name+" control socket answers", func() (bool, string) {
		if d.exited() {
			t.Fatalf("%s exited during start-up: %v\n%s", name, d.exitErr(), d.logTail(40))
		}
		_, err := (daemon.ControlClient{Path: cfg.Control, Timeout: 2 * time.Second}).Status(t.Context())
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	return d
}

func (d *daemonProc) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (d *daemonProc) exitErr() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.waitErr
}

// stop sends SIGTERM, waits up to 10s, then SIGKILLs.
func (d *daemonProc) stop() {
	if d.exited() {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return
	case <-time.After(10 * time.Second):
	}
	d.t.Logf("%s ignored SIGTERM for 10s; killing it", d.name)
	_ = d.cmd.Process.Kill()
	<-d.done
}

// kill SIGKILLs the process and waits for it to be gone.
func (d *daemonProc) kill(t *testing.T) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil && !d.exited() {
		t.Fatalf("kill %s: %v", d.name, err)
	}
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s still running 10s after SIGKILL", d.name)
	}
}

func (d *daemonProc) logTail(n int) string {
	b, err := os.ReadFile(d.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (d *daemonProc) dumpLog() {
	d.t.Logf("---- last log lines of %s ----\n%s", d.name, d.logTail(60))
}

// listenAddr waits for the daemon's "listening for primaries" log line
// and returns the address it bound (the config asks for port 0, so there
// is no race for a free port).
func (d *daemonProc) listenAddr(t *testing.T) string {
	t.Helper()
	var addr string
	waitFor(t, 20*time.Second, d.name+" logs its replication address", func() (bool, string) {
		f, err := os.Open(d.logPath)
		if err != nil {
			return false, err.Error()
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var rec struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "listening for primaries" && rec.Addr != "" {
				addr = rec.Addr
				return true, ""
			}
		}
		return false, "no such line yet"
	})
	return addr
}

// status runs `remusd status --json` against the daemon's control socket.
func status(t *testing.T, control string) []daemon.VMStatus {
	t.Helper()
	r := runCLI(t, "status", "--json", "--control", control)
	if r.code != 0 {
		t.Fatalf("remusd status: %v", r)
	}
	var out struct {
		VMs []daemon.VMStatus `json:"vms"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("remusd status --json: bad JSON: %v\n%s", err, r.stdout)
	}
	if out.VMs == nil {
		t.Fatalf("remusd status --json: no \"vms\" array:\n%s", r.stdout)
	}
	return out.VMs
}

// vmStatus returns vm's entry of `remusd status --json` (ok=false if absent).
func vmStatus(t *testing.T, control, vm string) (daemon.VMStatus, bool) {
	t.Helper()
	for _, s := range status(t, control) {
		if s.VM == vm {
			return s, true
		}
	}
	return daemon.VMStatus{}, false
}

// waitFor polls cond until it holds or the deadline passes (a liveness
// bound for a loaded machine, not a performance assertion).
func waitFor(t *testing.T, deadline time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	end := time.Now().Add(deadline)
	last := ""
	for {
		ok, why := cond()
		if ok {
			return
		}
		last = why
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s (last: %s)", deadline, what, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// baseConfig is a daemon config with every path inside dir and a
// certificate for name from the test's CA (see testCA): mutual TLS, as by
// default. trust pairs configs as peers.
func baseConfig(t *testing.T, dir, name string) daemon.Config {
	t.Helper()
	cfg := daemon.DefaultConfig()
	cfg.Name = name
	cfg.Control = filepath.Join(dir, name+".sock")
	cfg.StateDir = filepath.Join(dir, name+"-state")
	cfg.TLS = hostTLS(t, dir, name)
	return cfg
}

// closedPort returns a 127.0.0.1 address nothing listens on (best effort).
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// testCA returns the CA of the test directory dir (created on first use,
// under dir/ca).
func testCA(t *testing.T, dir string) *pki.CA {
	t.Helper()
	caDir := filepath.Join(dir, "ca")
	if _, err := os.Stat(filepath.Join(caDir, pki.CACertFile)); err != nil {
		if err := pki.InitCA(caDir, "e2e-ca", 0, false); err != nil {
			t.Fatal(err)
		}
	}
	ca, err := pki.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// hostTLS issues (once) the certificate bundle of host name from dir's CA.
func hostTLS(t *testing.T, dir, name string) transport.TLSFiles {
	t.Helper()
	out := filepath.Join(dir, "tls-"+name)
	if _, err := os.Stat(filepath.Join(out, pki.HostCertFile)); err == nil {
		return pki.BundleFiles(out)
	}
	f, err := testCA(t, dir).IssueFiles(out, name, pki.HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// trust makes every config list the others as peers it accepts replicas
// of any VM from (at their listen address, when it is fixed).
func trust(cfgs ...*daemon.Config) {
	for _, c := range cfgs {
		for _, o := range cfgs {
			if o != c {
				addr := o.Listen
				if strings.HasSuffix(addr, ":0") {
					addr = ""
				}
				c.Peers = append(c.Peers, daemon.Peer{Name: o.Name, Address: addr, VMs: []string{"*"}})
			}
		}
	}
}
