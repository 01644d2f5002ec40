package libvirt_test

import (
	"context"
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

// TestStandbyCompatNIC: device state saved by libvirt's QEMU (q35 domain
// with a virtio NIC at 00:01.0, as StandbyProblems asks) loads into the
// directly launched standby built from the domain's Spec; with libvirt's
// default NIC placement (behind a pcie-root-port) StandbyProblems says so.
func TestStandbyCompatNIC(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	withNIC := func(name, addr string) string {
		x := lvtest.Domain{Name: name, MemoryMiB: 64, Shared: true}.XML()
		return strings.Replace(x, "  </devices>", "    <interface type='ethernet'><mac address='52:54:00:aa:00:01'/><target dev='"+name+"'/><model type='virtio'/>"+addr+"</interface>\n  </devices>", 1)
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
	if _, err := lv.Virsh(ctx, "destroy", "lvt-rp"); err != nil {
		t.Fatal(err)
	}

	if err := lv.DefineAndStart(ctx, "lvt-nic", withNIC("lvt-nic", libvirt.StandbyNICAddress)); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn2, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	g, dom, err := conn2.Attach(ctx, "lvt-nic", libvirt.Options{}, qemu.MonitorGuestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if p := dom.StandbyProblems(); len(p) != 0 {
		t.Fatalf("problems %q", p)
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
	spec, err := qemu.ParseConfig(g.Config())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("spec from the domain: %+v", spec)
	dir, _ := os.MkdirTemp("/dev/shm", "lvt-compat-")
	defer os.RemoveAll(dir)
	spec.RAMPath, spec.QMPPath, spec.SerialPath, spec.Tap = filepath.Join(dir, "r.ram"), filepath.Join(dir, "q.sock"), "", "lvtapb"
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
