package xen

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sort"

	"github.com/cespare/xxhash/v2"

	"github.com/remusd/remusd/dirtymap"
)

// The replicated memory of an HVM or PVH domain is not its whole p2m: a
// 128 MiB PVH guest's p2m reaches gfn 0xfefff (libxenguest puts the ACPI
// tables below 0xfc000 and the special pages below 0xff000), so a full
// copy of [0, p2m) would move 4 GiB, nearly all of it holes. Instead the
// populated gfns, found when the domain is opened, are grouped into
// segments (runs of populated frames joined across gaps shorter than
// segmentGap), and the engine's page index runs through the segments one
// after another: index Index+i of a segment is gfn GFN+i. A 128 MiB PVH
// guest is two segments, RAM and the ACPI tables: 32,776 pages.
//
// Both sides compute their layout from their own domain; domains built
// from the same configuration by the same toolstack have the same one.
// The layout's hash is part of BackendVersion, which the backup's
// handshake requires to be equal, so a mismatch is refused before any
// page is written rather than scattering pages.
//
// Frames outside the segments are not replicated: the special region
// (specialRegionStart) and Xen-owned frames a guest maps into its gaps or
// into holes inside segments (grant table, shared_info: Xen's page type
// for them is XTAB, and they read as zeros here). HarvestDirty counts the
// dirty gfns outside the segments (Timings.Outside); the special region's
// rings and those Xen-owned frames are expected there.
//
// Memory the guest populates after Open (ballooning up, memory hot-add,
// a hole inside a segment filled) is not in the layout, and would not be
// replicated: HarvestDirty fails closed (ErrLayoutChanged) when the
// domain's tot_pages differs from its value at Open, or when a dirty gfn
// the layout does not map (outside the segments but not in the special
// region, or a hole inside one) holds guest memory now: unmappedDirty
// picks those gfns out, and only they (a few Xen-owned frames per epoch,
// if any) are asked of Xen. A balloon-down is not seen by tot_pages while
// we hold the frames mapped (Xen frees a frame, and lowers tot_pages,
// only when its last reference goes, and our mapping holds one): its gfns
// leave the guest's p2m, the replica keeps their last contents, which the
// guest does not use; populating any gfn again takes a new frame and
// raises tot_pages.
// Segment is a run of the replicated layout (see above).
type Segment struct {
	GFN   uint64 `json:"gfn"`
	Index uint64 `json:"index"`
	Count uint64 `json:"count"`
}

// segmentGap: populated runs closer than this (in frames) share a
// segment; the holes between them are replicated as zero pages.
const segmentGap = 16384

// Special pages of HVM and PVH domains: libxenguest puts the ioreq server
// pages and the special pages (xenstore and console rings, paging, access
// and sharing rings, identity page table, ...) in the 16 frames below
// X86_HVM_END_SPECIAL_REGION. They belong to the domain they were built
// for: the backup's standby has its own rings, connected to its own
// xenstored and xenconsoled connections (Xen's own restore clears them
// rather than carrying them over), so they are not replicated.
const (
	specialRegionEnd   = 0xff000 // X86_HVM_END_SPECIAL_REGION
	specialRegionStart = specialRegionEnd - 8 - 8
)

// layoutOf groups the populated gfns of [0, len(hole)) (hole[i] false)
// outside the special region into segments.
func layoutOf(hole func(gfn int) bool, p2m int) []Segment {
	var segs []Segment
	var idx uint64
	for g := 0; g < p2m; {
		if g >= specialRegionStart && g < specialRegionEnd || hole(g) {
			g++
			continue
		}
		e := g + 1
		for e < p2m && !(e >= specialRegionStart && e < specialRegionEnd) && !hole(e) {
			e++
		}
		// Run [g, e): join it to the last Segment if the gap is short.
		if n := len(segs); n > 0 && uint64(g)-(segs[n-1].GFN+segs[n-1].Count) < segmentGap {
			s := &segs[n-1]
			grow := uint64(e) - (s.GFN + s.Count)
			s.Count += grow
			idx += grow
		} else {
			segs = append(segs, Segment{GFN: uint64(g), Index: idx, Count: uint64(e - g)})
			idx += uint64(e - g)
		}
		g = e
	}
	return segs
}

// layoutPages is the number of pages the segments cover.
func layoutPages(segs []Segment) int {
	if len(segs) == 0 {
		return 0
	}
	l := segs[len(segs)-1]
	return int(l.Index + l.Count)
}

// layoutHash identifies a layout (for BackendVersion).
func layoutHash(segs []Segment) string {
	var b []byte
	for _, s := range segs {
		b = binary.LittleEndian.AppendUint64(b, s.GFN)
		b = binary.LittleEndian.AppendUint64(b, s.Count)
	}
	return fmt.Sprintf("%08x", uint32(xxhash.Sum64(b)))
}

// gfnsToIndexes sets in dst (indexed by page index) every gfn set in
// words (a bitmap indexed by gfn) that lies in a Segment, and returns how
// many set gfns lay outside every Segment.
func gfnsToIndexes(words []uint64, segs []Segment, dst *dirtymap.Bitmap) int {
	inside := 0
	for _, s := range segs {
		end := s.GFN + s.Count
		for w := s.GFN / 64; w < (end+63)/64 && w < uint64(len(words)); w++ {
			v := words[w]
			if v == 0 {
				continue
			}
			for v != 0 {
				b := uint64(bits.TrailingZeros64(v))
				v &= v - 1
				g := w*64 + b
				if g < s.GFN || g >= end {
					continue
				}
				dst.Set(int(s.Index + g - s.GFN))
				inside++
			}
		}
	}
	total := 0
	for _, v := range words {
		total += bits.OnesCount64(v)
	}
	return total - inside
}

// layoutVersion is BackendVersion: the Xen version and the layout's hash.
func layoutVersion(xen string, segs []Segment) string {
	return xen + "/layout-" + layoutHash(segs)
}

// CheckStateFor checks that a state blob from the primary fits a standby
// of the given type and vCPU count: well formed (ParseState), the same
// domain type, a well-formed HVM context (CheckHVMContext) with one CPU
// record per vCPU, and one vCPU context entry per vCPU, in order.
func CheckStateFor(b []byte, pvh bool, vcpus int) (State, error) {
	st, err := ParseState(b)
	if err != nil {
		return st, err
	}
	if st.PVH != pvh {
		return st, fmt.Errorf("xen: state of a %s domain for a %s standby", typeName(st.PVH), typeName(pvh))
	}
	hi, err := CheckHVMContext(st.HVM)
	if err != nil {
		return st, err
	}
	if hi.CPUs != vcpus || hi.MaxCPU != vcpus-1 {
		return st, fmt.Errorf("xen: state: hvm context has %d cpu records (highest %d), standby has %d vcpus", hi.CPUs, hi.MaxCPU, vcpus)
	}
	if len(st.VCPUs) != vcpus {
		return st, fmt.Errorf("xen: state: %d vcpu contexts, standby has %d vcpus", len(st.VCPUs), vcpus)
	}
	for i, v := range st.VCPUs {
		if v.ID != uint32(i) {
			return st, fmt.Errorf("xen: state: vcpu entry %d has id %d", i, v.ID)
		}
	}
	return st, nil
}

func typeName(pvh bool) string {
	if pvh {
		return "pvh"
	}
	return "hvm"
}

// unmappedDirty appends to dst the gfns set in words (a bitmap indexed by
// gfn) that the layout does not map: outside every Segment (the special
// region excepted: its frames are populated but deliberately left out),
// or a hole inside one (bit clear in mapped, indexed by page index). At
// Open none of them held guest memory.
func unmappedDirty(words []uint64, segs []Segment, mapped []uint64, dst []uint64) []uint64 {
	for w, v := range words {
		for v != 0 {
			b := uint64(bits.TrailingZeros64(v))
			v &= v - 1
			g := uint64(w)*64 + b
			if g >= specialRegionStart && g < specialRegionEnd {
				continue
			}
			// The last segment starting at or below g.
			i := sort.Search(len(segs), func(i int) bool { return segs[i].GFN > g }) - 1
			if i >= 0 && g < segs[i].GFN+segs[i].Count {
				idx := segs[i].Index + g - segs[i].GFN
				if idx/64 < uint64(len(mapped)) && mapped[idx/64]&(1<<(idx%64)) != 0 {
					continue
				}
			}
			dst = append(dst, g)
		}
	}
	return dst
}
