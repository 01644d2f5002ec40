package sim

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
)

const (
	pageSize = hypervisor.PageSize

	// headerBytes at the start of page 0 hold the output record
	// (seq, ops at emission); workload writes never touch them.
	headerBytes = 64

	writeBytes = 256 // bytes per uniform/hotset op

	initSalt     = 0x5eed_1a17_0000_0001
	workloadSalt = 0x5eed_0b5e_0000_0002
	fillerSalt   = 0xc0de_f111_e700_0003
)

// Device state blob layout (little endian), DeviceStateSize bytes:
//
//	0   magic "RMSIMDEV"
//	8   u32 version
//	12  u32 total length
//	16  u64 ops
//	24  u64 PRNG state
//	32  u64 output seq
//	40  u64 sequential cursor
//	48  u64 memory bytes
//	56  u64 seed
//	64  u32 workload index
//	68  u32 output every (0 = none)
//	72  ... "CPU register" filler derived from ops and PRNG state
//	end-4 u32 CRC-32C of everything before it
const (
	// DeviceStateSize is the length of a sim device-state blob.
	DeviceStateSize = 4096
	// DeviceStateVersion is the blob format version.
	DeviceStateVersion = 1

	deviceMagic  = "RMSIMDEV"
	fillerOffset = 72
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// DeviceInfo is the decoded header of a device-state blob.
type DeviceInfo struct {
	Ops         uint64 // ops executed
	OutputSeq   uint64 // last output sequence number emitted
	RNG         uint64 // workload PRNG state
	Cursor      uint64 // next page of the sequential workload
	MemoryBytes int64
	Seed        uint64
	Workload    string
	OutputEvery uint64 // 0 = no output
}

// machine is the deterministic core of a simulated guest: its state after N
// steps is a pure function of the configuration and N. It has no locking;
// Guest serialises access.
type machine struct {
	mem      []byte
	pages    int
	dirty    *dirtymap.Bitmap
	workload int
	memBytes int64
	seed     uint64
	outEvery uint64

	ops    uint64
	rng    uint64 // splitmix64 state
	outSeq uint64
	cursor uint64

	// dimg is the guest's disk (nil: none); observe, if set, sees every
	// change after it was applied (the block seam's Observer path).
	hasDisk bool // Config.DiskBytes > 0: page 0 carries the op count
	dimg    disk.Backend
	observe func(c disk.Change)
	dbuf    []byte
}

// Disk layout of a simulated guest: the first diskSector bytes hold the op
// count (u64 LE) and the output sequence (u64 LE) written by the last op;
// the rest takes one derived change per op.
const (
	diskSector   = 512
	diskOpSalt   = 0xd15c_0b5e_0000_0004
	diskRecBytes = 16
)

// diskStep makes the op's disk changes: the op count at offset 0 (as in
// memory at byte 16 of page 0, same step) and, every fourth op, one change
// derived from the op count alone (so that the device state needs nothing
// more).
func (m *machine) diskStep() {
	if m.dimg == nil {
		return
	}
	if m.dbuf == nil {
		m.dbuf = make([]byte, 4096)
	}
	ctx := context.Background()
	apply := func(c disk.Change) {
		var err error
		switch c.Kind {
		case disk.KindWrite:
			err = m.dimg.WriteAt(ctx, c.Data, c.Offset)
		case disk.KindTrim:
			err = m.dimg.Trim(ctx, c.Offset, c.Length)
		case disk.KindZero:
			err = m.dimg.WriteZeroes(ctx, c.Offset, c.Length, c.NoHole)
		case disk.KindFlush:
			err = m.dimg.Flush(ctx)
		}
		if err != nil {
			panic(fmt.Sprintf("sim: disk change %v at %d: %v", c.Kind, c.Offset, err)) // ranges are ours: a bug
		}
		if m.observe != nil {
			m.observe(c)
		}
	}
	rec := m.dbuf[:diskRecBytes]
	binary.LittleEndian.PutUint64(rec[0:], m.ops)
	binary.LittleEndian.PutUint64(rec[8:], m.outSeq)
	apply(disk.Change{Kind: disk.KindWrite, Offset: 0, Length: diskRecBytes, Data: rec})
	if m.ops%4 != 0 {
		return // one op in four makes a second change
	}
	s := m.seed ^ diskOpSalt ^ m.ops*0x9e3779b97f4a7c15
	h := splitmix64(&s)
	size := m.dimg.Size()
	blocks := (size - 4096) / 4096 // 4 KiB units after the first
	switch h % 16 {
	case 0:
		if blocks >= 2 {
			off := 4096 * (1 + int64((h>>8)%uint64(blocks-1)))
			apply(disk.Change{Kind: disk.KindTrim, Offset: off, Length: 8192})
			return
		}
	case 1:
		if blocks >= 1 {
			off := 4096 * (1 + int64((h>>8)%uint64(blocks)))
			apply(disk.Change{Kind: disk.KindZero, Offset: off, Length: 4096, NoHole: h&(1<<40) != 0})
			return
		}
	case 2:
		apply(disk.Change{Kind: disk.KindFlush})
		return
	}
	sectors := (size - diskSector) / diskSector
	off := diskSector * (1 + int64((h>>8)%uint64(sectors)))
	d := m.dbuf[diskRecBytes : diskRecBytes+diskSector]
	for i := 0; i < diskSector; i += 8 {
		binary.LittleEndian.PutUint64(d[i:], splitmix64(&s))
	}
	binary.LittleEndian.PutUint64(d[0:], m.ops)
	apply(disk.Change{Kind: disk.KindWrite, Offset: off, Length: diskSector, Data: d})
}

// splitmix64 advances *s and returns the next output.
func splitmix64(s *uint64) uint64 {
	*s += 0x9e3779b97f4a7c15
	z := *s
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// newMachine builds a machine for a validated, defaulted cfg with freshly
// initialised memory.
func newMachine(cfg Config) *machine {
	m := newMachineWith(cfg, make([]byte, cfg.MemoryBytes))
	initMemory(m.mem, cfg.Seed)
	m.rng = cfg.Seed ^ workloadSalt
	return m
}

// newMachineWith builds a machine around mem (len == cfg.MemoryBytes),
// leaving memory untouched and the op state zero. All pages start dirty:
// nothing about the content has been harvested yet.
func newMachineWith(cfg Config, mem []byte) *machine {
	pages := len(mem) / pageSize
	m := &machine{
		mem:      mem,
		pages:    pages,
		dirty:    dirtymap.New(pages),
		workload: workloadIndex(cfg.Workload),
		memBytes: cfg.MemoryBytes,
		seed:     cfg.Seed,
		outEvery: cfg.outputEvery(),
		hasDisk:  cfg.DiskBytes > 0,
	}
	m.dirty.SetRange(0, pages)
	return m
}

// initMemory fills mem deterministically from seed: the first quarter of
// pages with PRNG bytes, the next 1/16 with copies of pages from that
// quarter, the rest zero; the page-0 output header is zero. Every page is
// touched so that first-touch faults happen here, not on the hot path.
func initMemory(mem []byte, seed uint64) {
	pages := len(mem) / pageSize
	s := seed ^ initSalt
	filled := pages / 4
	for i := 0; i < filled*pageSize; i += 8 {
		binary.LittleEndian.PutUint64(mem[i:], splitmix64(&s))
	}
	if filled > 0 {
		for i := 0; i < pages/16; i++ {
			src := int(splitmix64(&s) % uint64(filled))
			dst := filled + i
			copy(mem[dst*pageSize:(dst+1)*pageSize], mem[src*pageSize:(src+1)*pageSize])
		}
	}
	clear(mem[:min(headerBytes, len(mem))])
	for p := filled + pages/16; p < pages; p++ {
		mem[p*pageSize] = 0 // prefault
	}
}

// writeWords writes n PRNG words at byte offset off (8-aligned) of page p,
// keeping clear of the page-0 output header.
func (m *machine) writeWords(p int, off, n int) {
	if p == 0 && off < headerBytes {
		n -= (headerBytes - off) / 8
		off = headerBytes
	}
	base := p*pageSize + off
	for k := 0; k < n; k++ {
		binary.LittleEndian.PutUint64(m.mem[base+8*k:], splitmix64(&m.rng))
	}
	m.dirty.Set(p)
}

// step executes one op. emit, if non-nil, receives each output message; the
// message slice is freshly allocated and may be retained.
func (m *machine) step(emit func(seq uint64, msg []byte)) {
	r := func() uint64 { return splitmix64(&m.rng) }
	n := uint64(m.pages)
	switch m.workload {
	case wlIdle:
		return
	case wlUniform:
		p := int(r() % n)
		off := int(r()%((pageSize-writeBytes)/8+1)) * 8
		m.writeWords(p, off, writeBytes/8)
	case wlHotset:
		var p int
		if r()%10 < 9 {
			hot := max(n/16, 1)
			// min of three uniform draws: skewed towards low pages.
			p = int(min(r(), r(), r()) % hot)
		} else {
			p = int(r() % n)
		}
		off := int(r()%((pageSize-writeBytes)/8+1)) * 8
		m.writeWords(p, off, writeBytes/8)
	case wlSequential:
		p := int(m.cursor)
		m.cursor = (m.cursor + 1) % n
		m.writeWords(p, 0, pageSize/8)
	case wlSparse:
		p := int(r() % n)
		k := 2 + int(r()%3)
		for range k {
			off := int(r()%(pageSize/8)) * 8
			if p == 0 && off < headerBytes {
				off += headerBytes
			}
			m.writeWords(p, off, 1)
		}
	}
	m.ops++
	if m.hasDisk {
		binary.LittleEndian.PutUint64(m.mem[16:], m.ops)
		m.dirty.Set(0)
	}
	if m.outEvery != 0 && m.ops%m.outEvery == 0 {
		m.outSeq++
		binary.LittleEndian.PutUint64(m.mem[0:], m.outSeq)
		binary.LittleEndian.PutUint64(m.mem[8:], m.ops)
		m.dirty.Set(0)
		if emit != nil {
			msg := make([]byte, 16)
			binary.LittleEndian.PutUint64(msg[0:], m.outSeq)
			binary.LittleEndian.PutUint64(msg[8:], m.ops)
			emit(m.outSeq, msg)
		}
	}
	m.diskStep()
}

// appendState appends the device-state blob to dst.
func (m *machine) appendState(dst []byte) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, DeviceStateSize)...)
	b := dst[start:]
	le := binary.LittleEndian
	copy(b, deviceMagic)
	le.PutUint32(b[8:], DeviceStateVersion)
	le.PutUint32(b[12:], DeviceStateSize)
	le.PutUint64(b[16:], m.ops)
	le.PutUint64(b[24:], m.rng)
	le.PutUint64(b[32:], m.outSeq)
	le.PutUint64(b[40:], m.cursor)
	le.PutUint64(b[48:], uint64(m.memBytes))
	le.PutUint64(b[56:], m.seed)
	le.PutUint32(b[64:], uint32(m.workload))
	le.PutUint32(b[68:], uint32(m.outEvery))
	s := m.ops*fillerSalt ^ m.rng
	for i := fillerOffset; i+8 <= DeviceStateSize-4; i += 8 {
		le.PutUint64(b[i:], splitmix64(&s))
	}
	le.PutUint32(b[DeviceStateSize-4:], crc32.Checksum(b[:DeviceStateSize-4], castagnoli))
	return dst
}

// ErrBadDeviceState is wrapped by every device-state decoding error.
var ErrBadDeviceState = errors.New("sim: bad device state")

// DecodeDeviceState validates a device-state blob (length, magic, version,
// checksum, workload) and returns its header.
func DecodeDeviceState(b []byte) (DeviceInfo, error) {
	if len(b) != DeviceStateSize {
		return DeviceInfo{}, fmt.Errorf("%w: length %d, want %d", ErrBadDeviceState, len(b), DeviceStateSize)
	}
	if string(b[:8]) != deviceMagic {
		return DeviceInfo{}, fmt.Errorf("%w: magic %q, want %q", ErrBadDeviceState, b[:8], deviceMagic)
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[8:]); v != DeviceStateVersion {
		return DeviceInfo{}, fmt.Errorf("%w: version %d, want %d", ErrBadDeviceState, v, DeviceStateVersion)
	}
	if l := le.Uint32(b[12:]); l != DeviceStateSize {
		return DeviceInfo{}, fmt.Errorf("%w: header length %d, want %d", ErrBadDeviceState, l, DeviceStateSize)
	}
	if got, want := crc32.Checksum(b[:DeviceStateSize-4], castagnoli), le.Uint32(b[DeviceStateSize-4:]); got != want {
		return DeviceInfo{}, fmt.Errorf("%w: checksum %08x, want %08x", ErrBadDeviceState, got, want)
	}
	wl := le.Uint32(b[64:])
	if wl >= uint32(len(workloads)) {
		return DeviceInfo{}, fmt.Errorf("%w: workload index %d unknown", ErrBadDeviceState, wl)
	}
	return DeviceInfo{
		Ops:         le.Uint64(b[16:]),
		RNG:         le.Uint64(b[24:]),
		OutputSeq:   le.Uint64(b[32:]),
		Cursor:      le.Uint64(b[40:]),
		MemoryBytes: int64(le.Uint64(b[48:])),
		Seed:        le.Uint64(b[56:]),
		Workload:    workloads[wl],
		OutputEvery: uint64(le.Uint32(b[68:])),
	}, nil
}

// matches reports whether the device state was produced by a guest with the
// deterministic parameters of cfg (defaulted).
func (d DeviceInfo) matches(cfg Config) error {
	switch {
	case d.MemoryBytes != cfg.MemoryBytes:
		return fmt.Errorf("%w: memory_bytes %d, config has %d", ErrBadDeviceState, d.MemoryBytes, cfg.MemoryBytes)
	case d.Seed != cfg.Seed:
		return fmt.Errorf("%w: seed %d, config has %d", ErrBadDeviceState, d.Seed, cfg.Seed)
	case d.Workload != cfg.Workload:
		return fmt.Errorf("%w: workload %q, config has %q", ErrBadDeviceState, d.Workload, cfg.Workload)
	case d.OutputEvery != cfg.outputEvery():
		return fmt.Errorf("%w: output_every %d, config has %d", ErrBadDeviceState, d.OutputEvery, cfg.outputEvery())
	case cfg.Workload == "sequential" && d.Cursor >= uint64(cfg.MemoryBytes/pageSize):
		return fmt.Errorf("%w: cursor %d beyond %d pages", ErrBadDeviceState, d.Cursor, cfg.MemoryBytes/pageSize)
	}
	return nil
}
