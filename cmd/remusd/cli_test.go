package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/failover/witness"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code = run(ctx, args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		code, out, _ := runCLI(t, args...)
		if code != exitOK || !strings.Contains(out, "Usage: remusd COMMAND") || !strings.Contains(out, "failover") {
			t.Errorf("%v: code %d, out %q", args, code, out)
		}
	}
	for _, c := range commands {
		if c.name == "demo" {
			continue // the demo parses its own flags; see TestDemoHelp
		}
		for _, args := range [][]string{{c.name, "--help"}, {c.name, "-h"}, {"help", c.name}} {
			code, out, errOut := runCLI(t, args...)
			if code != exitOK {
				t.Errorf("%v: exit %d (stderr %q)", args, code, errOut)
			}
			if !strings.HasPrefix(out, "Usage: remusd "+c.name) {
				t.Errorf("%v: output lacks usage line:\n%s", args, out)
			}
		}
	}
	_, out, _ := runCLI(t, "serve", "--help")
	for _, f := range []string{"--config FILE", "--listen ADDR", "--control PATH", "--metrics ADDR", "--state-dir DIR",
		"--name NAME", "--epoch-interval D", "--max-inflight N", "--heartbeat-interval D", "--heartbeat-timeout D",
		"--ack-timeout D", "--ack-timeout-policy hold|unprotect", "--takeover manual|auto-unsafe", "--sim-vm SPEC",
		"--log-level LEVEL", "--log-format FORMAT", "--insecure"} {
		if !strings.Contains(out, f) {
			t.Errorf("serve --help lacks %q", f)
		}
	}
	_, out, _ = runCLI(t, "protect", "--help")
	if !strings.Contains(out, "Usage: remusd protect VM --peer PEER|HOST:PORT") || !strings.Contains(out, "--max-inflight N") {
		t.Errorf("protect --help:\n%s", out)
	}
}

func TestDemoHelp(t *testing.T) {
	// The demo owns its flags; all remusd promises is that --help is not
	// an error.
	if code, out, errOut := runCLI(t, "demo", "--help"); code != exitOK {
		t.Errorf("demo --help: exit %d\nstdout %s\nstderr %s", code, out, errOut)
	}
}

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		code, out, _ := runCLI(t, args...)
		if code != exitOK || !strings.HasPrefix(out, "remusd ") {
			t.Errorf("%v: %d %q", args, code, out)
		}
	}
}

func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "Usage: remusd"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"help", "frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"protect", "--peer", "h:1"}, "missing VM argument"},
		{[]string{"protect", "web"}, "--peer NAME or HOST:PORT is required"},
		{[]string{"protect", "../x", "--peer", "h:1"}, "is not valid"},
		{[]string{"failover", "a/b"}, "is not valid"},
		{[]string{"forget", ".x"}, "is not valid"},
		{[]string{"stop"}, "missing VM argument"},
		{[]string{"protect", "web", "extra", "--peer", "h:1"}, `unexpected argument "extra"`},
		{[]string{"unprotect"}, "missing VM argument"},
		{[]string{"failover"}, "missing VM argument"},
		{[]string{"status", "web"}, `unexpected argument "web"`},
		{[]string{"status", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"protect", "web", "--peer", "h:1", "--epoch-interval", "soon"}, "epoch-interval"},
		{[]string{"serve", "--sim-vm", "name=web,colour=blue"}, `unknown key "colour"`},
		{[]string{"serve", "--sim-vm", "name=web,memory=12XB"}, "memory"},
		{[]string{"serve", "--sim-vm", "memory=64MiB"}, "missing name"},
		{[]string{"serve", "--log-format", "xml"}, `log format "xml"`},
		{[]string{"serve", "--log-level", "loud"}, `log level "loud"`},
		{[]string{"bench", "--failover-trials", "1001"}, "--failover-trials: 1001 out of range"},
		{[]string{"bench", "--failover-trials", "-1"}, "--failover-trials: -1 out of range"},
		{[]string{"bench", "--skip", "lunch"}, `unknown section "lunch"`},
		{[]string{"bench", "--soak", "10m"}, "--soak: 10m0s needs --backend qemu"},
		{[]string{"bench", "--backend", "qemu", "--soak", "25h"}, "at most 24h"},
	} {
		code, _, errOut := runCLI(t, tc.args...)
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d (stderr %q)", tc.args, code, exitUsage, errOut)
		}
		if !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: stderr %q lacks %q", tc.args, errOut, tc.want)
		}
	}
}

func TestInvalidConfig(t *testing.T) {
	code, _, errOut := runCLI(t, "serve", "--heartbeat-timeout", "10ms", "--heartbeat-interval", "100ms",
		"--control", filepath.Join(t.TempDir(), "c.sock"))
	if code != exitConfig {
		t.Fatalf("exit %d, want %d (stderr %q)", code, exitConfig, errOut)
	}
	if !strings.Contains(errOut, "heartbeat_timeout") {
		t.Errorf("stderr %q does not name heartbeat_timeout", errOut)
	}
	// Every bad field is named.
	code, _, errOut = runCLI(t, "serve", "--takeover", "yolo", "--max-inflight", "0")
	if code != exitConfig || !strings.Contains(errOut, "takeover") || !strings.Contains(errOut, "max_inflight") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	// A config file with an unknown field is a config error.
	f := filepath.Join(t.TempDir(), "remusd.json")
	os.WriteFile(f, []byte(`{"epoch_intreval":"10ms"}`), 0o600)
	code, _, errOut = runCLI(t, "serve", "--config", f)
	if code != exitConfig || !strings.Contains(errOut, "epoch_intreval") {
		t.Errorf("config file: exit %d, stderr %q", code, errOut)
	}
	// Flags override the file.
	os.WriteFile(f, []byte(`{"heartbeat_interval":"100ms","heartbeat_timeout":"10ms"}`), 0o600)
	code, _, errOut = runCLI(t, "serve", "--config", f, "--heartbeat-interval", "1ms", "--takeover", "bogus")
	if code != exitConfig || strings.Contains(errOut, "heartbeat_timeout") || !strings.Contains(errOut, "takeover") {
		t.Errorf("override: exit %d, stderr %q", code, errOut)
	}
}

// A configuration only daemon.New can judge (a sim guest's workload) is
// still a configuration error, and leaves no control socket behind.
func TestInvalidSimVM(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "c.sock")
	code, _, errOut := runCLI(t, "serve", "--control", sock, "--state-dir", filepath.Join(dir, "state"), "--insecure",
		"--sim-vm", "name=web,workload=bogus", "--log-level", "error")
	if code != exitConfig || !strings.Contains(errOut, "bogus") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
}

// A second daemon on the same control socket fails without disturbing
// the first.
func TestServeAlreadyRunning(t *testing.T) {
	f := &fakeService{}
	path := startControl(t, f)
	code, _, errOut := runCLI(t, "serve", "--control", path, "--state-dir", t.TempDir(), "--insecure", "--log-level", "error")
	if code != exitFailure || !strings.Contains(errOut, "already running") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "status", "--control", path); code != exitOK {
		t.Errorf("first daemon disturbed: exit %d, stderr %q", code, errOut)
	}
}

func TestParseSimVM(t *testing.T) {
	vm, err := parseSimVM("name=web,memory=64MiB,workload=uniform,rate=20000,seed=1,output_every=64,output=127.0.0.1:9000")
	if err != nil {
		t.Fatal(err)
	}
	want := daemon.SimVM{Name: "web", MemoryBytes: 64 << 20, Workload: "uniform", Rate: 20000, Seed: 1,
		OutputEvery: 64, Output: "127.0.0.1:9000"}
	if vm != want {
		t.Errorf("got %+v, want %+v", vm, want)
	}
	for s, want := range map[string]int64{"4096": 4096, "512KiB": 512 << 10, "2GiB": 2 << 30, "1g": 1 << 30, "3 MiB": 3 << 20} {
		if got, err := parseSize(s); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", s, got, err, want)
		}
	}
	for _, s := range []string{"", "MiB", "12XB", "-1", "1.5GiB", "99999999999TiB"} {
		if _, err := parseSize(s); err == nil {
			t.Errorf("parseSize(%q) succeeded", s)
		}
	}
	for _, spec := range []string{"name=a,name=b", "name=a,rate=x", "name=a,junk", "name=a,rate=-1"} {
		if _, err := parseSimVM(spec); err == nil {
			t.Errorf("parseSimVM(%q) succeeded", spec)
		}
	}
}

// fakeService serves canned figures over a real control socket.
type fakeService struct {
	mu     sync.Mutex
	calls  []string
	status []daemon.VMStatus
}

func (f *fakeService) record(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
}

func (f *fakeService) Protect(_ context.Context, r daemon.ProtectRequest) error {
	f.record("protect " + r.VM + " " + r.Peer + " " + r.EpochInterval.String())
	return nil
}

func (f *fakeService) Unprotect(_ context.Context, vm string) error {
	f.record("unprotect " + vm)
	if vm == "ghost" {
		return errors.New(`no VM named "ghost"`)
	}
	return nil
}

func (f *fakeService) Failover(_ context.Context, req daemon.FailoverRequest) error {
	if req.Force {
		f.record("failover --force " + req.VM)
	} else {
		f.record("failover " + req.VM)
	}
	return nil
}

func (f *fakeService) Forget(_ context.Context, vm string) error {
	f.record("forget " + vm)
	return nil
}
func (f *fakeService) Start(_ context.Context, vm string) error { f.record("start " + vm); return nil }
func (f *fakeService) Stop(_ context.Context, vm string) error  { f.record("stop " + vm); return nil }

func (f *fakeService) Status(context.Context) ([]daemon.VMStatus, error) { return f.status, nil }

func startControl(t *testing.T, svc daemon.Service) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "remusd-cli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "control.sock")
	s, err := daemon.ListenControl(path, svc, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return path
}

func TestClientCommands(t *testing.T) {
	f := &fakeService{status: []daemon.VMStatus{
		{VM: "web", Role: daemon.RolePrimary, Link: daemon.LinkUp, OutBuf: "held", Epoch: 120, AckedEpoch: 119,
			PauseMsP50: 1.2, PauseMsP99: 3.4, DirtyPagesLast: 77, WireBytesSent: 5 << 20, CompressionRatio: 2.5, AckMsP50: 1.5},
	}}
	path := startControl(t, f)

	code, out, errOut := runCLI(t, "status", "--control", path)
	if code != exitOK {
		t.Fatalf("status: exit %d, stderr %q", code, errOut)
	}
	if !strings.Contains(out, "VM") || !strings.Contains(out, "EPOCH") || !strings.Contains(out, "web") ||
		!strings.Contains(out, "primary") || !strings.Contains(out, "5.0 MiB") {
		t.Errorf("status table:\n%s", out)
	}

	t.Setenv(envControl, path) // the environment names the socket too
	code, out, errOut = runCLI(t, "status", "--json")
	if code != exitOK {
		t.Fatalf("status --json: exit %d, stderr %q", code, errOut)
	}
	var doc struct {
		VMs []daemon.VMStatus `json:"vms"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("status --json is not JSON: %v\n%s", err, out)
	}
	if len(doc.VMs) != 1 || doc.VMs[0] != f.status[0] {
		t.Errorf("status --json = %+v", doc.VMs)
	}

	if code, out, errOut := runCLI(t, "protect", "web", "--peer", "10.0.0.2:7788", "--epoch-interval", "40ms"); code != exitOK ||
		!strings.Contains(out, "web") {
		t.Errorf("protect: exit %d, out %q, stderr %q", code, out, errOut)
	}
	if code, _, errOut := runCLI(t, "failover", "--control", path, "db"); code != exitOK {
		t.Errorf("failover: exit %d, stderr %q", code, errOut)
	}
	if code, _, errOut := runCLI(t, "unprotect", "ghost"); code != exitFailure || !strings.Contains(errOut, `no VM named "ghost"`) {
		t.Errorf("unprotect ghost: exit %d, stderr %q", code, errOut)
	}
	for _, args := range [][]string{{"failover", "--force", "db"}, {"forget", "db"}, {"start", "web"}, {"stop", "web"}} {
		if code, _, errOut := runCLI(t, args...); code != exitOK {
			t.Errorf("%v: exit %d, stderr %q", args, code, errOut)
		}
	}
	f.mu.Lock()
	got := strings.Join(f.calls, "; ")
	f.mu.Unlock()
	if want := "protect web 10.0.0.2:7788 40ms; failover db; unprotect ghost; failover --force db; forget db; start web; stop web"; got != want {
		t.Errorf("calls = %q, want %q", got, want)
	}
}

func TestClientDaemonDown(t *testing.T) {
	path := filepath.Join(t.TempDir(), "none.sock")
	code, _, errOut := runCLI(t, "status", "--control", path)
	if code != exitFailure || !strings.Contains(errOut, "is `remusd serve` running?") || !strings.Contains(errOut, path) {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
}

// TestServe runs the real daemon (daemon.New) with a simulated guest,
// reads its status through the CLI, and stops it with the context.
func TestServe(t *testing.T) {
	dir, err := os.MkdirTemp("", "remusd-serve")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "run", "control.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	// The quick path: a CA, a host bundle, and the config naming them.
	if code, _, e := runCLI(t, "certs", "init", "--dir", filepath.Join(dir, "ca")); code != exitOK {
		t.Fatalf("certs init: %s", e)
	}
	if code, _, e := runCLI(t, "certs", "host", "web1", "--ca-dir", filepath.Join(dir, "ca"), "--out", filepath.Join(dir, "tls")); code != exitOK {
		t.Fatalf("certs host: %s", e)
	}
	cfgPath := filepath.Join(dir, "remusd.json")
	tlsDir := filepath.Join(dir, "tls")
	if err := os.WriteFile(cfgPath, []byte(`{"name": "web1", "tls": {"cert": "`+tlsDir+`/host.crt", "key": "`+tlsDir+`/host.key", "ca": "`+tlsDir+`/ca.crt"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// systemd's readiness protocol (Type=notify).
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify.sock"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", filepath.Join(dir, "notify.sock"))
	go func() {
		done <- run(ctx, []string{"serve", "--config", cfgPath, "--control", sock, "--state-dir", filepath.Join(dir, "state"),
			"--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--log-format", "console", "--log-level", "warn",
			"--sim-vm", "name=web,memory=4MiB,rate=1000"}, &out, &errb)
	}()
	var code int
	var stOut, stErr string
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case c := <-done:
			t.Fatalf("serve exited early with %d: %s", c, errb.String())
		default:
		}
		code, stOut, stErr = runCLI(t, "status", "--json", "--control", sock)
		if code == exitOK || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code != exitOK {
		t.Fatalf("status against serve: exit %d, stderr %q", code, stErr)
	}
	var doc struct {
		VMs []daemon.VMStatus `json:"vms"`
	}
	if err := json.Unmarshal([]byte(stOut), &doc); err != nil {
		t.Fatalf("status --json: %v\n%s", err, stOut)
	}
	if len(doc.VMs) != 1 || doc.VMs[0].VM != "web" {
		t.Errorf("status = %+v", doc.VMs)
	}
	buf := make([]byte, 512)
	_ = notify.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, _, err := notify.ReadFromUnix(buf); err != nil || !strings.Contains(string(buf[:n]), "READY=1") {
		t.Errorf("no READY=1 to systemd: %q, %v", buf[:n], err)
	}
	stopAt := time.Now()
	cancel()
	select {
	case c := <-done:
		t.Logf("serve stopped %v after cancel", time.Since(stopAt))
		if c != exitOK {
			t.Errorf("serve exited %d after cancel: %s", c, errb.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not stop on cancel")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left behind: %v", err)
	}
	_ = notify.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, _, err := notify.ReadFromUnix(buf); err != nil || !strings.Contains(string(buf[:n]), "STOPPING=1") {
		t.Errorf("no STOPPING=1 to systemd: %q, %v\n%s", buf[:n], err, errb.String())
	}
}

func (f *fakeService) Switchover(_ context.Context, vm string) (daemon.SwitchoverResult, error) {
	f.record("switchover " + vm)
	return daemon.SwitchoverResult{VM: vm, NewPrimary: "b", Epoch: 7, PausedMs: 12.5}, nil
}

// TestWitnessServe runs `remusd witness serve` and reaches it as the
// daemons would.
func TestWitnessServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"witness", "serve", "--port", strconv.Itoa(port), "--data-dir", t.TempDir()}, &out, &errb)
	}()
	cfg := witness.Config{Endpoints: []string{fmt.Sprintf("http://127.0.0.1:%d", port)}, OpTimeout: time.Second}
	w, err := witness.Dial(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := w.Ping(ctx); err == nil {
			break
		}
		select {
		case c := <-done:
			t.Fatalf("witness serve exited %d: %s", c, errb.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("witness never answered: %s", errb.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := w.Init(ctx, "vm", "hostA"); err != nil {
		t.Fatal(err)
	}
	cancel()
	if c := <-done; c != exitOK {
		t.Fatalf("witness serve exited %d: %s", c, errb.String())
	}
	if code, _, errOut := runCLI(t, "witness", "serve", "--host", "nohost"); code != exitUsage || !strings.Contains(errOut, "not an IP") {
		t.Errorf("bad host: exit %d, %q", code, errOut)
	}
}
