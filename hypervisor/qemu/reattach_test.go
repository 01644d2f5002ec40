package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/dirtymap"
)

// launcherEnv names the directory the helper process launches its QEMU in.
const launcherEnv = "REMUSD_QEMU_LAUNCHER_DIR"

func launcherSpec(dir string) Spec {
	return Spec{
		Name:       "outlives",
		MemoryMiB:  64,
		RAMPath:    dir + "/ram",
		QMPPath:    dir + "/qmp.sock",
		SerialPath: dir + "/serial.log",
	}
}

// TestLauncherHelper is not a test of its own: it is the "remusd" of
// TestQEMUOutlivesLauncher, run as a separate process that launches a
// QEMU, reports its pid and waits to be killed.
func TestLauncherHelper(t *testing.T) {
	dir := os.Getenv(launcherEnv)
	if dir == "" {
		t.Skip("helper process of TestQEMUOutlivesLauncher")
	}
	g, err := Launch(context.Background(), launcherSpec(dir), nil)
	if err != nil {
		fmt.Printf("ERR %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("PID %d\n", g.Pid())
	time.Sleep(10 * time.Minute)
}

// procState is the state letter of /proc/PID/stat ("" if there is no such
// process).
func procState(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return ""
	}
	return string(b[i+2])
}

// TestQEMUOutlivesLauncher: a QEMU launched by a process that is then
// SIGKILLed keeps running, keeps answering QMP, writes its output to its
// log file, and a new process re-attaches to it (Reattach), drives an epoch,
// detaches, re-attaches and finally quits it with Close.
func TestQEMUOutlivesLauncher(t *testing.T) {
	requireQEMU(t)
	if os.Getenv(launcherEnv) != "" {
		t.Skip("inside the helper")
	}
	// The orphaned QEMU is re-parented to this process, which reaps it at
	// the end (pid 1 of a container may not).
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	dir := testDir(t)
	spec := launcherSpec(dir)
	ctx := testCtx(t)

	helper := exec.Command(os.Args[0], "-test.run=^TestLauncherHelper$", "-test.count=1")
	helper.Env = append(os.Environ(), launcherEnv+"="+dir)
	var stderr bytes.Buffer
	helper.Stderr = &stderr
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	pid := 0
	lines := bufio.NewScanner(out)
	for pid == 0 && lines.Scan() {
		l := lines.Text()
		if strings.HasPrefix(l, "ERR ") {
			t.Fatalf("helper: %s", l)
		}
		if s, ok := strings.CutPrefix(l, "PID "); ok {
			pid, _ = strconv.Atoi(s)
		}
	}
	if pid <= 0 {
		helper.Process.Kill()
		helper.Wait()
		t.Fatalf("helper reported no QEMU pid; stderr:\n%s", stderr.String())
	}
	t.Cleanup(func() { // whatever happens, no QEMU is left behind
		if procState(pid) != "" {
			_ = unix.Kill(pid, unix.SIGKILL)
			_, _ = unix.Wait4(pid, nil, 0, nil)
		}
	})

	// The launcher dies without a chance to clean up.
	if err := helper.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = helper.Wait()
	time.Sleep(300 * time.Millisecond)
	if st := procState(pid); st == "" || st == "Z" {
		t.Fatalf("QEMU (pid %d) did not survive its launcher: state %q", pid, st)
	}

	// A wrong pid or name is refused (and leaves QMP free for the next try).
	if _, err := Reattach(ctx, spec, pid+100000, nil); err == nil || !strings.Contains(err.Error(), "served by pid") {
		t.Fatalf("Reattach with a wrong pid: %v", err)
	}
	other := spec
	other.Name = "someone-else"
	if _, err := Reattach(ctx, other, pid, nil); err == nil || !strings.Contains(err.Error(), `is VM "outlives"`) {
		t.Fatalf("Reattach with a wrong name: %v", err)
	}

	g, err := Reattach(ctx, spec, pid, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Reattach: %v", err)
	}
	if g.Pid() != pid || g.Name() != "outlives" || g.NumPages() != 64<<20/pageSize || g.Paused() {
		t.Fatalf("re-attached guest: pid %d (want %d), name %q, %d pages, paused %v", g.Pid(), pid, g.Name(), g.NumPages(), g.Paused())
	}
	// QEMU's output after its launcher died lands in its log file: trace
	// every QMP command to stderr.
	if err := g.QMP().Execute(ctx, "trace-event-set-state", map[string]any{"name": "monitor_qmp_cmd_in_band", "enable": true}, nil); err != nil {
		t.Fatal(err)
	}
	for epoch := 0; epoch < 3; epoch++ {
		time.Sleep(50 * time.Millisecond)
		if err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		bm := dirtymap.New(g.NumPages())
		if err := g.HarvestDirty(ctx, bm); err != nil {
			t.Fatal(err)
		}
		if epoch == 0 && bm.Count() != g.NumPages() {
			t.Fatalf("first harvest after Reattach: %d pages, want all", bm.Count())
		}
		if _, err := g.SaveDeviceState(ctx, nil); err != nil {
			t.Fatal(err)
		}
		if err := g.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	}
	logged := ""
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(spec.LogFile())
		if logged = string(b); strings.Contains(logged, "monitor_qmp_cmd_in_band") {
			break
		}
	}
	if !strings.Contains(logged, "monitor_qmp_cmd_in_band") || !strings.Contains(logged, "remusd: starting") {
		t.Fatalf("QEMU's output after the launcher's death is not in %s:\n%s", spec.LogFile(), logged)
	}

	// Detach leaves it running; Reattach with pid 0 finds the pid itself.
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if st := procState(pid); st == "" || st == "Z" {
		t.Fatalf("Detach stopped QEMU: state %q", st)
	}
	g, err = Reattach(ctx, spec, 0, nil)
	if err != nil {
		t.Fatalf("second Reattach: %v", err)
	}
	if g.Pid() != pid {
		t.Fatalf("Reattach(pid 0) found pid %d, want %d", g.Pid(), pid)
	}
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	// Close quits the QEMU and removes its files.
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.proc.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not stop the re-attached QEMU")
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil {
		t.Fatalf("reap QEMU: %v", err)
	}
	t.Logf("QEMU exit status %d", ws.ExitStatus())
	for _, f := range []string{spec.RAMPath, spec.QMPPath} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind: %v", f, err)
		}
	}
}
