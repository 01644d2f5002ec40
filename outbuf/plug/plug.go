// Package plug is the production output buffer: the Linux sch_plug qdisc,
// driven through netlink.
//
// Topology (as upstream Remus), built by New and removed by Close:
//
//	guest iface (vif/tap) ── ingress qdisc ffff: ── u32 match-all, protocol all
//	    (IPv4, IPv6, ARP, everything) ── mirred egress redirect ──► IFB device
//	    whose root qdisc is plug 1: (byte limit Config.LimitBytes)
//
// Packets the guest emits arrive on the host side of its interface as
// ingress traffic, are redirected into the IFB and queue in the plug until
// released; the IFB then re-injects them into the host stack as if received
// on the guest interface.
//
// Epochs map onto plug actions: Checkpoint(N) = TCQ_PLUG_BUFFER (closes the
// epoch), Release(N) = TCQ_PLUG_RELEASE_ONE, ReleaseAll =
// TCQ_PLUG_RELEASE_INDEFINITE. sch_plug remembers only one closed epoch
// (BUFFER, BUFFER, RELEASE_ONE would release the first epoch and part of the
// second), so this Buffer never issues a second BUFFER while an epoch is
// pending: a Checkpoint then merges its epoch into the open part of the
// queue (no boundary is placed). Its output stays held until a later
// epoch's boundary is placed and released, which is later than necessary
// but never early: Release(N) lets out only output of epochs <= N. This is
// what keeps a reconnect's resync epoch (captured while the previous epoch
// still awaits its ack) from failing protection.
//
// Fail closed: the plug starts plugged; if this process dies the qdiscs stay
// and held packets stay held (they are never released by the kernel on its
// own); Close drops what is held (the IFB and its plug are deleted) and
// restores the interface; a netlink failure during Checkpoint leaves the
// Buffer refusing further epochs (its kernel state is unknown) until
// ReleaseAll or Close. After Close the guest's traffic is no longer
// buffered: pause or stop the guest first if it must not get out.
//
// Restarts: Detach leaves the qdiscs holding (up to the byte limit, then
// dropping); New on an interface whose topology a detached Buffer (or a
// process that died, also half-way through setup or teardown) left takes
// it over instead of refusing it: it grafts a fresh plug in place of the
// IFB's root qdisc in one netlink request (nothing leaks; what the old
// plug held is dropped) and adds a missing ingress qdisc or filter. The
// old plug is not reused because its epoch state cannot be read back: a
// closed epoch pending there would make every later release one epoch's
// worth of packets short, forever. New recognises the topology by the IFB
// name and this package's u32 redirect; an ingress qdisc with other
// filters, a non-IFB device of that name, or an ingress qdisc without the
// IFB is refused with ErrBusy. Two live Buffers on one interface are the
// caller's error: the second takes the topology over from the first.
//
// A kernel without sch_plug makes New fail with an error matching
// ErrNotSupported (the host kernels we run on today; see
// ARCHITECTURE.md §5); vmtest runs this package's tests in a VM whose
// kernel has it.
package plug

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/outbuf"
)

// Plug actions (include/uapi/linux/pkt_sched.h, struct tc_plug_qopt).
const (
	actionBuffer            = 0 // TCQ_PLUG_BUFFER
	actionReleaseOne        = 1 // TCQ_PLUG_RELEASE_ONE
	actionReleaseIndefinite = 2 // TCQ_PLUG_RELEASE_INDEFINITE
	actionLimit             = 3 // TCQ_PLUG_LIMIT
)

// DefaultLimitBytes is the plug's byte limit when Config.LimitBytes is 0.
const DefaultLimitBytes = 16 << 20

// DefaultTimeout bounds each netlink operation when Config.Timeout is 0.
const DefaultTimeout = 2 * time.Second

var (
	// ErrNotSupported: the kernel has no sch_plug (or no ifb).
	ErrNotSupported = errors.New("plug: sch_plug qdisc not supported by this kernel")
	// ErrBusy: the interface already has an ingress qdisc, or the IFB name is taken.
	ErrBusy = errors.New("plug: interface already in use")
	// ErrBroken: an earlier netlink failure left the plug in an unknown state.
	ErrBroken = errors.New("plug: plug state unknown after a failed operation")
)

// Config configures one guest interface's plug.
type Config struct {
	// Interface is the guest's interface on this host (Xen vif, QEMU tap).
	Interface string
	// IFB names the IFB device to create; default IFBName(Interface).
	IFB string
	// LimitBytes is the most the plug holds; beyond it packets are dropped
	// (never released). 0 means DefaultLimitBytes.
	LimitBytes uint32
	// Timeout bounds each netlink operation (also bounded by ctx in New).
	// 0 means DefaultTimeout.
	Timeout time.Duration
}

// IFBName derives the IFB device name from the guest interface name:
// "ifb-" + name, or, when that exceeds the 15 bytes Linux allows, a
// shortened name with a hash of the full one.
func IFBName(iface string) string {
	if n := "ifb-" + iface; len(n) <= 15 {
		return n
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(iface))
	return fmt.Sprintf("ifb-%s-%05x", iface[:5], h.Sum32()&0xfffff)
}

// control is what the Buffer needs from the kernel; netlinkControl
// implements it, tests substitute a fake.
type control interface {
	plug(ctx context.Context, action uint32) error
	stats(ctx context.Context) (outbuf.Stats, error)
	teardown(ctx context.Context) error
}

// Buffer is a plug-qdisc output buffer for one guest interface.
type Buffer struct {
	mu      sync.Mutex
	ctl     control
	log     *zap.Logger
	timeout time.Duration

	pending   bool   // an epoch is checkpointed and not released
	pendingN  uint64 // that epoch
	merged    uint64 // last epoch checkpointed without a boundary (merged into the open part)
	lastCkpt  uint64 // last checkpointed epoch
	lastRel   uint64 // last released epoch
	passThru  bool   // after ReleaseAll
	closed    bool
	broken    error
	lastStats outbuf.Stats
}

var _ outbuf.Buffer = (*Buffer)(nil)

// New builds the topology for cfg.Interface, or takes over the one a
// detached Buffer left there (see the package comment), and returns a
// Buffer holding the guest's output from now on (output before the first
// Checkpoint belongs to the first epoch). On failure everything it created
// is removed; a failed takeover removes nothing (the interface stays held).
func New(ctx context.Context, cfg Config, log *zap.Logger) (*Buffer, error) {
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.Interface == "" {
		return nil, errors.New("plug: no interface")
	}
	if cfg.IFB == "" {
		cfg.IFB = IFBName(cfg.Interface)
	}
	if len(cfg.IFB) > 15 {
		return nil, fmt.Errorf("plug: IFB name %q longer than 15 bytes", cfg.IFB)
	}
	if cfg.LimitBytes == 0 {
		cfg.LimitBytes = DefaultLimitBytes
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	ctl, err := setup(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	log.Info("plug output buffer set up", zap.String("iface", cfg.Interface), zap.String("ifb", cfg.IFB), zap.Uint32("limit_bytes", cfg.LimitBytes))
	return newBuffer(ctl, cfg.Timeout, log), nil
}

func newBuffer(ctl control, timeout time.Duration, log *zap.Logger) *Buffer {
	if log == nil {
		log = zap.NewNop()
	}
	return &Buffer{ctl: ctl, log: log, timeout: timeout}
}

func (b *Buffer) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), b.timeout)
}

// Kind implements outbuf.Buffer.
func (b *Buffer) Kind() string { return "plug" }

// Checkpoint implements outbuf.Buffer: it closes epoch (TCQ_PLUG_BUFFER).
// While an earlier epoch is not released it places no boundary: epoch's
// output joins the open part of the queue and goes out with the release
// of a later boundary (see the package comment). It fails with
// *outbuf.EpochError if epoch does not grow.
func (b *Buffer) Checkpoint(epoch uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.closed:
		return outbuf.ErrClosed
	case b.passThru:
		return nil
	case b.broken != nil:
		return fmt.Errorf("%w: %v", ErrBroken, b.broken)
	case b.lastCkpt > 0 && epoch <= b.lastCkpt:
		return &outbuf.EpochError{Op: "checkpoint", Epoch: epoch, Last: b.lastCkpt}
	case b.pending:
		b.merged, b.lastCkpt = epoch, epoch
		b.log.Debug("plug: epoch merged into the open queue (one closed epoch pending)", zap.Uint64("epoch", epoch), zap.Uint64("pending", b.pendingN))
		return nil
	}
	ctx, cancel := b.opCtx()
	defer cancel()
	if err := b.ctl.plug(ctx, actionBuffer); err != nil {
		// The kernel may or may not have closed the epoch; another BUFFER
		// could merge two epochs. Refuse epochs from now on.
		b.broken = err
		b.log.Error("plug: checkpoint failed; refusing further epochs", zap.Uint64("epoch", epoch), zap.Error(err))
		return fmt.Errorf("plug: checkpoint epoch %d: %w", epoch, err)
	}
	b.pending, b.pendingN, b.lastCkpt, b.merged = true, epoch, epoch, 0
	return nil
}

// Release implements outbuf.Buffer: it lets out the pending epoch if it is
// <= epoch (TCQ_PLUG_RELEASE_ONE). Epochs not yet checkpointed are not
// touched.
func (b *Buffer) Release(epoch uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.closed:
		return outbuf.ErrClosed
	case b.passThru:
		return nil
	case b.broken != nil:
		return fmt.Errorf("%w: %v", ErrBroken, b.broken)
	}
	if b.pending && b.pendingN <= epoch {
		ctx, cancel := b.opCtx()
		defer cancel()
		// Retrying RELEASE_ONE after an unknown outcome is harmless: the
		// kernel zeroes its closed-epoch count once released.
		if err := b.ctl.plug(ctx, actionReleaseOne); err != nil {
			return fmt.Errorf("plug: release epoch %d: %w", b.pendingN, err)
		}
		b.pending = false
	}
	// Every epoch <= epoch that had a boundary is now out; a merged epoch
	// waits for the next boundary.
	r := min(epoch, b.lastCkpt)
	if b.merged > b.pendingN && !b.pending {
		r = min(r, b.pendingN)
	}
	if r > b.lastRel {
		b.lastRel = r
	}
	return nil
}

// Hold implements outbuf.Buffer: after ReleaseAll, TCQ_PLUG_BUFFER makes
// the plug hold again (the kernel starts a new, empty epoch).
func (b *Buffer) Hold() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.closed:
		return outbuf.ErrClosed
	case !b.passThru:
		return nil
	}
	ctx, cancel := b.opCtx()
	defer cancel()
	if err := b.ctl.plug(ctx, actionBuffer); err != nil {
		// Unknown kernel state: the plug may still pass everything.
		b.broken = err
		return fmt.Errorf("plug: hold: %w", err)
	}
	b.passThru, b.pending, b.merged = false, false, 0
	b.log.Warn("plug: holding output again")
	return nil
}

// Detach implements outbuf.Buffer: the qdiscs stay as they are, holding
// the guest's output in the kernel (up to the byte limit, then dropping)
// until a new Buffer on the interface replaces them.
func (b *Buffer) Detach() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	b.closed = true
	b.log.Info("plug output buffer detached: the kernel keeps holding the guest's output")
	return nil
}

// ReleaseAll implements outbuf.Buffer: everything held goes out and the
// plug stops buffering (TCQ_PLUG_RELEASE_INDEFINITE).
func (b *Buffer) ReleaseAll() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return outbuf.ErrClosed
	}
	if b.passThru {
		return nil
	}
	ctx, cancel := b.opCtx()
	defer cancel()
	if err := b.ctl.plug(ctx, actionReleaseIndefinite); err != nil {
		return fmt.Errorf("plug: release all: %w", err)
	}
	b.log.Warn("plug: released all output; guest output is no longer buffered")
	b.passThru, b.pending, b.broken, b.merged = true, false, nil, 0
	if b.lastCkpt > b.lastRel {
		b.lastRel = b.lastCkpt
	}
	return nil
}

// Close implements outbuf.Buffer: the ingress qdisc (and its filter) and
// the IFB (and its plug, dropping whatever it holds) are deleted, leaving
// the interface as it was before New. Close is idempotent.
func (b *Buffer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil
	}
	ctx, cancel := b.opCtx()
	defer cancel()
	if st, err := b.ctl.stats(ctx); err == nil {
		b.lastStats = st
	}
	if err := b.ctl.teardown(ctx); err != nil {
		return fmt.Errorf("plug: close: %w", err)
	}
	b.closed = true
	b.lastStats.DroppedPackets += b.lastStats.HeldPackets
	b.lastStats.HeldPackets, b.lastStats.HeldBytes = 0, 0
	b.log.Info("plug output buffer closed", zap.Uint64("dropped_held_packets", b.lastStats.DroppedPackets))
	return nil
}

// Stats implements outbuf.Buffer from the plug qdisc's kernel counters:
// held = queue length and backlog, released = packets and bytes dequeued,
// dropped = qdisc drops (limit reached). If the kernel cannot be asked,
// the last counters read are returned.
func (b *Buffer) Stats() outbuf.Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		ctx, cancel := b.opCtx()
		st, err := b.ctl.stats(ctx)
		cancel()
		if err == nil {
			b.lastStats = st
		}
	}
	st := b.lastStats
	st.LastReleased = b.lastRel
	return st
}
