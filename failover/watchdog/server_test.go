package watchdog

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// The test binary doubles as a process standing in for QEMU (its command
// line carries -name and -qmp as the qemu backend's does) and as a daemon
// that pets and then dies.
const (
	envFakeQEMU   = "WATCHDOG_TEST_FAKE_QEMU"
	envFakeDaemon = "WATCHDOG_TEST_FAKE_DAEMON"
)

func TestMain(m *testing.M) {
	switch {
	case os.Getenv(envFakeQEMU) == "1":
		time.Sleep(10 * time.Minute) // killed by the test
		os.Exit(0)
	case os.Getenv(envFakeDaemon) != "":
		os.Exit(fakeDaemon(os.Getenv(envFakeDaemon), os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeDaemon connects to the watchdog of stateDir, vouches for one VM
// (NAME PID QMP) for an hour, says "ok" and waits to be killed.
func fakeDaemon(stateDir string, args []string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, stateDir)
	if err == nil {
		_, err = c.Hello(ctx)
	}
	if err == nil {
		var pid int
		fmt.Sscan(args[1], &pid)
		_, err = c.Pet(ctx, []PetVM{{Name: args[0], Pid: pid, QMP: args[2], ValidForNs: int64(time.Hour)}})
	}
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("ok")
	time.Sleep(10 * time.Minute)
	return 0
}

func testExe(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// startFakeQEMU runs a process whose command line is VM vm's with QMP
// socket qmp; killed (by pid) at the end of the test.
func startFakeQEMU(t *testing.T, vm, qmp string) Target {
	t.Helper()
	cmd := exec.Command(testExe(t), "-name", vm, "-qmp", "unix:"+qmp+",server=on,wait=off")
	cmd.Env = append(os.Environ(), envFakeQEMU+"=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	return Target{VM: vm, Pid: cmd.Process.Pid, QMP: qmp}
}

// shortDir is a state directory short enough for a unix socket path.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "wdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// startServer runs a watchdog server on dir until stop (or the end of
// the test).
func startServer(t *testing.T, dir string, o ServerOptions) (stop func()) {
	t.Helper()
	o.StateDir = dir
	if o.Log == nil {
		o.Log = zaptest.NewLogger(t).Named("watchdog")
	}
	if o.Procs == nil && o.Binaries == nil {
		o.Binaries = []string{testExe(t)}
	}
	ready := make(chan struct{})
	o.Ready = func() { close(ready) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, o) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("watchdog: %v", err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("watchdog: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func dial(t *testing.T, dir string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Hello(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// waitState polls /proc/PID/stat until the process is (or is not) stopped
// and returns how long it took.
func waitState(t *testing.T, pid int, stopped bool, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		st, err := ProcState(pid)
		if err != nil {
			t.Fatal(err)
		}
		if (st == 'T') == stopped {
			return time.Since(start)
		}
		if time.Since(start) > limit {
			t.Fatalf("pid %d: state %c after %v, want stopped=%v", pid, st, limit, stopped)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func petOne(t *testing.T, c *Client, tg Target, valid time.Duration) Reply {
	t.Helper()
	rep, err := c.Pet(context.Background(), []PetVM{{Name: tg.VM, Pid: tg.Pid, QMP: tg.QMP, ValidForNs: int64(valid)}})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// TestServeStopsAtDeadline: a real process standing in for QEMU is
// stopped (state T) when its daemon's proof runs out, stays so while pets
// go on, runs again on Cont and is not stopped while pets keep coming.
func TestServeStopsAtDeadline(t *testing.T) {
	dir := shortDir(t)
	startServer(t, dir, ServerOptions{})
	st, err := os.Stat(filepath.Join(dir, SocketName))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v, mode %v", err, st.Mode())
	}
	q := startFakeQEMU(t, "vm1", filepath.Join(dir, "vm1.qmp"))
	c := dial(t, dir)
	defer c.Close()

	const valid = 300 * time.Millisecond
	petAt := time.Now()
	if rep := petOne(t, c, q, valid); len(rep.Refused) != 0 {
		t.Fatalf("refused: %+v", rep.Refused)
	}
	waitState(t, q.Pid, true, 5*time.Second)
	took := time.Since(petAt)
	t.Logf("stopped %v after a pet valid for %v", took.Round(time.Millisecond), valid)
	if took < valid || took > valid+500*time.Millisecond {
		t.Errorf("stopped after %v, want %v (+ reaction)", took, valid)
	}
	rep := petOne(t, c, q, time.Hour)
	if len(rep.Stopped) != 1 || rep.Stopped[0].Pid != q.Pid {
		t.Fatalf("reply after the stop: %+v", rep)
	}
	time.Sleep(100 * time.Millisecond)
	if s, _ := ProcState(q.Pid); s != 'T' {
		t.Fatalf("a pet continued the stopped guest (state %c)", s)
	}
	if _, err := c.Cont(context.Background(), "vm1", time.Second, false); err != nil {
		t.Fatal(err)
	}
	waitState(t, q.Pid, false, time.Second)
	for i := 0; i < 10; i++ {
		petOne(t, c, q, 300*time.Millisecond)
		time.Sleep(100 * time.Millisecond)
		if s, _ := ProcState(q.Pid); s == 'T' {
			t.Fatal("stopped although pets keep coming")
		}
	}
}

// TestServeRestartGrace: a daemon that announces its restart and exits
// (closes) leaves its guests their grace; then they are stopped.
func TestServeRestartGrace(t *testing.T) {
	dir := shortDir(t)
	startServer(t, dir, ServerOptions{})
	q := startFakeQEMU(t, "vm1", filepath.Join(dir, "vm1.qmp"))
	c := dial(t, dir)
	petOne(t, c, q, 200*time.Millisecond)
	const grace = 800 * time.Millisecond
	if err := c.Restart(context.Background(), []string{"vm1"}, grace); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	c.Close()
	// The next daemon connects and pets without the VM (not resumed yet).
	c2 := dial(t, dir)
	defer c2.Close()
	if _, err := c2.Pet(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	if s, _ := ProcState(q.Pid); s == 'T' {
		t.Fatal("stopped within the restart grace")
	}
	waitState(t, q.Pid, true, 5*time.Second)
	if took := time.Since(at); took < grace {
		t.Fatalf("stopped %v after the restart notice, grace %v", took, grace)
	}
}

// TestServeDaemonDeath: a daemon process that dies (SIGKILL) without a
// restart notice: its guest is stopped at once, although the daemon had
// vouched for it for an hour.
func TestServeDaemonDeath(t *testing.T) {
	dir := shortDir(t)
	startServer(t, dir, ServerOptions{})
	q := startFakeQEMU(t, "vm1", filepath.Join(dir, "vm1.qmp"))
	d := exec.Command(testExe(t), q.VM, fmt.Sprint(q.Pid), q.QMP)
	d.Env = append(os.Environ(), envFakeDaemon+"="+dir)
	out, err := d.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(d.Process.Pid, syscall.SIGKILL); _ = d.Wait() })
	line, _ := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != "ok" {
		t.Fatalf("fake daemon: %q", line)
	}
	// A daemon that closes its connection but lives keeps its deadlines:
	// this test's own connection, closed, stops nothing.
	c := dial(t, dir)
	c.Close()
	time.Sleep(200 * time.Millisecond)
	if s, _ := ProcState(q.Pid); s == 'T' {
		t.Fatal("a living daemon's closed connection stopped a guest")
	}
	killed := time.Now()
	_ = syscall.Kill(d.Process.Pid, syscall.SIGKILL)
	waitState(t, q.Pid, true, 5*time.Second)
	t.Logf("guest stopped %v after its daemon was killed", time.Since(killed).Round(time.Millisecond))
}

// TestServeRefusesInvalidPids: init, the watchdog itself, a process of
// another binary with a QEMU-like command line, a QEMU-like process of
// another VM or QMP socket: all refused and never signalled.
func TestServeRefusesInvalidPids(t *testing.T) {
	dir := shortDir(t)
	startServer(t, dir, ServerOptions{})
	qmp := filepath.Join(dir, "vm1.qmp")
	other := startFakeQEMU(t, "vm2", filepath.Join(dir, "vm2.qmp"))
	sh := exec.Command("/bin/sh", "-c", "sleep 600", "sh", "-name", "vm1", "-qmp", "unix:"+qmp+",server=on")
	if err := sh.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(sh.Process.Pid, syscall.SIGKILL); _ = sh.Wait() })
	c := dial(t, dir)
	defer c.Close()
	cases := []PetVM{
		{Name: "vm1", Pid: 1, QMP: qmp},
		{Name: "vm1", Pid: os.Getpid(), QMP: qmp},      // the test (and watchdog) process: the right binary, not a VM
		{Name: "vm1", Pid: sh.Process.Pid, QMP: qmp},   // the command line, another binary
		{Name: "vm1", Pid: other.Pid, QMP: qmp},        // another VM's QEMU
		{Name: "vm2", Pid: other.Pid, QMP: qmp + ".x"}, // its VM, another QMP socket
		{Name: "vm2", Pid: 0x3fffff0, QMP: other.QMP},  // no such process
		{Name: "vm2", Pid: other.Pid, QMP: "vm2.qmp"},  // relative path
		{Name: "-vm2", Pid: other.Pid, QMP: other.QMP}, // not a VM name
	}
	for i, p := range cases {
		rep, err := c.Pet(context.Background(), []PetVM{p})
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Refused) != 1 || !strings.Contains(rep.Refused[0].Error, ErrInvalidTarget.Error()) {
			t.Errorf("case %d (%+v): %+v", i, p, rep)
		} else {
			t.Logf("case %d refused: %s", i, rep.Refused[0].Error)
		}
	}
	time.Sleep(50 * time.Millisecond)
	for _, pid := range []int{other.Pid, sh.Process.Pid} {
		if s, _ := ProcState(pid); s == 'T' {
			t.Errorf("pid %d stopped", pid)
		}
	}
	// The valid target is accepted.
	if rep := petOne(t, c, other, time.Hour); len(rep.Refused) != 0 {
		t.Fatalf("valid target refused: %+v", rep.Refused)
	}
}

// TestServeOneInstanceAndIdleExit: a second watchdog on the same state
// directory refuses to start; an idle one exits.
func TestServeOneInstanceAndIdleExit(t *testing.T) {
	dir := shortDir(t)
	startServer(t, dir, ServerOptions{})
	err := Serve(context.Background(), ServerOptions{StateDir: dir, Binaries: []string{testExe(t)}})
	if !errors.Is(err, ErrRunning) {
		t.Fatalf("second watchdog: %v", err)
	}
	dir2 := shortDir(t)
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), ServerOptions{StateDir: dir2, Binaries: []string{testExe(t)}, IdleExit: 200 * time.Millisecond, Log: zaptest.NewLogger(t)})
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("idle watchdog did not exit")
	}
	if _, err := os.Stat(filepath.Join(dir2, SocketName)); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestCheckCmdline(t *testing.T) {
	tg := Target{VM: "g", Pid: 2, QMP: "/r/g.qmp"}
	ok := "qemu\x00-name\x00g\x00-qmp\x00unix:/r/g.qmp,server=on,wait=off\x00"
	if err := checkCmdline(tg, []byte(ok)); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		"qemu\x00-name\x00gg\x00-qmp\x00unix:/r/g.qmp,server=on\x00",
		"qemu\x00-name\x00g\x00-qmp\x00unix:/r/g.qmp.x,server=on\x00",
		"qemu\x00-name g\x00-qmp unix:/r/g.qmp,server=on\x00",
		"qemu\x00-append\x00-name g -qmp unix:/r/g.qmp,\x00",
		"qemu\x00-name\x00g\x00",
	} {
		if err := checkCmdline(tg, []byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}
