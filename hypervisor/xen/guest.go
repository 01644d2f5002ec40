//go:build xen

package xen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/transport"
)

var (
	_ hypervisor.Guest       = (*Guest)(nil)
	_ hypervisor.LiveReader  = (*Guest)(nil)
	_ hypervisor.Rebaseliner = (*Guest)(nil)
)

const (
	pageSize        = hypervisor.PageSize
	shutdownSuspend = 2 // SHUTDOWN_suspend, xen/sched.h
)

// Guest is a running HVM or PVH domain on the primary, driven from dom0.
//
// Every method that calls into libxc takes its context's deadline into
// account (see the package comment); calls are serialised by the caller's
// sem, and every field from x on is only touched while holding it.
type Guest struct {
	caller  // sem, log, domid
	name    string
	version string
	pvh     bool
	pages   int // replicated pages (see layoutOf)
	config  []byte

	x              *xc
	coop           bool // Options.Cooperative
	suspendTimeout time.Duration
	paused         bool // paused by us (we hold one pause reference)
	suspended      bool // a suspend we asked for is in effect (or may be: asked, not seen)
	logDirty       bool
	enableLater    bool // Open enables log-dirty inside a suspend (quiesced)
	closed         bool
	last           Timings
	lastDirty      uint32 // Xen's dirty count of the last harvest

	recover   bool   // Options.Recover
	recovered string // what Open did to recover the domain ("": nothing)
	totPages  uint64 // the domain's tot_pages when the layout was taken
	// allDirty: the next harvest reports every page (a Rebaseline that
	// cleaned Xen's log and failed before its hashes were complete).
	allDirty bool
	// layoutErr: the layout no longer matches the domain
	// (ErrLayoutChanged); sticky.
	layoutErr error
	unmapped  []uint64 // scratch for the harvest's layout check
	newlyPop  []uint64 // scratch: those of them populated now
}

// Open attaches to domain domid: it checks the domain is HVM or PVH,
// enables log-dirty mode (refusing a domain where that is unsupported,
// ErrLogDirtyUnsupported) and maps its memory read-only. The domain keeps
// running; a cooperative one (Options.Cooperative) is suspended for the
// moment log-dirty is enabled (see quiesced), so Open fails if it does
// not suspend within its SuspendTimeout. A domain left suspended by an unfinished checkpoint is refused
// (ErrLeftSuspended) unless opts.Recover, which resumes it (see Options).
func Open(ctx context.Context, domid uint32, opts Options) (*Guest, error) {
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	name := opts.Name
	if name == "" {
		name = fmt.Sprintf("domid-%d", domid)
	}
	g := &Guest{
		caller:         newCaller(domid, log.With(zap.String("vm", name), zap.String("backend", BackendName), zap.Uint32("domid", domid))),
		name:           name,
		coop:           opts.Cooperative,
		suspendTimeout: opts.SuspendTimeout,
		recover:        opts.Recover,
	}
	if g.suspendTimeout <= 0 {
		g.suspendTimeout = 30 * time.Second
	}
	err := g.call(ctx, "open", func() error {
		x, err := openXC(domid)
		if err != nil {
			return err
		}
		if err := g.attach(x); err != nil {
			x.close()
			return err
		}
		g.x = x
		return nil
	})
	if err != nil {
		return nil, err
	}
	if g.enableLater {
		err := g.quiesced(ctx, "enable log-dirty", func() error {
			if err := enableLogDirty(g.x, g.domid); err != nil {
				return err
			}
			g.logDirty = true
			return nil
		})
		if err != nil {
			if cerr := g.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
			return nil, fmt.Errorf("xen: open domain %d: %w", domid, err)
		}
	}
	return g, nil
}

// enableLogDirty turns on domid's log-dirty mode through x.
func enableLogDirty(x *xc, domid uint32) error {
	if err := x.enableLogDirty(); err != nil {
		if errors.Is(err, syscall.EOPNOTSUPP) {
			return fmt.Errorf("%w: domain %d: %w", ErrLogDirtyUnsupported, domid, err)
		}
		return err
	}
	return nil
}

// attach runs under sem.
func (g *Guest) attach(x *xc) error {
	v, err := x.version()
	if err != nil {
		return err
	}
	g.version = v
	info, err := x.info()
	if err != nil {
		return err
	}
	suspended := info.shutdown && info.shutdownReason == shutdownSuspend
	if info.dying || info.shutdown && !suspended {
		return fmt.Errorf("domain %d is shutting down (reason %d)", g.domid, info.shutdownReason)
	}
	if !info.hvm {
		// Find out whether log-dirty works at all, to say why we refuse.
		if err := x.enableLogDirty(); err != nil {
			if errors.Is(err, syscall.EOPNOTSUPP) {
				return fmt.Errorf("%w: domain %d is a PV guest and this Xen cannot track its dirty pages "+
					"(it was built without shadow paging, as Debian's is; run the guest as PVH or HVM): %w",
					ErrLogDirtyUnsupported, g.domid, err)
			}
			return fmt.Errorf("domain %d is a PV guest: enabling log-dirty: %w", g.domid, err)
		}
		_ = x.disableLogDirty()
		return fmt.Errorf("domain %d is a PV guest: this backend handles only PVH and HVM domains (no p2m translation)", g.domid)
	}
	g.pvh = info.pvh
	if err := g.recoverDomain(x, info, suspended); err != nil {
		return err
	}
	maxGPFN, err := x.maxGPFN()
	if err != nil {
		return err
	}
	if maxGPFN >= 1<<32 {
		return fmt.Errorf("domain %d: max gpfn %#x is implausibly large", g.domid, maxGPFN)
	}
	// A running cooperative guest gets log-dirty enabled inside a suspend
	// (Open, through quiesced, which says why); any other now.
	g.enableLater = g.coop && !g.suspended && !g.paused && !info.paused
	if !g.enableLater {
		if err := enableLogDirty(x, g.domid); err != nil {
			return err
		}
		g.logDirty = true
	}
	// tot_pages before the layout is taken: memory populated or released
	// meanwhile makes the first harvest fail closed rather than go
	// unnoticed.
	if info, err = x.info(); err != nil {
		if g.logDirty {
			_ = x.disableLogDirty()
			g.logDirty = false
		}
		return err
	}
	g.totPages = info.totPages
	t0 := time.Now()
	holes, err := x.mapAll(int(maxGPFN)+1, false)
	if err != nil {
		if g.logDirty {
			_ = x.disableLogDirty()
			g.logDirty = false
		}
		return err
	}
	g.pages = x.memPages
	g.version = layoutVersion(g.version, x.segs)
	typ := "hvm"
	if g.pvh {
		typ = "pvh"
	}
	g.config, _ = json.Marshal(Config{DomID: g.domid, Type: typ, Pages: g.pages, Segments: x.segs, MaxPages: info.maxPages, MaxVCPUID: info.maxVCPUID, Version: g.version})
	g.log.Info("attached",
		zap.String("type", typ), zap.String("xen", g.version), zap.Uint64("p2m_size", maxGPFN+1), zap.Int("pages", g.pages),
		zap.Uint64("tot_pages", info.totPages), zap.Int("holes", holes), zap.Int("runs", x.mapRuns), zap.Any("segments", x.segs), zap.Duration("map", time.Since(t0)))
	return nil
}

// recoverDomain runs under sem, from attach: a domain a dead remusd left
// suspended (suspended) or paused is adopted with Options.Recover (the
// Guest holds that suspend and pause as its own: Resume ends them), the
// suspend refused without it. It is not resumed here: the caller decides
// when the guest may run (the daemon only after the witness agreed and
// the output buffer holds again).
func (g *Guest) recoverDomain(x *xc, info domInfo, suspended bool) error {
	if !g.recover {
		if suspended {
			paused := ""
			if info.paused {
				paused = " and paused"
			}
			return fmt.Errorf("%w: domain %d is suspended (shut down with reason suspend)%s: a cooperative checkpoint suspended it and was not finished, "+
				"most likely because its remusd died; it does not run until the suspend is cancelled. "+
				"Opening it with Recover (the daemon's restart path) cancels the suspend (xc_domain_resume fast)%s and lets it run on",
				ErrLeftSuspended, g.domid, paused, map[bool]string{true: " and unpauses it", false: ""}[info.paused])
		}
		if info.paused {
			g.log.Warn("domain is paused and stays paused: a pause left by a remusd that died is dropped only by Recover (the daemon's restart path)")
		}
		return nil
	}
	var did []string
	if suspended {
		g.suspended = true
		did = append(did, "adopted the suspend an unfinished checkpoint left (Resume cancels it: xc_domain_resume fast)")
	}
	if info.paused {
		g.paused = true
		did = append(did, "adopted one pause reference (Resume drops it: xc_domain_unpause)")
	}
	g.recovered = strings.Join(did, "; ")
	if g.recovered != "" {
		g.log.Warn("recovered a domain left mid-checkpoint", zap.String("recovered", g.recovered))
	}
	return nil
}

// Recovered says what Open did to recover a domain left in the middle of
// a checkpoint (Options.Recover), "" if nothing: for the daemon's log.
func (g *Guest) Recovered() string { return g.recovered }

// Paused reports whether the guest is stopped by this Guest: paused by
// Pause or PauseNow, or suspended for a checkpoint (a Recover adopted
// either); Resume runs it again.
func (g *Guest) Paused() bool {
	g.sem <- struct{}{}
	defer func() { <-g.sem }()
	return g.paused || g.suspended
}

// caller runs libxc calls for one domain with deadlines: calls are
// serialised by sem, and every field of its owner that libxc calls touch
// is only touched while holding it.
type caller struct {
	domid uint32
	log   *zap.Logger
	sem   chan struct{} // holds the right to call into libxc
}

func newCaller(domid uint32, log *zap.Logger) caller {
	return caller{domid: domid, log: log, sem: make(chan struct{}, 1)}
}

// call runs fn (which calls into libxc) holding sem, on its own goroutine,
// and returns early with ctx's error if ctx ends first; fn then finishes
// in the background and releases sem when done.
func (g *caller) call(ctx context.Context, op string, fn func() error) error {
	select {
	case g.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("xen: %s on domain %d: %w: %w", op, g.domid, ErrBusy, ctx.Err())
	}
	if err := ctx.Err(); err != nil {
		<-g.sem
		return fmt.Errorf("xen: %s on domain %d: %w", op, g.domid, err)
	}
	done := make(chan error, 1)
	go func() {
		err := fn()
		<-g.sem
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("xen: %s on domain %d: %w", op, g.domid, err)
		}
		return nil
	case <-ctx.Done():
		g.log.Warn("libxc call abandoned at its deadline; it completes in the background", zap.String("op", op))
		return fmt.Errorf("xen: %s on domain %d: %w", op, g.domid, ctx.Err())
	}
}

var errClosed = errors.New("guest closed")

// Name returns the VM name.
func (g *Guest) Name() string { return g.name }

// DomID returns the domain id.
func (g *Guest) DomID() uint32 { return g.domid }

// Backend returns "xen".
func (g *Guest) Backend() string { return BackendName }

// BackendVersion returns the hypervisor's version and the memory
// layout's hash, e.g. "xen-4.17.7/layout-1a2b3c4d": the backup's standby
// must match both (see layoutOf).
func (g *Guest) BackendVersion() string { return g.version }

// Config returns the domain's description (JSON, see Config).
func (g *Guest) Config() []byte { return g.config }

// NumPages is the number of replicated pages: the guest's populated gfns
// grouped into segments (see layoutOf), page index i of a Segment being
// its gfn GFN+i. Holes inside segments read as zeros.
func (g *Guest) NumPages() int { return g.pages }

// PVH reports whether the domain is PVH (else HVM).
func (g *Guest) PVH() bool { return g.pvh }

// Pause pauses the domain (xc_domain_pause returns once no vCPU runs).
// With Options.Cooperative it first has the guest suspend itself (see
// SuspendCooperative); a suspend the guest did not finish within ctx
// fails Pause, and the next Pause or Resume finds out whether it happened
// late.
func (g *Guest) Pause(ctx context.Context) error {
	if g.coop {
		t0 := time.Now()
		sctx, cancel := context.WithTimeout(ctx, g.suspendTimeout)
		err := g.SuspendCooperative(sctx)
		cancel()
		if err != nil {
			return err
		}
		d := time.Since(t0)
		if err := g.call(ctx, "pause", func() error { g.last.Suspend = d; return nil }); err != nil {
			return err
		}
	}
	return g.call(ctx, "pause", func() error {
		t0 := time.Now()
		if g.closed {
			return errClosed
		}
		if g.paused {
			return nil
		}
		if err := g.x.pause(); err != nil {
			return err
		}
		g.paused = true
		g.last.Pause = time.Since(t0)
		return nil
	})
}

// Resume unpauses a domain paused by Pause; a suspend Pause asked for is
// cancelled first (xc_domain_resume fast).
func (g *Guest) Resume(ctx context.Context) error {
	return g.call(ctx, "unpause", func() error {
		if g.closed {
			return errClosed
		}
		if g.suspended {
			t0 := time.Now()
			if err := g.cancelSuspend(); err != nil {
				return err
			}
			g.last.ResumeFast = time.Since(t0)
		}
		t0 := time.Now()
		if !g.paused {
			return nil
		}
		if err := g.x.unpause(); err != nil {
			return err
		}
		g.paused = false
		g.last.Unpause = time.Since(t0)
		return nil
	})
}

// HarvestDirty ORs the pages Xen logged as written since the previous
// harvest (or since Open) into dst and clears Xen's log. dst must have
// NumPages pages.
func (g *Guest) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error {
	if dst.Len() != g.pages {
		return fmt.Errorf("xen: harvest: bitmap of %d pages for a guest of %d", dst.Len(), g.pages)
	}
	return g.call(ctx, "harvest", func() error {
		t0 := time.Now()
		if g.closed {
			return errClosed
		}
		if !g.paused {
			return ErrNotPaused
		}
		if !g.logDirty {
			return ErrNotTracking
		}
		if g.layoutErr != nil {
			return g.layoutErr
		}
		words, dirty, err := g.x.cleanLogDirty(g.x.p2m, true)
		if err != nil {
			return err
		}
		// The layout check comes after the clean: memory populated
		// before it is seen now, after it at the next harvest.
		if err := g.checkLayout(words); err != nil {
			g.layoutErr = err
			return err
		}
		if g.allDirty {
			dst.SetRange(0, g.pages)
			g.allDirty = false
		}
		g.last.Outside = gfnsToIndexes(words, g.x.segs, dst)
		g.lastDirty = dirty
		g.last.Harvest = time.Since(t0)
		return nil
	})
}

// checkLayout runs under sem, in HarvestDirty: it fails closed
// (ErrLayoutChanged) if the domain's populated memory is no longer what
// the layout was built from (see layoutOf's comment): tot_pages changed,
// or a dirty gfn the layout does not map holds guest memory.
func (g *Guest) checkLayout(words []uint64) error {
	info, err := g.x.info()
	if err != nil {
		return err
	}
	if info.totPages != g.totPages {
		return fmt.Errorf("%w: domain %d holds %d pages of memory, %d when protection started (ballooned or hot-added since): "+
			"the replicated layout is fixed when protection starts, so memory added since would not be replicated; "+
			"re-protect the VM (unprotect and protect it again) to take the new layout",
			ErrLayoutChanged, g.domid, info.totPages, g.totPages)
	}
	g.unmapped = unmappedDirty(words, g.x.segs, g.x.mapped, g.unmapped[:0])
	if len(g.unmapped) == 0 {
		return nil
	}
	// Expected: Xen-owned frames the guest maps (grant table,
	// shared_info), which read as holes. Guest memory there is new.
	g.newlyPop, err = g.x.populated(g.unmapped, g.newlyPop[:0])
	if err != nil {
		return err
	}
	if len(g.newlyPop) > 0 {
		return fmt.Errorf("%w: domain %d: gfn %#x (and %d more) was written and holds guest memory, but held none when protection started, "+
			"so it is not replicated; re-protect the VM (unprotect and protect it again) to take the new layout",
			ErrLayoutChanged, g.domid, g.newlyPop[0], len(g.newlyPop)-1)
	}
	return nil
}

// rebaselineChunk is how many pages Rebaseline hashes between checks of
// its context.
const rebaselineChunk = 256

// Rebaseline implements hypervisor.Rebaseliner, while the guest runs or
// is paused: it clears Xen's log-dirty bitmap (XEN_DOMCTL_SHADOW_OP_CLEAN,
// discarding what it reports) and then hashes every replicated page
// (transport.PageHash, xxhash64) from the read-only mapping, holes as the
// zero pages they read as. A page the guest writes after the clean is in
// the next harvest; one it does not write keeps the content hashed. The
// frames Xen writes through its own mappings are marked by the next
// harvest's final round (as in every epoch; the vcpu_info caveat of the
// package's README applies alike). If it fails after the clean, the next
// harvest reports every page.
func (g *Guest) Rebaseline(ctx context.Context) ([]uint64, error) {
	hashes := make([]uint64, g.pages)
	t0 := time.Now()
	var quiesce bool
	err := g.call(ctx, "rebaseline", func() error {
		if g.closed {
			return errClosed
		}
		if !g.logDirty {
			return ErrNotTracking
		}
		if g.layoutErr != nil {
			return g.layoutErr
		}
		quiesce = g.coop && !g.paused && !g.suspended
		return nil
	})
	if err != nil {
		return nil, err
	}
	clean := func() error {
		// Until every hash is taken, the next harvest reports all.
		g.allDirty = true
		_, _, err := g.x.cleanLogDirty(g.x.p2m, false)
		return err
	}
	if quiesce {
		// A cooperative guest is cleaned inside a suspend, as at every
		// epoch (see quiesced).
		err = g.quiesced(ctx, "rebaseline clean", clean)
	} else {
		err = g.call(ctx, "rebaseline clean", func() error {
			if g.closed {
				return errClosed
			}
			// A running guest is paused for the clean (a millisecond or
			// two), as quiesced explains.
			if !g.paused && !g.suspended {
				if err := g.x.pause(); err != nil {
					return err
				}
				err := clean()
				if uerr := g.x.unpause(); uerr != nil && err == nil {
					err = uerr
				}
				return err
			}
			return clean()
		})
	}
	if err != nil {
		return nil, err
	}
	err = g.call(ctx, "rebaseline hash", func() error {
		if g.closed {
			return errClosed
		}
		if err := hashAll(ctx, g.x.memory(), hashes); err != nil {
			return err
		}
		g.allDirty = false
		g.last.Rebaseline = time.Since(t0)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return hashes, nil
}

// quiesced runs fn (under sem) with the guest suspended cooperatively,
// then cancels the suspend (xc_domain_resume fast), as every cooperative
// epoch does around its harvest. It is how a cooperative guest's log-dirty
// mode changes outside an epoch (Open's enable, Rebaseline's clean): a
// change of the p2m type of all memory taken while the guest was stopped
// at an arbitrary point (running, or merely paused) was followed by the
// domU's triple fault under QEMU's TCG (nested paging emulated): the
// guest found stopped inside pvclock_clocksource_read with interrupts
// off, or a kernel oops from the event-channel upcall delivered over and
// over at its handler's first instruction, within a second of the change,
// in most daemon runs; inside a suspend (interrupts off, the upcall
// quiet, the guest's resume path first to touch its memory again) it was
// not seen in thousands of epochs. On hardware this costs one suspend
// (tens of milliseconds). A suspend that fails is returned; one that
// takes effect after its deadline is cancelled by the next Resume or
// Close.
func (g *Guest) quiesced(ctx context.Context, op string, fn func() error) error {
	sctx, cancel := context.WithTimeout(ctx, g.suspendTimeout)
	err := g.SuspendCooperative(sctx)
	cancel()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	ferr := g.call(ctx, op, func() error {
		if g.closed {
			return errClosed
		}
		return fn()
	})
	// Resume cancels the suspend even when fn failed, and even when ctx
	// ended meanwhile (a dropped link must not leave the guest
	// suspended): the guest runs on.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), g.suspendTimeout)
	defer cancel()
	return errors.Join(ferr, g.Resume(rctx))
}

// hashAll sets hashes[p] to the PageHash of page p of mem, on up to
// GOMAXPROCS goroutines, checking ctx every rebaselineChunk pages.
func hashAll(ctx context.Context, mem []byte, hashes []uint64) error {
	pages := len(hashes)
	workers := min(runtime.GOMAXPROCS(0), 8, max(1, pages/rebaselineChunk))
	per := (pages + workers - 1) / workers
	var wg sync.WaitGroup
	var failed atomic.Bool
	for lo := 0; lo < pages; lo += per {
		hi := min(lo+per, pages)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := lo; c < hi; c += rebaselineChunk {
				if failed.Load() || ctx.Err() != nil {
					failed.Store(true)
					return
				}
				for p := c; p < min(c+rebaselineChunk, hi); p++ {
					hashes[p] = transport.PageHash(mem[p*pageSize : (p+1)*pageSize])
				}
			}
		}()
	}
	wg.Wait()
	if failed.Load() {
		return ctx.Err()
	}
	return nil
}

// Memory is the read-only foreign mapping of the guest's segments, page
// index i at offset i*PageSize, holes reading as zeros. It is consistent only while the guest is paused.
// A page the guest gives back to Xen (ballooning) keeps its last content
// here until Close.
func (g *Guest) Memory() []byte {
	if g.x == nil {
		return nil
	}
	return g.x.memory()
}

// Mapped returns the page indexes that are backed by memory (the rest of
// [0, NumPages) are holes), as found when Open mapped the guest.
func (g *Guest) Mapped() *dirtymap.Bitmap {
	b := dirtymap.New(g.pages)
	if g.x != nil {
		b.OrWords(g.x.mapped)
	}
	return b
}

// CopyDirty copies the pages set in bm from guest memory into dst, one
// after another in ascending order, and returns how many it copied. dst
// must hold bm.Count() pages. Only consistent while paused.
func (g *Guest) CopyDirty(bm *dirtymap.Bitmap, dst []byte) (int, error) {
	mem := g.Memory()
	if mem == nil {
		return 0, errClosed
	}
	t0 := time.Now()
	n := 0
	var err error
	bm.Runs(func(start, cnt int) bool {
		if (n+cnt)*pageSize > len(dst) {
			err = fmt.Errorf("xen: copy: staging of %d bytes too small", len(dst))
			return false
		}
		copy(dst[n*pageSize:(n+cnt)*pageSize], mem[start*pageSize:(start+cnt)*pageSize])
		n += cnt
		return true
	})
	g.last.Copy = time.Since(t0)
	g.last.DirtyPages = n
	return n, err
}

// ReadLive copies pages [first, first+n) into dst while the guest may run.
func (g *Guest) ReadLive(ctx context.Context, first, n int, dst []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	mem := g.Memory()
	if mem == nil {
		return errClosed
	}
	if first < 0 || n < 0 || first+n > g.pages || len(dst) < n*pageSize {
		return fmt.Errorf("xen: read pages [%d, %d) of %d into %d bytes", first, first+n, g.pages, len(dst))
	}
	copy(dst[:n*pageSize], mem[first*pageSize:(first+n)*pageSize])
	return nil
}

// SaveDeviceState appends the HVM context and every vCPU's context to dst
// (format: see ParseState). Only valid while paused.
func (g *Guest) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	var out []byte
	err := g.call(ctx, "save state", func() error {
		t0 := time.Now()
		if g.closed {
			return errClosed
		}
		if !g.paused {
			return ErrNotPaused
		}
		info, err := g.x.info()
		if err != nil {
			return err
		}
		// A guest suspended by SuspendCooperative is shut down with
		// reason suspend; any other shutdown means it is gone.
		if info.dying || info.shutdown && info.shutdownReason != shutdownSuspend {
			return fmt.Errorf("%w (domain shut down or crashed, reason %d)", ErrGone, info.shutdownReason)
		}
		if info.shutdown && !g.suspended {
			// Suspended without our asking: a request a dead daemon
			// wrote, obeyed after the restart. Resume cancels it.
			g.log.Warn("domain found suspended without a request of ours (left by a previous daemon?): Resume cancels the suspend")
			g.suspended = true
		}
		hvm, err := g.x.hvmContext()
		if err != nil {
			return err
		}
		// Suspended: the guest stopped in its suspend hypercall, whose
		// return value a standby's activation leaves at 0 ("resumed on
		// a new host").
		s := State{Version: stateVersion, PVH: g.pvh, Suspended: info.shutdown && info.shutdownReason == shutdownSuspend, HVM: hvm}
		if info.maxVCPUID != ^uint32(0) {
			for v := uint32(0); v <= info.maxVCPUID; v++ {
				c, online, err := g.x.vcpuContext(v)
				if err != nil {
					return err
				}
				// c aliases a C buffer reused per vCPU: copy it.
				s.VCPUs = append(s.VCPUs, VCPUState{ID: v, Online: online, Context: append([]byte(nil), c...)})
			}
		}
		// hvm aliases a C buffer; AppendState copies it.
		out = AppendState(nil, s)
		g.last.Context = time.Since(t0)
		return nil
	})
	if err != nil {
		return dst, err
	}
	return append(dst, out...), nil
}

// LastTimings returns the time spent inside the libxc calls of the latest
// Pause, HarvestDirty, SaveDeviceState and Resume (a caller also waits for
// a goroutine hand-off per call), the latest CopyDirty's duration and page
// count, and Xen's dirty count of the latest harvest.
func (g *Guest) LastTimings(ctx context.Context) (Timings, uint32, error) {
	var t Timings
	var d uint32
	err := g.call(ctx, "timings", func() error { t, d = g.last, g.lastDirty; return nil })
	return t, d, err
}

// Close disables log-dirty mode, unmaps guest memory, cancels a suspend
// and unpauses the domain if Pause left it so, and closes the handles. The domain itself keeps
// running: remusd does not own its lifecycle. Close waits for an abandoned
// libxc call to finish.
func (g *Guest) Close() error {
	g.sem <- struct{}{}
	defer func() { <-g.sem }()
	if g.closed {
		return nil
	}
	g.closed = true
	var errs []error
	if g.logDirty {
		if err := g.x.disableLogDirty(); err != nil {
			errs = append(errs, err)
		}
	}
	if g.suspended {
		if err := g.settleSuspend(); err != nil {
			errs = append(errs, err)
		}
	}
	if g.paused {
		if err := g.x.unpause(); err != nil {
			errs = append(errs, err)
		}
	}
	g.x.close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("xen: close domain %d: %w", g.domid, err)
	}
	return nil
}
