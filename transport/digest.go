package transport

import (
	"encoding/binary"

	"github.com/cespare/xxhash/v2"
)

// PageHash returns the xxhash64 of a page, the per-page input of the epoch
// digest.
func PageHash(page []byte) uint64 { return xxhash.Sum64(page) }

// Digest accumulates the epoch digest carried by EpochEnd:
//
//	xxhash64( for each page in epoch order: [pfn u64 LE][PageHash(page) u64 LE],
//	          then [xxhash64(deviceState) u64 LE] )
//
// Both sides feed it the same way: the primary from EncodeEpoch's
// EpochSummary.PageHashes (one per page, in order, pfns as passed), the
// backup from the page hashes DecodeBatch returns for each batch (with the
// batch's Pfns). The zero value is ready to use; it is not safe for
// concurrent use.
type Digest struct {
	h    xxhash.Digest
	init bool
	buf  [16]byte
}

// Reset starts a new digest.
func (d *Digest) Reset() {
	d.h.Reset()
	d.init = true
}

// AddPage adds the next page of the epoch.
func (d *Digest) AddPage(pfn uint64, pageHash uint64) {
	if !d.init {
		d.Reset()
	}
	binary.LittleEndian.PutUint64(d.buf[0:8], pfn)
	binary.LittleEndian.PutUint64(d.buf[8:16], pageHash)
	_, _ = d.h.Write(d.buf[:])
}

// AddPages adds pages in order: pfns[i] with hashes[i]. It panics if the
// slices differ in length (a caller bug).
func (d *Digest) AddPages(pfns, hashes []uint64) {
	if len(pfns) != len(hashes) {
		panic("transport: Digest.AddPages: length mismatch")
	}
	for i, p := range pfns {
		d.AddPage(p, hashes[i])
	}
}

// Sum returns the digest of the pages added so far followed by the device
// state. It does not change the digest's state.
func (d *Digest) Sum(deviceState []byte) uint64 {
	if !d.init {
		d.Reset()
	}
	h := d.h // xxhash.Digest is a plain value: copying forks the state
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], xxhash.Sum64(deviceState))
	_, _ = h.Write(b[:])
	return h.Sum64()
}

// EpochDigest computes the digest of a whole epoch in one call.
func EpochDigest(pfns, pageHashes []uint64, deviceState []byte) uint64 {
	var d Digest
	d.AddPages(pfns, pageHashes)
	return d.Sum(deviceState)
}
