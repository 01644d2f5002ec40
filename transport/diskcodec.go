package transport

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"

	"github.com/cespare/xxhash/v2"
	"github.com/pierrec/lz4/v4"

	"github.com/remusd/remusd/disk"
	remuspb "github.com/remusd/remusd/proto"
)

// Flags of a disk change's kind byte (DiskWrites.kinds).
const (
	diskKindMask   = 0x0f
	diskFlagFUA    = 0x10
	diskFlagNoHole = 0x20
)

var diskCRC = crc32.MakeTable(crc32.Castagnoli)

// diskKindByte encodes c's kind and flags.
func diskKindByte(c disk.Change) byte {
	b := byte(c.Kind) & diskKindMask
	if c.FUA {
		b |= diskFlagFUA
	}
	if c.NoHole {
		b |= diskFlagNoHole
	}
	return b
}

// DiskEncoder turns a disk's changes into DiskWrites records. Its buffers
// are reused across calls; it is not safe for concurrent use.
type DiskEncoder struct {
	lim  Limits
	comp lz4.Compressor
	raw  []byte
	out  []byte
}

// NewDiskEncoder returns an encoder whose records fit lim (zero fields:
// defaults).
func NewDiskEncoder(lim Limits) *DiskEncoder { return &DiskEncoder{lim: lim.withDefaults()} }

// diskBatchTarget is the write data a record aims for: big enough to pay
// for its frame, small enough to keep the send pipelined.
const diskBatchTarget = 4 << 20

// DiskEncodeStats counts what an encode produced.
type DiskEncodeStats struct {
	Records  int
	RawBytes int64 // write data before compression
	Payload  int64 // payload bytes on the wire (after compression)
}

// Encode emits changes (of disk id, the first being epoch change index
// first) as DiskWrites records of at most the limits' changes and data
// each. The payload is lz4-compressed only when that saves at least an
// eighth. emit's header and payload are valid during the call only. A
// single write larger than MaxDiskBatchBytes is an error (the journal's
// max write must be below it).
func (e *DiskEncoder) Encode(epoch uint64, id string, first uint32, changes []disk.Change, emit func(hdr *remuspb.DiskWrites, payload []byte) error) (DiskEncodeStats, error) {
	var st DiskEncodeStats
	target := min(diskBatchTarget, e.lim.MaxDiskBatchBytes)
	for lo := 0; lo < len(changes); {
		hdr := &remuspb.DiskWrites{Epoch: epoch, DiskId: id, FirstIndex: first + uint32(lo)}
		raw := e.raw[:0]
		hi := lo
		for hi < len(changes) && hi-lo < e.lim.MaxDiskBatchChanges {
			c := changes[hi]
			n := 0
			if c.Kind == disk.KindWrite {
				n = len(c.Data)
				if int64(n) != c.Length {
					return st, fmt.Errorf("transport: disk %s change %d: write of %d bytes carries %d", id, hi, c.Length, n)
				}
				if n > e.lim.MaxDiskBatchBytes {
					return st, fmt.Errorf("transport: disk %s change %d: write of %d bytes exceeds the record limit %d", id, hi, n, e.lim.MaxDiskBatchBytes)
				}
				if hi > lo && len(raw)+n > target {
					break
				}
			}
			hdr.Kinds = append(hdr.Kinds, diskKindByte(c))
			hdr.Offsets = append(hdr.Offsets, uint64(c.Offset))
			hdr.Lengths = append(hdr.Lengths, uint64(c.Length))
			raw = append(raw, c.Data...)
			hi++
		}
		e.raw = raw
		hdr.RawLength = uint32(len(raw))
		payload := raw
		if len(raw) >= 512 {
			bound := lz4.CompressBlockBound(len(raw))
			if cap(e.out) < bound {
				e.out = make([]byte, bound)
			}
			out := e.out[:bound]
			if n, err := e.comp.CompressBlock(raw, out); err == nil && n > 0 && n < len(raw)-len(raw)/8 {
				payload, hdr.Lz4 = out[:n], true
			}
		}
		hdr.PayloadCrc32C = crc32.Checksum(payload, diskCRC)
		if err := emit(hdr, payload); err != nil {
			return st, err
		}
		st.Records++
		st.RawBytes += int64(len(raw))
		st.Payload += int64(len(payload))
		lo = hi
	}
	return st, nil
}

// DecodeDiskWrites validates a DiskWrites record of a disk of size bytes
// against lim and returns its changes. Everything is checked before
// anything is allocated: equal counts within MaxDiskBatchChanges, known
// kinds and flags, every range within the disk, the writes' total equal
// to raw_length within MaxDiskBatchBytes, the payload's checksum and (lz4)
// its decompressed length. The changes' Data alias buf, grown to
// raw_length if needed and returned for reuse. Errors wrap ErrMalformed.
func DecodeDiskWrites(h *remuspb.DiskWrites, payload []byte, size int64, lim Limits, buf []byte) ([]disk.Change, []byte, error) {
	lim = lim.withDefaults()
	if h == nil {
		return nil, buf, malformed("nil DiskWrites header")
	}
	n := len(h.Kinds)
	if n != len(h.Offsets) || n != len(h.Lengths) {
		return nil, buf, malformed("disk %q record at change %d: %d kinds, %d offsets, %d lengths", h.DiskId, h.FirstIndex, n, len(h.Offsets), len(h.Lengths))
	}
	if n == 0 || n > lim.MaxDiskBatchChanges {
		return nil, buf, malformed("disk %q record at change %d: %d changes (want 1 to %d)", h.DiskId, h.FirstIndex, n, lim.MaxDiskBatchChanges)
	}
	if int64(h.RawLength) > int64(lim.MaxDiskBatchBytes) {
		return nil, buf, malformed("disk %q record at change %d: %d bytes of writes exceed limit %d", h.DiskId, h.FirstIndex, h.RawLength, lim.MaxDiskBatchBytes)
	}
	var total uint64
	for i, k := range h.Kinds {
		kind := disk.Kind(k & diskKindMask)
		off, l := h.Offsets[i], h.Lengths[i]
		flags := k &^ diskKindMask
		switch {
		case kind < disk.KindWrite || kind > disk.KindFlush:
			return nil, buf, malformed("disk %q change %d: unknown kind %d", h.DiskId, int(h.FirstIndex)+i, k&diskKindMask)
		case flags&^(diskFlagFUA|diskFlagNoHole) != 0:
			return nil, buf, malformed("disk %q change %d: unknown flags %#x", h.DiskId, int(h.FirstIndex)+i, flags)
		case flags&diskFlagNoHole != 0 && kind != disk.KindZero:
			return nil, buf, malformed("disk %q change %d: NO_HOLE on a %v", h.DiskId, int(h.FirstIndex)+i, kind)
		case kind == disk.KindFlush:
			if off != 0 || l != 0 || flags != 0 {
				return nil, buf, malformed("disk %q change %d: flush with a range or flags", h.DiskId, int(h.FirstIndex)+i)
			}
			continue
		case l == 0 || off > math.MaxInt64 || l > math.MaxInt64 || !disk.CheckRange(int64(off), int64(l), size):
			return nil, buf, malformed("disk %q change %d: %v of %d bytes at %d outside the disk's %d bytes", h.DiskId, int(h.FirstIndex)+i, kind, l, off, size)
		}
		if kind == disk.KindWrite {
			total += l
			if total > uint64(h.RawLength) {
				break
			}
		}
	}
	if total != uint64(h.RawLength) {
		return nil, buf, malformed("disk %q record at change %d: writes total %d bytes, raw_length says %d", h.DiskId, h.FirstIndex, total, h.RawLength)
	}
	if crc32.Checksum(payload, diskCRC) != h.PayloadCrc32C {
		return nil, buf, malformed("disk %q record at change %d: payload checksum mismatch", h.DiskId, h.FirstIndex)
	}
	raw := payload
	if h.Lz4 {
		if len(payload) == 0 || len(payload) > lz4.CompressBlockBound(int(h.RawLength)) {
			return nil, buf, malformed("disk %q record at change %d: lz4 payload of %d bytes for %d", h.DiskId, h.FirstIndex, len(payload), h.RawLength)
		}
		if cap(buf) < int(h.RawLength) {
			buf = make([]byte, h.RawLength)
		}
		raw = buf[:h.RawLength]
		got, err := lz4Decode(payload, raw)
		if err != nil || got != len(raw) {
			return nil, buf, malformed("disk %q record at change %d: lz4 payload decodes to %d of %d bytes (%v)", h.DiskId, h.FirstIndex, got, len(raw), err)
		}
	} else if len(payload) != int(h.RawLength) {
		return nil, buf, malformed("disk %q record at change %d: payload %d bytes, raw_length %d", h.DiskId, h.FirstIndex, len(payload), h.RawLength)
	}
	changes := make([]disk.Change, n)
	pos := int64(0)
	for i, k := range h.Kinds {
		c := disk.Change{Kind: disk.Kind(k & diskKindMask), Offset: int64(h.Offsets[i]), Length: int64(h.Lengths[i]),
			FUA: k&diskFlagFUA != 0, NoHole: k&diskFlagNoHole != 0}
		if c.Kind == disk.KindWrite {
			c.Data = raw[pos : pos+c.Length : pos+c.Length]
			pos += c.Length
		}
		changes[i] = c
	}
	return changes, buf, nil
}

// AddDiskChange adds the next disk change of the epoch (after its pages):
// [xxhash64(id)][kind|flags][offset][length][xxhash64(data)], u64 LE each.
func (d *Digest) AddDiskChange(id string, c disk.Change) {
	if !d.init {
		d.Reset()
	}
	var b [40]byte
	binary.LittleEndian.PutUint64(b[0:], xxhash.Sum64String(id))
	binary.LittleEndian.PutUint64(b[8:], uint64(diskKindByte(c)))
	binary.LittleEndian.PutUint64(b[16:], uint64(c.Offset))
	binary.LittleEndian.PutUint64(b[24:], uint64(c.Length))
	binary.LittleEndian.PutUint64(b[32:], xxhash.Sum64(c.Data))
	_, _ = d.h.Write(b[:])
}
