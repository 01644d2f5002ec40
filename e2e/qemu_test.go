package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/netlab"
	"github.com/remusd/remusd/vmtest"
)

// The test topology is netlab.Remus: client, primary host A, backup host
// B and a switch, each in its own network namespace.
const (
	guestIP   = netlab.GuestIP
	guestMAC  = netlab.GuestMAC
	hostAIP   = netlab.HostAIP
	hostBIP   = netlab.HostBIP
	replPort  = "7800"
	guestPort = "7000"
)

func newQNet(t *testing.T) *netlab.Remus {
	t.Helper()
	n, err := netlab.NewRemus(context.Background(), "rq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("netlab cleanup: %v", err)
		}
	})
	return n
}

// childPids lists the direct children of pid.
func childPids(pid int) []int {
	var out []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(b)) {
			if p, err := strconv.Atoi(s); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

// client is guestsvc.Client with the e2e tests' view of its state.
type client struct{ *guestsvc.Client }

func newClient(conn net.Conn, o guestsvc.ClientOptions) *client {
	return &client{guestsvc.NewClient(conn, o)}
}

func (c *client) run(ctx context.Context) { c.Run(ctx) }

func (c *client) state() (ok int, last time.Time, err error) {
	ok, last, _, err = c.State()
	return ok, last, err
}

// gap is the longest time between two replies and the replies before it.
func (c *client) gap() (time.Duration, int) { return c.MaxGap(0, time.Time{}) }

// TestQEMUTCPSessionSurvivesFailover is the proof: a Linux guest under
// QEMU serves one TCP connection; the primary's QEMU and remusd are
// SIGKILLed mid-stream; `remusd failover` on the backup; the same
// connection carries on with every reply consistent (nothing lost or
// replayed).
func TestQEMUTCPSessionSurvivesFailover(t *testing.T) {
	needQEMULab(t)
	// The kill lands at different points of the request stream and of
	// the epoch cycle.
	for _, killAfter := range []int{25, 100, 173} {
		t.Run(fmt.Sprintf("kill-after-%d", killAfter), func(t *testing.T) { qemuFailoverRun(t, killAfter) })
	}
}

// needQEMULab skips (saying why) where the QEMU lab cannot run: -short,
// not root, no QEMU, no ip/iptables, no guest image inputs.
func needQEMULab(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU guests")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, NFQUEUE)")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := guestimage.Build(ctx, guestimage.Config{}); errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
}

// qemuLab is a protected QEMU guest in the netlab topology with a client
// on one TCP connection to its service.
type qemuLab struct {
	n               *netlab.Remus
	dir, shm        string
	acfg, bcfg      daemon.Config
	primary, backup *daemonProc
	cl              *client
	stopClient      func() // stops the client and waits for it
	drainClient     func() // lets the client's request in flight finish, then stops it
	aImage, bImage  string // disk images of hosts A and B (with a disk)
}

// labOptions vary the QEMU lab.
type labOptions struct {
	// diskMiB > 0 gives the guest a protected ext4 disk of that size
	// (host A's image made with mkfs.ext4; host B's replica image created
	// by its daemon) and makes the client LOG records to it.
	diskMiB int64
}

// newQemuLab boots the guest on host A, protects it to host B at 50 ms
// epochs with mutual TLS, and starts the client.
func newQemuLab(t *testing.T, ctx context.Context) *qemuLab {
	return newQemuLabWith(t, ctx, labOptions{})
}

func newQemuLabWith(t *testing.T, ctx context.Context, o labOptions) *qemuLab {
	t.Helper()
	l := &qemuLab{n: newQNet(t), dir: shortTempDir(t)} // newQNet enables br_netfilter on the hosts (NFQUEUE output buffering)
	shm, err := os.MkdirTemp("/dev/shm", "rq-")
	if err != nil {
		t.Fatal(err)
	}
	l.shm = shm
	t.Cleanup(func() { os.RemoveAll(shm) })

	l.bcfg = baseConfig(t, l.dir, "hostB")
	l.bcfg.Listen = hostBIP + ":" + replPort
	l.bcfg.Standby = daemon.StandbyConfig{RunDir: filepath.Join(shm, "b")}
	off := false
	// The backup's own description of the VM, on its own tap and bridge:
	// the standby is built from it, never from what the primary sends.
	l.bcfg.QemuVMs = []daemon.QemuVM{{Name: "g", MemoryMiB: 128, UseGuestImage: true, GuestIP: guestIP + "/24",
		Tap: "tapB", MAC: guestMAC, Bridge: "brB", RunDir: filepath.Join(shm, "b-run"), Autostart: &off}}
	l.acfg = baseConfig(t, l.dir, "hostA")
	// Host A listens too, and builds standbys in its own dir: it can back
	// the VM up once it runs on B (re-protection).
	l.acfg.Listen = hostAIP + ":" + replPort
	l.acfg.Standby = daemon.StandbyConfig{RunDir: filepath.Join(shm, "a-standby")}
	l.acfg.EpochInterval = daemon.Duration(50 * time.Millisecond)
	l.acfg.QemuVMs = []daemon.QemuVM{{Name: "g", MemoryMiB: 128, UseGuestImage: true, GuestIP: guestIP + "/24",
		Tap: "tapA", MAC: guestMAC, Bridge: "brA", RunDir: filepath.Join(shm, "a")}}
	if o.diskMiB > 0 {
		l.aImage, l.bImage = filepath.Join(l.dir, "a-disk0.img"), filepath.Join(l.dir, "b-disk0.img")
		if err := guestimage.MakeDisk(ctx, l.aImage, o.diskMiB); err != nil {
			t.Fatal(err)
		}
		l.acfg.QemuVMs[0].Disks = []daemon.QemuDisk{{ID: "disk0", Path: l.aImage, SizeMiB: o.diskMiB}}
		l.bcfg.QemuVMs[0].Disks = []daemon.QemuDisk{{ID: "disk0", Path: l.bImage, SizeMiB: o.diskMiB}}
	}
	trust(&l.bcfg, &l.acfg)
	l.backup = startDaemonIn(t, l.dir, "hostB", l.n.B, l.bcfg)
	l.primary = startDaemonIn(t, l.dir, "hostA", l.n.A, l.acfg)

	serial := filepath.Join(shm, "a", "g.serial")
	line, err := guestimage.WaitReady(ctx, serial)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: %s", line)

	if r := runCLI(t, "protect", "g", "--peer", l.bcfg.Listen, "--control", l.acfg.Control); r.code != 0 {
		t.Fatalf("protect: %s", r)
	}
	waitFor(t, 2*time.Minute, "epochs acknowledged", func() (bool, string) {
		s, ok := vmStatus(t, l.acfg.Control, "g")
		return ok && s.AckedEpoch >= 10, fmt.Sprintf("%+v", s)
	})
	if s, _ := vmStatus(t, l.acfg.Control, "g"); s.OutBuf != "nfqueue" && s.OutBuf != "plug" {
		t.Fatalf("primary output buffer %q, want nfqueue or plug", s.OutBuf)
	}

	conn, err := netlab.Dial(ctx, l.n.Client, guestIP+":"+guestPort)
	if err != nil {
		t.Fatal(err)
	}
	l.cl = newClient(conn, guestsvc.ClientOptions{Log: o.diskMiB > 0})
	cctx, ccancel := context.WithCancel(ctx)
	cdone := make(chan struct{})
	go func() { defer close(cdone); l.cl.run(cctx) }()
	var once sync.Once
	l.stopClient = func() { once.Do(func() { ccancel(); conn.Close(); <-cdone }) }
	l.drainClient = func() {
		l.cl.Finish()
		select {
		case <-cdone:
		case <-time.After(2 * time.Minute):
		}
		l.stopClient()
	}
	t.Cleanup(l.stopClient)
	return l
}

// waitReplies waits until the client has n replies, failing on a client
// error.
func (l *qemuLab) waitReplies(t *testing.T, n int, what string) {
	t.Helper()
	waitFor(t, 2*time.Minute, what, func() (bool, string) {
		ok, _, err := l.cl.state()
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		return ok >= n, fmt.Sprintf("%d replies", ok)
	})
}

// killPrimary SIGKILLs the primary's QEMU and remusd (its host dies).
func (l *qemuLab) killPrimary(t *testing.T) {
	t.Helper()
	kids := childPids(l.primary.cmd.Process.Pid)
	if len(kids) == 0 {
		t.Fatal("primary remusd has no QEMU child")
	}
	for _, p := range kids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	l.primary.kill(t)
	t.Logf("killed primary QEMU %v and remusd", kids)
}

func qemuFailoverRun(t *testing.T, killAfter int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newQemuLab(t, ctx)
	acfg, bcfg, backup, cl := l.acfg, l.bcfg, l.backup, l.cl

	// Let the client run through a number of protected requests.
	waitFor(t, 2*time.Minute, "client requests under protection", func() (bool, string) {
		ok, _, err := cl.state()
		if err != nil {
			t.Fatal(err)
		}
		return ok >= killAfter, fmt.Sprintf("%d replies", ok)
	})
	ps, _ := vmStatus(t, acfg.Control, "g")
	t.Logf("primary before the kill: acked epoch %d, pause last %.1f ms p50 %.1f ms p99 %.1f ms, ack p50 %.1f ms, dirty pages last %d, outbuf %s held %d released %d dropped %d",
		ps.AckedEpoch, ps.PauseMsLast, ps.PauseMsP50, ps.PauseMsP99, ps.AckMsP50, ps.DirtyPagesLast, ps.OutBuf, ps.OutputHeld, ps.OutputReleased, ps.OutputDropped)

	// The primary host dies: its QEMU and its remusd, SIGKILL.
	before, _, _ := cl.state()
	killAt := time.Now()
	l.killPrimary(t)
	t.Logf("killed after %d replies", before)

	fstart := time.Now()
	if r := runCLI(t, "failover", "g", "--control", bcfg.Control); r.code != 0 {
		t.Fatalf("failover: %s", r)
	}
	t.Logf("remusd failover returned after %v", time.Since(fstart))
	waitFor(t, 2*time.Minute, "the client's next reply on the same connection", func() (bool, string) {
		ok, last, err := cl.state()
		if err != nil {
			t.Fatalf("client after failover: %v", err)
		}
		return ok > before && last.After(killAt), fmt.Sprintf("%d replies", ok)
	})
	_, last, _ := cl.state()
	t.Logf("first reply after the kill: %v after SIGKILL (failover command issued %v after)", last.Sub(killAt), fstart.Sub(killAt))
	waitFor(t, 2*time.Minute, "the client carries on", func() (bool, string) {
		ok, _, err := cl.state()
		if err != nil {
			t.Fatalf("client after failover: %v", err)
		}
		return ok >= before+100, fmt.Sprintf("%d replies", ok)
	})
	if s, ok := vmStatus(t, bcfg.Control, "g"); !ok || s.Role != daemon.RoleActive {
		t.Fatalf("backup status after failover: %+v", s)
	}
	l.stopClient()
	ok, _, cerr := cl.state()
	if cerr != nil && !errors.Is(cerr, context.Canceled) && !strings.Contains(cerr.Error(), "closed") {
		t.Fatalf("client: %v", cerr)
	}
	gap, after := cl.gap()
	t.Logf("client: %d replies, all consistent with the model, on one TCP connection; longest gap %v after reply %d", ok, gap, after)
	if b := backup.logTail(400); !strings.Contains(b, "qemu replica activated") {
		t.Errorf("backup log has no activation record")
	}
}
