// Package sim is the simulated hypervisor backend: a guest whose "vCPU" is a
// goroutine writing guest memory with a synthetic workload.
//
// Determinism is the point of the package: guest memory and device state
// are a pure function of the Config and the number of ops executed. Wall
// clock time only decides how many ops run when. Replay recomputes the
// state after any number of ops, so tests can check a replica byte for byte.
//
// Dirty tracking is exact: every page written is marked at write time. A new
// or restored guest starts with every page marked dirty (the first harvest
// therefore returns the whole memory, which is what an initial sync needs).
package sim

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"go.uber.org/zap"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
)

const (
	// BackendName is what Guest.Backend returns.
	BackendName = "sim"
	// BackendVersion is what Guest.BackendVersion returns.
	BackendVersion = "sim/1"

	maxBatch = 64                    // ops per run-lock hold
	minSleep = time.Millisecond      // shortest pacing sleep
	catchUp  = 10 * time.Millisecond // token bucket depth, in time
)

// Errors returned by Guest methods.
var (
	ErrClosed    = errors.New("sim: guest closed")
	ErrNotPaused = errors.New("sim: guest not paused")
)

var (
	_ hypervisor.Guest       = (*Guest)(nil)
	_ hypervisor.Rebaseliner = (*Guest)(nil)
	_ hypervisor.Replica     = (*Replica)(nil)
	_ hypervisor.DiskGuest   = (*Guest)(nil)
	_ hypervisor.DiskReplica = (*Replica)(nil)
)

// outputFn boxes the output callback for atomic swapping.
type outputFn struct{ fn func(seq uint64, msg []byte) }

// Guest is a running simulated VM.
//
// Locking: run is a one-slot semaphore (the "run lock"). The workload
// goroutine holds it for each batch of ops; Pause acquires it and keeps it
// until Resume, so holding it means no memory write is in progress. ctl
// guards the paused/closed flags and serialises control calls.
type Guest struct {
	name string
	cfg  Config
	log  *zap.Logger
	m    *machine // guarded by run

	run     chan struct{}
	resumed time.Time // last Resume; guarded by run
	output  atomic.Pointer[outputFn]
	ops     atomic.Uint64
	outSeq  atomic.Uint64
	// stopReq: a Pause waits for the run lock; the workload ends its batch
	// after the op in progress, as QEMU stops its vCPUs before it drains
	// I/O (so that what is in flight at a pause stays bounded: one op's
	// disk changes).
	stopReq atomic.Bool

	ctl    sync.Mutex
	paused bool
	closed bool

	done chan struct{}
	wg   sync.WaitGroup

	// The disk (Config.DiskBytes): image, its journal (fed by every
	// change the workload makes, as the NBD server feeds it), the
	// journal's configuration and the context its Observe calls wait
	// under (ended by Close).
	dimg     disk.Backend
	journal  *disk.Journal
	jcfg     disk.JournalConfig
	dctx     context.Context
	dcancel  context.CancelFunc
	diskErrs atomic.Uint64
}

// New creates a guest with deterministic initial memory and starts its
// workload running. cfg is defaulted and validated. log may be nil.
func New(name string, cfg Config, log *zap.Logger, opts ...Option) (*Guest, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := newMachine(cfg)
	g, err := start(name, cfg, m, log, false, opts)
	if err != nil {
		return nil, err
	}
	g.log.Info("sim guest started", zap.Int64("memory_bytes", cfg.MemoryBytes),
		zap.String("workload", cfg.Workload), zap.Int("rate", cfg.Rate), zap.Uint64("seed", cfg.Seed))
	return g, nil
}

// Restore creates a running guest from memory and a device-state blob saved
// by SaveDeviceState (or committed to a Replica). It continues the op count,
// PRNG, output sequence and sequential cursor exactly where the state was
// saved. Restore takes ownership of mem (no copy: failover must be fast);
// the caller must not use it afterwards except through the guest.
func Restore(name string, cfg Config, mem []byte, devState []byte, log *zap.Logger, opts ...Option) (*Guest, error) {
	return restore(name, cfg, mem, devState, log, false, opts...)
}

// Option configures a guest before its first op.
type Option func(*Guest)

// WithOutput installs the output callback before the workload starts, so
// that no message is emitted before it is in place (see SetOutput).
func WithOutput(fn func(seq uint64, msg []byte)) Option {
	return func(g *Guest) { g.SetOutput(fn) }
}

// WithDiskImage gives a guest with a disk (Config.DiskBytes) its image:
// Restore needs the replica's disk; New uses it instead of a zeroed one.
func WithDiskImage(img disk.Backend) Option {
	return func(g *Guest) { g.dimg = img }
}

// WithJournal configures the disk's journal (default: Limit 4 MiB,
// MaxWrite 4096, starting in tracking mode, as a journal fed from the
// guest's boot must).
func WithJournal(cfg disk.JournalConfig) Option {
	return func(g *Guest) { g.jcfg = cfg }
}

// Disks implements hypervisor.DiskGuest: the guest's disk, if it has one.
func (g *Guest) Disks() []hypervisor.Disk {
	if g.journal == nil {
		return nil
	}
	return []hypervisor.Disk{{ID: DiskID, Image: g.dimg, Journal: g.journal}}
}

// DiskErrors counts disk changes the journal refused (its Observe
// failed: the guest was closing).
func (g *Guest) DiskErrors() uint64 { return g.diskErrs.Load() }

// restore is Restore, optionally starting paused (so that tests can install
// an output callback before the first op).
func restore(name string, cfg Config, mem []byte, devState []byte, log *zap.Logger, paused bool, opts ...Option) (*Guest, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if int64(len(mem)) != cfg.MemoryBytes {
		return nil, fmt.Errorf("sim: restore %q: memory is %d bytes, config has %d", name, len(mem), cfg.MemoryBytes)
	}
	info, err := DecodeDeviceState(devState)
	if err != nil {
		return nil, fmt.Errorf("sim: restore %q: %w", name, err)
	}
	if err := info.matches(cfg); err != nil {
		return nil, fmt.Errorf("sim: restore %q: %w", name, err)
	}
	m := newMachineWith(cfg, mem)
	m.ops, m.rng, m.outSeq, m.cursor = info.Ops, info.RNG, info.OutputSeq, info.Cursor
	g, err := start(name, cfg, m, log, paused, opts)
	if err != nil {
		return nil, fmt.Errorf("sim: restore %q: %w", name, err)
	}
	g.log.Info("sim guest restored", zap.Uint64("ops", info.Ops), zap.Uint64("output_seq", info.OutputSeq))
	return g, nil
}

// start wraps m in a Guest and starts its workload goroutine, paused if
// asked.
func start(name string, cfg Config, m *machine, log *zap.Logger, paused bool, opts []Option) (*Guest, error) {
	if log == nil {
		log = zap.NewNop()
	}
	g := &Guest{
		name:    name,
		cfg:     cfg,
		log:     log.With(zap.String("vm", name), zap.String("backend", BackendName)),
		m:       m,
		run:     make(chan struct{}, 1),
		resumed: time.Now(),
		done:    make(chan struct{}),
	}
	g.ops.Store(m.ops)
	g.outSeq.Store(m.outSeq)
	if paused {
		g.run <- struct{}{}
		g.paused = true
	}
	g.jcfg = disk.JournalConfig{Limit: 4 << 20, MaxWrite: 4096, Tracking: true}
	for _, o := range opts {
		o(g)
	}
	if cfg.DiskBytes > 0 {
		if g.dimg == nil {
			if m.ops != 0 {
				return nil, errors.New("a restored guest with a disk needs its image (WithDiskImage)")
			}
			g.dimg = disk.NewMemory(int(cfg.DiskBytes))
		}
		if g.dimg.Size() != cfg.DiskBytes {
			return nil, fmt.Errorf("disk image has %d bytes, config says %d", g.dimg.Size(), cfg.DiskBytes)
		}
		j, err := disk.NewJournal(g.jcfg, 1)
		if err != nil {
			return nil, err
		}
		g.journal = j
		g.dctx, g.dcancel = context.WithCancel(context.Background())
		m.dimg = g.dimg
		m.observe = func(c disk.Change) {
			if err := j.Observe(g.dctx, c); err != nil {
				g.diskErrs.Add(1)
			}
		}
	}
	if cfg.rate() > 0 && m.workload != wlIdle {
		g.wg.Add(1)
		go g.workload()
	}
	return g, nil
}

// workload runs ops paced by a token bucket on the wall clock, in batches of
// at most maxBatch ops, each under the run lock.
func (g *Guest) workload() {
	defer g.wg.Done()
	rate := float64(g.cfg.rate())
	depth := max(maxBatch, rate*catchUp.Seconds())
	var tokens float64
	last := time.Now()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case g.run <- struct{}{}:
		case <-g.done:
			return
		}
		now := time.Now()
		if g.resumed.After(last) {
			last = g.resumed // time spent paused earns no tokens
		}
		tokens = min(tokens+now.Sub(last).Seconds()*rate, depth)
		last = now
		n := min(int(tokens), maxBatch)
		if n > 0 {
			emit := g.emit
			if g.output.Load() == nil {
				emit = nil
			}
			done := 0
			for ; done < n && !g.stopReq.Load(); done++ {
				g.m.step(emit)
			}
			tokens -= float64(done)
			g.ops.Store(g.m.ops)
			g.outSeq.Store(g.m.outSeq)
		}
		<-g.run
		if tokens >= 1 {
			continue
		}
		wait := max(time.Duration((1-tokens)/rate*float64(time.Second)), minSleep)
		timer.Reset(wait)
		select {
		case <-timer.C:
		case <-g.done:
			return
		}
	}
}

// emit delivers one output message to the current callback (run lock held).
func (g *Guest) emit(seq uint64, msg []byte) {
	if o := g.output.Load(); o != nil && o.fn != nil {
		o.fn(seq, msg)
	}
}

// SetOutput installs the output callback. The workload calls it for each
// output message, with the run lock held (so never while paused); it must
// not call Pause or Resume. The message slice may be retained. nil
// discards output. It may be called at any time.
func (g *Guest) SetOutput(fn func(seq uint64, msg []byte)) {
	if fn == nil {
		g.output.Store(nil)
		return
	}
	g.output.Store(&outputFn{fn: fn})
}

// Ops returns the number of ops executed so far. While paused it is exact.
func (g *Guest) Ops() uint64 { return g.ops.Load() }

// OutputSeq returns the last output sequence number emitted (0 = none).
func (g *Guest) OutputSeq() uint64 { return g.outSeq.Load() }

// Name returns the VM name.
func (g *Guest) Name() string { return g.name }

// Backend returns "sim".
func (g *Guest) Backend() string { return BackendName }

// BackendVersion returns "sim/1".
func (g *Guest) BackendVersion() string { return BackendVersion }

// Config returns the defaulted configuration as JSON (see ParseConfig).
func (g *Guest) Config() []byte { return g.cfg.Marshal() }

// NumPages returns the number of guest pages.
func (g *Guest) NumPages() int { return g.m.pages }

// Memory returns guest RAM. Its content is only stable while paused.
func (g *Guest) Memory() []byte { return g.m.mem }

// Paused reports whether the guest is paused.
func (g *Guest) Paused() bool {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	return g.paused
}

// Pause stops the workload between two batches and returns once no memory
// write is in progress. Pausing a paused guest is a no-op. It returns
// ctx.Err() (wrapped) if ctx ends first, leaving the guest running, and
// ErrClosed after Close.
func (g *Guest) Pause(ctx context.Context) error {
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return ErrClosed
	}
	if g.paused {
		return nil
	}
	g.stopReq.Store(true)
	defer g.stopReq.Store(false)
	select {
	case g.run <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("sim: pause %q: %w", g.name, ctx.Err())
	}
	g.paused = true
	return nil
}

// Resume restarts a paused guest. Resuming a running guest is a no-op.
func (g *Guest) Resume(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sim: resume %q: %w", g.name, err)
	}
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return ErrClosed
	}
	if !g.paused {
		return nil
	}
	g.resumed = time.Now()
	g.paused = false
	<-g.run
	return nil
}

// whilePaused runs fn with the guest held paused.
func (g *Guest) whilePaused(ctx context.Context, op string, fn func()) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("sim: %s %q: %w", op, g.name, err)
	}
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return ErrClosed
	}
	if !g.paused {
		return fmt.Errorf("sim: %s %q: %w", op, g.name, ErrNotPaused)
	}
	fn()
	return nil
}

// HarvestDirty ORs the pages written since the previous harvest into dst
// and clears the guest's dirty map. Only valid while paused; dst must have
// NumPages bits.
func (g *Guest) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error {
	if dst.Len() != g.m.pages {
		return fmt.Errorf("sim: harvest %q: bitmap has %d pages, guest has %d", g.name, dst.Len(), g.m.pages)
	}
	return g.whilePaused(ctx, "harvest", func() {
		dst.Union(g.m.dirty)
		g.m.dirty.Reset()
	})
}

// rebaselineChunk is how many pages Rebaseline hashes per hold of the run
// lock: the workload runs between chunks.
const rebaselineChunk = 256

// Rebaseline implements hypervisor.Rebaseliner: it clears the dirty map and
// then hashes every page (xxhash64, as transport.PageHash) while the
// workload keeps running: the run lock is taken per chunk of pages, so
// ops run between chunks but never during a page's hash. A page written
// after the clear is in the next harvest; one not written since has the
// content that was hashed. On a paused guest it runs in one go. It holds
// the control lock throughout (Pause waits for it).
func (g *Guest) Rebaseline(ctx context.Context) ([]uint64, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("sim: rebaseline %q: %w", g.name, err)
	}
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	hashes := make([]uint64, g.m.pages)
	hold, unhold := func() error { return nil }, func() {}
	if !g.paused { // else the run lock is ours already
		hold = func() error {
			select {
			case g.run <- struct{}{}:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		unhold = func() { <-g.run }
	}
	for lo := 0; lo < g.m.pages; lo += rebaselineChunk {
		if err := hold(); err != nil {
			if lo > 0 { // leave tracking conservative: every page dirty
				g.run <- struct{}{} // the workload lets go within one batch
				g.m.dirty.SetRange(0, g.m.pages)
				<-g.run
			}
			return nil, fmt.Errorf("sim: rebaseline %q: %w", g.name, err)
		}
		if lo == 0 {
			g.m.dirty.Reset()
		}
		for p := lo; p < min(lo+rebaselineChunk, g.m.pages); p++ {
			hashes[p] = xxhash.Sum64(g.m.mem[p*pageSize : (p+1)*pageSize])
		}
		unhold()
	}
	return hashes, nil
}

// ReadLive implements hypervisor.LiveReader: pages are copied in chunks,
// each under the run lock (the workload waits for at most one chunk), so
// every page copied is a state the guest really had.
func (g *Guest) ReadLive(ctx context.Context, first, n int, dst []byte) error {
	if first < 0 || n < 0 || first+n > g.m.pages || len(dst) < n*pageSize {
		return fmt.Errorf("sim: read live %q: pages [%d, %d) of %d into %d bytes", g.name, first, first+n, g.m.pages, len(dst))
	}
	g.ctl.Lock()
	defer g.ctl.Unlock()
	if g.closed {
		return ErrClosed
	}
	for lo := first; lo < first+n; lo += rebaselineChunk {
		hi := min(lo+rebaselineChunk, first+n)
		if !g.paused {
			select {
			case g.run <- struct{}{}:
			case <-ctx.Done():
				return fmt.Errorf("sim: read live %q: %w", g.name, ctx.Err())
			}
		}
		copy(dst[(lo-first)*pageSize:], g.m.mem[lo*pageSize:hi*pageSize])
		if !g.paused {
			<-g.run
		}
	}
	return nil
}

// SaveDeviceState appends the DeviceStateSize-byte device state to dst.
// Only valid while paused.
func (g *Guest) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	err := g.whilePaused(ctx, "save device state", func() { dst = g.m.appendState(dst) })
	return dst, err
}

// Close stops the workload goroutine and waits for it. Further control
// calls return ErrClosed; Memory stays readable. Close is idempotent.
func (g *Guest) Close() error {
	g.ctl.Lock()
	if g.closed {
		g.ctl.Unlock()
		return nil
	}
	g.closed = true
	close(g.done)
	if g.dcancel != nil {
		g.dcancel() // a change waiting for the journal gives up
	}
	g.ctl.Unlock()
	g.wg.Wait()
	g.log.Info("sim guest closed", zap.Uint64("ops", g.ops.Load()))
	return nil
}

// Replay recomputes, without a goroutine or pacing, the memory and device
// state of a guest with cfg after exactly ops ops. The result equals a live
// guest paused after ops ops, byte for byte.
func Replay(cfg Config, ops uint64) (mem []byte, devState []byte, err error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	if cfg.Workload == "idle" && ops != 0 {
		return nil, nil, fmt.Errorf("sim: replay: idle workload executes no ops, asked for %d", ops)
	}
	m := newMachine(cfg)
	for range ops {
		m.step(nil)
	}
	return m.mem, m.appendState(nil), nil
}

// ReplayDisk recomputes the disk of a guest with cfg (DiskBytes > 0)
// after exactly ops ops, as Replay does its memory.
func ReplayDisk(cfg Config, ops uint64) ([]byte, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.DiskBytes <= 0 {
		return nil, errors.New("sim: replay disk: the config has no disk")
	}
	m := newMachine(cfg)
	img := disk.NewMemory(int(cfg.DiskBytes))
	m.dimg = img
	for range ops {
		m.step(nil)
	}
	return img.Bytes(), nil
}
