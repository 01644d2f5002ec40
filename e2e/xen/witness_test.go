//go:build xen

package xene2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/xentest"
)

// TestDom0DaemonWitness, in dom0 (TestXenDaemonFailover runs it after
// TestDom0DaemonFailover): the two daemons with an etcd witness (`remusd
// witness serve` on loopback) and automatic takeover; hosta runs the
// watchdog (on by default with a witness and xen_vms). hosta's daemon
// hangs (SIGSTOP): the watchdog pauses web, hostb wins the VM's record and
// activates its standby, and the client's connection carries on there.
// hosta's daemon is then continued: it finds web paused by the watchdog,
// the witness names hostb, so it fences its copy (its own pause first,
// then the watchdog's dropped): web stays paused, never a second running
// copy, and the connection carries on from hostb.
func TestDom0DaemonWitness(t *testing.T) {
	if !xentest.InDom0() {
		t.Skip("runs in a xentest dom0 (TestXenDaemonFailover boots one)")
	}
	ctx := context.Background()
	dir := t.TempDir()
	_, xlCfg, echo, addr := startWeb(ctx, t, dir)

	port, err := demo.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	wit, err := demo.StartWitness(ctx, remusdBin, "", "127.0.0.1", port, filepath.Join(dir, "witness"))
	if err != nil {
		t.Fatal(err)
	}
	defer wit.Stop()

	const replA, replB = "127.0.0.1:17822", "127.0.0.1:17821"
	acfg, bcfg := dom0Pair(dir, replA, replB, xlCfg, daemon.XenVM{Name: "web", XLConfig: xlCfg}, daemon.OutputPlug)
	acfg.Witness, bcfg.Witness = wit.Config(), wit.Config()
	t.Cleanup(func() { killWatchdog(acfg.StateDir) })
	b, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: time.Minute}, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.StopKeepGuests()
	a, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: 2 * time.Minute}, acfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = a.Cmd.Process.Signal(syscall.SIGCONT)
		a.StopKeepGuests()
	}()
	defer func() {
		if t.Failed() {
			t.Logf("hosta's log:\n%s", demo.LogTail(a.LogPath, 40))
			t.Logf("hosta's watchdog:\n%s", demo.LogTail(filepath.Join(acfg.StateDir, "watchdog.log"), 20))
			t.Logf("hostb's log:\n%s", demo.LogTail(b.LogPath, 40))
		}
	}()
	ac := daemon.ControlClient{Path: acfg.Control, Timeout: 10 * time.Second}
	bc := daemon.ControlClient{Path: bcfg.Control, Timeout: 10 * time.Second}

	t0 := time.Now()
	cli(t, "protect", "web", "--peer", replB, "--control", acfg.Control)
	var ps daemon.VMStatus
	waitFor(t, 4*time.Minute, "six epochs acknowledged, the watchdog supervising web", func() (bool, string) {
		ps, err = ac.VMStatus(ctx, "web")
		return err == nil && ps.Role == daemon.RolePrimary && ps.AckedEpoch >= 6 && ps.Watchdog == daemon.WatchdogSupervised && ps.WitnessView == daemon.WitnessHolder,
			fmt.Sprintf("%+v %v", ps, err)
	})
	t.Logf("dom0: witness: protected in %s: epoch %d acked, witness record held by %s (generation %d), watchdog %s",
		time.Since(t0).Round(time.Millisecond), ps.AckedEpoch, ps.WitnessHolder, ps.WitnessGeneration, ps.Watchdog)
	if err := echo.WaitCarriesOn(3, 2*time.Minute); err != nil {
		t.Fatalf("under protection: %v", err)
	}

	// hosta's daemon hangs.
	stops := watchdogStops(acfg.StateDir)
	before, _, _ := echo.State()
	if err := a.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	hung := time.Now()
	var pausedAt, activeAt time.Duration
	var bs daemon.VMStatus
	waitFor(t, time.Minute, "the watchdog pauses web and hostb takes the VM over", func() (bool, string) {
		if pausedAt == 0 && watchdogStops(acfg.StateDir) > stops && domPaused(t, "web") {
			pausedAt = time.Since(hung)
		}
		bs, err = bc.VMStatus(ctx, "web")
		if activeAt == 0 && err == nil && bs.Role == daemon.RoleActive {
			activeAt = time.Since(hung)
		}
		return pausedAt > 0 && activeAt > 0, fmt.Sprintf("paused %v active %v; hostb %+v %v", pausedAt, activeAt, bs, err)
	})
	if bs.WitnessHolder != "hostb" {
		t.Fatalf("hostb active, but the witness record names %q", bs.WitnessHolder)
	}
	if err := echo.WaitCarriesOn(5, 2*time.Minute); err != nil {
		t.Fatalf("after hostb's takeover: %v", err)
	}
	n, _, _ := echo.State()
	t.Logf("dom0: hosta's daemon hung: the watchdog paused web %s later, hostb active (witness generation %d, activation %.1f ms) %s later; the connection carries on from hostb (%d exchanges after the hang)",
		pausedAt.Round(time.Millisecond), bs.WitnessGeneration, bs.ActivationMs, activeAt.Round(time.Millisecond), n-before)

	// hosta's daemon wakes: the witness names hostb, so it fences web.
	if err := a.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	woke := time.Now()
	var s daemon.VMStatus
	waitFor(t, time.Minute, "the woken hosta fences web", func() (bool, string) {
		s, err = ac.VMStatus(ctx, "web")
		return err == nil && s.WitnessView == daemon.WitnessFenced && logHas(a.LogPath, "this host no longer holds the VM: paused (fenced)"), fmt.Sprintf("%+v %v", s, err)
	})
	fencedAfter := time.Since(woke)
	// The watchdog let go of it (its log says so, its record of the
	// pause is gone); web stays paused (the fence's pause).
	wlog := filepath.Join(acfg.StateDir, "watchdog.log")
	waitFor(t, 10*time.Second, "the watchdog lets go of the fenced web", func() (bool, string) {
		_, recErr := os.Stat(filepath.Join(acfg.StateDir, "watchdog-xen.json"))
		return logHas(wlog, "its daemon released it") && os.IsNotExist(recErr), demo.LogTail(wlog, 5)
	})
	for range 5 {
		if !domPaused(t, "web") {
			t.Fatalf("the fenced web runs:\n%s", xlOut("list"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := echo.WaitCarriesOn(5, time.Minute); err != nil {
		t.Fatalf("after hosta's fence: %v", err)
	}
	if err := xentest.EchoOnce(addr); err != nil {
		t.Fatalf("a new connection (to hostb's copy): %v", err)
	}
	t.Logf("dom0: woken hosta fenced web %s later (witness: %s); web stays paused, the connection carries on from hostb",
		fencedAfter.Round(time.Millisecond), strings.TrimSpace(s.WitnessError))
}
