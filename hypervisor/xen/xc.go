//go:build xen

package xen

/*
#cgo LDFLAGS: -lxenctrl -lxenforeignmemory -lxentoollog
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xen/version.h>

// A log-dirty bitmap in hypercall-safe memory (as xc_sr_save keeps one).
typedef struct {
	xc_hypercall_buffer_t hbuf;
	int nrpages;
} rx_bitmap;

static rx_bitmap *rx_bitmap_new(xc_interface *xch, int nrpages) {
	rx_bitmap *b = calloc(1, sizeof(*b));
	if (!b)
		return NULL;
	b->hbuf.ubuf = (void *)-1; // HYPERCALL_BUFFER_INIT_NO_BOUNCE
	b->nrpages = nrpages;
	if (!xc__hypercall_buffer_alloc_pages(xch, &b->hbuf, nrpages)) {
		int e = errno;
		free(b);
		errno = e;
		return NULL;
	}
	return b;
}

static void rx_bitmap_free(xc_interface *xch, rx_bitmap *b) {
	if (!b)
		return;
	if (b->hbuf.hbuf)
		xc__hypercall_buffer_free_pages(xch, &b->hbuf, b->nrpages);
	free(b);
}

static void *rx_bitmap_data(rx_bitmap *b) { return b->hbuf.hbuf; }

// Fetch-and-clear: returns the number of pages the bitmap covers (or -1,
// errno set); *dirty is Xen's count of pages dirtied since the last clean.
// With final, XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL makes Xen first mark the
// frames it maps writably itself (hvm_mapped_guest_frames_mark_dirty):
// without it their writes are never logged. Every checkpoint of a paused
// guest is such a final round (xc_sr_save passes it in
// suspend_and_send_dirty); a clean that only restarts tracking
// (Rebaseline) need not be, since the next final round marks them.
static long long rx_logdirty_clean(xc_interface *xch, uint32_t domid, rx_bitmap *b,
		unsigned long pages, int final, uint32_t *dirty) {
	xc_shadow_op_stats_t st;
	memset(&st, 0, sizeof(st));
	long long rc = xc_logdirty_control(xch, domid, XEN_DOMCTL_SHADOW_OP_CLEAN,
		&b->hbuf, pages, final ? XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL : 0, &st);
	*dirty = st.dirty_count;
	return rc;
}

static int rx_shadow_op(xc_interface *xch, uint32_t domid, unsigned int op) {
	return xc_shadow_control(xch, domid, op, NULL, 0);
}

static int rx_getinfo(xc_interface *xch, uint32_t domid, xc_domaininfo_t *info) {
	int n = xc_domain_getinfolist(xch, domid, 1, info);
	if (n < 0)
		return -1;
	if (n != 1 || info->domain != domid) {
		errno = ESRCH;
		return -1;
	}
	return 0;
}

// Exported by libxenctrl 4.17 (VERS_4.17.0) and used by libxenguest's
// save code, but declared only in libxc's private header.
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);

// Which of gpfns [0, n) hold guest memory, asked of Xen 1024 at a time
// (XEN_DOMCTL_getpageframeinfo3, as xc_sr_save does): XTAB (no page, or a
// Xen-owned page such as shared_info or grant frames) and BROKEN frames
// are holes, hole[i] set nonzero. Returns 0, or -1 with errno set.
static int rx_pfn_holes(xc_interface *xch, uint32_t domid, size_t n, int *hole) {
	xen_pfn_t *types = malloc(1024 * sizeof(*types));
	if (!types) {
		errno = ENOMEM;
		return -1;
	}
	for (size_t i = 0; i < n; i += 1024) {
		unsigned int k = n - i < 1024 ? n - i : 1024;
		for (unsigned int j = 0; j < k; j++)
			types[j] = i + j;
		if (xc_get_pfn_type_batch(xch, domid, k, types) < 0) {
			int e = errno ? errno : EIO;
			free(types);
			errno = e;
			return -1;
		}
		for (unsigned int j = 0; j < k; j++) {
			xen_pfn_t t = types[j] & XEN_DOMCTL_PFINFO_LTAB_MASK;
			hole[i + j] = t == XEN_DOMCTL_PFINFO_XTAB || t == XEN_DOMCTL_PFINFO_BROKEN;
		}
	}
	free(types);
	return 0;
}

// Which of the n gfns in gfns hold guest memory now (the same question as
// rx_pfn_holes, for a scattered set): populated[i] is set nonzero unless
// gfns[i] is XTAB (no page, or a Xen-owned one) or BROKEN. gfns is
// overwritten with the types. Returns 0, or -1 with errno set.
static int rx_pfn_populated(xc_interface *xch, uint32_t domid, size_t n, xen_pfn_t *gfns, int *populated) {
	for (size_t i = 0; i < n; i += 1024) {
		unsigned int k = n - i < 1024 ? n - i : 1024;
		if (xc_get_pfn_type_batch(xch, domid, k, gfns + i) < 0) {
			if (!errno)
				errno = EIO;
			return -1;
		}
		for (unsigned int j = 0; j < k; j++) {
			xen_pfn_t t = gfns[i + j] & XEN_DOMCTL_PFINFO_LTAB_MASK;
			populated[i + j] = !(t == XEN_DOMCTL_PFINFO_XTAB || t == XEN_DOMCTL_PFINFO_BROKEN);
		}
	}
	return 0;
}

// Reserve n pages of anonymous private memory (reading as zeros) for a
// mapping of guest frames to be laid over; prot is PROT_READ, or
// PROT_READ|PROT_WRITE for a standby whose frames we write.
static void *rx_reserve(size_t n, int prot) {
	void *p = mmap(NULL, n << XC_PAGE_SHIFT, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

// Map gfns [gfn, gfn+cnt) over the reserved range at page idx (MAP_FIXED:
// patching holes into one big privcmd mapping fails with ENOMEM). Returns
// 0, or -1 with errno set.
static int rx_map_run(xenforeignmemory_handle *fmem, uint32_t domid, void *base,
		size_t idx, xen_pfn_t gfn, size_t cnt, int prot) {
	xen_pfn_t *pfns = malloc(cnt * sizeof(*pfns));
	int *err = malloc(cnt * sizeof(*err));
	int e = 0;
	if (!pfns || !err) {
		e = ENOMEM;
		goto out;
	}
	for (size_t i = 0; i < cnt; i++)
		pfns[i] = gfn + i;
	if (!xenforeignmemory_map2(fmem, domid, (char *)base + (idx << XC_PAGE_SHIFT),
			prot, MAP_FIXED, cnt, pfns, err)) {
		e = errno ? errno : EIO;
		goto out;
	}
	for (size_t k = 0; k < cnt; k++)
		if (err[k]) {
			e = -err[k] > 0 ? -err[k] : EFAULT;
			break;
		}
out:
	free(pfns);
	free(err);
	if (e) {
		errno = e;
		return -1;
	}
	return 0;
}

static int rx_version(xc_interface *xch, int *major, int *minor, char *extra) {
	int v = xc_version(xch, XENVER_version, NULL);
	if (v < 0)
		return -1;
	*major = v >> 16;
	*minor = v & 0xffff;
	xen_extraversion_t x;
	memset(x, 0, sizeof(x));
	if (xc_version(xch, XENVER_extraversion, &x) < 0)
		return -1;
	memcpy(extra, x, sizeof(x));
	extra[sizeof(x) - 1] = 0;
	return 0;
}

static uint32_t rx_info_flags(xc_domaininfo_t *i) { return i->flags; }
static uint64_t rx_info_tot_pages(xc_domaininfo_t *i) { return i->tot_pages; }
static uint64_t rx_info_max_pages(xc_domaininfo_t *i) { return i->max_pages; }
static uint32_t rx_info_max_vcpu_id(xc_domaininfo_t *i) { return i->max_vcpu_id; }
static uint32_t rx_info_emu_flags(xc_domaininfo_t *i) { return i->arch_config.emulation_flags; }

static int rx_vcpu_online(xc_interface *xch, uint32_t domid, uint32_t vcpu, int *online) {
	xc_vcpuinfo_t info;
	memset(&info, 0, sizeof(info));
	if (xc_vcpu_getinfo(xch, domid, vcpu, &info) < 0)
		return -1;
	*online = info.online;
	return 0;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"syscall"
	"unsafe"
)

// xc is one domain's libxc handles. It is not safe for concurrent use:
// Guest serialises every call (see Guest.call).
type xc struct {
	xch   *C.xc_interface
	fmem  *C.xenforeignmemory_handle
	domid C.uint32_t

	bitmap      *C.rx_bitmap
	bitmapPages int // pages the bitmap covers

	hvmBuf  unsafe.Pointer // C buffer for the HVM context
	hvmCap  int
	vcpuBuf *C.vcpu_guest_context_any_t

	mem      unsafe.Pointer // foreign mapping of every gpfn, holes zero-filled
	memPages int
	mapped   []uint64  // bit p set: page index p is mapped (not a hole)
	mapRuns  int       // populated runs, each its own privcmd mapping
	segs     []Segment // page index -> gfn (see layoutOf)
	p2m      int       // gfns [0, p2m) were scanned; log-dirty covers them
}

func errnoErr(op string, err error) error {
	if err == nil {
		err = syscall.EIO
	}
	return fmt.Errorf("%s: %w", op, err)
}

func openXC(domid uint32) (*xc, error) {
	x := &xc{domid: C.uint32_t(domid)}
	var err error
	x.xch, err = C.xc_interface_open(nil, nil, 0)
	if x.xch == nil {
		return nil, errnoErr("xc_interface_open (is this dom0 with privcmd loaded?)", err)
	}
	x.fmem, err = C.xenforeignmemory_open(nil, 0)
	if x.fmem == nil {
		C.xc_interface_close(x.xch)
		return nil, errnoErr("xenforeignmemory_open", err)
	}
	x.vcpuBuf = (*C.vcpu_guest_context_any_t)(C.calloc(1, C.size_t(unsafe.Sizeof(C.vcpu_guest_context_any_t{}))))
	return x, nil
}

func (x *xc) close() {
	if x.mem != nil {
		// One munmap releases the privcmd runs and the anonymous holes.
		C.munmap(x.mem, C.size_t(x.memPages)*C.XC_PAGE_SIZE)
		x.mem = nil
	}
	if x.bitmap != nil {
		C.rx_bitmap_free(x.xch, x.bitmap)
		x.bitmap = nil
	}
	C.free(x.hvmBuf)
	x.hvmBuf = nil
	C.free(unsafe.Pointer(x.vcpuBuf))
	x.vcpuBuf = nil
	if x.fmem != nil {
		C.xenforeignmemory_close(x.fmem)
		x.fmem = nil
	}
	if x.xch != nil {
		C.xc_interface_close(x.xch)
		x.xch = nil
	}
}

func (x *xc) version() (string, error) {
	var maj, min C.int
	var extra [16]C.char
	if rc, err := C.rx_version(x.xch, &maj, &min, &extra[0]); rc < 0 {
		return "", errnoErr("xc_version", err)
	}
	return fmt.Sprintf("xen-%d.%d%s", maj, min, C.GoString(&extra[0])), nil
}

type domInfo struct {
	hvm, pvh, hap, paused, shutdown, dying bool
	shutdownReason                         uint32 // SHUTDOWN_* when shutdown
	totPages, maxPages                     uint64
	maxVCPUID                              uint32
}

func (x *xc) info() (domInfo, error) {
	var i C.xc_domaininfo_t
	if rc, err := C.rx_getinfo(x.xch, x.domid, &i); rc < 0 {
		return domInfo{}, errnoErr("xc_domain_getinfolist", err)
	}
	f := uint32(C.rx_info_flags(&i))
	d := domInfo{
		hvm:       f&C.XEN_DOMINF_hvm_guest != 0,
		hap:       f&C.XEN_DOMINF_hap != 0,
		paused:    f&C.XEN_DOMINF_paused != 0,
		shutdown:  f&C.XEN_DOMINF_shutdown != 0,
		dying:     f&C.XEN_DOMINF_dying != 0,
		totPages:  uint64(C.rx_info_tot_pages(&i)),
		maxPages:  uint64(C.rx_info_max_pages(&i)),
		maxVCPUID: uint32(C.rx_info_max_vcpu_id(&i)),
	}
	d.shutdownReason = f >> C.XEN_DOMINF_shutdownshift & C.XEN_DOMINF_shutdownmask
	// An HVM domain without the emulated PIC/IOAPIC/... is PVH.
	d.pvh = d.hvm && uint32(C.rx_info_emu_flags(&i))&C.XEN_X86_EMU_ALL != C.XEN_X86_EMU_ALL
	return d, nil
}

func (x *xc) maxGPFN() (uint64, error) {
	var g C.xen_pfn_t
	if rc, err := C.xc_domain_maximum_gpfn(x.xch, x.domid, &g); rc < 0 {
		return 0, errnoErr("xc_domain_maximum_gpfn", err)
	}
	return uint64(g), nil
}

func (x *xc) pause() error {
	if rc, err := C.xc_domain_pause(x.xch, x.domid); rc < 0 {
		return errnoErr("xc_domain_pause", err)
	}
	return nil
}

func (x *xc) unpause() error {
	if rc, err := C.xc_domain_unpause(x.xch, x.domid); rc < 0 {
		return errnoErr("xc_domain_unpause", err)
	}
	return nil
}

// enableLogDirty turns log-dirty mode on, the way xc_sr_save does: if the
// first attempt fails (log-dirty already on, e.g. left by a crashed
// process or for VRAM tracking), turn it off and on again.
func (x *xc) enableLogDirty() error {
	rc, err1 := C.rx_shadow_op(x.xch, x.domid, C.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
	if rc >= 0 {
		return nil
	}
	if errors.Is(err1, syscall.EOPNOTSUPP) {
		return fmt.Errorf("xc_shadow_control(ENABLE_LOGDIRTY): %w", err1)
	}
	if rc, err := C.rx_shadow_op(x.xch, x.domid, C.XEN_DOMCTL_SHADOW_OP_OFF); rc < 0 {
		return fmt.Errorf("xc_shadow_control(ENABLE_LOGDIRTY): %w; then OFF: %v", err1, err)
	}
	if rc, err := C.rx_shadow_op(x.xch, x.domid, C.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY); rc < 0 {
		return fmt.Errorf("xc_shadow_control(ENABLE_LOGDIRTY) after OFF (first attempt: %v): %w", err1, err)
	}
	return nil
}

func (x *xc) disableLogDirty() error {
	if rc, err := C.rx_shadow_op(x.xch, x.domid, C.XEN_DOMCTL_SHADOW_OP_OFF); rc < 0 {
		return errnoErr("xc_shadow_control(OFF)", err)
	}
	return nil
}

// cleanLogDirty fetches and clears the log-dirty bitmap for pages pfns
// and returns its words (valid until the next call) and Xen's dirty count.
// final: a checkpoint's round (see rx_logdirty_clean).
func (x *xc) cleanLogDirty(pages int, final bool) ([]uint64, uint32, error) {
	words := (pages + 63) / 64
	if x.bitmap == nil || x.bitmapPages < pages {
		if x.bitmap != nil {
			C.rx_bitmap_free(x.xch, x.bitmap)
			x.bitmap = nil
		}
		nr := (words*8 + C.XC_PAGE_SIZE - 1) / C.XC_PAGE_SIZE
		b, err := C.rx_bitmap_new(x.xch, C.int(nr))
		if b == nil {
			return nil, 0, errnoErr("xc_hypercall_buffer_alloc_pages", err)
		}
		x.bitmap, x.bitmapPages = b, pages
	}
	var dirty C.uint32_t
	fin := C.int(0)
	if final {
		fin = 1
	}
	rc, err := C.rx_logdirty_clean(x.xch, x.domid, x.bitmap, C.ulong(pages), fin, &dirty)
	if rc < 0 {
		return nil, 0, errnoErr("xc_logdirty_control(CLEAN)", err)
	}
	if int64(rc) != int64(pages) {
		// Xen reports how many pages it covered; fewer means the p2m
		// shrank below our size, which the caller must not ignore.
		return nil, 0, fmt.Errorf("xc_logdirty_control(CLEAN) covered %d pages, asked %d", int64(rc), pages)
	}
	w := unsafe.Slice((*uint64)(C.rx_bitmap_data(x.bitmap)), words)
	return w, uint32(dirty), nil
}

// mapAll finds which of gfns [0, p2m) hold guest memory, groups them
// into segments (see layoutOf) and maps the segments one after another,
// read-only or read-write (a standby). Holes inside segments read as
// zeros (and take writes into private memory that Xen never sees). It
// returns the number of holes inside the segments.
func (x *xc) mapAll(p2m int, writable bool) (int, error) {
	if p2m <= 0 {
		return 0, fmt.Errorf("p2m size %d", p2m)
	}
	holes := (*C.int)(C.calloc(C.size_t(p2m), C.size_t(unsafe.Sizeof(C.int(0)))))
	if holes == nil {
		return 0, errors.New("calloc failed")
	}
	defer C.free(unsafe.Pointer(holes))
	if rc, err := C.rx_pfn_holes(x.xch, x.domid, C.size_t(p2m), holes); rc < 0 {
		return 0, errnoErr("xc_get_pfn_type_batch", err)
	}
	h := unsafe.Slice(holes, p2m)
	isHole := func(g int) bool { return h[g] != 0 }
	segs := layoutOf(isHole, p2m)
	n := layoutPages(segs)
	if n == 0 {
		return 0, errors.New("domain has no populated memory")
	}
	prot := C.int(C.PROT_READ)
	if writable {
		prot |= C.PROT_WRITE
	}
	base, err := C.rx_reserve(C.size_t(n), prot)
	if base == nil {
		return 0, errnoErr("mmap", err)
	}
	fail := func(err error) (int, error) {
		C.munmap(base, C.size_t(n)*C.XC_PAGE_SIZE)
		return 0, err
	}
	nholes, runs := 0, 0
	mapped := make([]uint64, (n+63)/64)
	for _, s := range segs {
		for i := uint64(0); i < s.Count; {
			g := s.GFN + i
			if isHole(int(g)) {
				nholes++
				i++
				continue
			}
			j := i
			for j < s.Count && !isHole(int(s.GFN+j)) {
				idx := s.Index + j
				mapped[idx/64] |= 1 << (idx % 64)
				j++
			}
			if rc, err := C.rx_map_run(x.fmem, x.domid, base, C.size_t(s.Index+i), C.xen_pfn_t(g), C.size_t(j-i), prot); rc < 0 {
				return fail(errnoErr(fmt.Sprintf("xenforeignmemory_map2(gfn %#x, %d frames)", g, j-i), err))
			}
			runs++
			i = j
		}
	}
	x.mem, x.memPages, x.mapRuns, x.mapped, x.segs, x.p2m = base, n, runs, mapped, segs, p2m
	return nholes, nil
}

// populated returns the gfns of gfns that hold guest memory now (Xen's
// page type is neither XTAB nor BROKEN), appended to dst.
func (x *xc) populated(gfns []uint64, dst []uint64) ([]uint64, error) {
	n := len(gfns)
	if n == 0 {
		return dst, nil
	}
	arr := (*C.xen_pfn_t)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.xen_pfn_t(0)))))
	pop := (*C.int)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.int(0)))))
	defer C.free(unsafe.Pointer(arr))
	defer C.free(unsafe.Pointer(pop))
	if arr == nil || pop == nil {
		return dst, errors.New("malloc failed")
	}
	a, p := unsafe.Slice(arr, n), unsafe.Slice(pop, n)
	for i, g := range gfns {
		a[i] = C.xen_pfn_t(g)
	}
	if rc, err := C.rx_pfn_populated(x.xch, x.domid, C.size_t(n), arr, pop); rc < 0 {
		return dst, errnoErr("xc_get_pfn_type_batch", err)
	}
	for i, g := range gfns {
		if p[i] != 0 {
			dst = append(dst, g)
		}
	}
	return dst, nil
}

func (x *xc) memory() []byte {
	if x.mem == nil {
		return nil
	}
	return unsafe.Slice((*byte)(x.mem), x.memPages*C.XC_PAGE_SIZE)
}

// hvmContext returns the domain's HVM context record (valid until the next
// call).
func (x *xc) hvmContext() ([]byte, error) {
	size, err := C.xc_domain_hvm_getcontext(x.xch, x.domid, nil, 0)
	if size <= 0 {
		return nil, errnoErr("xc_domain_hvm_getcontext(size)", err)
	}
	if int(size) > x.hvmCap {
		C.free(x.hvmBuf)
		x.hvmBuf = C.malloc(C.size_t(size))
		if x.hvmBuf == nil {
			x.hvmCap = 0
			return nil, errors.New("malloc failed")
		}
		x.hvmCap = int(size)
	}
	n, err := C.xc_domain_hvm_getcontext(x.xch, x.domid, (*C.uint8_t)(x.hvmBuf), C.uint32_t(x.hvmCap))
	if n < 0 {
		return nil, errnoErr("xc_domain_hvm_getcontext", err)
	}
	return unsafe.Slice((*byte)(x.hvmBuf), int(n)), nil
}

// vcpuContext returns vCPU v's context (valid until the next call) and
// whether it is online.
func (x *xc) vcpuContext(v uint32) ([]byte, bool, error) {
	var online C.int
	if rc, err := C.rx_vcpu_online(x.xch, x.domid, C.uint32_t(v), &online); rc < 0 {
		return nil, false, errnoErr(fmt.Sprintf("xc_vcpu_getinfo(%d)", v), err)
	}
	if online == 0 {
		return nil, false, nil
	}
	if rc, err := C.xc_vcpu_getcontext(x.xch, x.domid, C.uint32_t(v), x.vcpuBuf); rc < 0 {
		return nil, true, errnoErr(fmt.Sprintf("xc_vcpu_getcontext(%d)", v), err)
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(x.vcpuBuf)), int(unsafe.Sizeof(*x.vcpuBuf))), true, nil
}

// setHVMContext loads an HVM context record (as hvmContext returns it)
// into the domain, which must be paused.
func (x *xc) setHVMContext(b []byte) error {
	if len(b) == 0 {
		return errors.New("empty HVM context")
	}
	p := C.CBytes(b)
	defer C.free(p)
	if rc, err := C.xc_domain_hvm_setcontext(x.xch, x.domid, (*C.uint8_t)(p), C.uint32_t(len(b))); rc < 0 {
		return errnoErr("xc_domain_hvm_setcontext", err)
	}
	return nil
}
