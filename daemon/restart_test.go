package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/vmtest"
)

func runDaemon(t *testing.T, cfg Config) (*Daemon, func()) {
	t.Helper()
	d, err := New(cfg, zaptest.NewLogger(t).Named(cfg.Name))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	<-d.Running()
	return d, func() { cancel(); <-done }
}

// TestResumedPrimaryRunsAgain: the previous daemon died inside an
// epoch's pause (SIGKILL: QEMU left stopped). The next daemon re-attaches
// and leaves a primary's guest paused until its first checkpoint, which
// needs the backup. With the backup unreachable, the guest never runs
// again, and ack_timeout_policy unprotect never fires (acked 0, next 1).
func TestResumedPrimaryRunsAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	if _, err := guestimage.Build(ctx, guestimage.Config{}); errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	}
	shm, _ := os.MkdirTemp("/dev/shm", "rdrs-")
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()
	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "b")}
	bcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "b-run"), Autostart: boolp(false)}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.EpochInterval = Duration(50 * time.Millisecond)
	pcfg.AckTimeoutPolicy = AckTimeoutUnprotect
	pcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "a")}}
	securePeers(t, &bcfg, &pcfg)
	_, stopB := runDaemon(t, bcfg)
	a, stopA := runDaemon(t, pcfg)
	t.Cleanup(func() { KillRecordedGuests(pcfg.StateDir) })
	serial := filepath.Join(shm, "a", "g1.serial")
	for {
		b, _ := os.ReadFile(serial)
		if strings.Contains(string(b), "REMUS-GUEST") {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("guest did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := a.Protect(ctx, ProtectRequest{VM: "g1", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a, "g1", func(s VMStatus) bool { return s.AckedEpoch >= 5 })
	stopA()
	// What a SIGKILL inside an epoch's pause leaves: QEMU stopped.
	g, err := qemu.Attach(ctx, filepath.Join(shm, "a", "g1.qmp"), filepath.Join(shm, "a", "g1.ram"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	g.Detach()
	stopB() // the backup is unreachable while hostA's daemon comes back
	a2, stopA2 := runDaemon(t, pcfg)
	defer stopA2()
	time.Sleep(3*pcfg.AckTimeout.D() + time.Second)
	a2.mu.Lock()
	qg := a2.vms["g1"].guest.(*qemu.Guest)
	a2.mu.Unlock()
	st, err := qg.QMP().Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s := vmStatus(t, a2, "g1")
	t.Logf("after %v: running %v, status %+v", 3*pcfg.AckTimeout.D(), st.Running, s)
	if !st.Running {
		t.Errorf("re-attached primary guest still paused %v after restart (backup down, ack_timeout_policy unprotect)", 3*pcfg.AckTimeout.D())
	}
}

// TestFailoverRefusedWhilePrimaryRestarts: the primary's daemon restarts
// (upgrade) and said so (Goodbye restart); its guest runs on. The backup
// knows (link "restarting"), yet `remusd failover` without --force
// activates the replica: two copies of the VM run.
func TestFailoverRefusedWhilePrimaryRestarts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	if _, err := guestimage.Build(ctx, guestimage.Config{}); errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	}
	shm, _ := os.MkdirTemp("/dev/shm", "rdfo-")
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()
	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "b")}
	bcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "b-run"), Autostart: boolp(false)}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.EpochInterval = Duration(50 * time.Millisecond)
	pcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "a")}}
	securePeers(t, &bcfg, &pcfg)
	b, stopB := runDaemon(t, bcfg)
	defer stopB()
	a, stopA := runDaemon(t, pcfg)
	t.Cleanup(func() { KillRecordedGuests(pcfg.StateDir); KillRecordedGuests(bcfg.StateDir) })
	for {
		out, _ := os.ReadFile(filepath.Join(shm, "a", "g1.serial"))
		if strings.Contains(string(out), "REMUS-GUEST") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := a.Protect(ctx, ProtectRequest{VM: "g1", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, a, "g1", func(s VMStatus) bool { return s.AckedEpoch >= 5 })
	stopA() // daemon restart: the guest runs on
	s := waitStatus(t, b, "g1", func(s VMStatus) bool { return s.Link == "restarting" })
	t.Logf("backup sees link %q", s.Link)
	err := b.Failover(ctx, FailoverRequest{VM: "g1"})
	pg, aerr := qemu.Attach(ctx, filepath.Join(shm, "a", "g1.qmp"), filepath.Join(shm, "a", "g1.ram"), nil)
	if aerr != nil {
		t.Fatal(aerr)
	}
	st, _ := pg.QMP().Status(ctx)
	pg.Detach()
	t.Logf("failover without --force: %v; primary's guest running: %v", err, st.Running)
	if err == nil && st.Running {
		t.Errorf("failover activated beside a primary that announced a restart and still runs: two copies")
	}
	if err == nil || !strings.Contains(err.Error(), "--force") || !strings.Contains(err.Error(), "restarts") {
		t.Errorf("failover during the primary's restart: %v, want a refusal naming the restart and --force", err)
	}
}

// qemusOn lists the pids of QEMU processes whose command line names ram.
func qemusOn(ram string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), "qemu-system") && strings.Contains(string(b), ram) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestNoSecondQEMUOnAliveGuest: the guest of a local VM
// still runs, but re-attaching fails (here: its QMP socket is busy with
// another client, so no greeting within reattachTimeout). The daemon
// removes the record and autostarts the VM: launch deletes the live QMP
// socket ("stale") and starts a second QEMU on the same RAM file.
func TestNoSecondQEMUOnAliveGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	if _, err := guestimage.Build(ctx, guestimage.Config{}); errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	}
	shm, _ := os.MkdirTemp("/dev/shm", "rddl-")
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()
	cfg := DefaultConfig()
	cfg.Name, cfg.Control, cfg.StateDir, cfg.Insecure = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a"), true
	cfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "a")}}
	ram := filepath.Join(shm, "a", "g1.ram")
	_, stop := runDaemon(t, cfg)
	t.Cleanup(func() {
		for _, p := range qemusOn(ram) {
			_ = killPid(p)
		}
	})
	stop() // the guest runs on
	if n := qemusOn(ram); len(n) != 1 {
		t.Fatalf("before: %v", n)
	}
	// Someone holds the QMP socket (an operator's socat, a slow old daemon).
	c, err := net.Dial("unix", filepath.Join(shm, "a", "g1.qmp"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, stop2 := runDaemon(t, cfg)
	defer stop2()
	pids := qemusOn(ram)
	t.Logf("QEMU processes on %s after the restart: %v", ram, pids)
	if len(pids) > 1 {
		t.Errorf("a second QEMU was launched on the running guest's RAM file")
	}
}

func killPid(p string) error {
	var pid int
	for _, ch := range p {
		pid = pid*10 + int(ch-'0')
	}
	proc, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	return proc.Kill()
}
