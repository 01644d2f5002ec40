// Package dirtymap provides word-level page bitmaps used to track which
// guest pages were written during an epoch.
//
// A Bitmap is not safe for concurrent use; callers synchronise access (for
// example, a guest's dirty map is only written under its run lock and only
// harvested while the guest is paused).
package dirtymap

import (
	"fmt"
	"math/bits"
)

const wordBits = 64

// Bitmap is a fixed-size set of page indices [0, Len()).
//
// Invariant: bits at positions >= n in the last word are always zero.
type Bitmap struct {
	words []uint64
	n     int
}

// New returns a bitmap of n pages, all clear. It panics if n is negative.
func New(n int) *Bitmap {
	if n < 0 {
		panic(fmt.Sprintf("dirtymap: New(%d): negative length", n))
	}
	return &Bitmap{words: make([]uint64, (n+wordBits-1)/wordBits), n: n}
}

// Len returns the number of pages the bitmap covers.
func (b *Bitmap) Len() int { return b.n }

func (b *Bitmap) check(op string, i int) {
	if i < 0 || i >= b.n {
		panic(fmt.Sprintf("dirtymap: %s(%d) out of range [0, %d)", op, i, b.n))
	}
}

// Set marks page i. It panics if i is out of range.
func (b *Bitmap) Set(i int) {
	b.check("Set", i)
	b.words[i/wordBits] |= 1 << (uint(i) % wordBits)
}

// Clear unmarks page i. It panics if i is out of range.
func (b *Bitmap) Clear(i int) {
	b.check("Clear", i)
	b.words[i/wordBits] &^= 1 << (uint(i) % wordBits)
}

// Test reports whether page i is marked. It panics if i is out of range.
func (b *Bitmap) Test(i int) bool {
	b.check("Test", i)
	return b.words[i/wordBits]&(1<<(uint(i)%wordBits)) != 0
}

// SetRange marks pages [start, start+n). It panics if the range does not
// lie within [0, Len()) or n is negative. n == 0 is a no-op.
func (b *Bitmap) SetRange(start, n int) {
	if n < 0 || start < 0 || start > b.n || n > b.n-start {
		panic(fmt.Sprintf("dirtymap: SetRange(%d, %d) out of range [0, %d)", start, n, b.n))
	}
	if n == 0 {
		return
	}
	end := start + n // exclusive
	sw, ew := start/wordBits, (end-1)/wordBits
	firstMask := ^uint64(0) << (uint(start) % wordBits)
	lastMask := ^uint64(0) >> (wordBits - 1 - uint(end-1)%wordBits)
	if sw == ew {
		b.words[sw] |= firstMask & lastMask
		return
	}
	b.words[sw] |= firstMask
	for w := sw + 1; w < ew; w++ {
		b.words[w] = ^uint64(0)
	}
	b.words[ew] |= lastMask
}

// Count returns the number of marked pages.
func (b *Bitmap) Count() int {
	c := 0
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return c
}

// Any reports whether at least one page is marked.
func (b *Bitmap) Any() bool {
	for _, w := range b.words {
		if w != 0 {
			return true
		}
	}
	return false
}

// Reset clears every page.
func (b *Bitmap) Reset() { clear(b.words) }

func (b *Bitmap) sameLen(op string, o *Bitmap) {
	if o.n != b.n {
		panic(fmt.Sprintf("dirtymap: %s of bitmaps with different lengths (%d and %d)", op, b.n, o.n))
	}
}

// Union sets b to b | o. It panics if the lengths differ.
func (b *Bitmap) Union(o *Bitmap) {
	b.sameLen("Union", o)
	dst := b.words
	src := o.words[:len(dst)]
	for i, w := range src {
		dst[i] |= w
	}
}

// OrWords ORs an external bitmap into b: bit j of w[k] marks page
// 64*k+j (the layout of Xen's log-dirty bitmaps and of Linux's on
// little-endian machines). Words beyond b and bits at or beyond Len() are
// ignored, so a source rounded up to whole words or pages can be passed.
func (b *Bitmap) OrWords(w []uint64) {
	if len(w) > len(b.words) {
		w = w[:len(b.words)]
	}
	for i, x := range w {
		b.words[i] |= x
	}
	if r := b.n % wordBits; r != 0 && len(w) == len(b.words) {
		b.words[len(b.words)-1] &= 1<<uint(r) - 1
	}
}

// CopyFrom makes b equal to o. It panics if the lengths differ.
func (b *Bitmap) CopyFrom(o *Bitmap) {
	b.sameLen("CopyFrom", o)
	copy(b.words, o.words)
}

// Equal reports whether b and o have the same length and marked pages.
func (b *Bitmap) Equal(o *Bitmap) bool {
	if b.n != o.n {
		return false
	}
	for i, w := range b.words {
		if o.words[i] != w {
			return false
		}
	}
	return true
}

// ForEach calls fn for each marked page in ascending order, stopping early
// when fn returns false. fn must not modify b.
func (b *Bitmap) ForEach(fn func(i int) bool) {
	for wi, w := range b.words {
		base := wi * wordBits
		for w != 0 {
			t := bits.TrailingZeros64(w)
			if !fn(base + t) {
				return
			}
			w &= w - 1
		}
	}
}

// AppendSet appends the marked page indices to dst in ascending order and
// returns the extended slice.
func (b *Bitmap) AppendSet(dst []uint64) []uint64 {
	for wi, w := range b.words {
		base := uint64(wi * wordBits)
		for w != 0 {
			dst = append(dst, base+uint64(bits.TrailingZeros64(w)))
			w &= w - 1
		}
	}
	return dst
}

// Runs calls fn for each maximal run of consecutive marked pages, in
// ascending order, stopping early when fn returns false. Runs spanning word
// boundaries are reported once. fn must not modify b.
func (b *Bitmap) Runs(fn func(start, n int) bool) {
	runStart := -1 // start of the run carried over from previous words
	for wi := 0; wi < len(b.words); wi++ {
		w := b.words[wi]
		base := wi * wordBits
		if runStart >= 0 {
			if w == ^uint64(0) {
				continue // the run covers this whole word
			}
			// The carried run ends at the first zero bit of w.
			t := bits.TrailingZeros64(^w)
			if !fn(runStart, base+t-runStart) {
				return
			}
			runStart = -1
			w &^= 1<<uint(t) - 1 // clear the low t ones (t < 64 here)
		}
		for w != 0 {
			s := bits.TrailingZeros64(w)
			// ones starting at s: count trailing ones of w>>s
			ones := bits.TrailingZeros64(^(w >> uint(s)))
			if s+ones == wordBits {
				// run reaches the top of the word: may continue.
				runStart = base + s
				break
			}
			if !fn(base+s, ones) {
				return
			}
			// clear bits [s, s+ones)
			w &^= (^uint64(0) >> (wordBits - uint(ones))) << uint(s)
		}
	}
	if runStart >= 0 {
		fn(runStart, b.n-runStart)
	}
}
