// Package xen is the Xen backend: it drives a domain of the Xen host it
// runs on (in dom0) through libxenctrl and libxenforeignmemory.
//
// Per epoch on the primary: pause the domain, fetch-and-clear its
// log-dirty bitmap (XEN_DOMCTL_SHADOW_OP_CLEAN) into a dirtymap.Bitmap,
// copy the dirty frames out of a foreign mapping of guest memory, capture
// the HVM context (xc_domain_hvm_getcontext) and every vCPU's context
// (xc_vcpu_getcontext), unpause. Log-dirty is enabled when a Guest is
// opened with tracking and disabled at Close. Only HVM and PVH domains are
// accepted: their guest-physical frame numbers need no translation, and
// log-dirty works on them with hardware paging (HAP). A PV domain needs
// shadow paging for log-dirty, which Debian's Xen is built without
// (enabling fails with EOPNOTSUPP); it is refused (ErrLogDirtyUnsupported).
//
// The cgo part is built only with the build tag "xen" (it needs
// libxen-dev); without it, Open returns ErrNotBuilt, so the default build
// needs no Xen headers.
//
// libxc calls block in the hypervisor; every call takes a context and
// runs on its own goroutine, so a caller's deadline is honoured: on expiry
// the call returns ctx's error while the C call finishes in the
// background, and the Guest's next call waits for it (calls on one Guest
// never overlap).
//
// A checkpoint is a bare pause unless Options.Cooperative: then the guest
// suspends itself for each checkpoint and the suspend is cancelled after
// it (xc_domain_resume fast), as Xen's Remus does, so that a standby
// activated from that state resumes as "moved" and re-establishes what a
// bare pause cannot carry (shared_info and vcpu_info registrations, event
// channels, timers, frontends).
//
// The backup side is a Standby (hypervisor.Replica): a paused domain
// created from the backup's own xl configuration of the VM, whose frames
// the engine writes through a writable foreign mapping; Activate loads
// the committed HVM context and unpauses it.
package xen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// BackendName is what Guest.Backend returns.
const BackendName = "xen"

// ErrNotBuilt is returned by Open in a build without the "xen" tag.
var ErrNotBuilt = errors.New("xen: backend not built (build with -tags xen and libxen-dev)")

// ErrLogDirtyUnsupported is returned (wrapped) for a domain whose
// log-dirty mode cannot be enabled on this Xen: a PV domain on a Xen built
// without shadow paging (EOPNOTSUPP), as Debian's is.
var ErrLogDirtyUnsupported = errors.New("xen: log-dirty tracking unsupported for this domain")

// ErrNotPaused is returned by HarvestDirty and SaveDeviceState on a
// running domain.
var ErrNotPaused = errors.New("xen: domain not paused")

// ErrGone is returned (wrapped) when the domain has shut down, crashed or
// is being destroyed.
var ErrGone = errors.New("xen: domain gone")

// ErrNotTracking is returned by HarvestDirty on a guest opened without
// log-dirty tracking (an activated standby).
var ErrNotTracking = errors.New("xen: dirty tracking is not enabled for this guest")

// ErrBusy is returned (wrapped with the context's error) when a call's
// deadline expired while it waited for an earlier, abandoned libxc call.
var ErrBusy = errors.New("xen: an earlier libxc call is still running")

// ErrLayoutChanged is returned (wrapped) by HarvestDirty, and by every
// later HarvestDirty and Rebaseline of that Guest, once the domain's
// populated memory is no longer the one its layout was built from at
// Open: its tot_pages changed (ballooning, memory hot-add), or a gfn the
// layout does not map holds guest memory. Memory outside the layout would
// not be replicated, so the protection must stop: unprotect and protect
// the VM again (a new Open) to take the new layout.
var ErrLayoutChanged = errors.New("xen: the domain's memory layout changed since protection started")

// ErrLeftSuspended is returned (wrapped) by Open, without Options.Recover,
// for a domain shut down with reason suspend: a cooperative checkpoint
// suspended it and was not finished (its remusd most likely died), so it
// does not run until that suspend is cancelled. Options.Recover (the
// daemon's restart path) cancels it.
var ErrLeftSuspended = errors.New("xen: domain left suspended by an unfinished checkpoint")

// Timings are the durations of the last epoch's steps, for benchmarks.
type Timings struct {
	Pause, Harvest, Copy, Context, Unpause time.Duration
	// Suspend (as the caller waits) and ResumeFast (inside the call):
	// the cooperative steps, zero for a bare pause.
	Suspend, ResumeFast time.Duration
	// Rebaseline: the last Rebaseline (clean and hashing every page).
	Rebaseline time.Duration
	DirtyPages int
	// Outside: gfns the last harvest reported dirty outside the layout
	// (Xen-owned frames the guest maps, the special region, or memory
	// populated after Open: not replicated).
	Outside int
}

// State format written by SaveDeviceState (little-endian):
//
//	magic "RXEN", version u32, domain type u32 (1 HVM, 2 PVH),
//	[version 2: flags u32, bit 0: suspended], hvm length u32,
//	hvm context bytes, vcpu count u32, then per vCPU: id u32, online u32,
//	length u32, vcpu_guest_context bytes.
const (
	stateMagic   = "RXEN"
	stateVersion = 2
)

// State is a parsed SaveDeviceState blob.
type State struct {
	// Version is the format version (1 or 2; AppendState writes 2 when 0).
	Version uint32
	PVH     bool
	// Suspended: the guest was stopped in its suspend hypercall
	// (Options.Cooperative), so a standby activated from this state runs
	// the guest's resume path.
	Suspended bool
	HVM       []byte
	VCPUs     []VCPUState
}

// VCPUState is one vCPU's context.
type VCPUState struct {
	ID      uint32
	Online  bool
	Context []byte
}

// AppendState appends s's encoding to dst.
func AppendState(dst []byte, s State) []byte {
	v := s.Version
	if v == 0 {
		v = stateVersion
	}
	dst = append(dst, stateMagic...)
	dst = binary.LittleEndian.AppendUint32(dst, v)
	typ := uint32(1)
	if s.PVH {
		typ = 2
	}
	dst = binary.LittleEndian.AppendUint32(dst, typ)
	if v >= 2 {
		flags := uint32(0)
		if s.Suspended {
			flags |= stateSuspended
		}
		dst = binary.LittleEndian.AppendUint32(dst, flags)
	}
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(s.HVM)))
	dst = append(dst, s.HVM...)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(s.VCPUs)))
	for _, v := range s.VCPUs {
		dst = binary.LittleEndian.AppendUint32(dst, v.ID)
		on := uint32(0)
		if v.Online {
			on = 1
		}
		dst = binary.LittleEndian.AppendUint32(dst, on)
		dst = binary.LittleEndian.AppendUint32(dst, uint32(len(v.Context)))
		dst = append(dst, v.Context...)
	}
	return dst
}

const stateSuspended = 1

// Limits for ParseState: a blob from a peer is never trusted for sizes.
const (
	maxHVMContext  = 16 << 20
	maxVCPUs       = 4096
	maxVCPUContext = 64 << 10
)

// ParseState decodes a SaveDeviceState blob, checking every length.
func ParseState(b []byte) (State, error) {
	var s State
	r := stateReader{b: b}
	if string(r.bytes(4)) != stateMagic {
		return s, errors.New("xen: state: bad magic")
	}
	s.Version = r.u32()
	if s.Version != 1 && s.Version != stateVersion {
		return s, fmt.Errorf("xen: state: version %d, want 1 or %d", s.Version, stateVersion)
	}
	switch r.u32() {
	case 1:
	case 2:
		s.PVH = true
	default:
		return s, errors.New("xen: state: bad domain type")
	}
	if s.Version >= 2 {
		f := r.u32()
		if f&^stateSuspended != 0 {
			return s, fmt.Errorf("xen: state: unknown flags %#x", f)
		}
		s.Suspended = f&stateSuspended != 0
	}
	n := r.u32()
	if n > maxHVMContext {
		return s, fmt.Errorf("xen: state: hvm context of %d bytes exceeds %d", n, maxHVMContext)
	}
	s.HVM = r.bytes(int(n))
	nv := r.u32()
	if nv > maxVCPUs {
		return s, fmt.Errorf("xen: state: %d vcpus exceed %d", nv, maxVCPUs)
	}
	for i := uint32(0); i < nv && r.err == nil; i++ {
		var v VCPUState
		v.ID = r.u32()
		switch r.u32() {
		case 0:
		case 1:
			v.Online = true
		default:
			if r.err == nil {
				return State{}, errors.New("xen: state: bad vcpu online flag")
			}
		}
		l := r.u32()
		if l > maxVCPUContext {
			return s, fmt.Errorf("xen: state: vcpu context of %d bytes exceeds %d", l, maxVCPUContext)
		}
		v.Context = r.bytes(int(l))
		s.VCPUs = append(s.VCPUs, v)
	}
	if r.err != nil {
		return State{}, r.err
	}
	if len(r.b) != 0 {
		return State{}, fmt.Errorf("xen: state: %d trailing bytes", len(r.b))
	}
	return s, nil
}

type stateReader struct {
	b   []byte
	err error
}

func (r *stateReader) bytes(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = errors.New("xen: state: truncated")
		return nil
	}
	out := r.b[:n:n]
	r.b = r.b[n:]
	return out
}

func (r *stateReader) u32() uint32 {
	b := r.bytes(4)
	if b == nil {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

// HVM context records (xen/include/public/arch-x86/hvm/save.h): a
// sequence of descriptors {typecode u16, instance u16, length u32} each
// followed by length bytes, starting with a HEADER record and ending with
// an END record.
const (
	hvmCodeEnd    = 0
	hvmCodeHeader = 1
	hvmCodeCPU    = 2
	hvmCodeMax    = 20 // HVM_SAVE_CODE_MAX in Xen 4.17 (hvm_load accepts up to it)

	hvmFileMagic   = 0x54381286
	hvmFileVersion = 1
	hvmHeaderLen   = 24 // struct hvm_save_header
)

// HVMInfo is what CheckHVMContext found in an HVM context.
type HVMInfo struct {
	Records int
	// CPUs is the number of CPU records; MaxCPU the highest instance.
	CPUs   int
	MaxCPU int
}

// CheckHVMContext walks an HVM context record by record and checks that
// it is well formed: a HEADER of this Xen's format first, every record
// within bounds and of a known type, an END record last and nothing after
// it. It does not interpret the records' contents (Xen's hvm_load does).
func CheckHVMContext(b []byte) (HVMInfo, error) {
	var info HVMInfo
	info.MaxCPU = -1
	for off := 0; ; {
		if len(b)-off < 8 {
			return info, fmt.Errorf("xen: hvm context: truncated descriptor at %d", off)
		}
		code := binary.LittleEndian.Uint16(b[off:])
		inst := binary.LittleEndian.Uint16(b[off+2:])
		n := binary.LittleEndian.Uint32(b[off+4:])
		off += 8
		if uint64(n) > uint64(len(b)-off) {
			return info, fmt.Errorf("xen: hvm context: record %d (type %d) of %d bytes overruns the %d left", info.Records, code, n, len(b)-off)
		}
		body := b[off : off+int(n)]
		off += int(n)
		switch {
		case info.Records == 0 && code != hvmCodeHeader:
			return info, fmt.Errorf("xen: hvm context: first record is type %d, not a header", code)
		case code == hvmCodeHeader:
			if info.Records != 0 {
				return info, errors.New("xen: hvm context: second header record")
			}
			if n != hvmHeaderLen {
				return info, fmt.Errorf("xen: hvm context: header of %d bytes", n)
			}
			if m := binary.LittleEndian.Uint32(body); m != hvmFileMagic {
				return info, fmt.Errorf("xen: hvm context: header magic %#x", m)
			}
			if v := binary.LittleEndian.Uint32(body[4:]); v != hvmFileVersion {
				return info, fmt.Errorf("xen: hvm context: header version %d", v)
			}
		case code == hvmCodeEnd:
			if n != 0 {
				return info, fmt.Errorf("xen: hvm context: end record of %d bytes", n)
			}
			if off != len(b) {
				return info, fmt.Errorf("xen: hvm context: %d bytes after the end record", len(b)-off)
			}
			info.Records++
			return info, nil
		case code > hvmCodeMax:
			return info, fmt.Errorf("xen: hvm context: unknown record type %d", code)
		case code == hvmCodeCPU:
			info.CPUs++
			info.MaxCPU = max(info.MaxCPU, int(inst))
		}
		info.Records++
	}
}
