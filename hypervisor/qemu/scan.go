package qemu

import (
	"bytes"
	"context"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"

	"github.com/remusd/remusd/dirtymap"
)

// Tracking is how HarvestDirty finds changed pages. QEMU 7.2 offers no RAM
// dirty bitmap over QMP, so the backend compares page contents.
type Tracking int

const (
	// TrackShadow compares every page byte for byte with a shadow copy
	// taken at the previous harvest. Exact; costs a second copy of guest
	// RAM. The default.
	TrackShadow Tracking = iota
	// TrackHash compares a 64-bit xxhash of every page with the hash taken
	// at the previous harvest. Costs 8 bytes per page, but a changed page
	// whose new hash equals the old one is missed: a 2^-64 chance per
	// changed page and harvest.
	TrackHash
)

func (t Tracking) String() string {
	if t == TrackHash {
		return "hash"
	}
	return "shadow"
}

// tracker remembers page contents (shadow) or page hashes between
// harvests.
type tracker struct {
	mode    Tracking
	shadow  []byte
	hashes  []uint64
	primed  bool
	workers int
}

func newTracker(size int, mode Tracking) *tracker {
	t := &tracker{mode: mode, workers: runtime.GOMAXPROCS(0)}
	if mode == TrackHash {
		t.hashes = make([]uint64, size/pageSize)
	} else {
		t.shadow = make([]byte, size)
	}
	return t
}

// scan ORs the pages of mem that changed since the previous scan into dst
// (every page on the first scan) and records their new content. The pages
// are split across GOMAXPROCS goroutines in ranges aligned to 64 pages, so
// that each writes distinct words of dst.
func (t *tracker) scan(mem []byte, dst *dirtymap.Bitmap) {
	pages := len(mem) / pageSize
	per := (pages + t.workers - 1) / t.workers
	per = (per + 63) &^ 63
	var wg sync.WaitGroup
	for lo := 0; lo < pages; lo += per {
		hi := min(lo+per, pages)
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.scanRange(mem, dst, lo, hi)
		}()
	}
	wg.Wait()
	t.primed = true
}

func (t *tracker) scanRange(mem []byte, dst *dirtymap.Bitmap, lo, hi int) {
	if !t.primed {
		if t.mode == TrackHash {
			for p := lo; p < hi; p++ {
				t.hashes[p] = xxhash.Sum64(mem[p*pageSize : (p+1)*pageSize])
			}
		} else {
			copy(t.shadow[lo*pageSize:hi*pageSize], mem[lo*pageSize:hi*pageSize])
		}
		dst.SetRange(lo, hi-lo)
		return
	}
	if t.mode == TrackHash {
		for p := lo; p < hi; p++ {
			h := xxhash.Sum64(mem[p*pageSize : (p+1)*pageSize])
			if h != t.hashes[p] {
				t.hashes[p] = h
				dst.Set(p)
			}
		}
		return
	}
	for p := lo; p < hi; p++ {
		page := mem[p*pageSize : (p+1)*pageSize]
		sh := t.shadow[p*pageSize : (p+1)*pageSize]
		if !bytes.Equal(page, sh) {
			copy(sh, page)
			dst.Set(p)
		}
	}
}

// rebaseline records the current content of mem as the baseline of the
// next scan and writes the xxhash64 of every baseline page into hashes,
// while the guest may be writing mem: a shadow page is copied and then the
// shadow is hashed (a page torn by a concurrent write differs from RAM at
// the next paused scan, so it is reported; if it equals RAM, RAM hashes to
// the value returned); a hash-table entry is the hash the next scan
// compares with. Split like scan; it checks ctx between chunks and leaves
// the tracker unprimed (next scan reports every page) if ctx ends.
func (t *tracker) rebaseline(ctx context.Context, mem []byte, hashes []uint64) error {
	pages := len(mem) / pageSize
	per := (pages + t.workers - 1) / t.workers
	per = (per + 63) &^ 63
	t.primed = false
	var wg sync.WaitGroup
	var failed atomic.Bool
	for lo := 0; lo < pages; lo += per {
		hi := min(lo+per, pages)
		wg.Add(1)
		go func() {
			defer wg.Done()
			const chunk = 256 // pages between ctx checks (1 MiB)
			for c := lo; c < hi; c += chunk {
				if failed.Load() || ctx.Err() != nil {
					failed.Store(true)
					return
				}
				t.rebaselineRange(mem, hashes, c, min(c+chunk, hi))
			}
		}()
	}
	wg.Wait()
	if failed.Load() {
		return ctx.Err()
	}
	t.primed = true
	return nil
}

func (t *tracker) rebaselineRange(mem []byte, hashes []uint64, lo, hi int) {
	if t.mode == TrackHash {
		for p := lo; p < hi; p++ {
			h := xxhash.Sum64(mem[p*pageSize : (p+1)*pageSize])
			t.hashes[p], hashes[p] = h, h
		}
		return
	}
	for p := lo; p < hi; p++ {
		sh := t.shadow[p*pageSize : (p+1)*pageSize]
		copy(sh, mem[p*pageSize:(p+1)*pageSize])
		if testHookAfterShadowCopy != nil {
			testHookAfterShadowCopy(p)
		}
		hashes[p] = xxhash.Sum64(sh) // the shadow, not RAM: see rebaseline
	}
}

// testHookAfterShadowCopy, if set (tests only), runs between the copy of a
// page into the shadow and its hash: a guest write lands there.
var testHookAfterShadowCopy func(p int)
