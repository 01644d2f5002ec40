package libvirt_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/libvirt/lvtest"
	"github.com/remusd/remusd/hypervisor/qemu"
)

const pageSize = hypervisor.PageSize

func TestConfigResolve(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := libvirt.Dial(ctx, libvirt.Config{URI: "xen:///system"})
	if err == nil || !strings.Contains(err.Error(), "qemu:///system") {
		t.Fatalf("bad URI accepted or unclear: %v", err)
	}
	_, err = libvirt.Dial(ctx, libvirt.Config{Socket: "/nonexistent/libvirt-sock"})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/libvirt-sock") {
		t.Fatalf("dial of a missing socket: %v", err)
	}
}

// TestLibvirtCheckpoint runs checkpoint epochs on a libvirt-managed VM
// through libvirt's QMP passthrough and checks every harvest is exact.
func TestLibvirtCheckpoint(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const name = "lvt-ckpt"
	if err := lv.DefineAndStart(ctx, name, lvtest.Domain{Name: name, MemoryMiB: 64, Shared: true}.XML()); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{URI: lv.URI()})
	if err != nil {
		t.Fatal(err)
	}
	g, dom, err := conn.Attach(ctx, name, libvirt.Options{}, qemu.MonitorGuestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if !strings.HasPrefix(g.BackendVersion(), "qemu-") {
		t.Fatalf("version %q", g.BackendVersion())
	}
	t.Logf("QEMU %s, %d pages, RAM file under %s", g.BackendVersion(), g.NumPages(), lv.RAMDir)
	if g.NumPages() != 64<<20/pageSize || g.Name() != name || g.Backend() != qemu.BackendName {
		t.Fatalf("pages %d name %q backend %q", g.NumPages(), g.Name(), g.Backend())
	}
	ram, err := dom.RAMPath(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(ram, lv.RAMDir+"/libvirt/qemu/") || !strings.HasSuffix(ram, "-"+name+"/pc.ram") {
		t.Errorf("RAM file %s, want <memory_backing_dir>/libvirt/qemu/<id>-%s/pc.ram", ram, name)
	}
	spec, err := qemu.ParseConfig(g.Config())
	if err != nil || spec.Name != name || spec.MemoryMiB != 64 {
		t.Fatalf("config %+v: %v", spec, err)
	}
	// A writer standing in for guest stores (the BIOS-only guest writes
	// little once idle): a second read-write mapping of the RAM file.
	f, err := os.OpenFile(ram, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	w, err := unix.Mmap(int(f.Fd()), 0, g.NumPages()*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(w)

	rng := rand.New(rand.NewSource(1))
	prev := make([]byte, len(g.Memory()))
	bm := dirtymap.New(g.NumPages())
	var state []byte
	for epoch := 0; epoch < 6; epoch++ {
		var wrote []int
		if epoch > 0 {
			// Write while running; these must show up in this epoch.
			for i := 0; i < 50; i++ {
				p := 4096/4 + rng.Intn(g.NumPages()-4096/4) // above the low 4 MiB the BIOS uses
				w[p*pageSize+rng.Intn(pageSize)] ^= byte(1 + rng.Intn(255))
				wrote = append(wrote, p)
			}
		}
		t0 := time.Now()
		if err := g.Pause(ctx); err != nil {
			t.Fatalf("epoch %d: %v", epoch, err)
		}
		st, err := dom.State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		bm.Reset()
		if err := g.HarvestDirty(ctx, bm); err != nil {
			t.Fatalf("epoch %d: %v", epoch, err)
		}
		state, err = g.SaveDeviceState(ctx, state[:0])
		if err != nil {
			t.Fatalf("epoch %d: %v", epoch, err)
		}
		mem := g.Memory()
		changed, missing := 0, 0
		for p := 0; p < g.NumPages(); p++ {
			if !bytes.Equal(mem[p*pageSize:(p+1)*pageSize], prev[p*pageSize:(p+1)*pageSize]) {
				changed++
				if !bm.Test(p) {
					missing++
				}
			}
		}
		for _, p := range wrote {
			if !bm.Test(p) {
				t.Errorf("epoch %d: page %d written since the last epoch is not in the harvest", epoch, p)
			}
		}
		if missing > 0 {
			t.Fatalf("epoch %d: %d of %d changed pages missing from the harvest", epoch, missing, changed)
		}
		if epoch == 0 && bm.Count() != g.NumPages() {
			t.Fatalf("first harvest reports %d pages, want all %d", bm.Count(), g.NumPages())
		}
		copy(prev, mem)
		if err := g.Resume(ctx); err != nil {
			t.Fatalf("epoch %d: %v", epoch, err)
		}
		t.Logf("epoch %d: libvirt state while paused %d, %d pages harvested (%d changed), device state %d bytes, pause %v",
			epoch, st, bm.Count(), changed, len(state), time.Since(t0).Round(time.Microsecond))
		if len(state) < 1000 || !bytes.HasPrefix(state, []byte("QEVM")) {
			t.Fatalf("epoch %d: device state %d bytes, prefix %q", epoch, len(state), state[:min(4, len(state))])
		}
		time.Sleep(20 * time.Millisecond)
	}
	st, err := dom.State(ctx)
	if err != nil || st != 1 {
		t.Fatalf("domain state after resume %d (%v), want running", st, err)
	}

	// A QEMU error passes through as a CommandError.
	err = g.Monitor().Execute(ctx, "no-such-command", nil, nil)
	var ce *qemu.CommandError
	if !errors.As(err, &ce) || ce.Class == "" {
		t.Fatalf("unknown command: %v", err)
	}

	// The domain going away is reported on Exited and as ErrQEMUExited.
	if _, err := lv.Virsh(ctx, "destroy", name); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.Exited():
	case <-time.After(5 * time.Second):
		t.Fatal("Exited not closed after the domain was destroyed")
	}
	if err := g.Pause(ctx); !errors.Is(err, qemu.ErrQEMUExited) || !strings.Contains(err.Error(), name) {
		t.Fatalf("pause of a destroyed domain: %v", err)
	}
}

// TestLibvirtRefusesPrivateMemory: a domain without shared file memory
// backing is refused with what to add to its XML.
func TestLibvirtRefusesPrivateMemory(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const name = "lvt-private"
	if err := lv.DefineAndStart(ctx, name, lvtest.Domain{Name: name, MemoryMiB: 64}.XML()); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _, err = conn.Attach(ctx, name, libvirt.Options{}, qemu.MonitorGuestOptions{})
	if !errors.Is(err, libvirt.ErrNotSharedMemory) {
		t.Fatalf("want ErrNotSharedMemory, got %v", err)
	}
	for _, want := range []string{`"` + name + `"`, libvirt.SharedMemoryXML, "no <memoryBacking>"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	t.Logf("refused: %v", err)

	_, _, err = conn.Attach(ctx, "no-such-domain", libvirt.Options{}, qemu.MonitorGuestOptions{})
	if err == nil || !strings.Contains(err.Error(), "no-such-domain") || !strings.Contains(err.Error(), "DomainLookupByName") {
		t.Fatalf("missing domain: %v", err)
	}
}
