package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/dirtymap"
)

// requireQEMU skips the test when QEMU is not installed.
func requireQEMU(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skipf("%s not installed: %v", DefaultBinary, err)
	}
}

// testDir is a private directory on tmpfs when there is one (RAM files
// belong there), removed at the end of the test.
func testDir(t testing.TB) string {
	t.Helper()
	base := ""
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		base = "/dev/shm"
	}
	d, err := os.MkdirTemp(base, "remusd-qemu-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// testSpec is a BIOS-only guest: SeaBIOS writes RAM and keeps running
// (its timer interrupt updates the BIOS data area).
func testSpec(t testing.TB, name string, mib int) Spec {
	d := testDir(t)
	return Spec{
		Name:       name,
		MemoryMiB:  mib,
		RAMPath:    d + "/ram",
		QMPPath:    d + "/qmp.sock",
		SerialPath: d + "/serial.log",
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func launchTest(t testing.TB, name string, mib int) *Guest {
	t.Helper()
	requireQEMU(t)
	spec := testSpec(t, name, mib)
	g, err := Launch(testCtx(t), spec, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Launch: %v", err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if _, err := os.Stat(spec.RAMPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("RAM file left behind: %v", err)
		}
	})
	return g
}

func TestRealQMP(t *testing.T) {
	g := launchTest(t, "qmp-test", 64)
	ctx := testCtx(t)
	q := g.QMP()
	v, err := q.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v != q.Greeting() || v.Major < 7 {
		t.Errorf("version %+v, greeting %+v", v, q.Greeting())
	}
	if g.BackendVersion() != v.String() || !strings.HasPrefix(g.BackendVersion(), "qemu-") || g.Backend() != "qemu" {
		t.Errorf("BackendVersion %q Backend %q", g.BackendVersion(), g.Backend())
	}
	t.Logf("QEMU %s (%s)", v, v.Package)
	st, err := q.Status(ctx)
	if err != nil || !st.Running || st.Status != "running" {
		t.Fatalf("status %+v, %v", st, err)
	}
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := q.Status(ctx); err != nil || st.Running || st.Status != "paused" {
		t.Fatalf("after Pause: status %+v, %v", st, err)
	}
	select { // QEMU announces the stop as an event
	case ev := <-q.Events():
		if ev.Name != "STOP" {
			t.Fatalf("event %+v, want STOP", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no STOP event")
	}
	if err := g.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := q.Status(ctx); err != nil || !st.Running {
		t.Fatalf("after Resume: status %+v, %v", st, err)
	}
	var ce *CommandError
	if err := q.Execute(ctx, "no-such-command", nil, nil); !errors.As(err, &ce) || ce.Class != "CommandNotFound" || ce.Command != "no-such-command" {
		t.Fatalf("unknown command: %v", err)
	}
	if g.NumPages() != 64<<20/pageSize || len(g.Memory()) != 64<<20 {
		t.Fatalf("NumPages %d", g.NumPages())
	}
	// Config round-trips the machine part only.
	s, err := ParseConfig(g.Config())
	if err != nil || s.Name != "qmp-test" || s.MemoryMiB != 64 || s.RAMPath != "" || s.QMPPath != "" {
		t.Fatalf("ParseConfig: %+v, %v", s, err)
	}
}

func TestLaunchFailsClearly(t *testing.T) {
	requireQEMU(t)
	spec := testSpec(t, "bad", 64)
	spec.ExtraArgs = []string{"-device", "no-such-device"}
	_, err := Launch(testCtx(t), spec, nil)
	if !errors.Is(err, ErrQEMUExited) || !strings.Contains(err.Error(), "no-such-device") {
		t.Fatalf("Launch with a bad device: %v", err)
	}
	if _, err := os.Stat(spec.RAMPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RAM file left behind: %v", err)
	}
}

// diffPages lists the pages where a and b differ.
func diffPages(a, b []byte) []int {
	var d []int
	for p := 0; p < len(a)/pageSize; p++ {
		if !bytes.Equal(a[p*pageSize:(p+1)*pageSize], b[p*pageSize:(p+1)*pageSize]) {
			d = append(d, p)
		}
	}
	return d
}

// TestCheckpointCycle runs the primary's epoch loop by hand and checks that
// each harvest is exactly the set of pages that changed.
func TestCheckpointCycle(t *testing.T) {
	for _, mode := range []Tracking{TrackShadow, TrackHash} {
		t.Run(mode.String(), func(t *testing.T) {
			g := launchTest(t, "cycle", 64)
			g.SetTracking(mode)
			ctx := testCtx(t)
			n := g.NumPages()
			prev := make([]byte, len(g.Memory()))
			var dev []byte
			for epoch := 1; epoch <= 5; epoch++ {
				time.Sleep(150 * time.Millisecond)
				if err := g.Pause(ctx); err != nil {
					t.Fatal(err)
				}
				bm := dirtymap.New(n)
				if err := g.HarvestDirty(ctx, bm); err != nil {
					t.Fatal(err)
				}
				mem := g.Memory()
				if epoch == 1 {
					if bm.Count() != n {
						t.Fatalf("first harvest: %d pages, want all %d", bm.Count(), n)
					}
				} else {
					changed := diffPages(prev, mem)
					for _, p := range changed {
						if !bm.Test(p) {
							t.Fatalf("epoch %d: page %d changed but was not harvested", epoch, p)
						}
					}
					if bm.Count() != len(changed) {
						t.Errorf("epoch %d: harvested %d pages, %d changed", epoch, bm.Count(), len(changed))
					}
					if bm.Count() > n/10 {
						t.Errorf("epoch %d: %d of %d pages dirty: not much smaller than all", epoch, bm.Count(), n)
					}
					t.Logf("epoch %d: %d dirty pages", epoch, bm.Count())
				}
				bm.Runs(func(first, k int) bool {
					copy(prev[first*pageSize:], mem[first*pageSize:(first+k)*pageSize])
					return true
				})
				var err error
				dev, err = g.SaveDeviceState(ctx, dev[:0])
				if err != nil {
					t.Fatal(err)
				}
				if err := checkDeviceState(dev); err != nil {
					t.Fatal(err)
				}
				if err := g.Resume(ctx); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("device state: %d bytes", len(dev))
			// Harvest and save are refused while running.
			if err := g.HarvestDirty(ctx, dirtymap.New(n)); !errors.Is(err, ErrNotPaused) {
				t.Errorf("HarvestDirty while running: %v", err)
			}
			if _, err := g.SaveDeviceState(ctx, nil); !errors.Is(err, ErrNotPaused) {
				t.Errorf("SaveDeviceState while running: %v", err)
			}
		})
	}
}

// checkpoint pauses g, copies every dirty page into replica memory, saves
// the device state, commits it and resumes g (the engine's capture+apply).
func checkpoint(t *testing.T, g *Guest, r *Replica, epoch uint64) []byte {
	t.Helper()
	ctx := testCtx(t)
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(g.NumPages())
	if err := g.HarvestDirty(ctx, bm); err != nil {
		t.Fatal(err)
	}
	dev, err := g.SaveDeviceState(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.CommitDeviceState(epoch, dev); err != nil {
		t.Fatal(err)
	}
	src, dst := g.Memory(), r.Memory()
	bm.Runs(func(first, k int) bool {
		copy(dst[first*pageSize:], src[first*pageSize:(first+k)*pageSize])
		return true
	})
	if err := g.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	return dev
}

// xp reads 8 bytes of guest-physical memory as QEMU sees it.
func xp(t *testing.T, g *Guest, addr int) string {
	t.Helper()
	var out string
	err := g.QMP().Execute(testCtx(t), "human-monitor-command",
		map[string]any{"command-line": fmt.Sprintf("xp /1xg %#x", addr)}, &out)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func newTestReplica(t *testing.T, spec Spec, opts ...ReplicaOption) *Replica {
	t.Helper()
	r, err := NewReplica(testCtx(t), spec, zaptest.NewLogger(t), opts...)
	if err != nil {
		t.Fatalf("NewReplica: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("replica Close: %v", err)
		}
	})
	return r
}

func TestReplicaActivate(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []ReplicaOption
		kill bool // kill the hot standby before activating
		cold bool
	}{
		{name: "hot"},
		{name: "cold", opts: []ReplicaOption{WithoutStandby()}, cold: true},
		{name: "dead-standby", kill: true, cold: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := launchTest(t, "primary", 64)
			ctx := testCtx(t)
			// The standby starts before any RAM is written.
			// The backup's own spec of the VM; the primary's description
			// is only checked against it.
			spec := testSpec(t, "primary", 64)
			machine, err := ParseConfig(g.Config())
			if err != nil {
				t.Fatal(err)
			}
			if err := CheckCompatible(machine, spec); err != nil {
				t.Fatal(err)
			}
			r := newTestReplica(t, spec, tc.opts...)
			if sb := r.Standby(); sb != nil {
				if st, err := sb.QMP().Status(ctx); err != nil || st.Status != "inmigrate" {
					t.Fatalf("standby status %+v, %v", st, err)
				}
				if r.BackendVersion() != g.BackendVersion() {
					t.Fatalf("standby %s, primary %s", r.BackendVersion(), g.BackendVersion())
				}
			}
			time.Sleep(200 * time.Millisecond)
			checkpoint(t, g, r, 1)
			time.Sleep(100 * time.Millisecond)
			checkpoint(t, g, r, 2)
			// A page SeaBIOS never touches, marked in the replica: the
			// activated QEMU must see the replica file's content.
			const mark = 40 << 20
			copy(r.Memory()[mark:], []byte{0xef, 0xbe, 0xad, 0xde, 0x0d, 0xf0, 0xad, 0x0b})
			want := append([]byte(nil), r.Memory()...)
			// A refused state does not replace the committed one.
			if err := r.CommitDeviceState(3, []byte("not a QEMU device state")); err == nil {
				t.Fatal("garbage device state accepted")
			}
			if r.Committed() != 2 {
				t.Fatalf("Committed %d after a refused commit, want 2", r.Committed())
			}
			g.Close() // the primary dies
			if tc.kill {
				r.Standby().proc.cmd.Process.Kill()
				<-r.Standby().proc.done
			}
			hg, err := r.Activate(ctx)
			if err != nil {
				t.Fatalf("Activate: %v", err)
			}
			ag := hg.(*Guest)
			t.Cleanup(func() { ag.Close() })
			info := r.LastActivation()
			t.Logf("activation: %+v", info)
			if info.Cold != tc.cold || info.Epoch != 2 {
				t.Errorf("activation %+v, want cold=%v epoch 2", info, tc.cold)
			}
			st, err := ag.QMP().Status(ctx)
			if err != nil || !st.Running || st.Status != "running" {
				t.Fatalf("activated guest status %+v, %v", st, err)
			}
			if got := xp(t, ag, mark); !strings.Contains(got, "0x0badf00ddeadbeef") {
				t.Fatalf("QEMU reads %q at the marked page: not the replica RAM", got)
			}
			time.Sleep(200 * time.Millisecond)
			if st, err := ag.QMP().Status(ctx); err != nil || !st.Running {
				t.Fatalf("activated guest stopped running: %+v, %v", st, err)
			}
			if err := ag.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			d := diffPages(want, ag.Memory())
			t.Logf("%d of %d pages changed since activation", len(d), ag.NumPages())
			if len(d) > ag.NumPages()/10 {
				t.Errorf("%d pages differ from the checkpoint: RAM was not restored", len(d))
			}
			if err := ag.Resume(ctx); err != nil {
				t.Fatal(err)
			}
			// Activated once: later commits and activations are refused.
			if err := r.CommitDeviceState(4, want[:0]); err == nil {
				t.Error("commit after activation accepted")
			}
			if _, err := r.Activate(ctx); err == nil {
				t.Error("second Activate succeeded")
			}
		})
	}
}

func TestActivateWithoutState(t *testing.T) {
	requireQEMU(t)
	r := newTestReplica(t, testSpec(t, "empty", 64), WithoutStandby())
	if _, err := r.Activate(testCtx(t)); err == nil || !strings.Contains(err.Error(), "no device state") {
		t.Fatalf("Activate without state: %v", err)
	}
}

// TestAttach drives a QEMU the backend did not launch.
func TestAttach(t *testing.T) {
	requireQEMU(t)
	spec := testSpec(t, "attached", 64)
	if err := createRAM(spec.RAMPath, spec.MemoryBytes(), true); err != nil {
		t.Fatal(err)
	}
	p, err := startProcess(spec, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.stop(nil, 0) })
	ctx := testCtx(t)
	for { // wait for the socket, as an operator's tooling would
		if _, err := os.Stat(spec.QMPPath); err == nil {
			break
		}
		if p.exited() {
			t.Fatal(p.exitErr())
		}
		time.Sleep(5 * time.Millisecond)
	}
	g, err := Attach(ctx, spec.QMPPath, spec.RAMPath, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	if g.Name() != "attached" || g.NumPages() != 64<<20/pageSize || g.Pid() != 0 {
		t.Fatalf("attached guest %q, %d pages, pid %d", g.Name(), g.NumPages(), g.Pid())
	}
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(g.NumPages())
	if err := g.HarvestDirty(ctx, bm); err != nil || bm.Count() != g.NumPages() {
		t.Fatalf("harvest: %d pages, %v", bm.Count(), err)
	}
	if _, err := g.SaveDeviceState(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if err := g.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	if p.exited() {
		t.Fatal("Detach stopped QEMU")
	}
	// Re-attach, then Close quits it.
	g, err = Attach(ctx, spec.QMPPath, spec.RAMPath, nil)
	if err != nil {
		t.Fatalf("re-Attach: %v", err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not stop the attached QEMU")
	}
}

// A state that passes the header check but is not a valid stream makes
// the incoming QEMU exit; Activate reports QEMU's own words.
func TestActivateCorruptState(t *testing.T) {
	requireQEMU(t)
	r := newTestReplica(t, testSpec(t, "corrupt", 64))
	bad := append([]byte("QEVM\x00\x00\x00\x03"), bytes.Repeat([]byte{0x42}, 64)...)
	if err := r.CommitDeviceState(1, bad); err != nil {
		t.Fatal(err)
	}
	_, err := r.Activate(testCtx(t))
	if !errors.Is(err, ErrQEMUExited) {
		t.Fatalf("Activate with a corrupt state: %v", err)
	}
	t.Logf("corrupt state: %v", err)
}

// TestReplicaWithTap checkpoints a guest with a virtio-net NIC on a tap
// device (QEMU creates the non-persistent tap itself and removes it when
// it exits) and activates the standby on a second tap with the same MAC.
func TestReplicaWithTap(t *testing.T) {
	requireQEMU(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	const mac = "52:54:00:72:6d:01"
	spec := testSpec(t, "tapped", 64)
	spec.Tap, spec.MAC = fmt.Sprintf("rmqa%d", os.Getpid()%100000), mac
	ctx := testCtx(t)
	g, err := Launch(ctx, spec, zaptest.NewLogger(t))
	if err != nil {
		if strings.Contains(err.Error(), "tap") || strings.Contains(err.Error(), "TUNSETIFF") {
			t.Skipf("cannot create a tap device here: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	machine, err := ParseConfig(g.Config())
	if err != nil {
		t.Fatal(err)
	}
	if machine.MAC != mac {
		t.Fatalf("config MAC %q", machine.MAC)
	}
	rs := testSpec(t, "tapped", 64)
	rs.Tap, rs.MAC = fmt.Sprintf("rmqb%d", os.Getpid()%100000), strings.ToUpper(mac)
	if err := CheckCompatible(machine, rs); err != nil {
		t.Fatal(err)
	}
	r := newTestReplica(t, rs)
	time.Sleep(200 * time.Millisecond)
	checkpoint(t, g, r, 1)
	time.Sleep(100 * time.Millisecond)
	checkpoint(t, g, r, 2)
	g.Close()
	hg, err := r.Activate(ctx)
	if err != nil {
		t.Fatalf("Activate: %v", err)
	}
	ag := hg.(*Guest)
	t.Cleanup(func() { ag.Close() })
	t.Logf("activation: %+v", r.LastActivation())
	if st, err := ag.QMP().Status(ctx); err != nil || !st.Running {
		t.Fatalf("status %+v, %v", st, err)
	}
}
