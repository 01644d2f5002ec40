package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The reference of the wire_over_xor_rle figure: Remus's checkpoint
// compression, written for this benchmark from its published description
// (the XOR of a page against the copy last sent, run-length encoded, in
// Cully et al., "Remus: High Availability via Asynchronous Virtual Machine
// Replication", NSDI 2008, and in the comments and stream format notes of
// Xen 4.x's tools/libxc checkpoint compression, 2011, which carried it
// into Xen). It shares no code and no format with
// remusd's codec (transport's PAGE_XOR_RLE) and imports nothing from
// transport, so that comparing against it measures our codec and framing,
// not a copy of them.
//
// A page is compared with the copy last sent in 32-bit words:
//   - no copy was sent: FULL, one marker byte 0x80 and the page verbatim;
//   - no word changed: EMPTY, one marker byte 0x00;
//   - otherwise runs covering the page in order, each a header byte (high
//     bit set: skip, the words are unchanged; clear: copy, the words
//     follow; low 7 bits: run length, 1–127 words), a copy run followed by
//     its words XORed with the old copy.
//
// Pages are framed as Xen's save stream frames them: batches of up to 1024
// pages, each an int32 page count and one 8-byte pfn entry per page (the
// per-page header), then the batch's compressed pages as one chunk with an
// int32 marker and a 64-bit length. Nothing is charged for the end of a
// checkpoint (Xen sends more there), so the reference is if anything
// smaller than the original.

const (
	refWordSize    = 4
	refMaxRun      = 127
	refSkip        = 0x80
	refEmpty       = 0x00
	refFull        = 0x80 // a skip run of length 0
	refMaxBatch    = 1024
	refChunkMarker = 0xfffffff4 // int32 -12, XC_SAVE_ID_COMPRESSED_DATA
)

func refWord(p []byte, i int) uint32 { return binary.LittleEndian.Uint32(p[i*refWordSize:]) }

// refEncodePage appends the encoding of cur against prev (nil: never sent)
// to dst. len(cur) must be a multiple of 4.
func refEncodePage(dst, cur, prev []byte) []byte {
	if prev == nil {
		dst = append(dst, refFull)
		return append(dst, cur...)
	}
	start := len(dst)
	words := len(cur) / refWordSize
	copied := false
	for i := 0; i < words; {
		changed := refWord(cur, i) != refWord(prev, i)
		j := i + 1
		for j < words && j-i < refMaxRun && (refWord(cur, j) != refWord(prev, j)) == changed {
			j++
		}
		if !changed {
			dst = append(dst, refSkip|byte(j-i))
			i = j
			continue
		}
		copied = true
		dst = append(dst, byte(j-i))
		for ; i < j; i++ {
			dst = binary.LittleEndian.AppendUint32(dst, refWord(cur, i)^refWord(prev, i))
		}
	}
	if !copied {
		return append(dst[:start], refEmpty)
	}
	return dst
}

// refEncodeEpoch appends the reference stream of one epoch's pages to dst:
// page i (pageSize bytes at pages[i*pageSize:]) has pfn pfns[i]; prev(i)
// is the copy of it last sent (nil: none).
func refEncodeEpoch(dst []byte, pageSize int, pfns []uint64, pages []byte, prev func(i int) []byte) []byte {
	for lo := 0; lo < len(pfns); lo += refMaxBatch {
		hi := min(lo+refMaxBatch, len(pfns))
		dst = binary.LittleEndian.AppendUint32(dst, uint32(hi-lo))
		for _, pfn := range pfns[lo:hi] {
			dst = binary.LittleEndian.AppendUint64(dst, pfn)
		}
		dst = binary.LittleEndian.AppendUint32(dst, refChunkMarker)
		at := len(dst)
		dst = binary.LittleEndian.AppendUint64(dst, 0)
		for i := lo; i < hi; i++ {
			dst = refEncodePage(dst, pages[i*pageSize:(i+1)*pageSize], prev(i))
		}
		binary.LittleEndian.PutUint64(dst[at:], uint64(len(dst)-at-8))
	}
	return dst
}

var errRef = errors.New("bench: malformed reference stream")

// refDecodePage decodes one page from src onto out, which holds the copy
// last sent (FULL overwrites it), and returns the bytes consumed.
func refDecodePage(src, out []byte) (int, error) {
	if len(src) == 0 {
		return 0, errRef
	}
	switch src[0] {
	case refEmpty:
		return 1, nil
	case refFull:
		if len(src) < 1+len(out) {
			return 0, errRef
		}
		copy(out, src[1:1+len(out)])
		return 1 + len(out), nil
	}
	words := len(out) / refWordSize
	off, w := 0, 0
	for w < words {
		if off >= len(src) {
			return 0, errRef
		}
		h := src[off]
		off++
		n := int(h &^ refSkip)
		if n == 0 || n > words-w {
			return 0, errRef
		}
		if h&refSkip != 0 {
			w += n
			continue
		}
		if len(src)-off < n*refWordSize {
			return 0, errRef
		}
		for ; n > 0; n-- {
			o := w * refWordSize
			binary.LittleEndian.PutUint32(out[o:], binary.LittleEndian.Uint32(out[o:])^binary.LittleEndian.Uint32(src[off:]))
			off += refWordSize
			w++
		}
	}
	return off, nil
}

// refDecodeEpoch decodes a reference stream onto mem (numPages pages of
// pageSize bytes, holding the copies last sent) and returns the pfns it
// wrote, in order. Every count, length and pfn is checked before use.
func refDecodeEpoch(src []byte, pageSize int, mem []byte) ([]uint64, error) {
	numPages := uint64(len(mem) / pageSize)
	var pfns []uint64
	for len(src) > 0 {
		if len(src) < 4 {
			return nil, errRef
		}
		n := int(binary.LittleEndian.Uint32(src))
		src = src[4:]
		if n == 0 || n > refMaxBatch || len(src) < 8*n+12 {
			return nil, fmt.Errorf("%w: batch of %d pages", errRef, n)
		}
		batch := make([]uint64, n)
		for i := range batch {
			batch[i] = binary.LittleEndian.Uint64(src[8*i:])
			if batch[i] >= numPages {
				return nil, fmt.Errorf("%w: pfn %d out of range", errRef, batch[i])
			}
		}
		src = src[8*n:]
		if binary.LittleEndian.Uint32(src) != refChunkMarker {
			return nil, fmt.Errorf("%w: no compressed-data chunk", errRef)
		}
		l := binary.LittleEndian.Uint64(src[4:])
		src = src[12:]
		if l > uint64(len(src)) {
			return nil, fmt.Errorf("%w: chunk of %d bytes, %d left", errRef, l, len(src))
		}
		chunk := src[:l]
		src = src[l:]
		for _, pfn := range batch {
			k, err := refDecodePage(chunk, mem[pfn*uint64(pageSize):][:pageSize])
			if err != nil {
				return nil, fmt.Errorf("pfn %d: %w", pfn, err)
			}
			chunk = chunk[k:]
		}
		if len(chunk) != 0 {
			return nil, fmt.Errorf("%w: %d bytes left in a chunk", errRef, len(chunk))
		}
		pfns = append(pfns, batch...)
	}
	return pfns, nil
}
