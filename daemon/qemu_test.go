package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/hypervisor/qemu"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/vmtest"
)

func qemuCfg(vms ...QemuVM) Config {
	c := DefaultConfig()
	c.Insecure = true
	c.QemuVMs = vms
	return c
}

func TestQemuConfigValidation(t *testing.T) {
	good := QemuVM{Name: "g", MemoryMiB: 128, UseGuestImage: true, GuestIP: "10.77.0.10/24", Tap: "tap0", MAC: "52:54:00:00:00:01", Bridge: "br0"}
	if err := qemuCfg(good).Validate(); err != nil {
		t.Fatalf("good config refused: %v", err)
	}
	attach := QemuVM{Name: "a", QMP: "/run/x.qmp", RAM: "/dev/shm/x.ram"}
	if err := qemuCfg(attach).Validate(); err != nil {
		t.Fatalf("attach config refused: %v", err)
	}
	for _, tc := range []struct {
		name  string
		mod   func(*QemuVM)
		field string
	}{
		{"no name", func(q *QemuVM) { q.Name = "" }, "qemu_vms[0].name"},
		{"bad name", func(q *QemuVM) { q.Name = "a,b" }, "qemu_vms[0].name"},
		{"memory", func(q *QemuVM) { q.MemoryMiB = 0 }, "qemu_vms[0].memory_mib"},
		{"memory below the image's", func(q *QemuVM) { q.MemoryMiB = 64 }, "qemu_vms[0].memory_mib"},
		{"cpus", func(q *QemuVM) { q.CPUs = 300 }, "qemu_vms[0].cpus"},
		{"kernel with image", func(q *QemuVM) { q.Kernel = "/boot/vmlinuz" }, "qemu_vms[0].kernel"},
		{"bad ip", func(q *QemuVM) { q.GuestIP = "10.77.0.10" }, "qemu_vms[0].guest_ip"},
		{"bad gw", func(q *QemuVM) { q.GuestGateway = "x" }, "qemu_vms[0].guest_gateway"},
		{"long tap", func(q *QemuVM) { q.Tap = "a-very-long-tap-name" }, "qemu_vms[0].tap"},
		{"no mac", func(q *QemuVM) { q.MAC = "" }, "qemu_vms[0].mac"},
		{"multicast mac", func(q *QemuVM) { q.MAC = "01:00:5e:00:00:01" }, "qemu_vms[0].mac"},
		{"bridge without tap", func(q *QemuVM) { q.Tap, q.MAC, q.GuestIP = "", "", "" }, "qemu_vms[0].bridge"},
		{"relative run dir", func(q *QemuVM) { q.RunDir = "run" }, "qemu_vms[0].run_dir"},
		{"qmp without ram", func(q *QemuVM) { q.QMP = "/x.qmp" }, "qemu_vms[0].ram"},
		{"guest ip without image", func(q *QemuVM) { q.UseGuestImage = false }, "qemu_vms[0].guest_ip"},
	} {
		q := good
		tc.mod(&q)
		err := qemuCfg(q).Validate()
		if err == nil || !strings.Contains(err.Error(), "config field "+tc.field+":") {
			t.Errorf("%s: error %v does not name %s", tc.name, err, tc.field)
		}
	}
	c := qemuCfg(good, good)
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "qemu_vms[1].name") {
		t.Errorf("duplicate name: %v", err)
	}
	c = qemuCfg(good)
	c.SimVMs = []SimVM{{Name: "g"}}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "defined twice") {
		t.Errorf("qemu and sim VM with one name: %v", err)
	}
	c = qemuCfg()
	c.Standby = StandbyConfig{Tap: "standby-tap-%s-too-long", Bridge: "br 0", RunDir: "rel"}
	err := c.Validate()
	for _, f := range []string{"standby.tap", "standby.bridge", "standby.run_dir"} {
		if err == nil || !strings.Contains(err.Error(), "config field "+f+":") {
			t.Errorf("standby: error %v does not name %s", err, f)
		}
	}
	c.Standby = StandbyConfig{Tap: "%d%s"}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "standby.tap") {
		t.Errorf("standby tap with a verb other than %%s: %v", err)
	}
}

func TestQemuSpecTranslation(t *testing.T) {
	q := QemuVM{Name: "g", MemoryMiB: 128, CPUs: 1, UseGuestImage: true, GuestIP: "10.77.0.10/24", GuestPort: 7001,
		Tap: "tap0", MAC: "52:54:00:AA:00:01", Bridge: "br0", RunDir: "/dev/shm/r", ExtraArgs: []string{"-rtc", "base=utc"}}
	img := &guestimage.Image{Kernel: "/k/vmlinuz", Initrd: "/k/initrd.cpio"}
	s := q.qemuSpec("hostA", img)
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	if s.Kernel != img.Kernel || s.Initrd != img.Initrd || !strings.Contains(s.Append, "remus.ip=10.77.0.10/24") || !strings.Contains(s.Append, "remus.port=7001") {
		t.Errorf("guest image not used: %+v", s)
	}
	if s.RAMPath != "/dev/shm/r/g.ram" || s.QMPPath != "/dev/shm/r/g.qmp" || s.SerialPath != "/dev/shm/r/g.serial" || s.Tap != "tap0" || s.MAC != "52:54:00:aa:00:01" {
		t.Errorf("host-local fields: %+v", s)
	}
	if d := (QemuVM{Name: "g"}).runDir("hostA"); d != "/dev/shm/remusd-hostA" {
		t.Errorf("default run dir %q", d)
	}

	// The backup builds the standby from ITS OWN entry for the VM (its own
	// kernel paths, its standby run dir and tap); the primary's
	// description is only compared with it (issue 8, hole 2).
	d := &Daemon{cfg: Config{Name: "hostB", Standby: StandbyConfig{Tap: "r-%s", Bridge: "brB", RunDir: "/dev/shm/b", Binary: "/usr/bin/qemu-system-x86_64"}}}
	local := q
	local.Tap, local.Bridge, local.RunDir = "", "", "/dev/shm/other"
	bimg := &guestimage.Image{Kernel: "/b/vmlinuz", Initrd: "/b/initrd.cpio"}
	r := d.standbySpec(local, bimg)
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	if r.Tap != "r-g" || r.RAMPath != "/dev/shm/b/g.replica.ram" || r.QMPPath != "/dev/shm/b/g.qmp" || r.Binary != d.cfg.Standby.Binary {
		t.Errorf("standby host-local fields: %+v", r)
	}
	if r.Kernel != bimg.Kernel || r.Initrd != bimg.Initrd {
		t.Errorf("standby boots %s %s, want the backup's own %s %s", r.Kernel, r.Initrd, bimg.Kernel, bimg.Initrd)
	}
	machine, err := qemu.ParseConfig(s.Config())
	if err != nil {
		t.Fatal(err)
	}
	if err := qemu.CheckCompatible(machine, r); err != nil {
		t.Fatalf("same machine refused: %v", err)
	}
	// A primary that asks for another device layout, or smuggles a file
	// into the standby's command line, is refused, naming the difference.
	evil := s
	evil.ExtraArgs = append(append([]string(nil), s.ExtraArgs...), "-drive", "file=/etc/shadow")
	machine, err = qemu.ParseConfig(evil.Config())
	if err != nil {
		t.Fatal(err)
	}
	if err := qemu.CheckCompatible(machine, r); err == nil || !strings.Contains(err.Error(), "extra_args") {
		t.Fatalf("extra args from the wire: %v", err)
	}
	for _, a := range r.Args(true) {
		if strings.Contains(a, "/etc/shadow") {
			t.Fatalf("a wire argument reached the standby's command line: %q", r.Args(true))
		}
	}
	bigger := s
	bigger.MemoryMiB = 256
	machine, _ = qemu.ParseConfig(bigger.Config())
	if err := qemu.CheckCompatible(machine, r); err == nil || !strings.Contains(err.Error(), "memory_mib: primary 256, this backup 128") {
		t.Fatalf("memory mismatch: %v", err)
	}
	if got := (StandbyConfig{}).TapFor("vm1"); got != "rs-vm1" {
		t.Errorf("default standby tap %q", got)
	}
	// No NIC in the backup's description: no tap on the standby.
	local.MAC = ""
	if r := d.standbySpec(local, bimg); r.Tap != "" {
		t.Errorf("standby tap without a NIC: %q", r.Tap)
	}
}

func TestLocalQEMUVersion(t *testing.T) {
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	v, err := localQEMUVersion(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v, "qemu-") {
		t.Fatalf("version %q", v)
	}
}

// startDaemon runs a daemon until the test ends.
func startDaemon(t *testing.T, cfg Config) *Daemon {
	t.Helper()
	d, err := New(cfg, zaptest.NewLogger(t).Named(cfg.Name))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("%s: Run: %v", cfg.Name, err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s: Run did not return", cfg.Name)
		}
		// The daemon leaves its QEMU guests running (restarts must not
		// kill them): the test stops them, by PID.
		killGuests(t, d)
	})
	// Wait until Run serves (Protect needs it; a peer dialing the
	// listener needs it up: CI once dialed 8 ms too early).
	select {
	case <-d.Running():
		return d
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: Run did not start", cfg.Name)
		return nil
	}
}

// killGuests kills the QEMU guests a stopped daemon left running.
func killGuests(t *testing.T, d *Daemon) {
	t.Helper()
	d.mu.Lock()
	var pids []int
	for _, v := range d.vms {
		if v.pid > 0 {
			pids = append(pids, v.pid)
		}
	}
	d.mu.Unlock()
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGKILL); err == nil {
			for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
				if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || strings.Contains(string(b), ") Z ") {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func vmStatus(t *testing.T, d *Daemon, name string) VMStatus {
	t.Helper()
	st, err := d.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st {
		if s.VM == name {
			return s
		}
	}
	t.Fatalf("no VM %s in status %+v", name, st)
	return VMStatus{}
}

// TestQemuProtectFailover protects a guest-image VM (no NIC) from one
// in-process daemon to another, waits for acknowledged epochs, fails over
// and checks the standby runs the guest.
func TestQemuProtectFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := guestimage.Build(ctx, guestimage.Config{}); errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	shm, err := os.MkdirTemp("/dev/shm", "rdq-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()

	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "b")}
	// The backup's own description of the VM: its standby is built from it.
	bcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "b-run"), Autostart: boolp(false)}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.EpochInterval = Duration(100 * time.Millisecond)
	pcfg.QemuVMs = []QemuVM{{Name: "g1", MemoryMiB: 128, UseGuestImage: true, RunDir: filepath.Join(shm, "a")}}
	securePeers(t, &bcfg, &pcfg)
	backup := startDaemon(t, bcfg)
	primary := startDaemon(t, pcfg)

	// Let the guest boot a little (no NIC: the console says it started).
	serial := filepath.Join(shm, "a", "g1.serial")
	for {
		b, _ := os.ReadFile(serial)
		if strings.Contains(string(b), "REMUS-GUEST") {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("guest did not start: %s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := primary.Protect(ctx, ProtectRequest{VM: "g1", Peer: bcfg.Listen}); err != nil {
		t.Fatal(err)
	}
	for {
		s := vmStatus(t, primary, "g1")
		if s.AckedEpoch >= 5 {
			t.Logf("primary: role %s, acked %d, outbuf %q, pause last %.1f ms p50 %.1f ms p99 %.1f ms, dirty pages last %d",
				s.Role, s.AckedEpoch, s.OutBuf, s.PauseMsLast, s.PauseMsP50, s.PauseMsP99, s.DirtyPagesLast)
			if s.Role != RolePrimary || s.OutBuf == "" {
				t.Errorf("primary status %+v", s)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("epochs not acknowledged: %+v", s)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s := vmStatus(t, backup, "g1"); s.Role != RoleBackup || s.Backend != qemu.BackendName {
		t.Fatalf("backup status %+v", s)
	}
	// The primary dies (its QEMU is killed, the protection stops).
	primary.mu.Lock()
	pv := primary.vms["g1"]
	primary.mu.Unlock()
	pv.stop()
	<-pv.done
	if err := pv.guest.(*qemu.Guest).QMP().Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := backup.Failover(ctx, FailoverRequest{VM: "g1"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("failover (Activate) took %v", time.Since(start))
	s := vmStatus(t, backup, "g1")
	if s.Role != RoleActive {
		t.Fatalf("after failover: %+v", s)
	}
	backup.mu.Lock()
	g := backup.vms["g1"].guest.(*qemu.Guest)
	backup.mu.Unlock()
	st, err := g.QMP().Status(ctx)
	if err != nil || !st.Running {
		t.Fatalf("activated VM status %+v, %v", st, err)
	}
}

// TestQemuBackupRefusesOtherQEMUVersion: a primary whose QEMU differs is
// refused in the handshake, before any standby is started.
func TestQemuBackupRefusesOtherQEMUVersion(t *testing.T) {
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	shm := t.TempDir()
	cfg := DefaultConfig()
	cfg.Name, cfg.StateDir, cfg.Insecure = "hostB", filepath.Join(shm, "state"), true
	cfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "run")}
	cfg.QemuVMs = []QemuVM{{Name: "g", MemoryMiB: 16, Autostart: boolp(false)}}
	d, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	d.ctx = context.Background()
	spec := qemu.Spec{Name: "g", MemoryMiB: 16}
	hello := &remuspb.Hello{VmName: "g", Backend: qemu.BackendName, BackendVersion: "qemu-0.0.1",
		BackendConfig: spec.Config(), MemoryBytes: uint64(spec.MemoryBytes())}
	_, err = d.backupFor(context.Background(), hello, "hostA")
	if err == nil || !strings.Contains(err.Error(), "QEMU version mismatch") || !strings.Contains(err.Error(), "qemu-0.0.1") {
		t.Fatalf("backupFor = %v, want a QEMU version mismatch", err)
	}
	if _, err := os.Stat(filepath.Join(shm, "run")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a standby run dir was created for a refused primary: %v", err)
	}
	if v := d.vms["g"]; len(d.vms) != 1 || v.role != RoleStopped || v.backup != nil || v.replicaSize != 0 {
		t.Errorf("refused primary changed the VM: %+v", v)
	}
	hello.MemoryBytes += 4096
	if _, err := d.backupFor(context.Background(), hello, "hostA"); err == nil || !strings.Contains(err.Error(), "bytes of memory") {
		t.Errorf("memory mismatch: %v", err)
	}
	// A VM this host has no description of is refused before anything.
	hello.VmName = "other"
	if _, err := d.backupFor(context.Background(), hello, "hostA"); err == nil || !strings.Contains(err.Error(), "add a qemu_vms entry") {
		t.Errorf("VM without a local description: %v", err)
	}
}

// TestProtectRefusesNICWithoutTap: a guest with a network card whose
// entry names no tap would run protected with its output unheld; protect
// refuses it (unless output_buffer none-unsafe says so).
func TestProtectRefusesNICWithoutTap(t *testing.T) {
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	shm, err := os.MkdirTemp("/dev/shm", "rdn-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()
	cfg := DefaultConfig()
	cfg.Name, cfg.Control, cfg.StateDir, cfg.Insecure = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a"), true
	cfg.Peers = []Peer{{Name: "hostB", Address: "127.0.0.1:1"}}
	cfg.QemuVMs = []QemuVM{
		{Name: "nic", MemoryMiB: 32, RunDir: filepath.Join(shm, "a"), ExtraArgs: []string{"-netdev", "user,id=n1", "-device", "virtio-net-pci,netdev=n1"}},
		{Name: "nonic", MemoryMiB: 32, RunDir: filepath.Join(shm, "a")},
	}
	d := startDaemon(t, cfg)
	err = d.Protect(context.Background(), ProtectRequest{VM: "nic", Peer: "hostB"})
	if err == nil || !strings.Contains(err.Error(), "network card") || !strings.Contains(err.Error(), "tap") {
		t.Fatalf("protect of a guest with a NIC and no tap: %v", err)
	}
	if s := vmStatus(t, d, "nic"); s.Role != RoleLocal {
		t.Fatalf("a refused protect changed the role: %+v", s)
	}
	if err := d.Protect(context.Background(), ProtectRequest{VM: "nonic", Peer: "hostB"}); err != nil {
		t.Fatalf("protect of a guest without a NIC: %v", err)
	}
}
