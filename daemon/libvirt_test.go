package daemon

import (
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
