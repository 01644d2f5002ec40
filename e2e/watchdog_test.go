package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/failover/watchdog"
	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/netlab"
)

// watchdogLab is the QEMU topology with a witness (the demo's lab: hosts A
// and B, a client, an etcd witness on a third host), the guest protected
// from A to B, and a client on one TCP connection to the guest.
type watchdogLab struct {
	*demo.QEMULab
	qemuPid  int
	stateDir string
	cl       *client
}

func newWatchdogLab(t *testing.T, ctx context.Context, tweak func(a, b *daemon.Config)) *watchdogLab {
	t.Helper()
	needQEMULab(t)
	if err := demo.QEMUPrereqs(); err != nil {
		t.Skip(err)
	}
	lab, err := demo.StartQEMULab(ctx, demo.QEMULabConfig{Exe: binPath, Prefix: "rw", Tweak: tweak})
	if err != nil {
		t.Fatal(err)
	}
	l := &watchdogLab{QEMULab: lab, stateDir: lab.PrimaryDaemon().StateDir}
	t.Cleanup(func() {
		// A daemon left stopped would ignore the SIGTERM of Close.
		_ = syscall.Kill(l.PrimaryDaemon().Cmd.Process.Pid, syscall.SIGCONT)
		if t.Failed() {
			t.Logf("---- hostA ----\n%s", demo.LogTail(l.PrimaryDaemon().LogPath, 60))
			t.Logf("---- hostA's watchdog ----\n%s", demo.LogTail(filepath.Join(l.stateDir, watchdog.LogName), 30))
			t.Logf("---- hostB ----\n%s", demo.LogTail(l.BackupDaemon().LogPath, 30))
		}
		wpid := watchdogPid(l.stateDir)
		lab.Close() // stops the daemons, kills the guests by pid, removes the namespaces
		if wpid > 0 && processRuns(wpid) {
			_ = syscall.Kill(wpid, syscall.SIGKILL)
		}
	})
	if err := lab.Protect(ctx, 0, 10); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the watchdog supervises the guest", func() (bool, string) {
		s, err := lab.PrimaryStatus(ctx)
		l.qemuPid = s.QEMUPid
		return err == nil && s.Watchdog == daemon.WatchdogSupervised && s.QEMUPid > 0, fmt.Sprintf("%+v %v", s, err)
	})
	if wpid := watchdogPid(l.stateDir); wpid <= 0 || !processRuns(wpid) {
		t.Fatalf("no watchdog process for %s (pid file: %d)", l.stateDir, wpid)
	} else if kids := childPids(lab.PrimaryDaemon().Cmd.Process.Pid); !contains(kids, wpid) || !contains(kids, l.qemuPid) {
		t.Logf("primary remusd's children %v (watchdog %d, QEMU %d)", kids, wpid, l.qemuPid)
	}
	conn, err := lab.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	l.cl = newClient(conn, guestsvc.ClientOptions{})
	cctx, ccancel := context.WithCancel(ctx)
	cdone := make(chan struct{})
	go func() { defer close(cdone); l.cl.run(cctx) }()
	t.Cleanup(func() { ccancel(); conn.Close(); <-cdone })
	l.waitReplies(t, 20, "client replies under protection")
	return l
}

func (l *watchdogLab) waitReplies(t *testing.T, n int, what string) {
	t.Helper()
	waitFor(t, 2*time.Minute, what, func() (bool, string) {
		ok, _, err := l.cl.state()
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		return ok >= n, fmt.Sprintf("%d replies", ok)
	})
}

func watchdogPid(stateDir string) int {
	b, err := os.ReadFile(filepath.Join(stateDir, watchdog.PidName))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func processRuns(pid int) bool {
	st, err := watchdog.ProcState(pid)
	return err == nil && st != 'Z'
}

func contains(xs []int, x int) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// stopDaemon SIGSTOPs the primary's remusd and returns how long until its
// guest's QEMU is stopped (state T), polling /proc.
func (l *watchdogLab) stopDaemonUntilGuestStops(t *testing.T, limit time.Duration) time.Duration {
	t.Helper()
	dpid := l.PrimaryDaemon().Cmd.Process.Pid
	if err := syscall.Kill(dpid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	for {
		st, err := watchdog.ProcState(l.qemuPid)
		if err != nil {
			t.Fatalf("the guest's QEMU %d: %v (the watchdog must never kill it)", l.qemuPid, err)
		}
		if st == 'T' {
			return time.Since(at)
		}
		if time.Since(at) > limit {
			t.Fatalf("the guest still runs (state %c) %v after its daemon was stopped", st, limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// TestWatchdogHungPrimaryTakenOver (issue 9, item 2): the primary's remusd
// hangs (SIGSTOP). Its backup, hearing nothing, wins the witness and
// takes over; the watchdog stops the old primary's guest within
// watchdog.timeout of the daemon's last pet. When the daemon wakes up it
// finds the VM moved on: it continues its QEMU paused and fences it; the
// guest is never killed and the client's session carries on against the
// new primary.
func TestWatchdogHungPrimaryTakenOver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	l := newWatchdogLab(t, ctx, nil)
	timeout := daemon.DefaultConfig().FenceAfter.D() // watchdog.timeout's default

	took := l.stopDaemonUntilGuestStops(t, timeout+5*time.Second)
	t.Logf("primary remusd hung (SIGSTOP): its guest stopped by the watchdog %v later (watchdog.timeout %v)", took.Round(time.Millisecond), timeout)
	if took > timeout+timingSlack {
		t.Errorf("guest stopped %v after its daemon hung, bound %v", took, timeout)
	}
	active, err := l.WaitActive(ctx, time.Minute)
	if err != nil {
		t.Fatalf("backup did not take over: %v (%+v)", err, active)
	}
	if active.WitnessHolder != "hostB" {
		t.Fatalf("backup active without the record: %+v", active)
	}
	if st, _ := watchdog.ProcState(l.qemuPid); st != 'T' {
		t.Fatalf("the old primary's guest runs (state %c) while the backup is active", st)
	}
	before, _, _ := l.cl.state()
	l.waitReplies(t, before+20, "client replies from the new primary")

	// The daemon wakes up.
	if err := syscall.Kill(l.PrimaryDaemon().Cmd.Process.Pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	var s daemon.VMStatus
	waitFor(t, time.Minute, "the woken primary fences its copy", func() (bool, string) {
		s, err = l.PrimaryStatus(ctx)
		return err == nil && s.WitnessView == daemon.WitnessFenced && s.GuestState == daemon.GuestPaused && s.Watchdog == "", fmt.Sprintf("%+v %v", s, err)
	})
	if s.QEMUPid != l.qemuPid || !processRuns(l.qemuPid) {
		t.Fatalf("the old primary's QEMU %d is gone: %+v", l.qemuPid, s)
	}
	t.Logf("woken primary: guest %s, witness %s (%s)", s.GuestState, s.WitnessView, s.LastError)
	// It stays paused; the client keeps talking to the new primary.
	time.Sleep(time.Second)
	if s, _ := l.PrimaryStatus(ctx); s.GuestState != daemon.GuestPaused {
		t.Fatalf("the fenced guest runs again: %+v", s)
	}
	now, _, _ := l.cl.state()
	l.waitReplies(t, now+10, "client replies after the old primary woke up")
}

// TestWatchdogHungPrimaryResumes: the primary's remusd hangs for less than
// its backup's patience (the backup does not race). The watchdog stops the
// guest within watchdog.timeout; when the daemon wakes up the witness
// still names this host: the guest is continued and runs on, protected,
// and the client's session carries on.
func TestWatchdogHungPrimaryResumes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	const timeout = 1500 * time.Millisecond
	l := newWatchdogLab(t, ctx, func(a, b *daemon.Config) {
		a.Watchdog.Timeout = daemon.Duration(timeout)
		b.HeartbeatTimeout = daemon.Duration(30 * time.Second) // the backup waits out the hang
	})
	took := l.stopDaemonUntilGuestStops(t, timeout+5*time.Second)
	t.Logf("primary remusd hung (SIGSTOP): its guest stopped by the watchdog %v later (watchdog.timeout %v)", took.Round(time.Millisecond), timeout)
	if took > timeout+timingSlack {
		t.Errorf("guest stopped %v after its daemon hung, bound %v", took, timeout)
	}
	time.Sleep(time.Second) // hung for longer than the timeout
	if st, _ := watchdog.ProcState(l.qemuPid); st != 'T' {
		t.Fatalf("the guest does not stay stopped (state %c)", st)
	}
	before, _, _ := l.cl.state()
	ps, _ := l.PrimaryStatus(ctx)
	_ = ps
	woke := time.Now()
	if err := syscall.Kill(l.PrimaryDaemon().Cmd.Process.Pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	var s daemon.VMStatus
	waitFor(t, time.Minute, "the woken primary continues its guest", func() (bool, string) {
		var err error
		s, err = l.PrimaryStatus(ctx)
		return err == nil && s.Watchdog == daemon.WatchdogSupervised && s.GuestState != daemon.GuestStopped && s.WitnessView == daemon.WitnessHolder,
			fmt.Sprintf("%+v %v", s, err)
	})
	t.Logf("guest continued %v after its daemon woke up", time.Since(woke).Round(time.Millisecond))
	acked := s.AckedEpoch
	waitFor(t, time.Minute, "protection carries on", func() (bool, string) {
		s, err := l.PrimaryStatus(ctx)
		return err == nil && s.AckedEpoch > acked+10, fmt.Sprintf("%+v", s)
	})
	if b, _ := l.BackupStatus(ctx); b.Role != daemon.RoleBackup {
		t.Fatalf("the backup took over: %+v", b)
	}
	l.waitReplies(t, before+20, "client replies after the daemon woke up")
	n, _, _ := l.cl.state()
	t.Logf("client: %d replies on one TCP connection through the hang, all consistent", n)
}

// TestWatchdogCrashedPrimary: the primary's remusd is killed (SIGKILL, a
// crash) while its guest runs. The watchdog sees the daemon's connection
// end without a restart notice and the daemon's process gone: it stops
// the guest at once, while the backup takes over. The daemon restarted
// (as systemd would) finds the guest stopped and the VM moved on: it
// continues the guest paused, re-attaches and keeps it fenced; nothing
// killed it.
func TestWatchdogCrashedPrimary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	l := newWatchdogLab(t, ctx, nil)
	dp := l.PrimaryDaemon()
	if err := syscall.Kill(dp.Cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var took time.Duration
	for {
		st, err := watchdog.ProcState(l.qemuPid)
		if err != nil {
			t.Fatalf("the guest's QEMU is gone: %v", err)
		}
		if st == 'T' {
			took = time.Since(killed)
			break
		}
		if time.Since(killed) > 10*time.Second {
			t.Fatalf("guest still runs (state %c) 10s after its daemon was killed", st)
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Logf("primary remusd killed: its guest stopped by the watchdog %v later", took.Round(time.Millisecond))
	if took > timingSlack {
		t.Errorf("guest stopped %v after its daemon died; the watchdog should act at once", took)
	}
	active, err := l.WaitActive(ctx, time.Minute)
	if err != nil {
		t.Fatalf("backup did not take over: %v (%+v)", err, active)
	}
	<-dp.Done()
	if err := l.RestartPrimary(ctx); err != nil {
		t.Fatal(err)
	}
	var s daemon.VMStatus
	waitFor(t, time.Minute, "the restarted primary keeps its old copy fenced", func() (bool, string) {
		s, err = l.PrimaryStatus(ctx)
		return err == nil && s.WitnessView == daemon.WitnessFenced && s.GuestState == daemon.GuestPaused, fmt.Sprintf("%+v %v", s, err)
	})
	if s.QEMUPid != l.qemuPid {
		t.Fatalf("restarted primary runs QEMU %d, not the re-attached %d", s.QEMUPid, l.qemuPid)
	}
	t.Logf("restarted primary: guest %s (pid %d), witness %s: %s", s.GuestState, s.QEMUPid, s.WitnessView, s.LastError)
	now, _, _ := l.cl.state()
	l.waitReplies(t, now+10, "client replies from the new primary")
}

// TestWatchdogIsolatedPrimary measures the self-fencing bound with the
// default configuration: host A's uplink goes down (a silent partition:
// no reset reaches either side), so the primary loses its backup and the
// witness at once. Its daemon notices the link loss after
// heartbeat_timeout, cannot claim the record, and pauses the guest
// fence_after later; the watchdog backs that with SIGSTOP a margin after.
// Meanwhile the backup wins the record and takes over. When the link
// returns the old primary's guest stays paused, fenced.
func TestWatchdogIsolatedPrimary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	l := newWatchdogLab(t, ctx, nil)
	def := daemon.DefaultConfig()
	ns := l.PrimaryNetns()
	if err := netlab.IP(ctx, ns, "link", "set", "up0", "down"); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	t.Cleanup(func() { _ = netlab.IP(context.Background(), ns, "link", "set", "up0", "up") })
	// The stop is timed from /proc by its own goroutine: a status call in
	// flight when QEMU stops waits for QMP a moment.
	stoppedc := make(chan time.Duration, 1)
	go func() {
		for {
			if st, err := watchdog.ProcState(l.qemuPid); err != nil || st == 'T' {
				stoppedc <- time.Since(cut)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	var paused, stopped time.Duration
	for stopped == 0 {
		select {
		case stopped = <-stoppedc:
			continue
		default:
		}
		el := time.Since(cut)
		s, err := l.PrimaryStatus(ctx)
		switch {
		case err != nil:
		case s.GuestState == daemon.GuestPaused && paused == 0:
			paused = el
		case s.GuestState == daemon.GuestRunning:
			paused = 0 // an epoch's capture: the self-fence pause lasts
		}
		if el > 30*time.Second {
			t.Fatalf("guest not stopped %v after the partition (paused at %v)", el, paused)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st, err := watchdog.ProcState(l.qemuPid); err != nil || st != 'T' {
		t.Fatalf("the guest's QEMU: state %c, %v (the watchdog must stop it, never kill it)", st, err)
	}
	hb, fa := def.HeartbeatTimeout.D(), def.FenceAfter.D()
	t.Logf("primary isolated (uplink down): guest paused by its daemon after %v (heartbeat_timeout %v + fence_after %v), stopped by the watchdog after %v",
		paused.Round(time.Millisecond), hb, fa, stopped.Round(time.Millisecond))
	if paused == 0 || paused > hb+fa+timingSlack {
		t.Errorf("the daemon paused the guest after %v, bound heartbeat_timeout + fence_after = %v", paused, hb+fa)
	}
	if stopped > hb+fa+timingSlack {
		t.Errorf("the watchdog stopped the guest after %v", stopped)
	}
	active, err := l.WaitActive(ctx, time.Minute)
	if err != nil || active.WitnessHolder != "hostB" {
		t.Fatalf("backup did not take over: %v (%+v)", err, active)
	}
	if err := netlab.IP(ctx, ns, "link", "set", "up0", "up"); err != nil {
		t.Fatal(err)
	}
	var s daemon.VMStatus
	waitFor(t, time.Minute, "the old primary fences its copy once it reaches the witness", func() (bool, string) {
		s, err = l.PrimaryStatus(ctx)
		return err == nil && s.WitnessView == daemon.WitnessFenced && s.GuestState == daemon.GuestPaused, fmt.Sprintf("%+v %v", s, err)
	})
	t.Logf("partition healed: old primary's guest %s, witness %s (%s)", s.GuestState, s.WitnessView, s.LastError)
	now, _, _ := l.cl.state()
	l.waitReplies(t, now+10, "client replies from the new primary")
}

// timingSlack bounds how late the watchdog tests let a stop or a pause
// come: late is checked loosely, for a loaded 2-core machine delays
// timers; the figures are the logged values, not these checks.
const timingSlack = 5 * time.Second
