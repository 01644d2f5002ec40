package transport

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
	"github.com/pierrec/lz4/v4"
	remuspb "github.com/remusd/remusd/proto"
)

// DefaultPageSize is the page size every backend uses (hypervisor.PageSize,
// not imported to keep transport free of backend dependencies).
const DefaultPageSize = 4096

// castagnoli is the CRC-32C table (read-only after package init).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Page encodings, shorthand for the remuspb enum.
const (
	encRaw    = byte(remuspb.PageEncoding_PAGE_RAW)
	encZero   = byte(remuspb.PageEncoding_PAGE_ZERO)
	encSame   = byte(remuspb.PageEncoding_PAGE_SAME)
	encDup    = byte(remuspb.PageEncoding_PAGE_DUP)
	encLZ4    = byte(remuspb.PageEncoding_PAGE_LZ4)
	encXORLZ4 = byte(remuspb.PageEncoding_PAGE_XOR_LZ4)
	encXORRLE = byte(remuspb.PageEncoding_PAGE_XOR_RLE)
)

// rleTake is the run-length coding size below which a delta goes as
// XOR_RLE without trying lz4: a few changed words cost ~10 bytes each.
const rleTake = 1024

// EncoderConfig configures an Encoder. Use DefaultEncoderConfig and adjust.
type EncoderConfig struct {
	// PageSize in bytes, a positive multiple of 8. 0 means 4096.
	PageSize int
	// CachePages bounds the cache of last-sent page copies used for SAME
	// and XOR_LZ4 (memory: CachePages*PageSize, allocated in 1 MiB chunks
	// as slots are first used, never beyond the bound). 0 disables the
	// cache (no SAME, no XOR_LZ4). The default is 16384 (64 MiB).
	CachePages int
	// BatchPages is the number of pages per PageBatch. 0 means 256.
	BatchPages int
	// Workers is the number of parallel encode goroutines. 0 means
	// runtime.GOMAXPROCS(0).
	Workers int
}

// DefaultEncoderConfig returns the default configuration.
func DefaultEncoderConfig() EncoderConfig {
	return EncoderConfig{PageSize: DefaultPageSize, CachePages: 16384, BatchPages: 256, Workers: runtime.GOMAXPROCS(0)}
}

// EncodeStats counts the pages of an epoch by encoding.
type EncodeStats struct {
	Pages, Raw, Zero, Same, Dup, LZ4, XORLZ4, XORRLE int
	// RawBytes is Pages*PageSize; PayloadBytes the encoded page bytes of
	// the PageBatch payloads, without frame or protobuf headers (a frame
	// Writer counts those).
	RawBytes, PayloadBytes int64
}

func (s *EncodeStats) add(o *EncodeStats) {
	s.Pages += o.Pages
	s.Raw += o.Raw
	s.Zero += o.Zero
	s.Same += o.Same
	s.Dup += o.Dup
	s.LZ4 += o.LZ4
	s.XORLZ4 += o.XORLZ4
	s.XORRLE += o.XORRLE
	s.RawBytes += o.RawBytes
	s.PayloadBytes += o.PayloadBytes
}

func (s *EncodeStats) count(enc byte) {
	s.Pages++
	switch enc {
	case encRaw:
		s.Raw++
	case encZero:
		s.Zero++
	case encSame:
		s.Same++
	case encDup:
		s.Dup++
	case encLZ4:
		s.LZ4++
	case encXORLZ4:
		s.XORLZ4++
	case encXORRLE:
		s.XORRLE++
	}
}

// EpochSummary is what EncodeEpoch returns besides the batches.
type EpochSummary struct {
	// PageHashes holds PageHash of every page of the epoch, in order (a
	// fresh slice owned by the caller). Feed it with the pfns to a Digest:
	// d.AddPages(pfns, s.PageHashes); d.Sum(deviceState).
	PageHashes []uint64
	Stats      EncodeStats
}

// Encoder encodes epochs of pages into PageBatch records (primary side).
//
// Encoding choice per page, in order: ZERO (all zero); SAME (equal to the
// cached last-sent copy); DUP (equal to an earlier page of the same batch:
// duplicates are detected within a batch only, so that batches encode in
// parallel without a sequential pre-pass); XOR_LZ4 (lz4 of page XOR cached
// copy, if it is at least 1/64 smaller than a page); LZ4; RAW.
//
// The cache of last-sent copies is a fixed set of CachePages slots with a
// pfn→slot map (O(1) lookup) and CLOCK (second-chance) eviction. Slot
// assignment is done sequentially before the parallel encode; a slot used by
// a page of the current epoch is never reassigned within that epoch, so
// workers never share a slot (pages beyond the capacity within one epoch
// simply go uncached).
//
// The cache stands for the backup's committed copy, so the caller must
// Invalidate (or InvalidateAll) pages sent in an epoch the backup may not
// apply (a torn or unacknowledged epoch after a reconnect). EncodeEpoch
// itself invalidates the pages of an epoch it fails to finish.
//
// Methods are safe for concurrent use (they serialise on a mutex); an
// Invalidate waits for a running EncodeEpoch.
type Encoder struct {
	mu  sync.Mutex
	cfg EncoderConfig

	// cache
	index   map[uint64]int32 // pfn -> slot
	owner   []uint64         // slot -> pfn
	owned   []bool           // slot is mapped in index
	valid   []bool           // slot content is the last-sent copy of owner
	ref     []bool           // CLOCK reference bit
	stamp   []uint64         // generation of the epoch that last used the slot
	slotH   []uint64         // PageHash of the slot content
	chunks  [][]byte         // slot data, chunkSlots slots per chunk
	free    []int32          // unmapped allocated slots
	nalloc  int              // slots allocated so far
	hand    int              // CLOCK hand
	gen     uint64           // epoch generation counter
	chunkSl int              // slots per chunk
	zeroH   uint64           // PageHash of an all-zero page

	// per-epoch plan (reused)
	pageSlot []int32
	pageBase []bool

	workers []*encWorker
	bufs    []*batchBuf
}

// encWorker holds one encode goroutine's scratch space.
type encWorker struct {
	comp lz4.Compressor
	xbuf []byte
	dups map[uint64]uint32
}

// batchBuf is one slot of the pipeline ring: an encoded batch awaiting emit.
type batchBuf struct {
	hdr     remuspb.PageBatch
	payload []byte
	stats   EncodeStats
	err     error
	done    chan struct{} // cap 1: signalled when the batch is encoded
}

// NewEncoder returns an Encoder, validating cfg (zero PageSize, BatchPages
// and Workers take their defaults; CachePages 0 disables the cache).
func NewEncoder(cfg EncoderConfig) (*Encoder, error) {
	if cfg.PageSize == 0 {
		cfg.PageSize = DefaultPageSize
	}
	if cfg.BatchPages == 0 {
		cfg.BatchPages = 256
	}
	if cfg.Workers == 0 {
		cfg.Workers = runtime.GOMAXPROCS(0)
	}
	switch {
	case cfg.PageSize < 0 || cfg.PageSize%8 != 0 || cfg.PageSize > 1<<20:
		return nil, fmt.Errorf("transport: encoder: page size %d must be a positive multiple of 8 up to 1 MiB", cfg.PageSize)
	case cfg.CachePages < 0 || cfg.CachePages > math.MaxInt32:
		return nil, fmt.Errorf("transport: encoder: cache pages %d out of range", cfg.CachePages)
	case cfg.BatchPages < 0:
		return nil, fmt.Errorf("transport: encoder: batch pages %d must be positive", cfg.BatchPages)
	case cfg.Workers < 0:
		return nil, fmt.Errorf("transport: encoder: workers %d must be positive", cfg.Workers)
	}
	e := &Encoder{cfg: cfg, zeroH: xxhash.Sum64(make([]byte, cfg.PageSize))}
	if n := cfg.CachePages; n > 0 {
		e.index = make(map[uint64]int32, n)
		e.owner = make([]uint64, n)
		e.owned = make([]bool, n)
		e.valid = make([]bool, n)
		e.ref = make([]bool, n)
		e.stamp = make([]uint64, n)
		e.slotH = make([]uint64, n)
		e.chunkSl = max(1, (1<<20)/cfg.PageSize)
		e.chunks = make([][]byte, (n+e.chunkSl-1)/e.chunkSl)
	}
	bound := lz4.CompressBlockBound(cfg.PageSize)
	for range cfg.Workers {
		e.workers = append(e.workers, &encWorker{
			xbuf: make([]byte, cfg.PageSize),
			dups: make(map[uint64]uint32, cfg.BatchPages),
		})
	}
	for range 2 * cfg.Workers {
		b := &batchBuf{done: make(chan struct{}, 1)}
		b.payload = make([]byte, 0, cfg.BatchPages*cfg.PageSize+bound)
		e.bufs = append(e.bufs, b)
	}
	return e, nil
}

// Config returns the effective configuration.
func (e *Encoder) Config() EncoderConfig { return e.cfg }

// Invalidate forgets the cached copy of pfn, so that its next encoding
// uses neither SAME nor XOR_LZ4.
func (e *Encoder) Invalidate(pfn uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if s, ok := e.index[pfn]; ok {
		e.valid[s] = false
	}
}

// InvalidateAll forgets every cached copy.
func (e *Encoder) InvalidateAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cfg.CachePages == 0 {
		return
	}
	clear(e.index)
	e.free = e.free[:0]
	for s := range e.nalloc {
		e.owned[s] = false
		e.valid[s] = false
		e.ref[s] = false
		e.free = append(e.free, int32(s))
	}
}

// slotData returns the cached bytes of slot s.
func (e *Encoder) slotData(s int32) []byte {
	c := int(s) / e.chunkSl
	off := (int(s) % e.chunkSl) * e.cfg.PageSize
	return e.chunks[c][off : off+e.cfg.PageSize]
}

// victim returns a slot for a new pfn, or -1 if every slot is in use by
// the current epoch.
func (e *Encoder) victim() int32 {
	if n := len(e.free); n > 0 {
		s := e.free[n-1]
		e.free = e.free[:n-1]
		return s
	}
	if e.nalloc < e.cfg.CachePages {
		s := e.nalloc
		if c := s / e.chunkSl; e.chunks[c] == nil {
			slots := min(e.chunkSl, e.cfg.CachePages-c*e.chunkSl)
			e.chunks[c] = make([]byte, slots*e.cfg.PageSize)
		}
		e.nalloc++
		return int32(s)
	}
	n := e.cfg.CachePages
	for range 2 * n {
		s := e.hand
		e.hand++
		if e.hand == n {
			e.hand = 0
		}
		if e.stamp[s] == e.gen {
			continue
		}
		if e.ref[s] {
			e.ref[s] = false
			continue
		}
		if e.owned[s] {
			delete(e.index, e.owner[s])
			e.owned[s] = false
		}
		return int32(s)
	}
	return -1
}

// plan assigns cache slots to the pages of the epoch (sequentially).
func (e *Encoder) plan(pfns []uint64) {
	n := len(pfns)
	if cap(e.pageSlot) < n {
		e.pageSlot = make([]int32, n)
		e.pageBase = make([]bool, n)
	}
	e.pageSlot = e.pageSlot[:n]
	e.pageBase = e.pageBase[:n]
	if e.cfg.CachePages == 0 {
		for i := range e.pageSlot {
			e.pageSlot[i] = -1
			e.pageBase[i] = false
		}
		return
	}
	e.gen++
	full := false // every slot is taken by this epoch: stop looking
	for i, pfn := range pfns {
		s, ok := e.index[pfn]
		if ok {
			e.pageBase[i] = e.valid[s]
		} else {
			s = -1
			if !full {
				s = e.victim()
				full = s < 0
			}
			e.pageBase[i] = false
			if s >= 0 {
				e.index[pfn] = s
				e.owner[s] = pfn
				e.owned[s] = true
			}
		}
		e.pageSlot[i] = s
		if s >= 0 {
			e.stamp[s] = e.gen
			e.ref[s] = true
			e.valid[s] = true // holds the new content once encoded
		}
	}
}

// invalidatePlanned invalidates the slots of the current epoch's pages
// (after a failed EncodeEpoch).
func (e *Encoder) invalidatePlanned() {
	for _, s := range e.pageSlot {
		if s >= 0 {
			e.valid[s] = false
		}
	}
}

// EncodeEpoch encodes the pages of epoch: pfns ascending and distinct,
// pages = len(pfns)*PageSize bytes (read-only). It splits them into batches
// of BatchPages, encodes batches on Workers goroutines, pipelined with the
// in-order emit: emit is called once per batch, in order, from the calling
// goroutine, with a filled header (Epoch, FirstIndex, Pfns, Encodings,
// Lengths, Refs (nil if the batch has no DUP page), PayloadCrc32C) and its
// payload. Neither hdr nor payload may be retained after emit returns, and
// emit must not call methods of e (EncodeEpoch holds e's mutex).
//
// An error from emit or a cancelled ctx stops the epoch; the pages of a
// failed epoch are invalidated in the cache. On success the cache holds
// every page's new content.
func (e *Encoder) EncodeEpoch(ctx context.Context, epoch uint64, pfns []uint64, pages []byte, emit func(hdr *remuspb.PageBatch, payload []byte) error) (EpochSummary, error) {
	ps := e.cfg.PageSize
	n := len(pfns)
	if len(pages) != n*ps {
		return EpochSummary{}, fmt.Errorf("transport: encode epoch %d: %d bytes of pages for %d pfns (want %d)", epoch, len(pages), n, n*ps)
	}
	if uint64(n) > math.MaxUint32 {
		return EpochSummary{}, fmt.Errorf("transport: encode epoch %d: %d pages exceed the index range", epoch, n)
	}
	for i := 1; i < n; i++ {
		if pfns[i] <= pfns[i-1] {
			return EpochSummary{}, fmt.Errorf("transport: encode epoch %d: pfns not strictly ascending at index %d (%d after %d)", epoch, i, pfns[i], pfns[i-1])
		}
	}
	if err := ctx.Err(); err != nil {
		return EpochSummary{}, fmt.Errorf("transport: encode epoch %d: %w", epoch, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()

	sum := EpochSummary{PageHashes: make([]uint64, n)}
	if n == 0 {
		return sum, nil
	}
	e.plan(pfns)

	bp := e.cfg.BatchPages
	nb := (n + bp - 1) / bp
	ring := len(e.bufs)
	var abort atomic.Bool
	jobs := make(chan int, ring)
	var wg sync.WaitGroup
	for _, w := range e.workers[:min(len(e.workers), nb)] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				b := e.bufs[k%ring]
				lo := k * bp
				hi := min(lo+bp, n)
				b.err = e.encodeBatch(w, b, &abort, epoch, lo, pfns[lo:hi], pages[lo*ps:hi*ps], sum.PageHashes[lo:hi])
				b.done <- struct{}{}
			}
		}()
	}

	err := func() error {
		next := 0
		for k := range nb {
			for next < nb && next < k+ring {
				jobs <- next
				next++
			}
			b := e.bufs[k%ring]
			select {
			case <-b.done:
			case <-ctx.Done():
				return ctx.Err()
			}
			if b.err != nil {
				return b.err
			}
			if err := emit(&b.hdr, b.payload); err != nil {
				return err
			}
			sum.Stats.add(&b.stats)
		}
		return nil
	}()
	if err != nil {
		abort.Store(true)
	}
	close(jobs)
	wg.Wait()
	for _, b := range e.bufs { // drop stale completion signals of aborted batches
		select {
		case <-b.done:
		default:
		}
	}
	if err != nil {
		e.invalidatePlanned()
		return EpochSummary{}, fmt.Errorf("transport: encode epoch %d: %w", epoch, err)
	}
	return sum, nil
}

var errAborted = errors.New("transport: epoch encode aborted")

// encodeBatch encodes pages [lo, lo+len(pfns)) of the epoch into b.
func (e *Encoder) encodeBatch(w *encWorker, b *batchBuf, abort *atomic.Bool, epoch uint64, lo int, pfns []uint64, pages []byte, hashes []uint64) error {
	ps := e.cfg.PageSize
	limit := ps - ps/64 // compressed output must save at least this much
	bound := lz4.CompressBlockBound(ps)
	h := &b.hdr
	h.Epoch = epoch
	h.FirstIndex = uint32(lo)
	h.Pfns = append(h.Pfns[:0], pfns...)
	h.Encodings = h.Encodings[:0]
	h.Lengths = h.Lengths[:0]
	h.Refs = h.Refs[:0]
	hasDup := false
	b.stats = EncodeStats{}
	payload := b.payload[:0]
	clear(w.dups)

	for j := range pfns {
		if j&31 == 0 && abort.Load() {
			return errAborted
		}
		i := lo + j
		p := pages[j*ps : (j+1)*ps]
		slot := e.pageSlot[i]
		var base []byte
		if slot >= 0 {
			base = e.slotData(slot)
		}
		var enc byte
		var ref uint32
		var ph uint64
		start := len(payload)
		switch {
		case isZero(p):
			enc = encZero
			ph = e.zeroH
		case e.pageBase[i] && bytes.Equal(p, base):
			enc = encSame
			ph = e.slotH[slot]
		default:
			ph = xxhash.Sum64(p)
			if r, ok := w.dups[ph]; ok && bytes.Equal(p, pages[int(r-uint32(lo))*ps:][:ps]) {
				enc, ref = encDup, r
				break
			}
			w.dups[ph] = uint32(i)
			payload = growTo(payload, start+bound)
			out := payload[start : start+bound]
			if e.pageBase[i] {
				subtle.XORBytes(w.xbuf, p, base)
				// A few changed words: run-length coding is smaller and
				// cheaper than lz4.
				if r, ok := rleEncode(payload[:start], w.xbuf, rleTake); ok {
					enc = encXORRLE
					payload = r
					break
				}
				if c, err := w.comp.CompressBlock(w.xbuf, out); err == nil && c > 0 && c < limit {
					enc = encXORLZ4
					payload = payload[:start+c]
					break
				}
				// The delta did not compress: the page was rewritten. Try
				// the page alone only if its first bytes compress, so an
				// incompressible page pays for one failed attempt, not two.
				if !compressible(w, p[:probeBytes], out) {
					enc = encRaw
					payload = append(payload[:start], p...)
					break
				}
			}
			if c, err := w.comp.CompressBlock(p, out); err == nil && c > 0 && c < limit {
				enc = encLZ4
				payload = payload[:start+c]
				break
			}
			enc = encRaw
			payload = append(payload[:start], p...)
		}
		if enc != encSame && slot >= 0 {
			copy(base, p)
			e.slotH[slot] = ph
		}
		hashes[j] = ph
		h.Encodings = append(h.Encodings, enc)
		h.Lengths = append(h.Lengths, uint32(len(payload)-start))
		h.Refs = append(h.Refs, ref)
		hasDup = hasDup || enc == encDup
		b.stats.count(enc)
	}
	if !hasDup {
		h.Refs = h.Refs[:0]
	}
	b.payload = payload
	h.PayloadCrc32C = crc32.Checksum(payload, castagnoli)
	b.stats.RawBytes = int64(len(pfns) * ps)
	b.stats.PayloadBytes = int64(len(payload))
	return nil
}

// probeBytes is how much of a page compressible looks at.
const probeBytes = 512

// compressible reports whether lz4 shrinks b by at least 1/16 (out is
// scratch space of at least CompressBlockBound(len(b)) bytes).
func compressible(w *encWorker, b, out []byte) bool {
	c, err := w.comp.CompressBlock(b, out)
	return err == nil && c > 0 && c < len(b)-len(b)/16
}

// growTo extends b's capacity to at least n bytes, keeping its contents.
func growTo(b []byte, n int) []byte {
	if cap(b) >= n {
		return b
	}
	nb := make([]byte, len(b), max(n, 2*cap(b)))
	copy(nb, b)
	return nb
}

// isZero reports whether p is all zero, word-wise. len(p) must be a
// multiple of 8.
func isZero(p []byte) bool {
	for len(p) >= 64 {
		w := le64(p[0:]) | le64(p[8:]) | le64(p[16:]) | le64(p[24:]) |
			le64(p[32:]) | le64(p[40:]) | le64(p[48:]) | le64(p[56:])
		if w != 0 {
			return false
		}
		p = p[64:]
	}
	for len(p) >= 8 {
		if le64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

func le64(b []byte) uint64 {
	_ = b[7]
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

// Decoder validates and decodes PageBatch records (backup side). A Decoder
// decodes one batch at a time; for parallel decoding use one Decoder per
// goroutine.
type Decoder struct {
	pageSize int
	numPages uint64
	// MaxBatchPages bounds the pages of one batch (default 4096).
	MaxBatchPages int
}

// NewDecoder returns a Decoder for a guest of numPages pages of pageSize
// bytes (pageSize 0 means 4096).
func NewDecoder(pageSize int, numPages int) *Decoder {
	if pageSize <= 0 {
		pageSize = DefaultPageSize
	}
	return &Decoder{pageSize: pageSize, numPages: uint64(max(numPages, 0)), MaxBatchPages: DefaultLimits().MaxBatchPages}
}

// malformed returns an error wrapping ErrMalformed.
func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// DecodeBatch validates hdr and payload and decodes the batch's pages:
// page j of the batch (epoch index FirstIndex+j) goes to dst(FirstIndex+j),
// which must return a PageSize-byte slot. base(pfn) returns the backup's
// committed copy of pfn (used by SAME and XOR_LZ4). DUP copies from
// dst(ref), which must hold an already decoded earlier page of the epoch.
// expectIndex is the index the batch must start at.
//
// It returns PageHash of each decoded page, in order (a fresh slice), to be
// fed to a Digest with hdr.Pfns. The caller checks hdr.Epoch, and that pfns
// ascend across batches (hdr.Pfns[0] > last pfn of the previous batch).
// Errors caused by the input wrap ErrMalformed and name the batch, index
// and pfn; dst slots may be partly written on error.
func (d *Decoder) DecodeBatch(hdr *remuspb.PageBatch, payload []byte, expectIndex uint32, base func(pfn uint64) []byte, dst func(i uint32) []byte) ([]uint64, error) {
	if hdr == nil {
		return nil, malformed("nil PageBatch header")
	}
	first := hdr.FirstIndex
	if first != expectIndex {
		return nil, malformed("batch first index %d, expected %d", first, expectIndex)
	}
	n := len(hdr.Pfns)
	if n > d.MaxBatchPages {
		return nil, malformed("batch at index %d: %d pages exceed limit %d", first, n, d.MaxBatchPages)
	}
	if len(hdr.Encodings) != n || len(hdr.Lengths) != n {
		return nil, malformed("batch at index %d: %d pfns, %d encodings, %d lengths", first, n, len(hdr.Encodings), len(hdr.Lengths))
	}
	if len(hdr.Refs) != 0 && len(hdr.Refs) != n {
		return nil, malformed("batch at index %d: %d refs for %d pages", first, len(hdr.Refs), n)
	}
	if uint64(first)+uint64(n) > math.MaxUint32 {
		return nil, malformed("batch at index %d: %d pages overflow the index range", first, n)
	}
	ps := d.pageSize
	var total uint64
	for j, pfn := range hdr.Pfns {
		i := first + uint32(j)
		if pfn >= d.numPages {
			return nil, malformed("batch at index %d: page %d: pfn %d out of range (%d pages)", first, i, pfn, d.numPages)
		}
		if j > 0 && pfn <= hdr.Pfns[j-1] {
			return nil, malformed("batch at index %d: page %d: pfn %d not ascending (after %d)", first, i, pfn, hdr.Pfns[j-1])
		}
		enc, l := hdr.Encodings[j], hdr.Lengths[j]
		var ref uint32
		if len(hdr.Refs) != 0 {
			ref = hdr.Refs[j]
		}
		switch enc {
		case encRaw:
			if int(l) != ps {
				return nil, malformed("batch at index %d: page %d (pfn %d): RAW length %d, want %d", first, i, pfn, l, ps)
			}
		case encZero, encSame, encDup:
			if l != 0 {
				return nil, malformed("batch at index %d: page %d (pfn %d): %v length %d, want 0", first, i, pfn, remuspb.PageEncoding(enc), l)
			}
		case encXORRLE:
			if l == 0 || int(l) > ps+2*binary.MaxVarintLen64 {
				return nil, malformed("batch at index %d: page %d (pfn %d): %v length %d out of range", first, i, pfn, remuspb.PageEncoding(enc), l)
			}
		case encLZ4, encXORLZ4:
			if l == 0 || int(l) > lz4.CompressBlockBound(ps) {
				return nil, malformed("batch at index %d: page %d (pfn %d): %v length %d out of range", first, i, pfn, remuspb.PageEncoding(enc), l)
			}
		default:
			return nil, malformed("batch at index %d: page %d (pfn %d): unknown encoding %d", first, i, pfn, enc)
		}
		if enc == encDup {
			if len(hdr.Refs) == 0 {
				return nil, malformed("batch at index %d: page %d (pfn %d): DUP without refs", first, i, pfn)
			}
			if ref >= i {
				return nil, malformed("batch at index %d: page %d (pfn %d): DUP ref %d not before the page", first, i, pfn, ref)
			}
		} else if ref != 0 {
			return nil, malformed("batch at index %d: page %d (pfn %d): ref %d on a non-DUP page", first, i, pfn, ref)
		}
		total += uint64(l)
	}
	if total != uint64(len(payload)) {
		return nil, malformed("batch at index %d: page lengths sum to %d, payload is %d bytes", first, total, len(payload))
	}
	if c := crc32.Checksum(payload, castagnoli); c != hdr.PayloadCrc32C {
		return nil, malformed("batch at index %d: payload crc32c %#08x, header says %#08x", first, c, hdr.PayloadCrc32C)
	}

	hashes := make([]uint64, n)
	off := 0
	for j, pfn := range hdr.Pfns {
		i := first + uint32(j)
		enc, l := hdr.Encodings[j], int(hdr.Lengths[j])
		src := payload[off : off+l]
		off += l
		out := dst(i)
		if len(out) < ps {
			return nil, fmt.Errorf("transport: batch at index %d: page %d (pfn %d): destination slot is %d bytes, want %d", first, i, pfn, len(out), ps)
		}
		out = out[:ps]
		switch enc {
		case encRaw:
			copy(out, src)
		case encZero:
			clear(out)
		case encSame, encXORLZ4, encXORRLE:
			b := base(pfn)
			if len(b) < ps {
				return nil, malformed("batch at index %d: page %d (pfn %d): %v but no committed copy", first, i, pfn, remuspb.PageEncoding(enc))
			}
			if enc == encSame {
				copy(out, b[:ps])
				break
			}
			if enc == encXORRLE {
				copy(out, b[:ps])
				if err := rleApply(src, out); err != nil {
					return nil, malformed("batch at index %d: page %d (pfn %d): XOR_RLE: %v", first, i, pfn, err)
				}
				break
			}
			if err := uncompressPage(src, out); err != nil {
				return nil, malformed("batch at index %d: page %d (pfn %d): XOR_LZ4: %v", first, i, pfn, err)
			}
			subtle.XORBytes(out, out, b[:ps])
		case encDup:
			r := dst(hdr.Refs[j])
			if len(r) < ps {
				return nil, fmt.Errorf("transport: batch at index %d: page %d (pfn %d): DUP source slot %d is %d bytes", first, i, pfn, hdr.Refs[j], len(r))
			}
			copy(out, r[:ps])
		case encLZ4:
			if err := uncompressPage(src, out); err != nil {
				return nil, malformed("batch at index %d: page %d (pfn %d): LZ4: %v", first, i, pfn, err)
			}
		}
		hashes[j] = xxhash.Sum64(out)
	}
	return hashes, nil
}

// uncompressPage decompresses an lz4 block that must expand to exactly
// len(out) bytes.
func uncompressPage(src, out []byte) error {
	n, err := lz4Decode(src, out)
	if err != nil {
		return fmt.Errorf("bad lz4 block: %w", err)
	}
	if n != len(out) {
		return fmt.Errorf("lz4 output %d bytes, want %d", n, len(out))
	}
	return nil
}
