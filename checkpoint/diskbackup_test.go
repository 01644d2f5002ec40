package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"hash/crc32"
	"net"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
	"google.golang.org/protobuf/proto"
)

// diskRig drives a Backup whose sim replica has a disk directly, as a
// primary would (or a hostile one could), frame by frame.
type diskRig struct {
	t    *testing.T
	cfg  sim.Config
	rep  *sim.Replica
	b    *Backup
	conn net.Conn
	r    *transport.Reader
	w    *transport.Writer
	errc chan error
	// flushesAtCommit is the replica disk's flush count when OnCommit ran
	// (after apply, before the ack).
	flushesAtCommit []int
}

const rigDisk = 256 << 10

func newDiskRig(t *testing.T, noSync bool) *diskRig {
	t.Helper()
	cfg := sim.Config{MemoryBytes: 256 << 10, Workload: "uniform", Seed: 5, OutputEvery: 8, DiskBytes: rigDisk}.WithDefaults()
	rep, err := sim.NewReplica("vm", cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	rig := &diskRig{t: t, cfg: cfg, rep: rep}
	rig.b = NewBackup(BackupOptions{VMName: "vm", Replica: rep, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, Owner: "host-a",
		HeartbeatInterval: time.Hour, HeartbeatTimeout: 10 * time.Second, NoDiskSync: noSync,
		OnCommit: func(uint64, []byte) { rig.flushesAtCommit = append(rig.flushesAtCommit, rep.Disk().Flushes()) }})
	return rig
}

func (rig *diskRig) hello(disks []*remuspb.DiskInfo) *remuspb.Welcome {
	rig.t.Helper()
	a, b := transport.Pipe()
	rig.conn = a
	rig.r = transport.NewReader(a, transport.DefaultLimits())
	rig.w = transport.NewWriter(a)
	rig.errc = make(chan error, 1)
	h := &remuspb.Hello{ProtocolVersion: ProtocolVersion, VmName: "vm", ProtectionId: "p", MemoryBytes: uint64(rig.cfg.MemoryBytes), PageSize: hypervisor.PageSize,
		Backend: sim.BackendName, BackendVersion: sim.BackendVersion, Disks: disks}
	go func() {
		rig.errc <- rig.b.Serve(context.Background(), b, transport.NewReader(b, transport.DefaultLimits()), transport.NewWriter(b), h, "host-a")
	}()
	f, err := rig.r.ReadFrame()
	if err != nil {
		rig.t.Fatal(err)
	}
	return f.Header.(*remuspb.Welcome)
}

func rigDisks() []*remuspb.DiskInfo { return []*remuspb.DiskInfo{{Id: sim.DiskID, Size: rigDisk}} }

// epochSpec is one epoch to send; tamper, if set, may change or drop
// (return false) each frame before it is written.
type epochSpec struct {
	epoch, base uint64
	full        bool
	ops         uint64 // the guest state (sim.Replay) the epoch carries
	pfns        []uint64
	changes     []disk.Change
	tamper      func(k transport.Kind, hdr any, payload []byte) ([]byte, bool)
	// stopAfter: the link dies after this many frames (0: never).
	stopAfter int
}

// send writes e's frames; it returns the ack, or the error Serve ended with.
func (rig *diskRig) send(e epochSpec) (uint64, error) {
	rig.t.Helper()
	mem, dev, err := sim.Replay(rig.cfg, e.ops)
	if err != nil {
		rig.t.Fatal(err)
	}
	if e.full {
		e.pfns = nil
		for i := 0; i < len(mem)/hypervisor.PageSize; i++ {
			e.pfns = append(e.pfns, uint64(i))
		}
	}
	pages := make([]byte, 0, len(e.pfns)*hypervisor.PageSize)
	for _, p := range e.pfns {
		pages = append(pages, mem[int(p)*hypervisor.PageSize:int(p+1)*hypervisor.PageSize]...)
	}
	frames := 0
	wf := func(k transport.Kind, hdr any, payload []byte) error {
		if e.tamper != nil {
			var ok bool
			if payload, ok = e.tamper(k, hdr, payload); !ok {
				return nil
			}
		}
		frames++
		if e.stopAfter > 0 && frames > e.stopAfter {
			rig.conn.Close()
			return errors.New("link cut")
		}
		return rig.w.WriteFrame(k, hdr.(proto.Message), payload)
	}
	var d transport.Digest
	if err := wf(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: e.epoch, BaseEpoch: e.base, PageCount: uint32(len(e.pfns)), Full: e.full, DiskChanges: uint32(len(e.changes))}, nil); err != nil {
		return 0, rig.end()
	}
	enc, _ := transport.NewEncoder(transport.EncoderConfig{PageSize: hypervisor.PageSize})
	sum, err := enc.EncodeEpoch(context.Background(), e.epoch, e.pfns, pages, func(h *remuspb.PageBatch, p []byte) error { return wf(transport.KindPageBatch, h, p) })
	if err != nil {
		return 0, rig.end()
	}
	d.AddPages(e.pfns, sum.PageHashes)
	if _, err := transport.NewDiskEncoder(transport.Limits{}).Encode(e.epoch, sim.DiskID, 0, e.changes, func(h *remuspb.DiskWrites, p []byte) error {
		return wf(transport.KindDiskWrites, h, p)
	}); err != nil {
		return 0, rig.end()
	}
	for _, c := range e.changes {
		d.AddDiskChange(sim.DiskID, c)
	}
	if err := wf(transport.KindDeviceState, &remuspb.DeviceState{Epoch: e.epoch, PayloadCrc32C: crc32.Checksum(dev, crcTable)}, dev); err != nil {
		return 0, rig.end()
	}
	if err := wf(transport.KindEpochEnd, &remuspb.EpochEnd{Epoch: e.epoch, PageCount: uint32(len(e.pfns)), Digest: d.Sum(dev), DiskChanges: uint32(len(e.changes))}, nil); err != nil {
		return 0, rig.end()
	}
	for {
		f, err := rig.r.ReadFrame()
		if err != nil {
			return 0, rig.end()
		}
		if a, ok := f.Header.(*remuspb.Ack); ok {
			return a.Epoch, nil
		}
	}
}

// end closes the link and returns Serve's error.
func (rig *diskRig) end() error {
	rig.conn.Close()
	select {
	case err := <-rig.errc:
		return err
	case <-time.After(10 * time.Second):
		rig.t.Fatal("Serve did not end")
		return nil
	}
}

// model applies changes in order to a copy of base.
func model(t *testing.T, base []byte, changes ...[]disk.Change) []byte {
	t.Helper()
	m := disk.NewMemory(len(base))
	ctx := context.Background()
	_ = m.WriteAt(ctx, base, 0)
	for _, cs := range changes {
		for _, c := range cs {
			if err := applyChange(ctx, m, c); err != nil {
				t.Fatal(err)
			}
		}
	}
	return m.Bytes()
}

func wr(off int64, n int, b byte) disk.Change {
	d := bytes.Repeat([]byte{b}, n)
	return disk.Change{Kind: disk.KindWrite, Offset: off, Length: int64(n), Data: d}
}

// firstEpoch commits a full epoch 1 with some disk writes.
func (rig *diskRig) firstEpoch() (mem, dsk []byte) {
	rig.t.Helper()
	ch := []disk.Change{wr(0, 4096, 1), wr(65536, 9000, 2), {Kind: disk.KindFlush}}
	if a, err := rig.send(epochSpec{epoch: 1, full: true, ops: 40, changes: ch}); err != nil || a != 1 {
		rig.t.Fatalf("epoch 1: ack %d, %v", a, err)
	}
	return append([]byte(nil), rig.rep.Memory()...), rig.rep.Disk().Bytes()
}

func (rig *diskRig) unchanged(mem, dsk []byte) {
	rig.t.Helper()
	if !bytes.Equal(mem, rig.rep.Memory()) {
		rig.t.Fatal("replica memory changed")
	}
	if !bytes.Equal(dsk, rig.rep.Disk().Bytes()) {
		rig.t.Fatal("replica disk changed")
	}
	if rig.b.Committed() != 1 {
		rig.t.Fatalf("committed %d", rig.b.Committed())
	}
	if e, _ := rig.rep.DeviceState(); e != 1 {
		rig.t.Fatalf("device state of epoch %d", e)
	}
}

// TestDiskTornEpochAppliesNeither: an epoch cut anywhere (before its end),
// or whose disk data was altered (digest mismatch), applies neither its
// memory nor its disk changes: the replica stays at epoch 1.
func TestDiskTornEpochAppliesNeither(t *testing.T) {
	for cut := 1; cut <= 4; cut++ {
		rig := newDiskRig(t, false)
		rig.hello(rigDisks())
		mem, dsk := rig.firstEpoch()
		_, err := rig.send(epochSpec{epoch: 2, base: 1, ops: 90, pfns: []uint64{0, 3, 7}, changes: []disk.Change{wr(0, 512, 9), {Kind: disk.KindTrim, Offset: 65536, Length: 4096}}, stopAfter: cut})
		if err == nil {
			t.Fatalf("cut after %d frames: acked", cut)
		}
		rig.unchanged(mem, dsk)
		if st := rig.b.Stats(); st.TornEpochsDiscarded != 1 {
			t.Fatalf("cut after %d frames: torn %d", cut, st.TornEpochsDiscarded)
		}
	}
	// Altered data with a matching crc: only the digest can tell.
	rig := newDiskRig(t, false)
	rig.hello(rigDisks())
	mem, dsk := rig.firstEpoch()
	_, err := rig.send(epochSpec{epoch: 2, base: 1, ops: 90, pfns: []uint64{0}, changes: []disk.Change{wr(0, 512, 9)},
		tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			if h, ok := hdr.(*remuspb.DiskWrites); ok {
				q := append([]byte(nil), p...)
				q[len(q)-1] ^= 1
				h.PayloadCrc32C = crc32.Checksum(q, crc32.MakeTable(crc32.Castagnoli))
				return q, true
			}
			return p, true
		}})
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("altered disk data: %v", err)
	}
	rig.unchanged(mem, dsk)
}

// TestDiskOrderedOverwriteAcrossEpochs: writes, trims and zeroes of
// several epochs overlap; each epoch applies in order on the last, and
// the disk ends as the changes applied one by one.
func TestDiskOrderedOverwriteAcrossEpochs(t *testing.T) {
	rig := newDiskRig(t, false)
	rig.hello(rigDisks())
	zero := make([]byte, rigDisk)
	e1 := []disk.Change{wr(0, 8192, 1), wr(4096, 4096, 2), {Kind: disk.KindTrim, Offset: 6000, Length: 100}, wr(100000, 30000, 3)}
	e2 := []disk.Change{{Kind: disk.KindZero, Offset: 0, Length: 1000, NoHole: true}, wr(500, 10, 4), {Kind: disk.KindFlush}, wr(100000, 5, 5), {Kind: disk.KindTrim, Offset: 110000, Length: 4096, FUA: true}}
	e3 := []disk.Change{wr(0, 4096, 6), {Kind: disk.KindZero, Offset: 2048, Length: 1024}, wr(rigDisk-1, 1, 7)}
	for i, ch := range [][]disk.Change{e1, e2, e3} {
		e := epochSpec{epoch: uint64(i + 1), base: uint64(i), ops: uint64(10 * (i + 1)), pfns: []uint64{0, 1}, changes: ch, full: i == 0}
		if a, err := rig.send(e); err != nil || a != e.epoch {
			t.Fatalf("epoch %d: ack %d, %v", e.epoch, a, err)
		}
		if want := model(t, zero, [][]disk.Change{e1, e2, e3}[:i+1]...); !bytes.Equal(want, rig.rep.Disk().Bytes()) {
			t.Fatalf("after epoch %d the disk differs from the changes applied in order", i+1)
		}
	}
	// Every epoch flushed the disk before its ack.
	if want := []int{1, 2, 3}; len(rig.flushesAtCommit) != 3 || rig.flushesAtCommit[0] != 1 || rig.flushesAtCommit[2] != 3 {
		t.Fatalf("flushes at commits %v, want %v", rig.flushesAtCommit, want)
	}
	if st := rig.b.Stats(); st.DiskFlushes != 3 || st.DiskChangesApplied != uint64(len(e1)+len(e2)+len(e3)) {
		t.Fatalf("stats %+v", st)
	}
	rig.end()
}

// TestDiskNoSyncSkipsFlush: NoDiskSync applies without flushing.
func TestDiskNoSyncSkipsFlush(t *testing.T) {
	rig := newDiskRig(t, true)
	rig.hello(rigDisks())
	rig.firstEpoch()
	if rig.rep.Disk().Flushes() != 0 || rig.b.Stats().DiskFlushes != 0 {
		t.Fatal("NoDiskSync flushed")
	}
	rig.end()
}

// TestDiskHelloMismatchRefused: a primary whose disks differ from the
// replica's in ids or sizes is refused before anything changes.
func TestDiskHelloMismatchRefused(t *testing.T) {
	for name, ds := range map[string][]*remuspb.DiskInfo{
		"none":      nil,
		"size":      {{Id: sim.DiskID, Size: rigDisk * 2}},
		"id":        {{Id: "disk1", Size: rigDisk}},
		"extra":     {{Id: sim.DiskID, Size: rigDisk}, {Id: "disk1", Size: rigDisk}},
		"duplicate": {{Id: sim.DiskID, Size: rigDisk}, {Id: sim.DiskID, Size: rigDisk}},
	} {
		rig := newDiskRig(t, false)
		wel := rig.hello(ds)
		if wel.Error == "" {
			t.Fatalf("%s: welcomed", name)
		}
		if err := rig.end(); !errors.Is(err, ErrProtocol) {
			t.Fatalf("%s: %v", name, err)
		}
		if rig.b.Stats().Refused != 1 {
			t.Fatalf("%s: not counted as refused", name)
		}
	}
}

// TestDiskHostileRecordsRefused: disk records a hostile or broken primary
// could send (ranges outside the disk, overflowing lengths, mismatched
// counts, more changes than announced, a bad checksum, an unknown disk,
// unknown kinds or flags, wrong totals, more data than an epoch may
// stage, a corrupt lz4 block, records out of order) end the link before
// anything is applied: the replica keeps epoch 1, memory and disk.
func TestDiskHostileRecordsRefused(t *testing.T) {
	lim := transport.DefaultLimits()
	dw := func(f func(h *remuspb.DiskWrites, p []byte) []byte) func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
		return func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			if h, ok := hdr.(*remuspb.DiskWrites); ok {
				q := f(h, append([]byte(nil), p...))
				return q, true
			}
			return p, true
		}
	}
	recrc := func(h *remuspb.DiskWrites, p []byte) []byte {
		h.PayloadCrc32C = crc32.Checksum(p, crc32.MakeTable(crc32.Castagnoli))
		return p
	}
	cases := map[string]epochSpec{
		"offset beyond disk": {changes: []disk.Change{wr(rigDisk-10, 20, 1)}},
		"offset overflow": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Offsets[0] = 1<<64 - 10
			return p
		})},
		"trim length overflow": {changes: []disk.Change{{Kind: disk.KindTrim, Offset: 4096, Length: 4096}}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Lengths[0] = 1<<63 + 5
			return p
		})},
		"zero length write": {changes: []disk.Change{{Kind: disk.KindTrim, Offset: 4096, Length: 4096}}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Lengths[0] = 0
			return p
		})},
		"counts differ": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Offsets = append(h.Offsets, 0)
			return p
		})},
		"more than announced": {changes: []disk.Change{wr(0, 20, 1)}, tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			if h, ok := hdr.(*remuspb.EpochBegin); ok {
				h.DiskChanges = 0
			}
			return p, true
		}},
		"fewer than announced": {changes: []disk.Change{wr(0, 20, 1)}, tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			switch h := hdr.(type) {
			case *remuspb.EpochBegin:
				h.DiskChanges = 2
			case *remuspb.EpochEnd:
				h.DiskChanges = 2
			}
			return p, true
		}},
		"announced beyond limit": {changes: []disk.Change{wr(0, 20, 1)}, tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			if h, ok := hdr.(*remuspb.EpochBegin); ok {
				h.DiskChanges = uint32(lim.MaxEpochDiskChanges + 1)
			}
			return p, true
		}},
		"bad crc": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.PayloadCrc32C ^= 1
			return p
		})},
		"unknown disk": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.DiskId = "../etc/passwd"
			return p
		})},
		"unknown kind": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Kinds[0] = 9
			return p
		})},
		"no-hole on a write": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Kinds[0] |= 0x20
			return p
		})},
		"flush with a range": {changes: []disk.Change{{Kind: disk.KindFlush}}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.Lengths[0] = 4096
			return p
		})},
		"raw length lies": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.RawLength = 10
			return recrc(h, p[:10])
		})},
		"raw length beyond the batch limit": {changes: []disk.Change{wr(0, 20, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			h.RawLength = uint32(lim.MaxDiskBatchBytes + 1)
			h.Lengths[0] = uint64(h.RawLength)
			return p
		})},
		"corrupt lz4": {changes: []disk.Change{wr(0, 8192, 1)}, tamper: dw(func(h *remuspb.DiskWrites, p []byte) []byte {
			if !h.Lz4 {
				t.Fatal("test payload not compressed")
			}
			for i := range p {
				p[i] = 0xff
			}
			return recrc(h, p)
		})},
		"device state before the disk changes": {changes: []disk.Change{wr(0, 20, 1)}, tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			_, isDisk := hdr.(*remuspb.DiskWrites)
			return p, !isDisk // announced, never sent
		}},
		"disk sync after an epoch began": {changes: []disk.Change{wr(0, 20, 1)}, tamper: func(k transport.Kind, hdr any, p []byte) ([]byte, bool) {
			if h, ok := hdr.(*remuspb.DiskWrites); ok {
				h.Epoch = 0
			}
			return p, true
		}},
	}
	for name, e := range cases {
		t.Run(name, func(t *testing.T) {
			rig := newDiskRig(t, false)
			rig.hello(rigDisks())
			mem, dsk := rig.firstEpoch()
			e.epoch, e.base, e.ops, e.pfns = 2, 1, 77, []uint64{0, 5}
			a, err := rig.send(e)
			if err == nil {
				t.Fatalf("acked %d", a)
			}
			if !errors.Is(err, ErrProtocol) && !errors.Is(err, transport.ErrMalformed) {
				t.Fatalf("Serve ended with %v", err)
			}
			rig.unchanged(mem, dsk)
		})
	}
}
