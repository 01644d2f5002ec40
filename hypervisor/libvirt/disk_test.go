package libvirt_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/libvirt/lvtest"
	"github.com/remusd/remusd/hypervisor/qemu"
)

const diskMiB = 16

// newImage makes a sparse raw image of size bytes.
func newImage(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// withDevices adds XML inside <devices>.
func withDevices(x string, devs ...string) string {
	return strings.Replace(x, "  </devices>", "    "+strings.Join(devs, "\n    ")+"\n  </devices>", 1)
}

// hmp runs an HMP command through the passthrough and fails on qemu-io's
// error messages.
func hmp(ctx context.Context, t *testing.T, m qemu.Monitor, cmd string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out string
	if err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	if strings.Contains(out, "failed") || strings.Contains(out, "rror") {
		t.Fatalf("%s: %s", cmd, out)
	}
	return out
}

func readImage(t *testing.T, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

type jobView struct {
	Device string `json:"device"`
	Status string `json:"status"`
}

func blockJobs(ctx context.Context, t *testing.T, m qemu.Monitor) []jobView {
	t.Helper()
	var jobs []jobView
	if err := m.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		t.Fatal(err)
	}
	return jobs
}

func hasNode(ctx context.Context, t *testing.T, m qemu.Monitor, name string) bool {
	t.Helper()
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.NodeName == name {
			return true
		}
	}
	return false
}

// TestLibvirtDiskSeam: a running libvirt domain with a file-backed raw
// virtio disk gets remusd's seam live (write-blocking mirror to remusd's
// NBD server): writes reach the image and, in order and before they
// complete, the disk's journal; a write waits while the journal is full; a
// restarted daemon takes the job over; a job that is gone or paused fails
// the checkpoint;
// Remove takes the seam out and the guest's disk keeps working.
func TestLibvirtDiskSeam(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const name = "lvt-disk"
	img := filepath.Join(lv.Dir, name+".raw")
	newImage(t, img, diskMiB<<20)
	// discard='unmap': the guest's discards may reach the image (the
	// journal must then have them too).
	dxml := strings.Replace(libvirt.StandbyDiskXML("vda", img, 2), "type='raw'/>", "type='raw' discard='unmap'/>", 1)
	x := withDevices(lvtest.Domain{Name: name, MemoryMiB: 64, Shared: true}.XML(), dxml)
	if err := lv.DefineAndStart(ctx, name, x); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	// checkpoint is the engine's use of the guest: pause, harvest, resume.
	checkpoint := func(g *qemu.Guest) error {
		t.Helper()
		if err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := g.Resume(ctx); err != nil {
				t.Fatal(err)
			}
		}()
		return g.HarvestDirty(ctx, dirtymap.New(g.NumPages()))
	}
	attach := func(jb int64, deferred bool) (*qemu.Guest, *libvirt.Domain) {
		t.Helper()
		conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		g, dom, err := conn.Attach(ctx, name, libvirt.Options{Disks: libvirt.DiskOptions{JournalBytes: jb, Deferred: deferred}}, qemu.MonitorGuestOptions{})
		if err != nil {
			t.Fatalf("%v\n%s", err, lv.Log())
		}
		t.Logf("attach with the disk seam: %v", time.Since(start).Round(time.Millisecond))
		return g, dom
	}
	// The smallest journal: one 2 MiB write and its overhead.
	const jbytes = 2<<20 + disk.ChangeOverhead
	g, dom := attach(jbytes, false)
	if err := dom.CheckStandby(); err != nil {
		t.Fatal(err)
	}
	ds := g.Disks()
	if len(ds) != 1 || ds[0].ID != "vda" || ds[0].Image.Size() != diskMiB<<20 {
		t.Fatalf("disks %+v", ds)
	}
	var spec qemu.Spec
	if spec = g.Spec(); len(spec.Disks) != 1 || spec.Disks[0].ID != "vda" || spec.Disks[0].SizeBytes != diskMiB<<20 || spec.Disks[0].PCISlot != 2 {
		t.Fatalf("spec disks %+v", spec.Disks)
	}
	m := g.Monitor()
	if jobs := blockJobs(ctx, t, m); len(jobs) != 1 || jobs[0].Device != "remusd-vda" {
		t.Fatalf("jobs %+v", jobs)
	}
	qdev := dom.DiskSeam().Qdev("vda")
	io := func(cmd string) string { return hmp(ctx, t, m, fmt.Sprintf("qemu-io -d %s %q", qdev, cmd)) }

	// Writes (the BIOS may have read the disk; it does not write it). The
	// journal tracks (never blocks) until the engine's first cut.
	j := ds[0].Journal
	j.BeginPause()
	j.Cut()
	j.Release(1)
	start := time.Now()
	io("write -P 0x11 0 4k")
	t.Logf("one 4 KiB write through HMP qemu-io: %v", time.Since(start).Round(time.Microsecond))
	io("write -P 0x22 4k 4k")
	io("write -P 0x33 0 512")
	io("write -z 64k 64k")
	io("write -P 0x99 128k 64k")
	io("discard 128k 64k")
	if err := g.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	j.BeginPause()
	e := j.Cut()
	if err := g.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	var got []string
	flushes := 0
	for _, c := range e.Changes {
		if c.Kind == disk.KindFlush { // QMP stop flushes every node, the nbd one too
			flushes++
			continue
		}
		s := fmt.Sprintf("%s %d+%d", c.Kind, c.Offset, c.Length)
		if c.Kind == disk.KindWrite {
			s += fmt.Sprintf(" %#x", c.Data[0])
			if !bytes.Equal(c.Data, bytes.Repeat(c.Data[:1], len(c.Data))) {
				t.Errorf("change %s: data not uniform", s)
			}
		}
		got = append(got, s)
	}
	t.Logf("epoch %d: %q and %d flushes", e.Number, got, flushes)
	want := []string{"write 0+4096 0x11", "write 4096+4096 0x22", "write 0+512 0x33", "zero 65536+65536", "write 131072+65536 0x99"}
	if len(got) < len(want) || strings.Join(got[:len(want)], "|") != strings.Join(want, "|") {
		t.Fatalf("journal %q, want %q first", got, want)
	}
	for _, c := range got[len(want):] {
		if !strings.HasPrefix(c, "trim 131072+") {
			t.Fatalf("journal has %q after the writes", c)
		}
	}
	// The journal must say what the image holds: a discard that changed
	// the image must be in it.
	discarded := !bytes.Equal(readImage(t, img, 128<<10, 64<<10), bytes.Repeat([]byte{0x99}, 64<<10))
	if discarded && len(got) == len(want) {
		t.Fatal("the discard changed the image but is not in the journal")
	}
	t.Logf("discard: image changed %v, journal has it %v", discarded, len(got) > len(want))
	if b := readImage(t, img, 0, 8192); !bytes.Equal(b[:512], bytes.Repeat([]byte{0x33}, 512)) || !bytes.Equal(b[512:4096], bytes.Repeat([]byte{0x11}, 3584)) || !bytes.Equal(b[4096:], bytes.Repeat([]byte{0x22}, 4096)) {
		t.Fatalf("image does not hold the writes")
	}
	j.Release(e.Number)

	// Write-blocking: with the journal full, a write does not complete
	// until an epoch is released.
	io("write -P 0x44 1M 2M")
	done := make(chan string, 1)
	go func() {
		var out string
		c, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		err := m.Execute(c, "human-monitor-command", map[string]any{"command-line": fmt.Sprintf("qemu-io -d %s %q", qdev, "write -P 0x55 8k 4k")}, &out)
		if err != nil {
			out = err.Error()
		}
		done <- out
	}()
	select {
	case out := <-done:
		t.Fatalf("a write completed with the journal full: %q", out)
	case <-time.After(1500 * time.Millisecond):
	}
	if b := readImage(t, img, 8192, 4096); !bytes.Equal(b, bytes.Repeat([]byte{0x55}, 4096)) {
		t.Fatalf("the blocked write is not on the image yet (the source is written first)")
	}
	j.BeginPause()
	e = j.Cut()
	released := time.Now()
	j.Release(e.Number)
	select {
	case out := <-done:
		if strings.Contains(out, "failed") {
			t.Fatal(out)
		}
		t.Logf("the blocked write completed %v after the release", time.Since(released).Round(time.Microsecond))
	case <-time.After(20 * time.Second):
		t.Fatal("the write did not complete after the release")
	}
	if len(e.Changes) == 0 || e.Changes[0].Offset != 1<<20 || e.Changes[0].Length != 2<<20 {
		t.Fatalf("full journal's epoch: %+v", e.Changes)
	}

	// The per-checkpoint job check (HarvestDirty runs it): time it against
	// the pause itself.
	var pauses, checks []time.Duration
	for range 20 {
		start := time.Now()
		if err := g.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		pauses = append(pauses, time.Since(start))
		start = time.Now()
		if err := dom.DiskSeam().Check(ctx); err != nil {
			t.Fatal(err)
		}
		checks = append(checks, time.Since(start))
		if err := g.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("pause (stop, query-status): %s; the job check (query-block-jobs): %s", durStats(pauses), durStats(checks))
	if err := checkpoint(g); err != nil {
		t.Fatal(err)
	}

	// A restarting daemon: Detach leaves the job; the next attach takes it
	// over and its journal gets the writes.
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	g, dom = attach(0, false)
	m = g.Monitor()
	if jobs := blockJobs(ctx, t, m); len(jobs) != 1 || jobs[0].Device != "remusd-vda" {
		t.Fatalf("jobs after re-attach %+v", jobs)
	}
	j = g.Disks()[0].Journal
	j.BeginPause()
	if e = j.Cut(); !e.Tracked { // a new journal tracks until its first cut
		t.Fatalf("a new seam's journal is not tracking: %+v", e)
	}
	io("write -P 0x66 12k 4k")
	j.BeginPause()
	e = j.Cut()
	if n := len(e.Changes); n == 0 || e.Changes[n-1].Offset != 12<<10 || e.Changes[n-1].Data[0] != 0x66 {
		t.Fatalf("re-attached journal: %d changes", n)
	}

	// Unprotect: the job and the nbd node go, the disk keeps working.
	start = time.Now()
	if err := dom.DiskSeam().Remove(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("remove the seam: %v", time.Since(start).Round(time.Millisecond))
	if jobs := blockJobs(ctx, t, m); len(jobs) != 0 {
		t.Fatalf("jobs after remove %+v", jobs)
	}
	if hasNode(ctx, t, m, "remusd-vda-nbd") || hasNode(ctx, t, m, "remusd-vda-mirror") {
		t.Fatal("remusd's nodes left after remove")
	}
	if len(g.Disks()) != 0 {
		t.Fatal("disks after remove")
	}
	io("write -P 0x77 16k 4k")
	if b := readImage(t, img, 16<<10, 4096); !bytes.Equal(b, bytes.Repeat([]byte{0x77}, 4096)) {
		t.Fatal("write after remove is not on the image")
	}
	if err := checkpoint(g); err != nil {
		t.Fatalf("checkpoint without a seam: %v", err)
	}
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}

	// Deferred (the daemon's way): no seam until Start. A job that went
	// away (here cancelled by hand) fails the checkpoint's harvest (the
	// pause itself succeeds: fencing and restarts only want the guest
	// stopped).
	g, dom = attach(0, true)
	defer g.Close()
	m = g.Monitor()
	if len(g.Disks()) != 0 || len(blockJobs(ctx, t, m)) != 0 {
		t.Fatal("deferred attach built the seam")
	}
	if err := dom.DiskSeam().Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dom.DiskSeam().Start(ctx); err != nil { // up: nothing to do
		t.Fatal(err)
	}
	if len(g.Disks()) != 1 || len(blockJobs(ctx, t, m)) != 1 {
		t.Fatal("Start did not build the seam")
	}
	if err := m.Execute(ctx, "block-job-cancel", map[string]any{"device": "remusd-vda", "force": true}, nil); err != nil {
		t.Fatal(err)
	}
	for i := 0; len(blockJobs(ctx, t, m)) > 0; i++ {
		if i > 100 {
			t.Fatal("job still there")
		}
		time.Sleep(20 * time.Millisecond)
	}
	err := checkpoint(g)
	if err == nil || !strings.Contains(err.Error(), "remusd-vda is gone") {
		t.Fatalf("checkpoint with the job gone: %v", err)
	}
	t.Logf("checkpoint with the job gone: %v", err)
	if err := dom.DiskSeam().Remove(ctx); err != nil {
		t.Fatal(err)
	}
	// Discards without the seam, for comparison (the mirror's filter node
	// drops them: QEMU 7.2 opens it without BDRV_O_UNMAP).
	io("write -P 0x99 192k 64k")
	io("discard 192k 64k")
	t.Logf("discard without the seam changes the image: %v", !bytes.Equal(readImage(t, img, 192<<10, 64<<10), bytes.Repeat([]byte{0x99}, 64<<10)))

	// A paused job (here by hand) fails the checkpoint too.
	if err := dom.DiskSeam().Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx, "block-job-pause", map[string]any{"device": "remusd-vda"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := checkpoint(g); err == nil || !strings.Contains(err.Error(), "not copying writes") {
		t.Fatalf("checkpoint with the job paused: %v", err)
	}

	// A daemon away longer than the nbd node's reconnect-delay: the
	// guest's write completes anyway, the job stops with io-status failed
	// at once (on-target-error=stop), and the next attach replaces it.
	if err := m.Execute(ctx, "block-job-resume", map[string]any{"device": "remusd-vda"}, nil); err != nil {
		t.Fatal(err)
	}
	if err := g.Detach(); err != nil {
		t.Fatal(err)
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	d2, err := conn.LookupDomain(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	m2 := d2.Monitor()
	defer m2.Close()
	start = time.Now()
	hmp(ctx, t, m2, fmt.Sprintf("qemu-io -d %s %q", qdev, "write -P 0x88 20k 4k"))
	t.Logf("a write with no server: completed after %v", time.Since(start).Round(time.Millisecond))
	if b := readImage(t, img, 20<<10, 4096); !bytes.Equal(b, bytes.Repeat([]byte{0x88}, 4096)) {
		t.Fatal("the write with no server is not on the image")
	}
	var jobs []struct {
		Device   string `json:"device"`
		Paused   bool   `json:"paused"`
		IOStatus string `json:"io-status"`
		Status   string `json:"status"`
	}
	if err := m2.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 1 || !jobs[0].Paused || jobs[0].IOStatus != "failed" {
		t.Fatalf("job after a failed copy: %+v", jobs)
	}
	t.Logf("job after a failed copy: %+v", jobs[0])
	g, _ = attach(0, false)
	defer g.Close()
	m = g.Monitor()
	if err := checkpoint(g); err != nil {
		t.Fatalf("checkpoint after the job was replaced: %v", err)
	}
	io("write -P 0x89 24k 4k")
	if st := g.Disks()[0].Journal.Stats(); st.Used == 0 && st.DirtyBlocks == 0 {
		t.Fatal("the replaced job's journal is empty")
	}
}

// durStats is "n N p50 X max Y" of ds.
func durStats(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	return fmt.Sprintf("n %d p50 %v max %v", len(s), s[len(s)/2].Round(10*time.Microsecond), s[len(s)-1].Round(10*time.Microsecond))
}

// TestStandbyCompatDisk: the device state of a running domain with a NIC
// at 00:01.0 and a raw virtio disk at 00:03.0 (as StandbyProblems asks)
// loads into a standby built from DefinedSpec, which serves its replica
// image over NBD, and the activated standby reads the primary's data from
// that image.
func TestStandbyCompatDisk(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const name, mac = "lvt-cdisk", "52:54:00:aa:00:02"
	img := filepath.Join(lv.Dir, name+".raw")
	newImage(t, img, diskMiB<<20)
	nic := "<interface type='ethernet'><mac address='" + mac + "'/><target dev='" + name + "'/><model type='virtio'/>" + libvirt.StandbyNICAddress + "</interface>"
	// Slot 3, not the first free one (2): the standby must honour it.
	x := withDevices(lvtest.Domain{Name: name, MemoryMiB: 64, Shared: true}.XML(), nic, libvirt.StandbyDiskXML("vda", img, 3))
	if err := lv.Define(ctx, name, x); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local, err := conn.DefinedSpec(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(local.Disks) != 1 || local.Disks[0].ID != "vda" || local.Disks[0].Path != img || local.Disks[0].SizeBytes != diskMiB<<20 || local.Disks[0].PCISlot != 3 {
		t.Fatalf("defined spec disks %+v", local.Disks)
	}
	g, dom := startAttached(ctx, t, lv, name)
	hmp(ctx, t, g.Monitor(), fmt.Sprintf("qemu-io -d %s %q", dom.DiskSeam().Qdev("vda"), "write -P 0x5a 0 64k"))
	time.Sleep(300 * time.Millisecond)
	if err := g.Pause(ctx); err != nil {
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
	other := local
	other.Disks = append([]qemu.DiskSpec(nil), local.Disks...)
	other.Disks[0].PCISlot = 4
	if err := qemu.CheckCompatible(machine, other); !errors.Is(err, qemu.ErrIncompatible) || !strings.Contains(err.Error(), "@00:04.0") {
		t.Fatalf("disk at another slot: %v", err)
	}

	dir, _ := os.MkdirTemp("/dev/shm", "lvt-cdisk-")
	defer os.RemoveAll(dir)
	spec := local
	// The same host plays the backup: its replica image must not be the
	// primary's.
	spec.Disks = []qemu.DiskSpec{local.Disks[0]}
	spec.Disks[0].Path = filepath.Join(lv.Dir, "replica.raw")
	spec.RAMPath, spec.QMPPath, spec.Tap = filepath.Join(dir, "r.ram"), filepath.Join(dir, "q.sock"), "lvtapd"
	defer exec.Command("ip", "link", "del", "lvtapd").Run()
	rep, err := qemu.NewReplica(ctx, spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	copy(rep.Memory(), g.Memory())
	rd := rep.ReplicaDisks()
	if len(rd) != 1 {
		t.Fatalf("replica disks %+v", rd)
	}
	data := readImage(t, img, 0, 64<<10)
	if err := rd[0].Image.WriteAt(ctx, data, 0); err != nil {
		t.Fatal(err)
	}
	if err := rep.CommitDeviceState(1, state); err != nil {
		t.Fatal(err)
	}
	ag, err := rep.Activate(ctx)
	if err != nil {
		t.Fatalf("activate: %v", err)
	}
	defer ag.Close()
	aq, ok := ag.(*qemu.Guest)
	if !ok {
		t.Fatalf("activated guest is %T", ag)
	}
	hmp(ctx, t, aq.Monitor(), `qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x6b 64k 4k"`)
	if b := readImage(t, spec.Disks[0].Path, 0, 68<<10); !bytes.Equal(b[:64<<10], data) || !bytes.Equal(b[64<<10:], bytes.Repeat([]byte{0x6b}, 4096)) {
		t.Fatal("the activated standby's disk is not the replica image")
	}
	t.Logf("activated; the standby's disk is the replica image")
}

// TestDiskXMLRefusals: disks the standby could not reproduce are refused
// with the XML to use; a backup whose image is missing is told so.
func TestDiskXMLRefusals(t *testing.T) {
	lv := lvtest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	img := filepath.Join(lv.Dir, "r.raw")
	newImage(t, img, diskMiB<<20)
	base := func(n string) string { return lvtest.Domain{Name: n, MemoryMiB: 64, Shared: true}.XML() }
	cases := []struct {
		name, disk, want string
	}{
		{"lvt-qcow", strings.Replace(libvirt.StandbyDiskXML("vda", img, 2), "type='raw'", "type='qcow2'", 1), "type='raw'"},
		{"lvt-sata", "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='" + img + "'/><target dev='sda' bus='sata'/></disk>", "bus='virtio'"},
		{"lvt-rport", "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='" + img + "'/><target dev='vda' bus='virtio'/></disk>", libvirt.StandbyDiskXML("vda", img, 2)},
		{"lvt-queues", strings.Replace(libvirt.StandbyDiskXML("vda", img, 2), "type='raw'/>", "type='raw' queues='2'/>", 1), "queues=\"2\""},
		{"lvt-wt", strings.Replace(libvirt.StandbyDiskXML("vda", img, 2), "type='raw'/>", "type='raw' cache='writethrough'/>", 1), "write cache off"},
		{"lvt-cdrom", "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='" + img + "'/><target dev='sda' bus='sata'/><readonly/></disk>", "device \"cdrom\""},
	}
	conn, err := libvirt.Dial(ctx, libvirt.Config{Socket: lv.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, c := range cases {
		if err := lv.Define(ctx, c.name, withDevices(base(c.name), c.disk)); err != nil {
			t.Fatalf("%s: %v\n%s", c.name, err, lv.Log())
		}
		_, err := conn.DefinedSpec(ctx, c.name)
		if !errors.Is(err, libvirt.ErrStandbyIncompatible) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v (want %q)", c.name, err, c.want)
		}
		t.Logf("%s: %v", c.name, err)
	}
	// The backup's image of the disk must exist.
	missing := filepath.Join(lv.Dir, "missing.raw")
	if err := lv.Define(ctx, "lvt-noimg", withDevices(base("lvt-noimg"), libvirt.StandbyDiskXML("vda", missing, 2))); err != nil {
		t.Fatalf("%v\n%s", err, lv.Log())
	}
	_, err = conn.DefinedSpec(ctx, "lvt-noimg")
	if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "create the replica image") || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing image: %v", err)
	}
	t.Logf("missing image: %v", err)
}
