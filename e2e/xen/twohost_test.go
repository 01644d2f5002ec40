//go:build xen

package xene2e

// The two-Xen-host profile: two QEMU machines, each booting Xen with its
// own dom0 (host A and host B), their dom0s' NICs joined by QEMU's socket
// netdev over loopback UDP and enslaved to each dom0's bridge, so the
// bridges form one layer-2 segment. Host A runs the protected PVH domain
// and its remusd, host B the backup's remusd and the TCP client. The
// host-side driver kills host A's QEMU outright (SIGKILL by PID): the
// primary host dies. Host B sees the replication link lost, runs
// `remusd failover web`, and checks the client's connection carries on
// and a new one works.
//
// Not run by CI (two Xen machines under TCG on two cores take ~10 min):
// scripts/xen-two-hosts runs it (REMUSD_XEN_TWO_HOSTS=1).

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/internal/pki"
	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

const (
	// EnvTwoHosts=1 runs TestXenTwoHosts (scripts/xen-two-hosts).
	envTwoHosts = "REMUSD_XEN_TWO_HOSTS"
	// envTwoHostsNIC names the dom0 NICs' QEMU model (default
	// virtio-net-pci; e1000 also works with the modules loaded).
	envTwoHostsNIC = "REMUSD_XEN_TWO_HOSTS_NIC"
	// envRole is "a" or "b" in each dom0.
	envRole = "REMUSD_XEN_TWO_HOSTS_ROLE"

	// Each dom0's address on the bridge (the replication network and the
	// guest's segment), and its NIC's MAC.
	hostAIP, hostBIP = "10.99.0.11", "10.99.0.12"
	hostAMAC         = "52:54:00:52:4d:0a"
	hostBMAC         = "52:54:00:52:4d:0b"
	replPort         = "7788"
	// Per-host TLS bundles (pki.BundleFiles) under tlsDir/NAME.
	tlsDir = "/vmtest/tls"

	// Markers on host B's console the driver acts on or measures by.
	markReady = "TWOHOST-B: ready"    // protected, client running: kill host A
	markLost  = "TWOHOST-B: lost"     // B's daemon reports the link lost
	markReply = "TWOHOST-B: replied"  // first reply on the old connection
	markDone  = "TWOHOST-B: finished" // figures follow in dom0: lines
)

// TestXenTwoHosts is the host-side driver of the two-host profile.
func TestXenTwoHosts(t *testing.T) {
	if xentest.InDom0() {
		t.Skip("host-side driver; in dom0 TestTwoHostsDom0 runs")
	}
	if os.Getenv(envTwoHosts) != "1" {
		t.Skipf("the two-Xen-host profile boots two Xen machines under QEMU (~10 min): run scripts/xen-two-hosts (sets %s=1)", envTwoHosts)
	}
	ctx := context.Background()
	tmp := t.TempDir()
	files := dom0Files(t, tmp)
	x, err := xentest.FindXen(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	testBin := filepath.Join(tmp, "test.bin")
	if err := xentest.BuildGoTest(ctx, ".", testBin, "xen"); err != nil {
		t.Fatal(err)
	}
	tf, err := xentest.ELFFiles(x, testBin, "/vmtest/test.bin", tmp)
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, tf...)
	// Mutual TLS on the replication link: one CA, a bundle per host.
	tls, err := pki.Mesh(filepath.Join(tmp, "tls"), "hosta", "hostb")
	if err != nil {
		t.Fatal(err)
	}
	perHost := func(name string) []vmtest.File {
		f := append([]vmtest.File(nil), files...)
		dst := pki.BundleFiles(filepath.Join(tlsDir, name))
		src := tls[name]
		return append(f,
			vmtest.File{Src: src.CA, Dst: dst.CA, Mode: 0o644},
			vmtest.File{Src: src.Cert, Dst: dst.Cert, Mode: 0o644},
			vmtest.File{Src: src.Key, Dst: dst.Key, Mode: 0o600})
	}
	nic := os.Getenv(envTwoHostsNIC)
	if nic == "" {
		nic = "virtio-net-pci"
	}
	logDir := os.Getenv("REMUSD_XEN_TWO_HOSTS_LOGS")
	if logDir == "" {
		logDir = filepath.Join(os.TempDir(), "remusd-xen-two-hosts")
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for attempt := 1; ; attempt++ {
		r, err := twoHostsOnce(t, perHost("hosta"), perHost("hostb"), nic, logDir, attempt)
		if err == nil {
			t.Logf("attempt %d: PASS: host B's verdict %q in %s", attempt, r.verdict, r.elapsed.Round(time.Second))
			t.Logf("driver's clock: host A killed → B reports the link lost %s, → first reply on the old connection %s",
				r.lost, r.reply)
			return
		}
		if attempt <= xentest.MaxTripleFaultRetries && r.tripleFault {
			t.Logf("RETRYING (attempt %d failed: %s): a domU triple-faulted under TCG (an open problem); consoles in %s", attempt, firstLine(err), logDir)
			continue
		}
		t.Fatalf("attempt %d: %v (consoles in %s)", attempt, err, logDir)
	}
}

// twoHostsResult is one run's outcome, timed by the driver's clock.
type twoHostsResult struct {
	verdict     string
	elapsed     time.Duration
	lost, reply time.Duration // after host A's QEMU was killed
	tripleFault bool
}

// twoHostsOnce boots both machines, kills host A's when host B says it is
// ready, and waits for host B's verdict.
func twoHostsOnce(t *testing.T, filesA, filesB []vmtest.File, nic, logDir string, attempt int) (twoHostsResult, error) {
	var r twoHostsResult
	portA, portB, err := freeUDPPorts()
	if err != nil {
		return r, err
	}
	ca, err := newConsole(filepath.Join(logDir, fmt.Sprintf("hosta-%d.log", attempt)), "hosta", t)
	if err != nil {
		return r, err
	}
	defer ca.close()
	cb, err := newConsole(filepath.Join(logDir, fmt.Sprintf("hostb-%d.log", attempt)), "hostb", t)
	if err != nil {
		return r, err
	}
	defer cb.close()
	const timeout = 30 * time.Minute
	cmd := []string{"/vmtest/test.bin", "-test.v", "-test.count=1", "-test.timeout=" + timeout.String(), "-test.run=^TestTwoHostsDom0$"}
	modules := append(append([]string(nil), xentest.NICModules...), "e1000")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type outcome struct {
		res *vmtest.Result
		err error
	}
	doneA, doneB := make(chan outcome, 1), make(chan outcome, 1)
	procA := make(chan *os.Process, 1)
	start := time.Now()
	go func() {
		res, err := xentest.Run(ctx, xentest.Config{Files: filesB, Command: cmd, Timeout: timeout + time.Minute,
			Env: map[string]string{envRole: "b"}, Console: cb, Modules: modules,
			QEMUArgs: xentest.UDPNIC(nic, hostBMAC, portB, portA)})
		doneB <- outcome{res, err}
	}()
	go func() {
		res, err := xentest.Run(ctx, xentest.Config{Files: filesA, Command: cmd, Timeout: timeout + time.Minute,
			Env: map[string]string{envRole: "a"}, Console: ca, Modules: modules,
			QEMUArgs: xentest.UDPNIC(nic, hostAMAC, portA, portB),
			Started:  func(p *os.Process) { procA <- p }})
		doneA <- outcome{res, err}
	}()
	var pa *os.Process
	select {
	case pa = <-procA:
	case o := <-doneA:
		return r, fmt.Errorf("host A's QEMU did not start: %w", o.err)
	}
	var killed time.Time
	var oa *outcome
	// A domU's triple fault (under TCG, see xentest.TripleFault) ends the
	// attempt at once: the guest is gone, waiting for timeouts is futile.
	aborted := func(which string) (twoHostsResult, error) {
		cancel()
		if oa == nil {
			<-doneA
		}
		<-doneB
		r.tripleFault = true
		return r, fmt.Errorf("a domU on %s triple-faulted", which)
	}
	select {
	case <-ca.fault:
		return aborted("host A")
	case <-cb.fault:
		return aborted("host B")
	case <-cb.ready:
		// The primary host dies: its whole machine, at once.
		if err := pa.Kill(); err != nil {
			return r, fmt.Errorf("kill host A's QEMU (pid %d): %w", pa.Pid, err)
		}
		killed = time.Now()
		t.Logf("attempt %d: host A's QEMU (pid %d) killed %s after the start", attempt, pa.Pid, killed.Sub(start).Round(time.Second))
	case o := <-doneA:
		oa = &o
		cancel() // host B cannot pass without host A
	case o := <-doneB:
		cancel()
		<-doneA
		r.tripleFault = cb.has(xentest.TripleFault) || ca.has(xentest.TripleFault)
		return r, fmt.Errorf("host B ended before it was ready: %s", verdictOf(o.res, o.err))
	}
	if oa == nil {
		o := <-doneA
		oa = &o
	}
	var ob outcome
	select {
	case ob = <-doneB:
	case <-cb.fault:
		return aborted("host B, after host A's death")
	}
	r.tripleFault = cb.has(xentest.TripleFault) || ca.has(xentest.TripleFault)
	if killed.IsZero() {
		return r, fmt.Errorf("host A ended before host B was ready: %s", verdictOf(oa.res, oa.err))
	}
	if ob.err != nil || !ob.res.Passed {
		return r, fmt.Errorf("host B: %s; console tail:\n%s", verdictOf(ob.res, ob.err), xentest.Tail(cb.text(), 60))
	}
	r.verdict, r.elapsed = ob.res.Verdict, time.Since(start)
	if at, ok := cb.at(markLost); ok {
		r.lost = at.Sub(killed).Round(time.Millisecond)
	}
	if at, ok := cb.at(markReply); ok {
		r.reply = at.Sub(killed).Round(time.Millisecond)
	}
	return r, nil
}

func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

func verdictOf(res *vmtest.Result, err error) string {
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("verdict %q after %s", res.Verdict, res.Elapsed.Round(time.Second))
}

// freeUDPPorts returns two loopback UDP ports free a moment ago.
func freeUDPPorts() (int, int, error) {
	var ports [2]int
	for i := range ports {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return 0, 0, fmt.Errorf("find a free UDP port: %w", err)
		}
		defer c.Close()
		ports[i] = c.LocalAddr().(*net.UDPAddr).Port
	}
	return ports[0], ports[1], nil
}

// console is one machine's serial console as the driver sees it: written
// to a file, kept, its markers timed on arrival, and the in-dom0 test's
// own lines logged.
type console struct {
	name    string
	t       *testing.T
	f       *os.File
	mu      sync.Mutex
	buf     strings.Builder
	marks   map[string]time.Time
	ready   chan struct{} // markReady seen
	fault   chan struct{} // xentest.TripleFault seen
	faulted bool
}

func newConsole(path, name string, t *testing.T) (*console, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("console log: %w", err)
	}
	return &console{name: name, t: t, f: f, marks: map[string]time.Time{}, ready: make(chan struct{}), fault: make(chan struct{})}, nil
}

// Write takes one line (vmtest.RunQEMU writes whole lines).
func (c *console) Write(p []byte) (int, error) {
	now := time.Now()
	line := string(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	_, _ = c.f.Write(p)
	c.buf.WriteString(line)
	if !c.faulted && strings.Contains(line, xentest.TripleFault) {
		c.faulted = true
		close(c.fault)
	}
	for _, m := range []string{markReady, markLost, markReply, markDone} {
		if _, seen := c.marks[m]; !seen && strings.Contains(line, m) {
			c.marks[m] = now
			if m == markReady {
				close(c.ready)
			}
		}
	}
	if strings.Contains(line, "_test.go") || strings.Contains(line, "--- ") || strings.Contains(line, "dom0:") || strings.Contains(line, "TWOHOST-") {
		c.t.Logf("%s| %s", c.name, strings.TrimRight(line, "\r\n"))
	}
	return len(p), nil
}

var _ io.Writer = (*console)(nil)

func (c *console) at(mark string) (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.marks[mark]
	return at, ok
}

func (c *console) has(s string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return strings.Contains(c.buf.String(), s)
}

func (c *console) text() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func (c *console) close() { c.f.Close() }

// TestTwoHostsDom0 is one dom0 of the two-host profile, in the role
// $REMUSD_XEN_TWO_HOSTS_ROLE (a: the primary host, b: the backup host).
// Both dom0s put their NIC on the bridge with their own address; the
// domain, the xl file and remusd's configuration are named alike on both.
func TestTwoHostsDom0(t *testing.T) {
	role := os.Getenv(envRole)
	if !xentest.InDom0() || role == "" {
		t.Skip("runs in a dom0 of the two-host profile (TestXenTwoHosts boots them)")
	}
	ctx := context.Background()
	dir := t.TempDir()
	self, peer, selfMAC, name, peerName := hostAIP, hostBIP, hostAMAC, "hosta", "hostb"
	if role == "b" {
		self, peer, selfMAC, name, peerName = hostBIP, hostAIP, hostBMAC, "hostb", "hosta"
	}
	script, err := xentest.SetupNetAddr(ctx, dir, self+"/24")
	if err != nil {
		t.Fatal(err)
	}
	nic, err := xentest.AddUplink(ctx, selfMAC)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dom0: %s: %s on %s with %s", name, nic, xentest.NetBridge, self)
	xlCfg := filepath.Join(dir, "web.cfg")
	if err := os.WriteFile(xlCfg, []byte(xentest.NetGuestXL("web", domUKern, domUNetRD, script)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := daemon.DefaultConfig()
	cfg.Name, cfg.Control, cfg.StateDir = name, filepath.Join(dir, "control.sock"), filepath.Join(dir, "state")
	cfg.Listen = net.JoinHostPort(self, replPort)
	cfg.TLS = pki.BundleFiles(filepath.Join(tlsDir, name))
	cfg.Peers = []daemon.Peer{{Name: peerName, Address: net.JoinHostPort(peer, replPort), VMs: []string{"web"}}}
	cfg.XenVMs = []daemon.XenVM{{Name: "web", XLConfig: xlCfg}}
	// A cooperative checkpoint takes ~100 ms under TCG (README); the
	// takeover stays manual (no witness: etcd would have to be reachable
	// from both hosts).
	cfg.EpochInterval = daemon.Duration(200 * time.Millisecond)
	// Two TCG machines on two cores move the first epoch (all 128 MiB)
	// over their virtual network slowly enough that one frame took over
	// the default second: the backup's read deadline dropped the link,
	// tore the epoch and started over, again and again.
	cfg.HeartbeatTimeout = daemon.Duration(3 * time.Second)
	cfg.OutputBuffer = daemon.OutputPlug
	if role == "b" {
		twoHostsBackup(t, ctx, dir, cfg)
	} else {
		twoHostsPrimary(t, ctx, dir, cfg, peer)
	}
}

// twoHostsPrimary is host A: it creates the domain, waits for host B's
// daemon, protects the domain to it and runs until its machine is killed.
func twoHostsPrimary(t *testing.T, ctx context.Context, dir string, cfg daemon.Config, peer string) {
	xl(t, "create", cfg.XenVMs[0].XLConfig)
	defer func() {
		if t.Failed() {
			t.Logf("xl list:\n%s", xlOut("list"))
			b, _ := os.ReadFile("/var/log/xen/console/guest-web.log")
			t.Logf("web's console:\n%s", xentest.Tail(string(b), 30))
		}
	}()
	if d, ok := xentest.WaitPing(xentest.NetGuestIP, 5*time.Minute); !ok {
		t.Fatalf("the guest does not answer ping within %v", d)
	}
	if d, ok := xentest.WaitPing(peer, 10*time.Minute); !ok {
		t.Fatalf("host B's dom0 (%s) does not answer ping within %v: the virtual network is down", peer, d)
	}
	// Host B starts its daemon first thing: wait until it listens.
	backup := net.JoinHostPort(peer, replPort)
	waitFor(t, 5*time.Minute, "host B's daemon listening at "+backup, func() (bool, string) {
		c, err := net.DialTimeout("tcp", backup, 2*time.Second)
		if err != nil {
			return false, err.Error()
		}
		c.Close()
		return true, ""
	})
	a, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: 2 * time.Minute}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.StopKeepGuests()
	defer func() {
		if t.Failed() {
			t.Logf("hosta's log:\n%s", demo.LogTail(a.LogPath, 40))
		}
	}()
	ac := daemon.ControlClient{Path: cfg.Control, Timeout: 10 * time.Second}
	t0 := time.Now()
	cli(t, "protect", "web", "--peer", backup, "--control", cfg.Control)
	var ps daemon.VMStatus
	waitFor(t, 10*time.Minute, "epoch 10 acknowledged", func() (bool, string) {
		ps, err = ac.VMStatus(ctx, "web")
		return err == nil && ps.Role == daemon.RolePrimary && ps.AckedEpoch >= 10, fmt.Sprintf("%+v %v", ps, err)
	})
	t.Logf("dom0: hosta: protected to %s (%s) in %s: epoch %d acked, pause p50 %.1f ms p99 %.1f ms, ack p50 %.1f ms, %d pages sent, output buffer %s",
		ps.PeerName, backup, time.Since(t0).Round(time.Millisecond), ps.AckedEpoch, ps.PauseMsP50, ps.PauseMsP99, ps.AckMsP50, ps.PagesSent, ps.OutBuf)
	// Until the driver kills this machine.
	for deadline := time.Now().Add(20 * time.Minute); time.Now().Before(deadline); time.Sleep(15 * time.Second) {
		ps, err = ac.VMStatus(ctx, "web")
		if err != nil || ps.Role != daemon.RolePrimary {
			t.Fatalf("hosta's status of web: %+v, %v (want primary)", ps, err)
		}
		t.Logf("dom0: hosta: epoch %d acked, link %s, pause p50 %.1f ms, ack p50 %.1f ms", ps.AckedEpoch, ps.Link, ps.PauseMsP50, ps.AckMsP50)
	}
	t.Fatal("host A was not killed within 20 minutes of protecting")
}

// twoHostsBackup is host B: the backup's daemon, the client, and, once
// the driver killed host A, the failover and its checks.
func twoHostsBackup(t *testing.T, ctx context.Context, dir string, cfg daemon.Config) {
	b, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: remusdBin, Dir: dir, Wait: 2 * time.Minute}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.StopKeepGuests()
	defer func() {
		if t.Failed() {
			t.Logf("hostb's log:\n%s", demo.LogTail(b.LogPath, 40))
			t.Logf("xl list:\n%s", xlOut("list"))
			c, _ := os.ReadFile("/var/log/xen/console/guest-web.log")
			t.Logf("web's console (the standby's):\n%s", xentest.Tail(string(c), 30))
		}
		xlOut("destroy", "web")
	}()
	bc := daemon.ControlClient{Path: cfg.Control, Timeout: 10 * time.Second}
	if s, err := bc.VMStatus(ctx, "web"); err != nil || s.Role != daemon.RoleStopped {
		t.Fatalf("hostb's status of web: %+v, %v (want stopped: its standby does not exist yet)", s, err)
	}
	// The guest runs on host A: reached over the virtual network.
	if d, ok := xentest.WaitPing(xentest.NetGuestIP, 15*time.Minute); !ok {
		t.Fatalf("the guest (on host A) does not answer ping within %v", d)
	}
	addr := xentest.NetGuestIP + ":7"
	// The guest answers ping as soon as it has its address, a moment
	// before its echo service listens.
	var echo *xentest.EchoClient
	waitFor(t, 2*time.Minute, "the guest's echo service", func() (bool, string) {
		echo, err = xentest.StartEcho(addr)
		return err == nil, fmt.Sprint(err)
	})
	defer echo.Stop()
	var bs daemon.VMStatus
	waitFor(t, 15*time.Minute, "epoch 10 committed on host B", func() (bool, string) {
		bs, err = bc.VMStatus(ctx, "web")
		return err == nil && bs.Role == daemon.RoleBackup && bs.Epoch >= 10, fmt.Sprintf("%+v %v", bs, err)
	})
	if err := echo.WaitCarriesOn(3, 3*time.Minute); err != nil {
		t.Fatalf("under protection: %v", err)
	}
	n0, _, _ := echo.State()
	t.Logf("dom0: hostb: backup of web from %s (TLS: insecure=%v): epoch %d committed, %d pages received; the client made %d exchanges over the virtual network",
		bs.PeerName, bs.Insecure, bs.Epoch, bs.PagesReceived, n0)
	fmt.Println(markReady)

	// The driver kills host A's machine now. Host B notices the silence.
	waitFor(t, 3*time.Minute, "the replication link lost", func() (bool, string) {
		bs, err = bc.VMStatus(ctx, "web")
		return err == nil && (bs.Link == daemon.LinkLost || bs.Link == daemon.LinkClosed), fmt.Sprintf("%+v %v", bs, err)
	})
	lost := time.Now()
	before, lastBefore, _ := echo.State()
	fmt.Printf("%s: link %s, heartbeat age %.0f ms, epoch %d committed\n", markLost, bs.Link, bs.HeartbeatAgeMs, bs.Epoch)
	replied := make(chan struct{})
	go func() {
		defer close(replied)
		for deadline := time.Now().Add(5 * time.Minute); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if n, _, err := echo.State(); n > before {
				fmt.Println(markReply)
				return
			} else if err != nil {
				return
			}
		}
	}()
	cli(t, "failover", "web", "--control", cfg.Control)
	bs, err = bc.VMStatus(ctx, "web")
	if err != nil || bs.Role != daemon.RoleActive {
		t.Fatalf("hostb's status of web after failover: %+v, %v (want active)", bs, err)
	}
	active := time.Since(lost)
	// The guest's own reachability, apart from the client's TCP
	// retransmission backoff (which grew while host B waited out the
	// heartbeat timeout).
	pingAfter, pinged := xentest.WaitPing(xentest.NetGuestIP, time.Minute)
	if err := echo.WaitCarriesOn(5, 3*time.Minute); err != nil {
		t.Fatalf("the connection opened before the failover: %v", err)
	}
	<-replied
	n, _, _ := echo.State()
	if err := xentest.EchoOnce(addr); err != nil {
		t.Fatalf("a new connection to the activated guest: %v", err)
	}
	fmt.Println(markDone)
	t.Logf("dom0: hostb: failover: epoch %d committed, activation %.1f ms, active %s after the loss was reported; the guest answered ping %s later (%v)",
		bs.Epoch, bs.ActivationMs, active.Round(time.Millisecond), pingAfter.Round(time.Millisecond), pinged)
	t.Logf("dom0: hostb: the connection opened on host A carries on: %d exchanges, %d after the loss; client's outage (last reply from host A → first from host B) %s; first reply %s after the loss was reported; a new connection works",
		n, n-before, echo.FirstAfter(lastBefore), echo.FirstAfter(lost))
}
