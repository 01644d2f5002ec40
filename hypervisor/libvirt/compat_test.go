package libvirt_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/libvirt/lvtest"
	"github.com/remusd/remusd/hypervisor/qemu"
)

// TestStandbyCompatNIC: the backup builds its standby from its own
// libvirt definition of the domain (DefinedSpec, the domain defined but
// not running); device state saved by the running domain (q35, a virtio
// NIC at 00:01.0, as StandbyProblems asks) loads into that standby once
// the primary's description checks compatible. With libvirt's default NIC
// placement (behind a pcie-root-port) StandbyProblems and DefinedSpec say
// what to change.
func TestStandbyCompatNIC(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const mac = "52:54:00:aa:00:01"
	withNIC := func(name, addr string) string {
		x := lvtest.Domain{Name: name, MemoryMiB: 64, Shared: true}.XML()
		return strings.Replace(x, "  </devices>", "    <interface type='ethernet'><mac address='"+mac+"'/><target dev='"+name+"'/><model type='virtio'/>"+addr+"</interface>\n  </devices>", 1)
	}
	if err := lv.DefineAndStart(ctx, "lvt-rp", withNIC("lvt-rp", "")); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rp, err := conn.LookupDomain(ctx, "lvt-rp")
	if err != nil {
		t.Fatal(err)
	}
	if p := strings.Join(rp.StandbyProblems(), "; "); !strings.Contains(p, libvirt.StandbyNICAddress) {
		t.Fatalf("NIC behind a root port: problems %q", p)
	}
	if _, err := conn.DefinedSpec(ctx, "lvt-rp"); !errors.Is(err, libvirt.ErrStandbyIncompatible) || !strings.Contains(err.Error(), libvirt.StandbyNICAddress) {
		t.Fatalf("DefinedSpec of a domain with its NIC behind a root port: %v", err)
	}
	if _, err := lv.Virsh(ctx, "destroy", "lvt-rp"); err != nil {
		t.Fatal(err)
	}

	// The backup's view: the domain is defined here, not running.
	const name = "lvt-nic"
	if err := lv.Define(ctx, name, withNIC(name, libvirt.StandbyNICAddress)); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	local, err := conn.DefinedSpec(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("defined spec: %+v", local)
	if local.Name != name || local.MemoryMiB != 64 || local.CPUs != 1 || local.MAC != mac || !strings.HasPrefix(local.Machine, "pc-q35-") || local.Accel != "" ||
		local.Tap != "" || local.RAMPath != "" || local.QMPPath != "" || local.SerialPath != "" || local.Binary != "" {
		t.Fatalf("defined spec %+v", local)
	}
	if out, err := lv.Virsh(ctx, "domstate", name); err != nil || strings.TrimSpace(out) != "shut off" {
		t.Fatalf("DefinedSpec changed the domain's state: %q %v", out, err)
	}

	// The primary's view: the same domain running.
	g, _ := startAttached(ctx, t, lv, name)
	// A running domain's DefinedSpec is its definition too.
	if again, err := conn.DefinedSpec(ctx, name); err != nil || qemu.CheckCompatible(again, local) != nil {
		t.Fatalf("DefinedSpec of the running domain: %+v, %v", again, err)
	}
	time.Sleep(500 * time.Millisecond)
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	bm := dirtymap.New(g.NumPages())
	if err := g.HarvestDirty(ctx, bm); err != nil {
		t.Fatal(err)
	}
	state, err := g.SaveDeviceState(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	machine, err := qemu.ParseConfig(g.Config())
	if err != nil {
		t.Fatal(err)
	}
	if err := qemu.CheckCompatible(machine, local); err != nil {
		t.Fatal(err)
	}
	// A backup configured with another machine type is refused by name.
	other := local
	other.Machine = "q35"
	if err := qemu.CheckCompatible(machine, other); !errors.Is(err, qemu.ErrIncompatible) || !strings.Contains(err.Error(), "machine: primary \""+local.Machine+"\", this backup \"q35\"") {
		t.Fatalf("machine alias vs versioned: %v", err)
	}

	dir, _ := os.MkdirTemp("/dev/shm", "lvt-compat-")
	defer os.RemoveAll(dir)
	spec := local
	spec.RAMPath, spec.QMPPath, spec.Tap = filepath.Join(dir, "r.ram"), filepath.Join(dir, "q.sock"), "lvtapb"
	defer exec.Command("ip", "link", "del", "lvtapb").Run()
	rep, err := qemu.NewReplica(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	copy(rep.Memory(), g.Memory())
	if err := rep.CommitDeviceState(1, state); err != nil {
		t.Fatal(err)
	}
	ag, err := rep.Activate(ctx)
	if err != nil {
		t.Fatalf("activate: %v", err)
	}
	defer ag.Close()
	t.Logf("activated")
}

// TestDefinedSpecRefusals: the backup's definition of a domain is refused
// when the primary's would be (private memory, devices the standby lacks),
// and unknown or invalid names are refused naming them.
func TestDefinedSpecRefusals(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := lv.Define(ctx, "lvt-priv", lvtest.Domain{Name: "lvt-priv", MemoryMiB: 64}.XML()); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	balloon := strings.Replace(lvtest.Domain{Name: "lvt-balloon", MemoryMiB: 64, Shared: true}.XML(),
		"<memballoon model='none'/>", "<memballoon model='virtio'/>", 1)
	if err := lv.Define(ctx, "lvt-balloon", balloon); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	_, err = conn.DefinedSpec(ctx, "lvt-priv")
	if !errors.Is(err, libvirt.ErrNotSharedMemory) || !strings.Contains(err.Error(), libvirt.SharedMemoryXML) || !strings.Contains(err.Error(), `"lvt-priv"`) {
		t.Errorf("private memory: %v", err)
	}
	t.Logf("private memory: %v", err)

	_, err = conn.DefinedSpec(ctx, "lvt-balloon")
	if !errors.Is(err, libvirt.ErrStandbyIncompatible) || !strings.Contains(err.Error(), "memballoon model='none'") || !strings.Contains(err.Error(), `"lvt-balloon"`) {
		t.Errorf("balloon: %v", err)
	}
	t.Logf("balloon: %v", err)

	_, err = conn.DefinedSpec(ctx, "no-such-domain")
	if err == nil || !strings.Contains(err.Error(), "no-such-domain") || !strings.Contains(err.Error(), "DomainLookupByName") {
		t.Errorf("unknown domain: %v", err)
	}
	t.Logf("unknown: %v", err)

	for _, bad := range []string{"../lvt-priv", "a,b", "-x", ""} {
		_, err = conn.DefinedSpec(ctx, bad)
		if err == nil || !strings.Contains(err.Error(), "is not valid") || strings.Contains(err.Error(), "DomainLookupByName") {
			t.Errorf("name %q: %v", bad, err)
		}
	}
}

// startAttached starts the defined domain name, attaches to it as a
// primary would (closed when the test ends) and checks that a standby
// built from its definition could load its state.
func startAttached(ctx context.Context, t *testing.T, lv *lvtest.Libvirtd, name string) (*qemu.Guest, *libvirt.Domain) {
	t.Helper()
	if _, err := lv.Virsh(ctx, "start", name); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	g, dom, err := conn.Attach(ctx, name, libvirt.Options{}, qemu.MonitorGuestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	if err := dom.CheckStandby(); err != nil {
		t.Fatal(err)
	}
	return g, dom
}
