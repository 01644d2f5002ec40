// Package nfqueue is the NFQUEUE output buffer: the fallback for kernels
// without sch_plug (ARCHITECTURE.md §5).
//
// # Mechanism
//
// New installs an iptables and an ip6tables rule at the head of both the
// FORWARD and the INPUT chain of the host network namespace (four rules)
// that steer every packet arriving from the guest's port to NFQUEUE queue
// Config.QueueNum: FORWARD catches what the host passes on (to other
// ports, other hosts), INPUT what the guest addresses to the host itself
// (a client in the host namespace, e.g. in dom0 on the vif's bridge). The
// rule is the same in both chains:
//
//	-m physdev --physdev-in IF -j NFQUEUE --queue-num N   (Bridged: a bridge port)
//	-i IF -j NFQUEUE --queue-num N                         (routed)
//
// (iptables-nft through nft_compat; the native nft "queue" expression is
// not needed). Never with --queue-bypass. The queue is opened with
// metadata-only copy (no payload reaches user space), the GSO flag (GSO
// packets are queued whole instead of being segmented) and without
// fail-open. Every packet is held: the agent issues no verdict on arrival.
// Packet ids are assigned by the kernel in enqueue order, increasing by one
// per queue (both address families share the queue and the id sequence).
//
//   - Checkpoint(N) records the barrier of epoch N: the last id the kernel
//     has assigned on the queue (read from /proc/net/netfilter/nfnetlink_queue,
//     or the last id received if that is unreadable). Packets still in
//     flight towards the queue get later ids and belong to a later epoch,
//     which holds them longer, never shorter.
//   - Release(N) issues ONE batch verdict ACCEPT up to the barrier of the
//     highest checkpointed epoch <= N. Several epochs may be outstanding.
//   - ReleaseAll accepts everything queued and then accepts packets on
//     arrival (the rules stay until Close).
//   - Close removes the rules (every copy) and closes the queue socket: the
//     kernel drops what is held (fail closed) and the host's rule set is as
//     before New.
//   - Detach closes the queue socket and leaves the rules: the kernel drops
//     what was held and everything the guest sends until a new Buffer on
//     the same queue and port (a restarted daemon) binds the queue again;
//     that New adopts the rules instead of adding copies.
//
// # Failing closed
//
// A full queue (Config.MaxQueueLen) drops new packets, and so does a full
// socket buffer; both are counted by the kernel and reported in
// Stats().DroppedPackets. If the agent exits or its socket closes, the
// kernel drops the held packets and, as the rules stay without a listener,
// every later packet too: nothing leaves unacknowledged.
//
// # What is not held
//
// Packets the guest addresses to the host itself are held like forwarded
// ones (INPUT). Not held:
//
//   - ARP (not IP; iptables never sees it). A guest's ARP replies and
//     requests leave at once. IPv6 neighbour discovery is IP and IS held.
//   - Anything that crosses neither the FORWARD nor the INPUT hook from the
//     guest's port: traffic of other ports, non-IP ethertypes, and, for a
//     bridged port, anything if net.bridge.bridge-nf-call-iptables /
//     -ip6tables is 0 in the host namespace (New checks and refuses).
//   - Output that a rule in a table evaluated before filter/FORWARD or
//     filter/INPUT (raw, mangle) drops or redirects is simply not seen.
//   - Frames a host packet socket reads before the INPUT hook (tcpdump,
//     an ISC dhcpd or dhcrelay on the bridge) are seen at once.
//   - Whatever the guest sends between another tool deleting a rule or
//     putting an accepting rule ahead of it (a firewall reload, libvirt's
//     own INPUT jump) and the buffer's next check (Config.RuleCheckEvery,
//     1 s by default), which repairs it, logs an error and counts it
//     (Repairs).
//
// Held like any output, as with plug: the guest's IPv6 neighbour
// discovery to the host, so on a routed port the host resolves a guest
// address only once an epoch is released (a slow first epoch can make
// that resolution give up).
package nfqueue

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	gonfq "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/outbuf"
)

// Kind is the name of this mechanism.
const Kind = "nfqueue"

// Defaults.
const (
	DefaultMaxQueueLen     = 65536
	DefaultReadBufferBytes = 16 << 20
	DefaultCallTimeout     = 5 * time.Second
	// metaMsgBytes is the socket buffer cost of one queued packet's
	// metadata-only message (netlink header, packet header, ifindexes,
	// hw address, timestamp, lengths; ~150 bytes) plus skb overhead.
	metaMsgBytes = 512
)

// Config configures a Buffer.
type Config struct {
	// QueueNum is the NFQUEUE queue number (unique per host namespace).
	QueueNum uint16
	// Interface is the host-side name of the guest's port (tap, vif, veth).
	Interface string
	// Bridged: the port is a bridge port; packets are matched with
	// "-m physdev --physdev-in" (requires bridge-nf-call-ip{,6}tables=1).
	// Otherwise the host routes the guest's traffic and "-i" is used.
	Bridged bool
	// MaxQueueLen is the most packets the kernel holds (0: DefaultMaxQueueLen).
	// Beyond it new packets are dropped. See SizeFor.
	MaxQueueLen uint32
	// ReadBufferBytes is the queue socket's receive buffer
	// (0: DefaultReadBufferBytes). See SizeFor.
	ReadBufferBytes int
	// NetnsPath is the host network namespace the port lives in (e.g.
	// /var/run/netns/NAME); "" is the process's own.
	NetnsPath string
	// IPTables and IP6Tables are the binaries (default "iptables",
	// "ip6tables"; they must be the nft variants or legacy consistently
	// with the rest of the host).
	IPTables, IP6Tables string
	// CallTimeout bounds every external call: iptables runs, netlink
	// configuration and verdict writes (0: DefaultCallTimeout).
	CallTimeout time.Duration
	// RuleCheckEvery is how often the buffer checks that its rules are
	// still in place and ahead of every other tool's rule, repairing them
	// if not (0: DefaultRuleCheckEvery; negative: never).
	RuleCheckEvery time.Duration
}

// DefaultRuleCheckEvery is Config.RuleCheckEvery's default.
const DefaultRuleCheckEvery = time.Second

// SizeFor returns a queue length and a socket read buffer for a guest that
// emits up to packetsPerSec while epochs last epoch and the backup takes
// ack to acknowledge one: the queue holds the open epoch plus the
// unacknowledged ones, rate × (epoch + ack), times a safety margin of 2.
// The read buffer holds as many metadata-only messages.
func SizeFor(packetsPerSec float64, epoch, ack time.Duration) (maxQueueLen uint32, readBufferBytes int) {
	const margin = 2
	n := packetsPerSec * (epoch + ack).Seconds() * margin
	switch {
	case n < 1024 || math.IsNaN(n):
		n = 1024
	case n > 1<<24:
		n = 1 << 24
	}
	maxQueueLen = uint32(math.Ceil(n))
	readBufferBytes = int(maxQueueLen) * metaMsgBytes
	if readBufferBytes < 1<<20 {
		readBufferBytes = 1 << 20
	}
	if readBufferBytes > 256<<20 {
		readBufferBytes = 256 << 20
	}
	return maxQueueLen, readBufferBytes
}

func (c *Config) setDefaults() error {
	if c.Interface == "" || strings.ContainsAny(c.Interface, " \t\n/") || len(c.Interface) >= unix.IFNAMSIZ {
		return fmt.Errorf("nfqueue: invalid interface name %q", c.Interface)
	}
	if c.MaxQueueLen == 0 {
		c.MaxQueueLen = DefaultMaxQueueLen
	}
	if c.ReadBufferBytes <= 0 {
		c.ReadBufferBytes = DefaultReadBufferBytes
	}
	if c.IPTables == "" {
		c.IPTables = "iptables"
	}
	if c.IP6Tables == "" {
		c.IP6Tables = "ip6tables"
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	if c.RuleCheckEvery == 0 {
		c.RuleCheckEvery = DefaultRuleCheckEvery
	}
	return nil
}

// barrier is a checkpointed epoch not yet released.
type barrier struct {
	epoch uint64
	id    uint32 // last packet id of the epoch
	pkts  uint64 // packets of the epoch seen by the agent
	bytes uint64
}

// Buffer is the NFQUEUE output buffer. It is safe for concurrent use.
type Buffer struct {
	cfg   Config
	log   *zap.Logger
	nfq   *gonfq.Nfqueue
	stop  context.CancelFunc
	rules *ruleSet
	proc  *os.File // /proc/net/netfilter/nfnetlink_queue of the host netns

	mu        sync.Mutex
	closed    bool
	passThru  bool
	seenAny   bool
	lastSeen  uint32    // highest id received
	released  uint32    // ids <= released have been accepted (serial order)
	barriers  []barrier // ascending epochs and ids
	lastEpoch uint64    // last checkpointed epoch
	openPkts  uint64
	openBytes uint64
	stats     outbuf.Stats
	closeDrop uint64 // held packets dropped by Close
	kdrop     uint64 // kernel drop counters at the last successful read
	repairs   uint64 // rules the guard put back or moved to the head

	stopGuard context.CancelFunc // ends guardRules
	guardDone chan struct{}      // closed when guardRules has returned
}

var _ outbuf.Buffer = (*Buffer)(nil)

// after reports whether id a comes after b in the queue's serial order.
func after(a, b uint32) bool { return int32(a-b) > 0 }

// New opens queue cfg.QueueNum in the host namespace and then installs the
// rules that steer the guest port's IPv4 and IPv6 packets to it, forwarded
// ones (FORWARD) and those to the host itself (INPUT).
// Rules already in place for the same queue and port (a Buffer that
// detached, or whose process died, left them; the kernel has been dropping
// the guest's packets through them since) are adopted, not duplicated:
// exactly one copy of each stays, and the queue holds what they steer from
// now on. If New fails, adopted rules stay in place (fail closed). ctx
// bounds New only; the buffer lives until Close.
func New(ctx context.Context, cfg Config, log *zap.Logger) (*Buffer, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	b := &Buffer{cfg: cfg, log: log.With(zap.String("outbuf", Kind), zap.Uint16("queue", cfg.QueueNum), zap.String("port", cfg.Interface))}

	if cfg.Bridged {
		if err := checkBridgeNF(cfg.NetnsPath); err != nil {
			return nil, err
		}
	}
	proc, err := openProcStats(cfg.NetnsPath)
	if err != nil {
		return nil, err
	}
	b.proc = proc
	if st, err := b.readProc(); err == nil && st.present {
		proc.Close()
		return nil, fmt.Errorf("nfqueue: queue %d is already bound by port id %d", cfg.QueueNum, st.portID)
	}

	if err := b.open(ctx); err != nil {
		proc.Close()
		return nil, err
	}
	b.rules = newRuleSet(cfg)
	if err := b.rules.install(ctx); err != nil {
		b.stop()
		b.nfq.Close()
		proc.Close()
		return nil, err
	}
	b.log.Info("output buffer installed", zap.Bool("bridged", cfg.Bridged), zap.Uint32("max_queue_len", cfg.MaxQueueLen), zap.Int("read_buffer", cfg.ReadBufferBytes),
		zap.Int("rules", len(b.rules.installed)), zap.Int("rules_adopted", b.rules.adopted))
	gctx, stop := context.WithCancel(context.Background())
	b.stopGuard, b.guardDone = stop, make(chan struct{})
	go b.guardRules(gctx, slices.Clone(b.rules.installed))
	return b, nil
}

// guardRules checks the rules every cfg.RuleCheckEvery until ctx ends: a
// firewall reload or another tool can flush them or put an accepting rule
// ahead of them, and the guest's output would then leave unheld. What is
// found is repaired at once and logged as an error (output may have left
// unheld meanwhile); Repairs counts it.
func (b *Buffer) guardRules(ctx context.Context, refs []ruleRef) {
	defer close(b.guardDone)
	if b.cfg.RuleCheckEvery < 0 {
		return
	}
	t := time.NewTicker(b.cfg.RuleCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, ref := range refs {
			did, err := b.rules.check(ctx, ref)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				b.log.Warn("could not check an output buffer rule", zap.Stringer("rule", ref), zap.Error(err))
				continue
			}
			if did != "" {
				b.mu.Lock()
				b.repairs++
				b.mu.Unlock()
				b.log.Error("another tool changed an output buffer rule: the guest's output may have left unheld until now", zap.Stringer("rule", ref), zap.String("repaired", did))
			}
		}
	}
}

// endGuard stops guardRules and waits for it (before the rules are
// removed or left to a successor).
func (b *Buffer) endGuard() {
	if b.stopGuard != nil {
		b.stopGuard()
		<-b.guardDone
	}
}

func (b *Buffer) open(ctx context.Context) error {
	cfg := b.cfg
	ncfg := &gonfq.Config{
		NfQueue:      cfg.QueueNum,
		MaxQueueLen:  cfg.MaxQueueLen,
		MaxPacketLen: 0,
		Copymode:     gonfq.NfQnlCopyMeta,
		Flags:        gonfq.NfQaCfgFlagGSO, // never NfQaCfgFlagFailOpen
		AfFamily:     unix.AF_INET,         // ignored by kernels >= 3.8: the queue carries both families
		WriteTimeout: cfg.CallTimeout,
		Logger:       zapLogger{b.log},
	}
	if cfg.NetnsPath != "" {
		fd, err := unix.Open(cfg.NetnsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("nfqueue: open netns %s: %w", cfg.NetnsPath, err)
		}
		defer unix.Close(fd)
		ncfg.NetNS = fd
	}
	nfq, err := gonfq.Open(ncfg)
	if err != nil {
		return fmt.Errorf("nfqueue: open netlink socket: %w", err)
	}
	if err := setRcvBuf(nfq.Con, cfg.ReadBufferBytes); err != nil {
		nfq.Close()
		return err
	}
	// Packets dropped because the socket buffer is full are counted by the
	// kernel (user_dropped); we need no ENOBUFS wake-ups.
	_ = nfq.SetOption(netlink.NoENOBUFS, true)

	deadline := time.Now().Add(cfg.CallTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = nfq.Con.SetReadDeadline(deadline)
	rctx, stop := context.WithCancel(context.Background())
	if err := nfq.RegisterWithErrorFunc(rctx, b.onPacket, b.onError(rctx)); err != nil {
		stop()
		nfq.Close()
		return fmt.Errorf("nfqueue: bind queue %d: %w", cfg.QueueNum, err)
	}
	_ = nfq.Con.SetReadDeadline(time.Time{})
	b.nfq, b.stop = nfq, stop
	return nil
}

func setRcvBuf(c *netlink.Conn, n int) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("nfqueue: socket: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
		if serr != nil {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, n)
		}
	}); err != nil {
		return fmt.Errorf("nfqueue: socket: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("nfqueue: set read buffer to %d bytes: %w", n, serr)
	}
	return nil
}

// onPacket runs on the receive goroutine for every queued packet.
func (b *Buffer) onPacket(a gonfq.Attribute) int {
	if a.PacketID == nil {
		return 0
	}
	id := *a.PacketID
	if ce := b.log.Check(zap.DebugLevel, "queued"); ce != nil {
		var proto uint16
		var cl uint32
		var pl int
		if a.HwProtocol != nil {
			proto = *a.HwProtocol
		}
		if a.CapLen != nil {
			cl = *a.CapLen
		}
		if a.Payload != nil {
			pl = len(*a.Payload)
		}
		ce.Write(zap.Uint32("id", id), zap.Uint16("proto", proto), zap.Uint32("caplen", cl), zap.Int("payload", pl))
	}
	var size uint64
	switch {
	case a.CapLen != nil:
		size = uint64(*a.CapLen)
	case a.Payload != nil:
		size = uint64(len(*a.Payload))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0
	}
	if !b.seenAny || after(id, b.lastSeen) {
		b.lastSeen, b.seenAny = id, true
	}
	if b.passThru {
		if after(id, b.released) {
			if err := b.nfq.SetVerdict(id, gonfq.NfAccept); err != nil {
				b.log.Warn("accept on arrival failed; packet stays held", zap.Uint32("id", id), zap.Error(err))
				b.openPkts++
				b.openBytes += size
				return 0
			}
		}
		b.stats.ReleasedPackets++
		b.stats.ReleasedBytes += size
		return 0
	}
	if !after(id, b.released) {
		// Already accepted by a batch verdict whose barrier came from the
		// kernel's id sequence before this message was read.
		b.stats.ReleasedPackets++
		b.stats.ReleasedBytes += size
		return 0
	}
	for i := range b.barriers {
		if !after(id, b.barriers[i].id) {
			b.barriers[i].pkts++
			b.barriers[i].bytes += size
			return 0
		}
	}
	b.openPkts++
	b.openBytes += size
	return 0
}

func (b *Buffer) onError(ctx context.Context) gonfq.ErrorFunc {
	return func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		var oe *netlink.OpError
		if errors.As(err, &oe) {
			switch {
			case errors.Is(oe.Err, unix.ENOENT):
				// A batch verdict found nothing left to accept (all of it
				// had been dropped, e.g. the queue overflowed).
				return 0
			case errors.Is(oe.Err, unix.ENOBUFS), oe.Timeout():
				return 0
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, unix.EINTR) {
			return 0
		}
		if errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF) || strings.Contains(err.Error(), "use of closed") {
			b.log.Warn("queue socket closed: held output is dropped by the kernel (fail closed)")
			return 1
		}
		b.log.Error("queue receive error", zap.Error(err))
		return 0
	}
}

// Kind implements outbuf.Buffer.
func (b *Buffer) Kind() string { return Kind }

// barrierID is the last id the kernel assigned so far; lock held.
func (b *Buffer) barrierID() uint32 {
	id := b.lastSeen
	if st, err := b.readProc(); err == nil && st.present {
		if !b.seenAny || after(st.idSeq, id) {
			id = st.idSeq
		}
	}
	return id
}

// Checkpoint implements outbuf.Buffer: the packets queued so far belong to
// epoch.
func (b *Buffer) Checkpoint(epoch uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return outbuf.ErrClosed
	}
	if b.passThru {
		return nil
	}
	if epoch <= b.lastEpoch {
		return &outbuf.EpochError{Op: "checkpoint", Epoch: epoch, Last: b.lastEpoch}
	}
	b.lastEpoch = epoch
	id := b.barrierID()
	if n := len(b.barriers); n > 0 && after(b.barriers[n-1].id, id) {
		id = b.barriers[n-1].id
	} else if n == 0 && after(b.released, id) {
		id = b.released
	}
	b.barriers = append(b.barriers, barrier{epoch: epoch, id: id, pkts: b.openPkts, bytes: b.openBytes})
	b.openPkts, b.openBytes = 0, 0
	return nil
}

// Release implements outbuf.Buffer: one batch verdict accepts every packet
// up to the barrier of the highest checkpointed epoch <= epoch.
func (b *Buffer) Release(epoch uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return outbuf.ErrClosed
	}
	if b.passThru {
		return nil
	}
	i := 0
	for i < len(b.barriers) && b.barriers[i].epoch <= epoch {
		i++
	}
	if i > 0 {
		top := b.barriers[i-1].id
		if after(top, b.released) {
			if err := b.nfq.SetVerdictBatch(top, gonfq.NfAccept); err != nil {
				// Nothing was released; the epochs stay held.
				return fmt.Errorf("nfqueue: batch verdict up to id %d (epoch %d): %w", top, b.barriers[i-1].epoch, err)
			}
			b.released = top
		}
		for _, r := range b.barriers[:i] {
			b.stats.ReleasedPackets += r.pkts
			b.stats.ReleasedBytes += r.bytes
		}
		b.barriers = append(b.barriers[:0], b.barriers[i:]...)
	}
	if epoch > b.stats.LastReleased && epoch <= b.lastEpoch {
		b.stats.LastReleased = epoch
	}
	return nil
}

// ReleaseAll implements outbuf.Buffer: everything queued is accepted and
// later packets are accepted on arrival.
func (b *Buffer) ReleaseAll() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return outbuf.ErrClosed
	}
	if b.passThru {
		return nil
	}
	top := b.barrierID()
	if n := len(b.barriers); n > 0 && after(b.barriers[n-1].id, top) {
		top = b.barriers[n-1].id
	}
	if (b.seenAny || top != 0) && after(top, b.released) {
		if err := b.nfq.SetVerdictBatch(top, gonfq.NfAccept); err != nil {
			return fmt.Errorf("nfqueue: release all up to id %d: %w", top, err)
		}
		b.released = top
	}
	for _, r := range b.barriers {
		b.stats.ReleasedPackets += r.pkts
		b.stats.ReleasedBytes += r.bytes
	}
	b.stats.ReleasedPackets += b.openPkts
	b.stats.ReleasedBytes += b.openBytes
	b.barriers, b.openPkts, b.openBytes = nil, 0, 0
	b.stats.LastReleased = b.lastEpoch
	b.passThru = true
	b.log.Warn("output buffering stopped: releasing all output unbuffered")
	return nil
}

// Hold implements outbuf.Buffer: after ReleaseAll, packets are held again
// from now on (they belong to the next checkpointed epoch).
func (b *Buffer) Hold() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return outbuf.ErrClosed
	}
	if b.passThru {
		b.passThru = false
		b.log.Warn("output buffering resumed: holding output again")
	}
	return nil
}

// Detach implements outbuf.Buffer: the queue is unbound but the rules stay,
// so the kernel drops what was held and everything the guest sends until a
// new Buffer binds the queue again (no fail-open, no bypass).
func (b *Buffer) Detach() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	held := b.openPkts
	for _, r := range b.barriers {
		held += r.pkts
	}
	b.closeDrop = held
	b.barriers, b.openPkts, b.openBytes = nil, 0, 0
	b.mu.Unlock()
	b.endGuard()
	b.stop()
	cerr := b.nfq.Close()
	if cerr != nil && (errors.Is(cerr, os.ErrClosed) || strings.Contains(cerr.Error(), "closed")) {
		cerr = nil
	}
	perr := b.proc.Close()
	b.log.Info("detached: rules left in place, the kernel drops the guest's output until the queue is bound again", zap.Uint64("dropped_held", held))
	return errors.Join(cerr, perr)
}

// Close implements outbuf.Buffer: the rules are removed and the queue is
// closed; the kernel drops what is still held.
func (b *Buffer) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	if st, err := b.readProc(); err == nil && st.present {
		b.kdrop = st.dropped + st.userDropped
	}
	b.closed = true
	held := b.openPkts
	for _, r := range b.barriers {
		held += r.pkts
	}
	b.closeDrop = held
	b.barriers, b.openPkts, b.openBytes = nil, 0, 0
	b.mu.Unlock()
	b.endGuard()

	// Each rule takes a check, a delete and a final check.
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(3*len(b.rules.installed)+2)*b.cfg.CallTimeout)
	defer cancel()
	// Remove the rules first: with the queue still bound, nothing new is
	// queued to a queue without listener; then the unbind drops the rest.
	rerr := b.rules.remove(ctx)
	b.stop()
	cerr := b.nfq.Close()
	if cerr != nil && (errors.Is(cerr, os.ErrClosed) || strings.Contains(cerr.Error(), "closed")) {
		cerr = nil
	}
	perr := b.proc.Close()
	if held > 0 {
		b.log.Info("closed with output held: dropped", zap.Uint64("packets", held))
	}
	return errors.Join(rerr, cerr, perr)
}

// Stats implements outbuf.Buffer. DroppedPackets adds the kernel's drop
// counters of the queue (queue full, socket buffer full) to the packets
// held at Close. Packet counts are of packets the agent has received;
// HeldBytes and ReleasedBytes stay 0 with metadata-only copy, because the
// kernel then reports no packet length.
func (b *Buffer) Stats() outbuf.Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.stats
	for _, r := range b.barriers {
		s.HeldPackets += r.pkts
		s.HeldBytes += r.bytes
	}
	s.HeldPackets += b.openPkts
	s.HeldBytes += b.openBytes
	s.HoldRepairs = b.repairs
	if !b.closed {
		if st, err := b.readProc(); err == nil && st.present {
			b.kdrop = st.dropped + st.userDropped
		}
	}
	s.DroppedPackets = b.kdrop + b.closeDrop
	return s
}

type zapLogger struct{ l *zap.Logger }

func (z zapLogger) Debugf(format string, args ...interface{}) {
	z.l.Debug(fmt.Sprintf(format, args...))
}

func (z zapLogger) Errorf(format string, args ...interface{}) {
	z.l.Debug(fmt.Sprintf(format, args...)) // the library reports shutdown as errors; onError logs real ones
}
