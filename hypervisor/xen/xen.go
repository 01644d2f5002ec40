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
// Not done here: the cooperative suspend Xen's Remus uses (suspend event
// channel, then xc_domain_resume fast) so that PV frontends survive a
// checkpoint and reconnect on the backup; a bare pause is what this
// backend does. The backup side (a standby domain) is not implemented.
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

// ErrBusy is returned (wrapped with the context's error) when a call's
// deadline expired while it waited for an earlier, abandoned libxc call.
var ErrBusy = errors.New("xen: an earlier libxc call is still running")

// Timings are the durations of the last epoch's steps, for benchmarks.
type Timings struct {
	Pause, Harvest, Copy, Context, Unpause time.Duration
	DirtyPages                             int
}

// State format written by SaveDeviceState (little-endian):
//
//	magic "RXEN", version u32, domain type u32 (1 HVM, 2 PVH), hvm length u32,
//	hvm context bytes, vcpu count u32, then per vCPU: id u32, online u32,
//	length u32, vcpu_guest_context bytes.
const (
	stateMagic   = "RXEN"
	stateVersion = 1
)

// State is a parsed SaveDeviceState blob.
type State struct {
	PVH   bool
	HVM   []byte
	VCPUs []VCPUState
}

// VCPUState is one vCPU's context.
type VCPUState struct {
	ID      uint32
	Online  bool
	Context []byte
}

// AppendState appends s's encoding to dst.
func AppendState(dst []byte, s State) []byte {
	dst = append(dst, stateMagic...)
	dst = binary.LittleEndian.AppendUint32(dst, stateVersion)
	typ := uint32(1)
	if s.PVH {
		typ = 2
	}
	dst = binary.LittleEndian.AppendUint32(dst, typ)
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
	if v := r.u32(); v != stateVersion {
		return s, fmt.Errorf("xen: state: version %d, want %d", v, stateVersion)
	}
	switch r.u32() {
	case 1:
	case 2:
		s.PVH = true
	default:
		return s, errors.New("xen: state: bad domain type")
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
