package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/disk"
)

func TestDiskSpecValidation(t *testing.T) {
	s := testSpec(t, "d", 128)
	s.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 1 << 20, Path: "/x/a.img"}}
	if err := s.Validate(); err != nil {
		t.Fatalf("valid disk refused: %v", err)
	}
	for name, d := range map[string][]DiskSpec{
		"bad id":        {{ID: "Disk0", SizeBytes: 1 << 20, Path: "/a"}},
		"id with comma": {{ID: "d,x", SizeBytes: 1 << 20, Path: "/a"}},
		"duplicate":     {{ID: "d", SizeBytes: 512, Path: "/a"}, {ID: "d", SizeBytes: 512, Path: "/b"}},
		"odd size":      {{ID: "d", SizeBytes: 1000, Path: "/a"}},
		"zero size":     {{ID: "d", Path: "/a"}},
		"huge size":     {{ID: "d", SizeBytes: maxDiskBytes + 512, Path: "/a"}},
		"relative path": {{ID: "d", SizeBytes: 512, Path: "a.img"}},
		"long socket":   {{ID: "d", SizeBytes: 512, Path: "/a", Socket: "/" + strings.Repeat("s", 120)}},
		"slot 0x1f":     {{ID: "d", SizeBytes: 512, Path: "/a", PCISlot: 0x1f}},
		"slot -1":       {{ID: "d", SizeBytes: 512, Path: "/a", PCISlot: -1}},
		"same slot":     {{ID: "d", SizeBytes: 512, Path: "/a", PCISlot: 2}, {ID: "e", SizeBytes: 512, Path: "/b", PCISlot: 2}},
	} {
		s.Disks = d
		if err := s.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A peer's description is checked too (ids and sizes; no paths).
	p := testSpec(t, "d", 128)
	p.Disks = []DiskSpec{{ID: "bad id", SizeBytes: 512}}
	if _, err := ParseConfig(p.Config()); err == nil {
		t.Error("ParseConfig accepted a bad disk id")
	}
}

func TestDiskConfigAndCompat(t *testing.T) {
	p := testSpec(t, "d", 128)
	p.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 8 << 20, Path: "/primary/secret.img"}}
	if strings.Contains(string(p.Config()), "secret") {
		t.Fatalf("Config leaks the host-local image path: %s", p.Config())
	}
	got, err := ParseConfig(p.Config())
	if err != nil {
		t.Fatal(err)
	}
	local := testSpec(t, "d", 128)
	local.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 8 << 20, Path: "/backup/replica.img"}}
	if err := CheckCompatible(got, local); err != nil {
		t.Fatalf("same disks on another path: %v", err)
	}
	// Slot 0 is not sent: an older peer (which knows no pci_slot and
	// refuses unknown fields) still parses a description without one.
	if strings.Contains(string(p.Config()), "pci_slot") {
		t.Fatalf("pci_slot 0 is sent: %s", p.Config())
	}
	slotted := p
	slotted.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 8 << 20, PCISlot: 5}}
	gotSlot, err := ParseConfig(slotted.Config())
	if err != nil || gotSlot.Disks[0].PCISlot != 5 {
		t.Fatalf("pci_slot round trip: %+v %v", gotSlot.Disks, err)
	}
	local.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 8 << 20, Path: "/b", PCISlot: 5}}
	if err := CheckCompatible(gotSlot, local); err != nil {
		t.Fatalf("same slot: %v", err)
	}
	for name, d := range map[string][]DiskSpec{
		"other slot": {{ID: "disk0", SizeBytes: 8 << 20, Path: "/b", PCISlot: 6}},
		"no slot":    {{ID: "disk0", SizeBytes: 8 << 20, Path: "/b"}},
	} {
		local.Disks = d
		if err := CheckCompatible(gotSlot, local); !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "disk0:8388608@00:05.0") {
			t.Errorf("%s: %v", name, err)
		}
	}
	for name, d := range map[string][]DiskSpec{
		"other size": {{ID: "disk0", SizeBytes: 16 << 20, Path: "/b"}},
		"other id":   {{ID: "disk1", SizeBytes: 8 << 20, Path: "/b"}},
		"no disk":    nil,
	} {
		local.Disks = d
		err := CheckCompatible(got, local)
		if !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "disks") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestCreateImageKeepsAnExistingOne: a replica image is never created
// over an existing file (it may be the VM's newest disk): that file is
// renamed aside with its content, and the new image is sparse and empty.
func TestCreateImageKeepsAnExistingOne(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(path, []byte("the only good copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	aside, err := createImage(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(aside); err != nil || string(b) != "the only good copy" {
		t.Fatalf("the existing image moved to %q holds %q (%v)", aside, b, err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != 1<<20 {
		t.Fatalf("new image: %v %v", fi, err)
	}
	if b, _ := os.ReadFile(path); strings.Trim(string(b), "\x00") != "" {
		t.Fatal("new image is not empty")
	}
	if aside2, err := createImage(path, 1<<20); err != nil || aside2 == "" || aside2 == aside {
		t.Fatalf("second create: %q %v", aside2, err)
	}
	if err := os.Mkdir(filepath.Join(dir, "d.img"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := createImage(filepath.Join(dir, "d.img"), 1<<20); err == nil {
		t.Fatal("a directory at the image path was accepted")
	}
}

func TestDiskArgs(t *testing.T) {
	s := testSpec(t, "d", 128)
	s.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 1 << 20, Path: "/a.img"}}
	args := s.Args(false)
	i := slices.Index(args, "-blockdev")
	if i < 0 {
		t.Fatalf("no -blockdev in %q", args)
	}
	want := "driver=nbd,node-name=disk0,server.type=unix,server.path=" + strings.TrimSuffix(s.QMPPath, ".qmp") + ".disk0.nbd,export=disk0,reconnect-delay=60,discard=unmap"
	if args[i+1] != want {
		t.Errorf("blockdev %q, want %q", args[i+1], want)
	}
	if !slices.Contains(args, "virtio-blk-pci,drive=disk0,id=disk0") {
		t.Errorf("no virtio-blk device in %q", args)
	}
	s.Disks[0].PCISlot = 0x1e
	if args := s.Args(false); !slices.Contains(args, "virtio-blk-pci,drive=disk0,id=disk0,bus=pcie.0,addr=0x1e") {
		t.Errorf("no virtio-blk device at slot 0x1e in %q", args)
	}
}

// TestLaunchWithDiskServesImage: QEMU reaches the image only through
// remusd's NBD server; a write the guest's firmware cannot make is
// simulated through QMP's human monitor (qemu-io on the node), and the
// journal sees it before it completes.
func TestLaunchWithDiskServesImage(t *testing.T) {
	requireQEMU(t)
	spec := testSpec(t, "d", 128)
	img := filepath.Join(testDir(t), "disk.img")
	if _, err := createImage(img, 4<<20); err != nil {
		t.Fatal(err)
	}
	spec.Disks = []DiskSpec{{ID: "disk0", SizeBytes: 4 << 20, Path: img}}
	ctx := testCtx(t)
	g, err := LaunchWithDisks(ctx, spec, DiskOptions{JournalBytes: 8 << 20}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("LaunchWithDisks: %v", err)
	}
	defer g.Close()
	ds := g.Disks()
	if len(ds) != 1 || ds[0].ID != "disk0" || ds[0].Image.Size() != 4<<20 || ds[0].Journal == nil {
		t.Fatalf("Disks: %+v", ds)
	}
	// The journal starts in tracking mode (nothing releases its epochs
	// before protection): the first cut returns to journaling.
	ds[0].Journal.BeginPause()
	if ep := ds[0].Journal.Cut(); !ep.Tracked {
		t.Fatalf("a new disk's journal is not in tracking mode: %+v", ep)
	}
	var out string
	if err := g.QMP().Execute(ctx, "human-monitor-command", map[string]any{"command-line": `qemu-io -d /machine/peripheral/disk0/virtio-backend "write -P 0x5a 4096 8192"`}, &out); err != nil {
		t.Fatalf("qemu-io: %v", err)
	}
	if strings.Contains(out, "error") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io: %s", out)
	}
	t.Logf("qemu-io: %q", out)
	ds[0].Journal.BeginPause()
	ep := ds[0].Journal.Cut()
	var wrote int64
	for _, c := range ep.Changes {
		if c.Kind == disk.KindWrite {
			wrote += c.Length
		}
	}
	if wrote != 8192 {
		t.Fatalf("journal saw %d bytes written (%+v), want 8192", wrote, ep.Changes)
	}
	buf := make([]byte, 8192)
	if err := ds[0].Image.ReadAt(context.Background(), buf, 4096); err != nil {
		t.Fatal(err)
	}
	for i, b := range buf {
		if b != 0x5a {
			t.Fatalf("image byte %d = %#x, want 0x5a", 4096+i, b)
		}
	}
	if err := g.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := os.Stat(strings.TrimSuffix(spec.QMPPath, ".qmp") + ".disk0.nbd"); err == nil {
		t.Error("NBD socket left behind after Close")
	}
}
