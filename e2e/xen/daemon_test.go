//go:build xen

// Package xene2e runs two remusd daemons inside one Xen dom0 (booted under
// QEMU by xentest) and fails a protected PVH domain over from one to the
// other while a client keeps a TCP connection to it: `remusd protect` for
// a Xen domain, end to end.
package xene2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

// Files the host-side driver puts into dom0.
const (
	remusdBin = "/vmtest/remusd"
	domUKern  = xentest.DomUKernel
	domUNetRD = xentest.DomUNetRamdisk
)

// TestXenDaemonFailover boots Xen under QEMU with a remusd built with the
// xen tag and runs TestDom0DaemonFailover in dom0; XEN_E2E_FULL=1 adds
// the stopped (SIGTERM) restart and TestDom0DaemonFailoverNFQueue. Every
// cooperative checkpoint and every switch of log-dirty mode risks the
// domU triple fault under TCG (README), retried by a whole new run: CI
// runs the shorter profile.
func TestXenDaemonFailover(t *testing.T) {
	if xentest.InDom0() || testing.Short() {
		t.Skip("host-side driver that boots Xen")
	}
	files := dom0Files(t, t.TempDir())
	run := "^TestDom0Daemon(Failover|Witness)$"
	if os.Getenv("XEN_E2E_FULL") != "" {
		run = "^TestDom0Daemon(Failover|Witness)"
	}
	xentest.RunInDom0(t, ".", run, []string{"xen"}, xentest.Config{
		Files:   files,
		Timeout: 900 * time.Second,
		Env:     map[string]string{"XEN_E2E_FULL": os.Getenv("XEN_E2E_FULL"), "XEN_GUEST_CPUS": os.Getenv("XEN_GUEST_CPUS")},
		Accel:   os.Getenv("XEN_ACCEL"),
		XenArgs: os.Getenv("XEN_XENARGS"),
		CPUs:    atoi(os.Getenv("XEN_CPUS")),
		NoRetry: os.Getenv("XEN_NORETRY") != "",
	})
}

// dom0Files returns what the in-dom0 tests need besides their own binary:
// remusd built with the xen tag (at remusdBin, with the libraries dom0
// lacks) and the network guest's kernel and initramfs (NetDomUFiles),
// built in tmp. Missing facilities skip t, saying what to run.
func dom0Files(t *testing.T, tmp string) []vmtest.File {
	t.Helper()
	ctx := context.Background()
	kf, rf, err := xentest.NetDomUFiles(ctx, "", tmp)
	if errors.Is(err, vmtest.ErrUnavailable) {
		t.Skipf("needs the Debian cloud kernel for the domU: %v (run xentest/setup.sh)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	x, err := xentest.FindXen(ctx, "")
	if errors.Is(err, xentest.ErrUnavailable) {
		t.Skipf("needs Debian's Xen packages: %v (run xentest/setup.sh)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(tmp, "remusd")
	if err := buildRemusd(ctx, bin); err != nil {
		t.Fatal(err)
	}
	files, err := xentest.ELFFiles(x, bin, remusdBin, tmp)
	if err != nil {
		t.Fatal(err)
	}
	return append(files, kf, rf)
}

// buildRemusd builds cmd/remusd with the xen tag (cgo) into out.
func buildRemusd(ctx context.Context, out string) error {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return errors.New("cannot locate the module")
	}
	root := filepath.Join(filepath.Dir(self), "..", "..")
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", "xen", "-o", out, "./cmd/remusd")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -tags xen ./cmd/remusd: %v: %s", err, b)
	}
	return nil
}

// TestDom0DaemonFailover, in dom0: a PVH domain "web" with a vif on the
// dom0 bridge serves a counting TCP echo; daemon hosta finds it by name
// (xen_vms), daemon hostb backs it up into a standby domain "web-sb" it
// creates from its own xl configuration (the same file here: one Xen
// plays both hosts). A client keeps one TCP connection to the guest
// throughout, every reply checked against the count.
//
//  1. `remusd protect web --peer` protects it (cooperative checkpoints,
//     plug on its vif) until six epochs are acknowledged.
//  2. hosta's daemon is killed (SIGKILL, possibly inside a checkpoint;
//     with XEN_E2E_FULL=1 first also stopped with SIGTERM) and started
//     again: the domain runs on, the next daemon re-attaches to it and
//     resumes the protection, and the connection carries on.
//  3. The primary host dies: hosta's daemon is killed and the domain
//     destroyed; `remusd failover web` on hostb activates the standby.
//     The connection must carry on (its output was held until
//     acknowledged, so the standby's state includes all the client saw),
//     and a new connection must work.
//  4. hosta's daemon comes back (web is gone there: it is not looked for
//     again) and hostb protects the activated domain back to it: hosta
//     creates its standby (named web) and acknowledges epochs, while the
//     connection carries on.
func TestDom0DaemonFailover(t *testing.T) {
	daemonFailover(t, daemon.OutputPlug, true)
}

// TestDom0DaemonFailoverNFQueue is steps 1 and 3 with the NFQUEUE output
// buffer on the vif (the fallback where dom0's kernel lacks sch_plug): a
// bridge port, matched with physdev, so bridged traffic must traverse
// iptables (net.bridge.bridge-nf-call-iptables=1, as the operator's guide
// says).
func TestDom0DaemonFailoverNFQueue(t *testing.T) {
	for _, f := range []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables"} {
		if err := os.WriteFile("/proc/sys/net/bridge/"+f, []byte("1"), 0o644); err != nil {
			t.Fatalf("%s (br_netfilter loaded?): %v", f, err)
		}
	}
	mods, _ := os.ReadFile("/proc/modules")
	for _, m := range []string{"xt_physdev", "nft_compat", "xt_NFQUEUE", "nfnetlink_queue", "br_netfilter"} {
		if !strings.Contains(string(mods), m+" ") {
			t.Fatalf("module %s is not loaded in dom0; /proc/modules:\n%s", m, mods)
		}
	}
	daemonFailover(t, daemon.OutputNFQueue, false)
}

// daemonFailover runs the steps of TestDom0DaemonFailover with the output
// buffer outbuf, the restarts and the protection back only if all.
func daemonFailover(t *testing.T, outbuf string, all bool) {
	if !xentest.InDom0() {
		t.Skip("runs in a xentest dom0 (TestXenDaemonFailover boots one)")
	}
	ctx := context.Background()
	dir := t.TempDir()
	script, xlCfg, echo, addr := startWeb(ctx, t, dir)
	var err error

	const replA, replB = "127.0.0.1:17802", "127.0.0.1:17801"
	acfg, bcfg := dom0Pair(dir, replA, replB, xlCfg, daemon.XenVM{Name: "web", XLConfig: xlCfg}, outbuf)
	if all {
		// The watchdog guards hosta's daemon (no witness here: it guards
		// the daemon's liveness, watchdog.timeout 3 s).
		on := true
		acfg.Watchdog = daemon.WatchdogConfig{Enabled: &on, Timeout: daemon.Duration(3 * time.Second)}
		t.Cleanup(func() { killWatchdog(acfg.StateDir) })
	}
	b, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: time.Minute}, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.StopKeepGuests()
	var a *demo.DaemonProc
	startA := func() {
		t.Helper()
		if a, err = demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: 2 * time.Minute}, acfg); err != nil {
			t.Fatal(err)
		}
	}
	startA()
	defer func() { a.StopKeepGuests() }()
	defer func() {
		if t.Failed() {
			t.Logf("hosta's log:\n%s", demo.LogTail(a.LogPath, 40))
			t.Logf("hostb's log:\n%s", demo.LogTail(b.LogPath, 40))
		}
	}()
	ac := daemon.ControlClient{Path: acfg.Control, Timeout: 10 * time.Second}
	bc := daemon.ControlClient{Path: bcfg.Control, Timeout: 10 * time.Second}
	if s, err := ac.VMStatus(ctx, "web"); err != nil || s.Role != daemon.RoleLocal || s.Backend != "xen" {
		t.Fatalf("hosta's status of web: %+v, %v (want a local xen VM)", s, err)
	}
	if s, err := bc.VMStatus(ctx, "web"); err != nil || s.Role != daemon.RoleStopped {
		t.Fatalf("hostb's status of web: %+v, %v (want stopped: its domain web-sb does not exist yet)", s, err)
	}

	t0 := time.Now()
	cli(t, "protect", "web", "--peer", replB, "--control", acfg.Control)
	var ps daemon.VMStatus
	acked := func(c daemon.ControlClient, n uint64, within time.Duration) {
		t.Helper()
		waitFor(t, within, fmt.Sprintf("epoch %d acknowledged", n), func() (bool, string) {
			ps, err = c.VMStatus(ctx, "web")
			return err == nil && ps.Role == daemon.RolePrimary && ps.AckedEpoch >= n, fmt.Sprintf("%+v %v", ps, err)
		})
	}
	// Few epochs: every cooperative suspend risks the TCG triple fault
	// (README), which costs a whole retry.
	acked(ac, 6, 4*time.Minute)
	if ps.OutBuf != outbuf {
		t.Fatalf("output buffer %q, want %s on the vif", ps.OutBuf, outbuf)
	}
	bs, err := bc.VMStatus(ctx, "web")
	if err != nil || bs.Role != daemon.RoleBackup {
		t.Fatalf("hostb's status of web: %+v, %v (want backup)", bs, err)
	}
	if want := strings.TrimSpace(xlOut("domid", "web")); fmt.Sprint(ps.XenDomID) != want || ps.XenVif != "vif"+want+".0" {
		t.Fatalf("hosta says domain %d on %q; xl domid web says %s", ps.XenDomID, ps.XenVif, want)
	}
	if want := strings.TrimSpace(xlOut("domid", "web-sb")); fmt.Sprint(bs.XenDomID) != want {
		t.Fatalf("hostb says standby domain %d; xl domid web-sb says %s", bs.XenDomID, want)
	}
	t.Logf("dom0: %s: protected in %s: epoch %d acked, pause p50 %.1f ms p99 %.1f ms, ack p50 %.1f ms, %d pages sent; backup committed %d",
		outbuf, time.Since(t0).Round(time.Millisecond), ps.AckedEpoch, ps.PauseMsP50, ps.PauseMsP99, ps.AckMsP50, ps.PagesSent, bs.Epoch)
	if err := echo.WaitCarriesOn(3, 2*time.Minute); err != nil {
		t.Fatalf("under protection: %v", err)
	}

	// Restarts of the primary's daemon: the domain runs on, the next
	// daemon resumes the protection.
	var restarts []bool // SIGKILL?
	switch {
	case all && os.Getenv("XEN_E2E_FULL") != "":
		restarts = []bool{false, true}
	case all:
		restarts = []bool{true}
	}
	for _, kill := range restarts {
		last := ps.AckedEpoch
		stops := watchdogStops(acfg.StateDir)
		t1 := time.Now()
		if kill {
			if err := a.Cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			<-a.Done()
		} else {
			a.StopKeepGuests()
		}
		if kill {
			// The watchdog pauses the domain of a daemon that died.
			waitFor(t, 10*time.Second, "the watchdog pauses web after its daemon's SIGKILL", func() (bool, string) {
				return watchdogStops(acfg.StateDir) > stops && domPaused(t, "web"), xlOut("list", "web")
			})
			t.Logf("dom0: the watchdog paused web %s after its daemon's SIGKILL", time.Since(t1).Round(time.Millisecond))
		}
		startA()
		acked(ac, last+2, 3*time.Minute)
		if !strings.Contains(xlOut("list", "web"), "web") {
			t.Fatal("the domain is gone after a daemon restart")
		}
		if kill && !logHas(a.LogPath, "the watchdog had paused a Xen primary; this host still holds the VM") {
			t.Fatalf("the restarted daemon did not lift the watchdog's pause; its log:\n%s", demo.LogTail(a.LogPath, 40))
		}
		if err := echo.WaitCarriesOn(3, 2*time.Minute); err != nil {
			t.Fatalf("after a daemon restart (kill %v): %v", kill, err)
		}
		t.Logf("dom0: daemon restart (SIGKILL %v): protection resumed, epoch %d acked %s after the stop (last acked before: %d)",
			kill, ps.AckedEpoch, time.Since(t1).Round(time.Millisecond), last)
	}

	if all {
		// hosta's daemon hangs: the watchdog pauses web within its
		// timeout; the daemon wakes, finds it so, holds the VM (no
		// witness: its word stands) and has the pause lifted; the
		// protection and the client carry on.
		last := ps.AckedEpoch
		stops := watchdogStops(acfg.StateDir)
		if err := a.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		hung := time.Now()
		waitFor(t, 15*time.Second, "the watchdog pauses web while its daemon hangs", func() (bool, string) {
			return watchdogStops(acfg.StateDir) > stops && domPaused(t, "web"), xlOut("list", "web")
		})
		paused := time.Since(hung)
		// The watchdog itself dies now, holding the pause: its record
		// lets the next one (the woken daemon starts it) know the pause.
		rec, err := os.ReadFile(filepath.Join(acfg.StateDir, "watchdog-xen.json"))
		if err != nil || !strings.Contains(string(rec), `"vm":"web"`) {
			t.Fatalf("the watchdog's record of its pause: %q, %v", rec, err)
		}
		wpid := watchdogPid(acfg.StateDir)
		killWatchdog(acfg.StateDir)
		waitFor(t, 10*time.Second, "the watchdog exits", func() (bool, string) {
			_, err := os.Stat(fmt.Sprintf("/proc/%d", wpid))
			return wpid > 0 && os.IsNotExist(err), fmt.Sprint(wpid)
		})
		if err := a.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		woke := time.Now()
		waitFor(t, 30*time.Second, "web unpaused after its daemon woke", func() (bool, string) {
			return !domPaused(t, "web"), xlOut("list", "web")
		})
		running := time.Since(woke)
		acked(ac, last+2, 3*time.Minute)
		if err := echo.WaitCarriesOn(3, 2*time.Minute); err != nil {
			t.Fatalf("after the daemon's hang: %v", err)
		}
		if !logHas(a.LogPath, "this host still holds the VM: it runs on") {
			t.Fatalf("the woken daemon did not continue web through the watchdog; its log:\n%s", demo.LogTail(a.LogPath, 40))
		}
		if !logHas(filepath.Join(acfg.StateDir, "watchdog.log"), "restored a Xen domain a previous watchdog held paused") || watchdogPid(acfg.StateDir) == wpid {
			t.Fatalf("no new watchdog restored the pause; its log:\n%s", demo.LogTail(filepath.Join(acfg.StateDir, "watchdog.log"), 20))
		}
		t.Logf("dom0: hosta's daemon hung (SIGSTOP): the watchdog paused web %s later (then was killed; a new one restored its pause from the record); woken, the daemon had web running again %s later; epoch %d acked %s after the hang",
			paused.Round(time.Millisecond), running.Round(time.Millisecond), ps.AckedEpoch, time.Since(hung).Round(time.Millisecond))
	}

	if all {
		// A second vif hot-plugged into the protected domain would send
		// unheld output: hosta fences the copy at once (paused, held
		// output dropped); the backup's committed epoch is what the
		// failover below resumes.
		t3 := time.Now()
		xl(t, "network-attach", "web", "bridge="+xentest.NetBridge, "script="+script, "mac=00:16:3e:52:4d:99")
		attached := time.Since(t3)
		waitFor(t, 10*time.Second, "hosta fences web after a vif was hot-plugged", func() (bool, string) {
			s, err := ac.VMStatus(ctx, "web")
			return err == nil && s.WitnessView == "fenced" && strings.Contains(s.WitnessError, "not held"), fmt.Sprintf("%+v %v", s, err)
		})
		fenced := time.Since(t3)
		if !domPaused(t, "web") {
			t.Fatalf("web runs after the fence:\n%s", xlOut("list", "web"))
		}
		t.Logf("dom0: vif hot-plugged into web (xl network-attach %s): hosta fenced it %s after the attach began (paused, output dropped)",
			attached.Round(time.Millisecond), fenced.Round(time.Millisecond))
	}

	// The primary host dies: its daemon and its domain.
	bs = killAndFailover(ctx, t, a, func() { xl(t, "destroy", "web") }, bc, bcfg.Control, echo, addr)
	if !strings.Contains(xlOut("list"), "web-sb") {
		t.Fatal("xl list does not show web-sb")
	}

	if !all {
		return
	}
	// hosta comes back: web is gone there. hostb protects it back to
	// hosta, which creates its standby under the name web.
	startA()
	if s, err := ac.VMStatus(ctx, "web"); err != nil || s.Role != daemon.RoleStopped {
		t.Fatalf("hosta's status of web after it came back: %+v, %v (want stopped: it may run elsewhere)", s, err)
	}
	t2 := time.Now()
	cli(t, "protect", "web", "--peer", replA, "--control", bcfg.Control)
	acked(bc, 2, 4*time.Minute)
	if s, err := ac.VMStatus(ctx, "web"); err != nil || s.Role != daemon.RoleBackup {
		t.Fatalf("hosta's status of web: %+v, %v (want backup)", s, err)
	}
	if err := echo.WaitCarriesOn(3, 2*time.Minute); err != nil {
		t.Fatalf("after protecting it back: %v", err)
	}
	t.Logf("dom0: protected back from hostb to hosta: epoch %d acked %s after protect, pause p50 %.1f ms",
		ps.AckedEpoch, time.Since(t2).Round(time.Millisecond), ps.PauseMsP50)
}

// watchdogStops counts the stops in the watchdog's log in stateDir.
func watchdogStops(stateDir string) int {
	b, _ := os.ReadFile(filepath.Join(stateDir, "watchdog.log"))
	return strings.Count(string(b), "stopped the guest")
}

// domPaused reports whether xl lists domain name as paused (a domain xl
// does not list fails t).
func domPaused(t *testing.T, name string) bool {
	t.Helper()
	out := xlOut("list", name)
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 5 && f[0] == name {
			return strings.Contains(f[4], "p")
		}
	}
	t.Fatalf("xl list %s: no line for it:\n%s", name, out)
	return false
}

// logHas reports whether the daemon log at path contains s.
func logHas(path, s string) bool {
	b, _ := os.ReadFile(path)
	return strings.Contains(string(b), s)
}

// watchdogPid is the pid the watchdog of stateDir wrote (0: none).
func watchdogPid(stateDir string) int {
	b, _ := os.ReadFile(filepath.Join(stateDir, "watchdog.pid"))
	return atoi(strings.TrimSpace(string(b)))
}

// killWatchdog kills the watchdog of stateDir, by the pid it wrote.
func killWatchdog(stateDir string) {
	if pid := watchdogPid(stateDir); pid > 1 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func xlOut(args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, filepath.Join(xentest.BinDir, "xl"), args...).CombinedOutput()
	return string(out)
}

func xl(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, filepath.Join(xentest.BinDir, "xl"), args...).CombinedOutput(); err != nil {
		t.Fatalf("xl %v: %v: %s", args, err, out)
	}
}

// cli runs the remusd CLI in dom0 and fails on a non-zero exit.
func cli(t *testing.T, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, remusdBin, args...)
	cmd.Env = append(os.Environ(), "REMUSD_CONTROL=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("remusd %v: %v: %s", args, err, out)
	}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not happen within %v: %s", what, d, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// startWeb is the e2e's guest: the dom0 bridge (its vif script
// returned), the network guest "web" created with xl from dir/web.cfg
// (returned) and booted to its workload, and a client (echo) on one TCP
// connection to its echo service at addr. web and web-sb are destroyed
// at the end of the test, their consoles shown if it failed.
func startWeb(ctx context.Context, t *testing.T, dir string) (script, xlCfg string, echo *xentest.EchoClient, addr string) {
	t.Helper()
	script, err := xentest.SetupNet(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	xlCfg = filepath.Join(dir, "web.cfg")
	guestXL := xentest.NetGuestXL("web", domUKern, domUNetRD, script)
	if c := os.Getenv("XEN_GUEST_CPUS"); c != "" {
		guestXL += fmt.Sprintf("cpus = %q\n", c)
	}
	if err := os.WriteFile(xlCfg, []byte(guestXL), 0o644); err != nil {
		t.Fatal(err)
	}
	xl(t, "create", xlCfg)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("xl list:\n%s", xlOut("list"))
			for _, d := range []string{"web", "web-sb"} {
				t.Logf("%s's console (without the dirtier's rounds):\n%s", d, xentest.ConsoleTail(d, 80))
			}
		}
		xlOut("destroy", "web")
		xlOut("destroy", "web-sb")
	})
	// Booted to its workload before anything attaches: log-dirty enabled
	// during a domU's boot makes the TCG triple fault (README) likelier.
	if err := xentest.WaitConsole(ctx, "web", "dirtier: 8192 pages", 150*time.Second); err != nil {
		t.Fatal(err)
	}
	if d, ok := xentest.WaitPing(xentest.NetGuestIP, 150*time.Second); !ok {
		t.Fatalf("the guest does not answer ping within %v", d)
	}
	addr = xentest.NetGuestIP + ":7"
	if echo, err = xentest.StartEcho(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(echo.Stop)
	return script, xlCfg, echo, addr
}

// dom0Pair returns the configurations of two daemons sharing one dom0 over
// loopback, in plaintext: hosta, the primary of "web" (its xen_vms entry
// aVM), and hostb, its backup, whose standby "web-sb" is created from
// xlCfg; output buffer outbuf, 200 ms epochs (a cooperative checkpoint
// takes ~100 ms under TCG, README).
func dom0Pair(dir, replA, replB, xlCfg string, aVM daemon.XenVM, outbuf string) (acfg, bcfg daemon.Config) {
	bcfg = daemon.DefaultConfig()
	bcfg.Name, bcfg.Control, bcfg.StateDir = "hostb", filepath.Join(dir, "b.sock"), filepath.Join(dir, "b-state")
	bcfg.Insecure, bcfg.Listen = true, replB
	bcfg.Peers = []daemon.Peer{{Name: "hosta", Address: replA, VMs: []string{"web"}}}
	bcfg.XenVMs = []daemon.XenVM{{Name: "web", Domain: "web-sb", XLConfig: xlCfg}}
	acfg = daemon.DefaultConfig()
	acfg.Name, acfg.Control, acfg.StateDir = "hosta", filepath.Join(dir, "a.sock"), filepath.Join(dir, "a-state")
	acfg.Insecure, acfg.Listen = true, replA
	acfg.Peers = []daemon.Peer{{Name: "hostb", Address: replB, VMs: []string{"web"}}}
	acfg.XenVMs = []daemon.XenVM{aVM}
	for _, c := range []*daemon.Config{&acfg, &bcfg} {
		c.OutputBuffer = outbuf
		c.EpochInterval = daemon.Duration(200 * time.Millisecond)
	}
	return acfg, bcfg
}

// killAndFailover is the primary host's death and the takeover: hosta's
// daemon a is killed (SIGKILL) and its domain destroyed (destroy), then
// `remusd failover web` runs on hostb (bc, at bControl); the client's
// connection (echo) must carry on and a new one to addr must work. It
// returns hostb's status of web after the failover.
func killAndFailover(ctx context.Context, t *testing.T, a *demo.DaemonProc, destroy func(), bc daemon.ControlClient, bControl string, echo *xentest.EchoClient, addr string) daemon.VMStatus {
	t.Helper()
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-a.Done()
	destroy()
	killed := time.Now()
	before, _, _ := echo.State()
	cli(t, "failover", "web", "--control", bControl)
	bs, err := bc.VMStatus(ctx, "web")
	if err != nil || bs.Role != daemon.RoleActive {
		t.Fatalf("hostb's status of web after failover: %+v, %v (want active)", bs, err)
	}
	t.Logf("dom0: failover: epoch %d committed, activation %.1f ms, active %s after the kill",
		bs.Epoch, bs.ActivationMs, time.Since(killed).Round(time.Millisecond))
	if err := echo.WaitCarriesOn(5, 2*time.Minute); err != nil {
		t.Fatalf("the connection opened before the failover: %v", err)
	}
	n, _, _ := echo.State()
	t.Logf("dom0: the connection opened before the failover carries on: %d exchanges, %d after the kill; first %s after the kill",
		n, n-before, echo.FirstAfter(killed))
	if err := xentest.EchoOnce(addr); err != nil {
		t.Fatalf("a new connection to the activated guest: %v", err)
	}
	return bs
}
