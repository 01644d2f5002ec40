package daemon

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/libvirt/lvtest"
	"github.com/remusd/remusd/hypervisor/qemu"
)

func TestLibvirtConfigValidation(t *testing.T) {
	cfg := qemuCfg(QemuVM{Name: "web", Libvirt: true, Tap: "vnet-web"})
	cfg.Libvirt = libvirt.Config{Socket: "/run/libvirt/libvirt-sock"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	cfg = qemuCfg(QemuVM{Name: "web", Libvirt: true, MemoryMiB: 128, Kernel: "/k", Bridge: "br0"})
	cfg.Libvirt = libvirt.Config{Socket: "relative"}
	err := cfg.Validate()
	for _, want := range []string{"qemu_vms[0].memory_mib: must not be set with libvirt", "qemu_vms[0].kernel: must not be set with libvirt",
		"qemu_vms[0].tap: must be set with bridge", "libvirt.socket"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("want %q in %v", want, err)
		}
	}
}

// TestLibvirtProtectFailover protects a libvirt-managed guest-image VM
// (private libvirtd started by the test) from one in-process daemon to
// another whose standby is a directly launched QEMU, waits for
// acknowledged epochs, fails over and checks the standby runs the guest.
func TestLibvirtProtectFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU under libvirtd")
	}
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	img, err := guestimage.Build(ctx, guestimage.Config{})
	if errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	// Refused at start, saying what to change: a domain whose RAM remusd
	// cannot map, and one whose devices the backup's standby lacks.
	bad := lvtest.Domain{Name: "lbad1", MemoryMiB: 64}.XML()
	bad2 := strings.Replace(lvtest.Domain{Name: "lbad2", MemoryMiB: 64, Shared: true}.XML(), "<memballoon model='none'/>", "<memballoon model='virtio'/>", 1)
	for name, x := range map[string]string{"lbad1": bad, "lbad2": bad2} {
		if err := lv.DefineAndStart(ctx, name, x); err != nil {
			t.Fatalf("%v\n%s", err, lv.Log())
		}
	}
	for name, want := range map[string]string{"lbad1": libvirt.SharedMemoryXML, "lbad2": "<memballoon model='none'/>"} {
		cfg := DefaultConfig()
		cfg.Insecure = true
		cfg.Control, cfg.StateDir = filepath.Join(t.TempDir(), "c.sock"), t.TempDir()
		cfg.Libvirt = libvirt.Config{Socket: lv.Socket}
		cfg.QemuVMs = []QemuVM{{Name: name, Libvirt: true}}
		_, err := New(cfg, nil)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), name) {
			t.Fatalf("%s: want an error naming %q, got %v", name, want, err)
		}
		t.Logf("refused: %v", err)
		if _, err := lv.Virsh(ctx, "destroy", name); err != nil {
			t.Fatal(err)
		}
	}

	serial := filepath.Join(lv.Dir, "lg1.serial")
	dom := lvtest.Domain{Name: "lg1", MemoryMiB: 128, Shared: true, Kernel: img.Kernel, Initrd: img.Initrd,
		Cmdline: guestimage.Append("", "", 0), Serial: serial}
	if err := lv.DefineAndStart(ctx, dom.Name, dom.XML()); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	waitGuestConsole(t, ctx, serial)
	shm, err := os.MkdirTemp("/dev/shm", "rdl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()

	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "b")}
	// The backup's own definition of the domain (here the same libvirtd
	// stands for both hosts' libvirtd): its standby is built from it.
	bcfg.Libvirt = libvirt.Config{URI: lv.URI()}
	bcfg.QemuVMs = []QemuVM{{Name: dom.Name, Libvirt: true, Autostart: boolp(false)}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.EpochInterval = Duration(100 * time.Millisecond)
	pcfg.Libvirt = libvirt.Config{URI: lv.URI()}
	pcfg.QemuVMs = []QemuVM{{Name: dom.Name, Libvirt: true}}
	securePeers(t, &bcfg, &pcfg)
	backup := startDaemon(t, bcfg)
	primary := startDaemon(t, pcfg)

	if err := primary.Protect(ctx, ProtectRequest{VM: dom.Name, Peer: bcfg.Listen}); err != nil {
		t.Fatal(err)
	}
	for {
		s := vmStatus(t, primary, dom.Name)
		if s.AckedEpoch >= 5 {
			t.Logf("primary: role %s, acked %d, pause last %.1f ms p50 %.1f ms p99 %.1f ms, dirty pages last %d",
				s.Role, s.AckedEpoch, s.PauseMsLast, s.PauseMsP50, s.PauseMsP99, s.DirtyPagesLast)
			if s.Role != RolePrimary || s.Backend != qemu.BackendName {
				t.Errorf("primary status %+v", s)
			}
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("epochs not acknowledged: %+v", s)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s := vmStatus(t, backup, dom.Name); s.Role != RoleBackup {
		t.Fatalf("backup status %+v", s)
	}
	// The primary dies: protection stops, the libvirt domain is paused.
	primary.mu.Lock()
	pv := primary.vms[dom.Name]
	primary.mu.Unlock()
	pv.stop()
	<-pv.done
	if err := pv.guest.(*qemu.Guest).Monitor().Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := backup.Failover(ctx, FailoverRequest{VM: dom.Name}); err != nil {
		t.Fatal(err)
	}
	t.Logf("failover (Activate) took %v", time.Since(start))
	if s := vmStatus(t, backup, dom.Name); s.Role != RoleActive {
		t.Fatalf("after failover: %+v", s)
	}
	backup.mu.Lock()
	g := backup.vms[dom.Name].guest.(*qemu.Guest)
	backup.mu.Unlock()
	time.Sleep(500 * time.Millisecond)
	st, err := g.QMP().Status(ctx)
	if err != nil || !st.Running {
		t.Fatalf("activated VM status %+v, %v", st, err)
	}
}

func TestLibvirtDiskConfigValidation(t *testing.T) {
	cfg := qemuCfg(QemuVM{Name: "web", Libvirt: true, Disks: []QemuDisk{{ID: "vda", Path: "/x.raw", SizeMiB: 16}}})
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "qemu_vms[0].disks: must not be set with libvirt") || !strings.Contains(err.Error(), "<disk type='file'") {
		t.Fatalf("disks with libvirt: %v", err)
	}
}

// TestLibvirtProtectDisk protects a libvirt domain with a file-backed raw
// virtio disk between two daemons, each host with its own libvirtd (the
// backup's definition names its own image of the disk): the seam is
// built when protection starts (not at attach), guest writes reach the
// journal, unprotect takes the seam out (the disk keeps working),
// protection starts again, the primary's daemon restarts (the next one
// takes the mirror job over), and after a failover the standby runs with the
// backup's image as its virtio disk at the domain's PCI slot, holding what
// the guest wrote on the primary.
func TestLibvirtProtectDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU under libvirtd")
	}
	lvA := lvtest.Start(t)
	lvB := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	img, err := guestimage.Build(ctx, guestimage.Config{})
	if errors.Is(err, guestimage.ErrUnavailable) {
		t.Skip(err)
	} else if err != nil {
		t.Fatal(err)
	}
	const name, size = "ldisk", 16 << 20
	mkImage := func(path string) {
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	imgA, imgB := filepath.Join(lvA.Dir, name+".raw"), filepath.Join(lvB.Dir, name+".raw")
	mkImage(imgA)
	serial := filepath.Join(lvA.Dir, name+".serial")
	domXML := func(image string) string {
		x := lvtest.Domain{Name: name, MemoryMiB: 128, Shared: true, Kernel: img.Kernel, Initrd: img.Initrd,
			Cmdline: guestimage.Append("", "", 0), Serial: serial}.XML()
		return strings.Replace(x, "  </devices>", "    "+libvirt.StandbyDiskXML("vda", image, 2)+"\n  </devices>", 1)
	}
	// The backup's definition before its image exists: refused, saying so.
	if err := lvB.Define(ctx, name, domXML(imgB)); err != nil {
		t.Fatalf("%v\n%s", err, lvB.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lvB.Socket})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.DefinedSpec(ctx, name); err == nil || !strings.Contains(err.Error(), imgB) {
		t.Fatalf("backup without its image: %v", err)
	}
	conn.Close()
	mkImage(imgB)
	if err := lvA.DefineAndStart(ctx, name, domXML(imgA)); err != nil {
		t.Fatalf("%v\n%s", err, lvA.Log())
	}
	waitGuestConsole(t, ctx, serial)
	shm, err := os.MkdirTemp("/dev/shm", "rdd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	tmp := t.TempDir()
	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(shm, "b")}
	bcfg.Libvirt = libvirt.Config{URI: lvB.URI()}
	bcfg.QemuVMs = []QemuVM{{Name: name, Libvirt: true, Autostart: boolp(false)}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.EpochInterval = Duration(100 * time.Millisecond)
	pcfg.Libvirt = libvirt.Config{URI: lvA.URI()}
	pcfg.QemuVMs = []QemuVM{{Name: name, Libvirt: true}}
	securePeers(t, &bcfg, &pcfg)
	backup := startDaemon(t, bcfg)
	primary, stopPrimary := runDaemon(t, pcfg)
	defer func() { stopPrimary() }()

	primary.mu.Lock()
	pg := primary.vms[name].guest.(*qemu.Guest)
	primary.mu.Unlock()
	m := pg.Monitor()
	jobs := func() int {
		var j []struct{}
		if err := m.Execute(ctx, "query-block-jobs", nil, &j); err != nil {
			t.Fatal(err)
		}
		return len(j)
	}
	if len(pg.Disks()) != 0 || jobs() != 0 {
		t.Fatal("the seam was built before protection")
	}
	protect := func() {
		t.Helper()
		if err := primary.Protect(ctx, ProtectRequest{VM: name, Peer: bcfg.Listen}); err != nil {
			t.Fatal(err)
		}
		for {
			s := vmStatus(t, primary, name)
			if s.AckedEpoch >= 3 {
				t.Logf("primary: acked %d, pause p50 %.1f ms p99 %.1f ms", s.AckedEpoch, s.PauseMsP50, s.PauseMsP99)
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("epochs not acknowledged: %+v", s)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	protect()
	if ds := pg.Disks(); len(ds) != 1 || ds[0].ID != "vda" || jobs() != 1 {
		t.Fatalf("protected: disks %+v", ds)
	}
	qemuIO := func(cmd string) {
		t.Helper()
		var out string
		if err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": `qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "` + cmd + `"`}, &out); err != nil || strings.Contains(out, "failed") {
			t.Fatalf("qemu-io %s: %q %v", cmd, out, err)
		}
	}
	j := pg.Disks()[0].Journal
	before := j.Stats()
	qemuIO("write -P 0x5c 1M 64k")
	if after := j.Stats(); after.Used < before.Used+64<<10 && after.Epoch == before.Epoch {
		t.Fatalf("the write is not in the journal: before %+v after %+v", before, after)
	}

	if err := primary.Unprotect(ctx, name); err != nil {
		t.Fatal(err)
	}
	if len(pg.Disks()) != 0 || jobs() != 0 {
		t.Fatal("the seam is still there after unprotect")
	}
	qemuIO("write -P 0x5d 2M 64k")
	b, err := os.ReadFile(imgA)
	if err != nil || b[2<<20] != 0x5d || b[1<<20] != 0x5c {
		t.Fatalf("the guest's image misses its writes (%v)", err)
	}

	protect()
	if len(pg.Disks()) != 1 || jobs() != 1 {
		t.Fatal("the seam was not built again")
	}
	// A write while protected: acknowledged epochs after it carry it.
	qemuIO("write -P 0x5f 4M 64k")
	acked := vmStatus(t, primary, name).AckedEpoch
	for vmStatus(t, primary, name).AckedEpoch < acked+3 {
		if ctx.Err() != nil {
			t.Fatal("no epochs acknowledged after the write")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The primary's daemon restarts: the mirror job stays, the next daemon
	// resumes the protection and takes the job over (its journal is new:
	// what the old one held unacknowledged is the engine's to resend).
	ackedBefore := vmStatus(t, primary, name).AckedEpoch
	stopPrimary()
	primary, stopPrimary = runDaemon(t, pcfg)
	primary.mu.Lock()
	pg, _ = primary.vms[name].guest.(*qemu.Guest)
	primary.mu.Unlock()
	if pg == nil {
		t.Fatal("the restarted daemon did not re-attach to the domain")
	}
	m = pg.Monitor()
	for {
		s := vmStatus(t, primary, name)
		if s.Role == RolePrimary && s.AckedEpoch >= ackedBefore+3 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("protection did not resume: %+v", s)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(pg.Disks()) != 1 || jobs() != 1 {
		t.Fatal("the resumed protection has no seam")
	}
	qemuIO("write -P 0x60 5M 64k")
	acked = vmStatus(t, primary, name).AckedEpoch
	for vmStatus(t, primary, name).AckedEpoch < acked+3 {
		if ctx.Err() != nil {
			t.Fatal("no epochs acknowledged after the write")
		}
		time.Sleep(50 * time.Millisecond)
	}
	primary.mu.Lock()
	pv := primary.vms[name]
	primary.mu.Unlock()
	pv.stop()
	<-pv.done
	if err := m.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := backup.Failover(ctx, FailoverRequest{VM: name}); err != nil {
		t.Fatal(err)
	}
	backup.mu.Lock()
	g := backup.vms[name].guest.(*qemu.Guest)
	backup.mu.Unlock()
	if s := g.Spec(); len(s.Disks) != 1 || s.Disks[0].Path != imgB || s.Disks[0].PCISlot != 2 {
		t.Fatalf("standby disks %+v", s.Disks)
	}
	time.Sleep(500 * time.Millisecond)
	st, err := g.QMP().Status(ctx)
	if err != nil || !st.Running {
		t.Fatalf("activated VM status %+v, %v", st, err)
	}
	var out string
	if err := g.QMP().Execute(ctx, "human-monitor-command", map[string]any{"command-line": `qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x5e 3M 4k"`}, &out); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("activated standby's disk: %q %v", out, err)
	}
	b, err = os.ReadFile(imgB)
	if err != nil || b[3<<20] != 0x5e {
		t.Fatalf("the activated standby's disk is not the backup's image (%v)", err)
	}
	// The backup's image has the primary's data: written in the first
	// protection (0x5c), unprotected (0x5d: the second protection's copy
	// of the disk), protected (0x5f: an epoch's writes) and after the
	// daemon's restart (0x60: the resumed protection copies the disk
	// again, then epochs).
	for off, want := range map[int]byte{1 << 20: 0x5c, 2 << 20: 0x5d, 4 << 20: 0x5f, 5 << 20: 0x60} {
		if !bytes.Equal(b[off:off+64<<10], bytes.Repeat([]byte{want}, 64<<10)) {
			t.Errorf("backup's image at %d: %#x..., want %#x", off, b[off], want)
		}
	}
	t.Logf("failed over: the standby runs with %s as vda", imgB)
}

// TestLibvirtRecordValid: a libvirt-driven guest's state record (no QMP
// socket, no pid: remusd reaches it through libvirtd) is valid, so that a
// restarted daemon re-attaches to it; a QMP-less record with a pid is not.
func TestLibvirtRecordValid(t *testing.T) {
	ok := vmRecord{Name: "web", Backend: qemu.BackendName, Role: RolePrimary, QEMU: &qemuRecord{RAM: "/dev/shm/libvirt/qemu/1-web/pc.ram"}}
	if err := ok.validate(); err != nil {
		t.Fatal(err)
	}
	for _, q := range []qemuRecord{
		{Pid: 5, RAM: "/dev/shm/x.ram"},
		{QMP: "rel.qmp", RAM: "/dev/shm/x.ram"},
		{RAM: "x.ram"},
	} {
		r := ok
		r.QEMU = &q
		if err := r.validate(); err == nil {
			t.Errorf("record %+v accepted", q)
		}
	}
}

// waitGuestConsole waits until the guest's serial console shows its init
// ran (the guest image's REMUS-GUEST lines).
func waitGuestConsole(t *testing.T, ctx context.Context, serial string) {
	t.Helper()
	for {
		b, _ := os.ReadFile(serial)
		if strings.Contains(string(b), "REMUS-GUEST") {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("guest did not start: %s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLibvirtGuestNeverProvedGone: a recorded libvirt guest the restarted
// daemon cannot re-attach to (libvirtd restarting, a timeout) is not
// taken for dead: its output rules must stay (review finding: they were
// removed, releasing a running guest's held output).
func TestLibvirtGuestNeverProvedGone(t *testing.T) {
	lv := QemuVM{Name: "web", Libvirt: true}
	if !unprovable(lv, &vmRecord{QEMU: &qemuRecord{RAM: "/dev/shm/x.ram"}}) {
		t.Error("a libvirt record was taken as provably gone")
	}
	if !unprovable(QemuVM{Name: "g"}, &vmRecord{QEMU: &qemuRecord{RAM: "/dev/shm/x.ram"}}) {
		t.Error("a record without a pid was taken as provably gone")
	}
	if unprovable(QemuVM{Name: "g"}, &vmRecord{QEMU: &qemuRecord{Pid: 1234, QMP: "/run/g.qmp", RAM: "/dev/shm/g.ram"}}) {
		t.Error("a launched QEMU's record (pid recorded) cannot be proved gone")
	}
}
