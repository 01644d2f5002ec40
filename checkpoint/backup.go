package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// ErrActivated is returned when a replica that already took over is asked
// to accept replication again.
var ErrActivated = errors.New("replica already activated")

// ErrFenced is returned for a primary whose witness generation is older
// than one the replica has seen.
var ErrFenced = errors.New("primary fenced by a newer generation")

// ErrClosed is returned by a Backup that was closed (its replica freed).
var ErrClosed = errors.New("replica closed")

// errGoodbye ends receive when the current protection said Goodbye.
var errGoodbye = errors.New("goodbye")

// BackupOptions configures a Backup.
type BackupOptions struct {
	VMName  string
	Replica hypervisor.Replica
	// Owner is the authenticated identity of the peer that protects this
	// VM (its certificate's name, see transport.PeerIdentity). Links from
	// any other identity are refused before they can change anything.
	Owner string
	// Backend and BackendVersion the primary must match.
	Backend, BackendVersion string
	Limits                  transport.Limits

	HeartbeatInterval time.Duration
	HeartbeatTimeout  time.Duration

	Log *zap.Logger
	Now func() time.Time
	// OnCommit, if set, is called after an epoch is applied and before it
	// is acknowledged.
	OnCommit func(epoch uint64, deviceState []byte)
	// BeforeActivate, if set, is called during Activate with the committed
	// replica (memory and device state of epoch) just before the VM starts
	// from it, e.g. to keep an audit copy.
	BeforeActivate func(epoch uint64, memory, deviceState []byte)
	// OnGoodbye, if set, is called (on the link's goroutine, after the link
	// ended) when the owner's current protection said Goodbye: restart
	// false means protection ended on purpose and the replica may be freed.
	OnGoodbye func(restart bool)
	// OnHandover, if set, is called on the link's goroutine when the
	// owner hands the VM over (planned switchover, Activate at the
	// committed epoch, with its witness generation): it must activate the
	// replica with ActivateFromLink, or return why not. Without it a
	// handover is refused.
	OnHandover func(epoch, generation uint64) error
	// OnLinkDown, if set, is called (on the link's goroutine, without
	// locks) when the owner's current link ended, after Stats shows it:
	// a watcher can react at once instead of at its next poll.
	OnLinkDown func()
	// NoDiskSync skips the Flush of the replica's disks before an epoch
	// is acknowledged (by default every disk an epoch changed is flushed
	// first). Risk: an acknowledged epoch's disk writes may be lost if the
	// backup's host crashes (not merely its daemon), and a failover after
	// that would resume a guest whose disk lacks writes whose output its
	// clients saw (invariant 4).
	NoDiskSync bool
}

// BackupStats are a Backup's counters.
type BackupStats struct {
	Committed           uint64
	EpochsCommitted     uint64
	Connected           bool
	LastHeard           time.Time
	PagesReceived       uint64
	PagesPreloaded      uint64 // pages written by Preload records (before a first epoch)
	WireBytesReceived   uint64 // every byte of the frames read from primaries, headers included
	TornEpochsDiscarded uint64
	Rejected            uint64 // links closed for a protocol or integrity error
	LastError           string
	Activated           bool
	ActivationTime      time.Duration
	// Goodbye: the primary ended protection on purpose (not a failure).
	Goodbye bool
	// Restarting: the primary's daemon said it restarts and will resume
	// (since RestartingSince); cleared by its next link.
	Restarting      bool
	RestartingSince time.Time
	// Refused counts links refused before they could change anything
	// (another identity than the owner, an incompatible Hello).
	Refused uint64
	// ProtectionID is the protection the replica belongs to.
	ProtectionID string
	// Generation is the newest witness generation a link of the owner
	// carried (0: no witness).
	Generation uint64
	// CommittedGeneration is the witness generation of the link that
	// committed the replica's newest epoch. A primary that ran unprotected
	// claimed a new generation first: until an epoch of that generation
	// commits here, the replica may lack output it released, and the
	// backup must not take over from it.
	CommittedGeneration uint64
	// DisconnectedAt is when the owner's last link ended, PeerClosed
	// whether the owner's side closed it (EOF or reset: evidence that its
	// host or daemon is gone) rather than a timeout.
	DisconnectedAt time.Time
	PeerClosed     bool

	// Disks (hypervisor.DiskReplica): changes and write data applied by
	// committed epochs, data written by DiskSync copies, flushes made
	// before acks. DiskTorn: the replica's disks are not at its committed
	// epoch (a copy of a new protection over an older replica, or a
	// failed disk write): it cannot be activated until an epoch commits.
	DiskChangesApplied uint64
	DiskBytesApplied   uint64
	DiskBytesSynced    uint64
	DiskFlushes        uint64
	DiskTorn           bool
}

// Backup holds the replica of one protected VM and applies the epochs a
// primary sends it. It outlives individual connections.
type Backup struct {
	o   BackupOptions
	log *zap.Logger

	serveMu sync.Mutex // one Serve at a time
	// waiting counts Serves queued for serveMu: at most one may wait (the
	// owner's reconnect), so links cannot pile up goroutines and buffers.
	waiting atomic.Int32

	mu           sync.Mutex // replica memory, core, conn, stats
	core         *BackupCore
	protectionID string
	conn         net.Conn
	activated    bool
	closed       bool // Close: no link may use the replica any more
	stats        BackupStats

	dec     *transport.Decoder
	pages   []byte
	pfns    []uint64
	hashes  []uint64
	dev     []byte
	lastPfn int64
	// committedDev is the device state of the committed epoch.
	committedDev []byte

	// disks are the replica's disks (hypervisor.DiskReplica), diskIdx
	// their index by id; the rest is the staging of one epoch's changes
	// (link goroutine) and diskTorn/diskDirty (b.mu).
	disks     []hypervisor.ReplicaDisk
	diskIdx   map[string]int
	diskStage []stagedChange
	diskData  []byte // the staged writes' data, concatenated
	diskBuf   []byte // decode scratch
	diskTorn  bool
	diskDirty []bool // written since the last flush

	committedA atomic.Uint64
}

// NewBackup returns a Backup over an empty replica.
func NewBackup(o BackupOptions) *Backup {
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Limits.MaxFrame == 0 {
		o.Limits = transport.DefaultLimits()
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = 100 * time.Millisecond
	}
	if o.HeartbeatTimeout <= 0 {
		o.HeartbeatTimeout = 10 * o.HeartbeatInterval
	}
	b := &Backup{
		o:    o,
		log:  o.Log.With(zap.String("vm", o.VMName), zap.String("role", "backup")),
		core: NewBackupCore(0),
		dec:  transport.NewDecoder(hypervisor.PageSize, o.Replica.NumPages()),
	}
	if dr, ok := o.Replica.(hypervisor.DiskReplica); ok {
		b.disks = dr.ReplicaDisks()
		b.diskIdx = map[string]int{}
		for i, d := range b.disks {
			b.diskIdx[d.ID] = i
		}
		b.diskDirty = make([]bool, len(b.disks))
	}
	return b
}

// stagedChange is one staged disk change: Data is nil, its bytes are
// diskData[data : data+Length] for a write.
type stagedChange struct {
	disk int
	c    disk.Change
	data int64
}

// checkDisks compares the primary's disks with the replica's; "" means
// they match.
func (b *Backup) checkDisks(ds []*remuspb.DiskInfo) string {
	if len(ds) != len(b.disks) {
		return fmt.Sprintf("primary has %d disks, replica has %d", len(ds), len(b.disks))
	}
	seen := map[string]bool{}
	for _, d := range ds {
		i, ok := b.diskIdx[d.GetId()]
		switch {
		case !ok:
			return fmt.Sprintf("primary's disk %q is not among the replica's", d.GetId())
		case seen[d.GetId()]:
			return fmt.Sprintf("primary lists disk %q twice", d.GetId())
		case d.GetSize() != uint64(b.disks[i].Image.Size()):
			return fmt.Sprintf("disk %q has %d bytes on the primary, %d on the replica", d.GetId(), d.GetSize(), b.disks[i].Image.Size())
		}
		seen[d.GetId()] = true
	}
	return ""
}

// Stats returns a snapshot of the counters.
func (b *Backup) Stats() BackupStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.stats
	s.Committed = b.core.Committed()
	s.Connected = b.conn != nil
	s.ProtectionID = b.protectionID
	return s
}

// Owner is the identity of the peer allowed to change this replica.
func (b *Backup) Owner() string { return b.o.Owner }

// NumPages is the replica's size in pages.
func (b *Backup) NumPages() int { return b.o.Replica.NumPages() }

// Committed is the last applied epoch.
func (b *Backup) Committed() uint64 { return b.committedA.Load() }

// check validates a Hello against this replica; "" means compatible.
func (b *Backup) check(h *remuspb.Hello) string {
	switch {
	case h.ProtocolVersion != ProtocolVersion:
		return fmt.Sprintf("protocol version %d, backup speaks %d", h.ProtocolVersion, ProtocolVersion)
	case h.VmName != b.o.VMName:
		return fmt.Sprintf("hello for VM %q reached replica of %q", h.VmName, b.o.VMName)
	case h.PageSize != hypervisor.PageSize:
		return fmt.Sprintf("page size %d, backup supports %d", h.PageSize, hypervisor.PageSize)
	case h.MemoryBytes != uint64(b.o.Replica.NumPages())*hypervisor.PageSize:
		return fmt.Sprintf("memory %d bytes, replica has %d", h.MemoryBytes, uint64(b.o.Replica.NumPages())*hypervisor.PageSize)
	case h.Backend != b.o.Backend:
		return fmt.Sprintf("backend %q, replica is %q", h.Backend, b.o.Backend)
	case h.BackendVersion != b.o.BackendVersion:
		return fmt.Sprintf("backend version %q differs from backup's %q", h.BackendVersion, b.o.BackendVersion)
	}
	return b.checkDisks(h.Disks)
}

// ErrNotOwner is returned when a peer other than the replica's owner tries
// to open a link to it.
var ErrNotOwner = errors.New("peer does not own this replica")

// refusal checks, before anything is touched, whether a link from peer
// with hello may serve this replica; "" means yes. b.mu held.
func (b *Backup) refusal(hello *remuspb.Hello, peer string) (string, error) {
	if b.closed {
		return "replica released on this backup", ErrClosed
	}
	if b.activated {
		return "replica already activated (failed over)", ErrActivated
	}
	if peer != b.o.Owner {
		return fmt.Sprintf("the replica of %s on this backup belongs to %q; %q may not change it (on the backup, 'remusd forget %s' releases it)",
			b.o.VMName, b.o.Owner, peer, b.o.VMName), ErrNotOwner
	}
	if msg := b.check(hello); msg != "" {
		return msg, ErrProtocol
	}
	if hello.Generation < b.stats.Generation {
		return fmt.Sprintf("generation %d is older than %d: the VM moved on without this primary (it is fenced)", hello.Generation, b.stats.Generation), ErrFenced
	}
	return "", nil
}

// maxRefusal bounds a refusal's text: it may echo what the peer sent (a
// VM name, a version), and must fit a Welcome frame whatever that was.
const maxRefusal = 1024

// boundMsg cuts msg to maxRefusal bytes, on a rune boundary.
func boundMsg(msg string) string {
	if len(msg) <= maxRefusal {
		return msg
	}
	cut := maxRefusal
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + "…"
}

// Serve runs one link from a primary whose Hello has been read; peer is
// the link's authenticated identity. A peer other than the owner, or an
// incompatible Hello, is refused before anything changes (the owner's
// link, if any, carries on). Otherwise it answers with Welcome (followed
// by the replica's page hashes if the primary asked for them), then
// stages, verifies, applies and acknowledges epochs until the link fails
// or ctx is done. A partial epoch is discarded; the replica stays at its
// last committed epoch. A newer link of the owner closes the older one.
func (b *Backup) Serve(ctx context.Context, conn net.Conn, r *transport.Reader, w *transport.Writer, hello *remuspb.Hello, peer string) error {
	b.mu.Lock()
	if msg, err := b.refusal(hello, peer); msg != "" {
		msg = boundMsg(msg)
		b.stats.Refused++
		b.mu.Unlock()
		_ = w.WriteFrame(transport.KindWelcome, &remuspb.Welcome{ProtocolVersion: ProtocolVersion, Error: msg}, nil)
		return fmt.Errorf("%w: refused primary: %s", err, msg)
	}
	if b.waiting.Add(1) > 1 {
		b.waiting.Add(-1)
		b.stats.Refused++
		b.mu.Unlock()
		msg := "another link of this replica is being set up; try again"
		_ = w.WriteFrame(transport.KindWelcome, &remuspb.Welcome{ProtocolVersion: ProtocolVersion, Error: msg}, nil)
		return fmt.Errorf("%w: refused primary: %s", ErrProtocol, msg)
	}
	if old := b.conn; old != nil {
		old.Close() // the owner reconnected: the old link is dead
	}
	b.mu.Unlock()
	b.serveMu.Lock()
	b.waiting.Add(-1)
	defer b.serveMu.Unlock()

	b.mu.Lock()
	if msg, err := b.refusal(hello, peer); msg != "" {
		// Activated while we waited for the old link to end.
		msg = boundMsg(msg)
		b.stats.Refused++
		b.mu.Unlock()
		_ = w.WriteFrame(transport.KindWelcome, &remuspb.Welcome{ProtocolVersion: ProtocolVersion, Error: msg}, nil)
		return fmt.Errorf("%w: refused primary: %s", err, msg)
	}
	// A link of another protection (the VM was protected anew) starts
	// from nothing: a full epoch must come first. Until it is applied, the
	// replica keeps its last committed epoch, so a stray or lying peer
	// cannot make it unusable for failover.
	sess := b.core
	if hello.ProtectionId != b.protectionID {
		sess = NewBackupCore(0)
	}
	b.conn = conn
	b.stats.LastHeard = b.o.Now()
	b.stats.Goodbye = false
	b.stats.Restarting = false
	b.stats.Generation = max(b.stats.Generation, hello.Generation)
	committed := sess.Committed()
	sendHashes := hello.NeedReplicaHashes && committed > 0 && hello.ProtectionId == b.protectionID
	// A replica that holds nothing committed, of any protection, may be
	// preloaded: nothing a failover could use is overwritten.
	acceptsPreload := committed == 0 && b.core.Committed() == 0 && !b.activated
	b.mu.Unlock()
	var linkErr error
	defer func() {
		b.mu.Lock()
		down := b.conn == conn
		if down {
			b.conn = nil
			b.stats.DisconnectedAt = b.o.Now()
			b.stats.PeerClosed = linkPeerClosed(linkErr)
		}
		if sess.Discard() {
			b.stats.TornEpochsDiscarded++
			b.log.Warn("discarded torn epoch", zap.Uint64("committed", b.core.Committed()))
		}
		b.mu.Unlock()
		conn.Close()
		if down && b.o.OnLinkDown != nil {
			b.o.OnLinkDown()
		}
	}()

	wel := &remuspb.Welcome{ProtocolVersion: ProtocolVersion, CommittedEpoch: committed, ProtectionId: hello.ProtectionId, ReplicaHashes: sendHashes, Generation: hello.Generation,
		AcceptsPreload: acceptsPreload}
	if err := w.WriteFrame(transport.KindWelcome, wel, nil); err != nil {
		return fmt.Errorf("send welcome: %w", err)
	}
	if sendHashes {
		// The replica changes only in apply, which this Serve runs: it
		// stays at committed while hashed.
		start := time.Now()
		if err := transport.WriteReplicaHashes(w, b.o.Replica.Memory(), hypervisor.PageSize); err != nil {
			return err
		}
		b.log.Info("sent the replica's page hashes to a resuming primary", zap.Uint64("committed", committed), zap.Duration("took", time.Since(start)))
	}
	b.log.Info("primary connected", zap.String("remote", conn.RemoteAddr().String()), zap.Uint64("committed", committed))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan struct{})
	hbErr := make(chan error, 1)
	go func() { hbErr <- heartbeatLoop(ctx, done, w, b.o.HeartbeatInterval, "backup", b.committedA.Load) }()
	defer func() { close(done); conn.Close(); <-hbErr }()
	go func() {
		<-ctx.Done()
		conn.Close()
	}()

	err := b.receive(conn, r, w, sess, hello.ProtectionId, hello.Generation, acceptsPreload)
	linkErr = err
	if errors.Is(err, errGoodbye) {
		b.mu.Lock()
		current := hello.ProtectionId == b.protectionID
		restart := b.stats.Restarting
		b.mu.Unlock()
		if current && b.o.OnGoodbye != nil {
			b.o.OnGoodbye(restart)
		}
		return nil
	}
	if err != nil {
		b.mu.Lock()
		b.stats.LastError = err.Error()
		if errors.Is(err, ErrProtocol) || errors.Is(err, transport.ErrMalformed) {
			b.stats.Rejected++
		}
		b.mu.Unlock()
	}
	return err
}

func (b *Backup) receive(conn net.Conn, r *transport.Reader, w *transport.Writer, sess *BackupCore, protectionID string, gen uint64, acceptsPreload bool) error {
	mem := b.o.Replica.Memory()
	n := b.o.Replica.NumPages()
	var pre *preload
	if acceptsPreload {
		pre = &preload{}
	}
	base := func(pfn uint64) []byte {
		o := int(pfn) * hypervisor.PageSize
		return mem[o : o+hypervisor.PageSize]
	}
	dst := func(i uint32) []byte {
		o := int(i) * hypervisor.PageSize
		return b.pages[o : o+hypervisor.PageSize]
	}
	var counted uint64 // of r.BytesRead(); the first frame's share includes the Hello read before Serve
	lim := b.o.Limits.WithDefaults()
	began := false                  // an epoch began on this link: no more DiskSync
	syncNext := map[string]uint32{} // next DiskSync change index per disk
	for {
		_ = conn.SetReadDeadline(time.Now().Add(b.o.HeartbeatTimeout))
		f, err := r.ReadFrame()
		if err != nil {
			return fmt.Errorf("receive from primary: %w", err)
		}
		now := b.o.Now()
		b.mu.Lock()
		b.stats.LastHeard = now
		b.stats.WireBytesReceived += r.BytesRead() - counted
		counted = r.BytesRead()
		b.mu.Unlock()
		switch h := f.Header.(type) {
		case *remuspb.Heartbeat:
		case *remuspb.EpochBegin:
			if h.Preloaded {
				if !h.Full || pre == nil || pre.count != n {
					return fmt.Errorf("%w: epoch %d builds on a preload, but %s", ErrProtocol, h.Epoch, pre.describe(n, h.Full))
				}
				if err := sess.BeginPreloaded(h.Epoch, h.PageCount, n); err != nil {
					return err
				}
			} else if err := sess.Begin(h.Epoch, h.BaseEpoch, h.PageCount, h.Full, n); err != nil {
				return err
			}
			pre = nil // no preload once an epoch began
			began = true
			if err := sess.Disks(h.Epoch, h.DiskChanges, lim.MaxEpochDiskChanges); err != nil {
				return err
			}
			b.diskStage, b.diskData = b.diskStage[:0], b.diskData[:0]
			need := int(h.PageCount) * hypervisor.PageSize
			if cap(b.pages) < need {
				b.pages = make([]byte, need)
			}
			b.pages = b.pages[:need]
			b.pfns, b.hashes, b.lastPfn = b.pfns[:0], b.hashes[:0], -1
		case *remuspb.PageBatch:
			if f.Kind == transport.KindPreload {
				if pre == nil {
					return fmt.Errorf("%w: preload record, but this replica may not be preloaded now (it holds committed state, or an epoch began)", ErrProtocol)
				}
				if err := b.preloadBatch(pre, h, f.Payload, mem, n); err != nil {
					return err
				}
				continue
			}
			if err := sess.Batch(h.Epoch, h.FirstIndex, len(h.Pfns)); err != nil {
				return err
			}
			if len(h.Pfns) > 0 && int64(h.Pfns[0]) <= b.lastPfn {
				return fmt.Errorf("%w: epoch %d batch at page %d: pfn %d not above previous batch's %d", ErrProtocol, h.Epoch, h.FirstIndex, h.Pfns[0], b.lastPfn)
			}
			hashes, err := b.dec.DecodeBatch(h, f.Payload, h.FirstIndex, base, dst)
			if err != nil {
				return fmt.Errorf("epoch %d: %w", h.Epoch, err)
			}
			b.pfns = append(b.pfns, h.Pfns...)
			b.hashes = append(b.hashes, hashes...)
			if len(h.Pfns) > 0 {
				b.lastPfn = int64(h.Pfns[len(h.Pfns)-1])
			}
		case *remuspb.DiskWrites:
			if f.Kind == transport.KindDiskSync {
				if began {
					return fmt.Errorf("%w: disk copy record after an epoch began on this link", ErrProtocol)
				}
				if err := b.diskSync(h, f.Payload, lim, syncNext); err != nil {
					return err
				}
				continue
			}
			if err := b.stageDisk(sess, h, f.Payload, lim); err != nil {
				return err
			}
		case *remuspb.DeviceState:
			if err := sess.DeviceState(h.Epoch); err != nil {
				return err
			}
			if len(f.Payload) > b.o.Limits.MaxDeviceState {
				return fmt.Errorf("%w: epoch %d device state of %d bytes exceeds limit %d", ErrProtocol, h.Epoch, len(f.Payload), b.o.Limits.MaxDeviceState)
			}
			if crc32.Checksum(f.Payload, crcTable) != h.PayloadCrc32C {
				return fmt.Errorf("%w: epoch %d device state checksum mismatch", ErrProtocol, h.Epoch)
			}
			b.dev = append(b.dev[:0], f.Payload...)
		case *remuspb.EpochEnd:
			var d transport.Digest
			for i, pfn := range b.pfns {
				d.AddPage(pfn, b.hashes[i])
			}
			for _, sc := range b.diskStage {
				d.AddDiskChange(b.disks[sc.disk].ID, b.stagedData(sc))
			}
			ok := d.Sum(b.dev) == h.Digest
			if err := sess.DiskEnd(h.Epoch, h.DiskChanges); err != nil {
				return err
			}
			if err := sess.End(h.Epoch, h.PageCount, ok); err != nil {
				return err
			}
			if err := b.apply(h.Epoch, mem, sess, protectionID, gen); err != nil {
				return err
			}
			if b.o.OnCommit != nil {
				b.o.OnCommit(h.Epoch, b.dev)
			}
			if err := w.WriteFrame(transport.KindAck, &remuspb.Ack{Epoch: h.Epoch}, nil); err != nil {
				return fmt.Errorf("send ack %d: %w", h.Epoch, err)
			}
		case *remuspb.Activate:
			err := b.handover(sess, protectionID, h)
			msg := ""
			if err != nil {
				msg = err.Error()
				b.log.Warn("handover refused", zap.Uint64("epoch", h.Epoch), zap.Error(err))
			}
			if werr := w.WriteFrame(transport.KindActivated, &remuspb.Activated{Epoch: h.Epoch, Error: msg}, nil); werr != nil {
				return fmt.Errorf("answer handover: %w", werr)
			}
			if err == nil {
				return ErrActivated // the replica runs: this link is over
			}
		case *remuspb.Goodbye:
			b.mu.Lock()
			if protectionID != b.protectionID {
				// A protection that never committed here ends: the replica
				// still belongs to the one before it.
				b.mu.Unlock()
				b.log.Info("a new protection said goodbye before its first commit", zap.String("reason", h.Reason))
				return nil
			}
			if h.Restart {
				b.stats.Restarting, b.stats.RestartingSince = true, b.o.Now()
				b.log.Warn("primary daemon restarting: keeping the replica for it to resume", zap.String("reason", h.Reason))
			} else {
				b.stats.Goodbye = true
				b.log.Info("primary said goodbye: protection ended", zap.String("reason", h.Reason))
			}
			b.mu.Unlock()
			return errGoodbye
		default:
			return fmt.Errorf("%w: unexpected %v from primary", ErrProtocol, f.Kind)
		}
	}
}

// preload is one link's preload of a replica that holds nothing
// committed (Welcome.accepts_preload).
type preload struct {
	seen  *dirtymap.Bitmap
	count int      // distinct pages written
	run   []uint64 // pfns of the current run of batches, by index (DUP refs)
	buf   []byte   // decode scratch
}

// maxPreloadRun bounds a run of preload batches (its index range): the
// primary starts a run every few thousand pages.
const maxPreloadRun = 1 << 16

func (p *preload) describe(n int, full bool) string {
	switch {
	case !full:
		return "it is not marked full"
	case p == nil:
		return "this link sent no preload (or the replica may not be preloaded)"
	}
	return fmt.Sprintf("only %d of %d pages were preloaded", p.count, n)
}

// preloadBatch decodes a Preload record straight into the replica's memory
// (nothing committed lives there: see Welcome.accepts_preload) and counts
// the pages it covered.
func (b *Backup) preloadBatch(p *preload, h *remuspb.PageBatch, payload []byte, mem []byte, n int) error {
	if h.Epoch != 0 {
		return fmt.Errorf("%w: preload record for epoch %d (want 0)", ErrProtocol, h.Epoch)
	}
	if h.FirstIndex == 0 {
		p.run = p.run[:0]
	}
	if int(h.FirstIndex) != len(p.run) || len(p.run)+len(h.Pfns) > maxPreloadRun {
		return fmt.Errorf("%w: preload batch at index %d, expected %d (at most %d per run)", ErrProtocol, h.FirstIndex, len(p.run), maxPreloadRun)
	}
	ps := hypervisor.PageSize
	if need := len(h.Pfns) * ps; cap(p.buf) < need {
		p.buf = make([]byte, need)
	}
	page := func(pfn uint64) []byte { return mem[int(pfn)*ps : (int(pfn)+1)*ps] }
	first := h.FirstIndex
	_, err := b.dec.DecodeBatch(h, payload, first, page, func(i uint32) []byte {
		if i >= first {
			return p.buf[int(i-first)*ps : int(i-first+1)*ps]
		}
		return page(p.run[i]) // DUP of a page of an earlier batch of this run, already written
	})
	if err != nil {
		return fmt.Errorf("preload: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.activated {
		return ErrActivated
	}
	if b.closed {
		return ErrClosed
	}
	if p.seen == nil {
		p.seen = dirtymap.New(n)
	}
	for j, pfn := range h.Pfns {
		copy(page(pfn), p.buf[j*ps:(j+1)*ps])
		if !p.seen.Test(int(pfn)) {
			p.seen.Set(int(pfn))
			p.count++
		}
	}
	p.run = append(p.run, h.Pfns...)
	b.stats.PagesPreloaded += uint64(len(h.Pfns))
	return nil
}

// apply writes the staged, verified epoch into the replica. Activation
// cannot observe a half-applied epoch: both hold b.mu. The device state is
// committed first: a state the replica refuses leaves it untouched at its
// last committed epoch.
func (b *Backup) apply(epoch uint64, mem []byte, sess *BackupCore, protectionID string, gen uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.activated {
		return ErrActivated
	}
	if b.closed {
		return ErrClosed
	}
	if err := b.o.Replica.CommitDeviceState(epoch, b.dev); err != nil {
		return fmt.Errorf("%w: epoch %d: replica refused its device state: %w", ErrProtocol, epoch, err)
	}
	for i, pfn := range b.pfns {
		o := int(pfn) * hypervisor.PageSize
		copy(mem[o:o+hypervisor.PageSize], b.pages[i*hypervisor.PageSize:(i+1)*hypervisor.PageSize])
	}
	if err := b.applyDisks(epoch); err != nil {
		// Memory and device state are this epoch's, the disks are not
		// (or not durably): the replica must not be activated before an
		// epoch commits whole.
		b.diskTorn = true
		b.stats.DiskTorn = true
		return err
	}
	b.diskTorn = false
	b.stats.DiskTorn = false
	c := sess.Applied()
	// The first epoch applied for a new protection makes it the replica's.
	b.core, b.protectionID = sess, protectionID
	b.committedA.Store(c)
	b.committedDev = append(b.committedDev[:0], b.dev...)
	b.stats.EpochsCommitted++
	b.stats.CommittedGeneration = gen
	b.stats.PagesReceived += uint64(len(b.pfns))
	return nil
}

// Close ends every link of this replica and waits until none uses the
// replica's memory; the caller may then free the replica. Activate and
// Serve fail afterwards.
func (b *Backup) Close() {
	b.mu.Lock()
	b.closed = true
	if b.conn != nil {
		b.conn.Close()
	}
	b.mu.Unlock()
	// A link in progress holds serveMu until it has stopped touching the
	// replica.
	b.serveMu.Lock()
	b.serveMu.Unlock()
}

// handover checks a planned switchover's Activate and has the replica
// activated (OnHandover). Called on the link's goroutine.
func (b *Backup) handover(sess *BackupCore, protectionID string, h *remuspb.Activate) error {
	b.mu.Lock()
	current := protectionID == b.protectionID && sess == b.core
	committed, gen := b.core.Committed(), b.stats.Generation
	b.mu.Unlock()
	switch {
	case b.o.OnHandover == nil:
		return errors.New("this backup does not take planned handovers")
	case !current || sess.InEpoch():
		return errors.New("handover outside a committed epoch of the current protection")
	case h.Epoch != committed:
		return fmt.Errorf("handover at epoch %d but the replica holds %d", h.Epoch, committed)
	case h.Generation < gen:
		return fmt.Errorf("handover at generation %d, older than %d", h.Generation, gen)
	}
	return b.o.OnHandover(h.Epoch, h.Generation)
}

// ActivateFromLink activates the replica from inside its link (a planned
// handover, see OnHandover): like Activate, but the link is the caller,
// so it is neither closed nor waited for.
func (b *Backup) ActivateFromLink(ctx context.Context) (hypervisor.Guest, error) {
	start := time.Now()
	b.mu.Lock()
	switch {
	case b.closed:
		b.mu.Unlock()
		return nil, ErrClosed
	case b.activated:
		b.mu.Unlock()
		return nil, ErrActivated
	case b.core.Committed() == 0:
		b.mu.Unlock()
		return nil, fmt.Errorf("replica of %s holds no committed epoch: nothing to activate", b.o.VMName)
	case b.diskTorn:
		b.mu.Unlock()
		return nil, fmt.Errorf("replica of %s: its disks are not at the committed epoch %d (a disk copy or write since): not activatable until an epoch commits", b.o.VMName, b.core.Committed())
	}
	b.activated = true
	b.mu.Unlock()
	return b.activate(ctx, start)
}

// linkPeerClosed reports whether a receive error says the primary's side
// closed the connection (EOF or reset).
func linkPeerClosed(err error) bool { return peerClosed(err) }

// Activate makes the replica take over: replication stops (a link in
// progress is cut, its partial epoch discarded) and the VM starts from the
// last committed epoch.
func (b *Backup) Activate(ctx context.Context) (hypervisor.Guest, error) {
	start := time.Now()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, ErrClosed
	}
	if b.activated {
		b.mu.Unlock()
		return nil, ErrActivated
	}
	if b.core.Committed() == 0 {
		b.mu.Unlock()
		return nil, fmt.Errorf("replica of %s holds no committed epoch: nothing to activate", b.o.VMName)
	}
	if b.diskTorn {
		b.mu.Unlock()
		return nil, fmt.Errorf("replica of %s: its disks are not at the committed epoch %d (a disk copy or write since): not activatable until an epoch commits", b.o.VMName, b.core.Committed())
	}
	b.activated = true
	if b.conn != nil {
		b.conn.Close()
	}
	b.mu.Unlock()
	// Wait for a link in progress to finish: it discards its torn epoch.
	b.serveMu.Lock()
	defer b.serveMu.Unlock()
	return b.activate(ctx, start)
}

// activate starts the VM from the committed replica (no link runs).
func (b *Backup) activate(ctx context.Context, start time.Time) (hypervisor.Guest, error) {
	if b.o.BeforeActivate != nil {
		b.o.BeforeActivate(b.Committed(), b.o.Replica.Memory(), b.committedDev)
	}
	g, err := b.o.Replica.Activate(ctx)
	if err != nil {
		return nil, fmt.Errorf("activate replica of %s at epoch %d: %w", b.o.VMName, b.Committed(), err)
	}
	b.mu.Lock()
	b.stats.Activated = true
	b.stats.ActivationTime = time.Since(start)
	b.mu.Unlock()
	b.log.Info("replica activated", zap.Uint64("epoch", b.Committed()), zap.Duration("took", time.Since(start)))
	return g, nil
}

// stagedData returns sc's change with its data.
func (b *Backup) stagedData(sc stagedChange) disk.Change {
	c := sc.c
	if c.Kind == disk.KindWrite {
		c.Data = b.diskData[sc.data : sc.data+c.Length]
	}
	return c
}

// stageDisk validates a DiskWrites record of the epoch being staged and
// stages its changes, within the epoch's disk budget
// (Limits.MaxEpochDiskBytes), checked before anything is allocated.
func (b *Backup) stageDisk(sess *BackupCore, h *remuspb.DiskWrites, payload []byte, lim transport.Limits) error {
	i, ok := b.diskIdx[h.DiskId]
	if !ok {
		return fmt.Errorf("%w: epoch %d: changes for unknown disk %q", ErrProtocol, h.Epoch, boundMsg(h.DiskId))
	}
	if err := sess.DiskBatch(h.Epoch, h.FirstIndex, len(h.Kinds)); err != nil {
		return err
	}
	if int64(len(b.diskData))+int64(h.RawLength) > lim.MaxEpochDiskBytes {
		return fmt.Errorf("%w: epoch %d carries more than %d bytes of disk writes", ErrProtocol, h.Epoch, lim.MaxEpochDiskBytes)
	}
	changes, buf, err := transport.DecodeDiskWrites(h, payload, b.disks[i].Image.Size(), lim, b.diskBuf)
	b.diskBuf = buf
	if err != nil {
		return fmt.Errorf("epoch %d: %w", h.Epoch, err)
	}
	for _, c := range changes {
		sc := stagedChange{disk: i, c: c, data: int64(len(b.diskData))}
		if c.Kind == disk.KindWrite {
			b.diskData = append(b.diskData, c.Data...)
		}
		sc.c.Data = nil
		b.diskStage = append(b.diskStage, sc)
	}
	return nil
}

// applyDisks applies the staged disk changes in order and flushes every
// disk changed (unless NoDiskSync); b.mu held.
func (b *Backup) applyDisks(epoch uint64) error {
	ctx := context.Background()
	var bytes uint64
	for _, sc := range b.diskStage {
		d := b.disks[sc.disk]
		if err := applyChange(ctx, d.Image, b.stagedData(sc)); err != nil {
			return fmt.Errorf("epoch %d: disk %s: %w", epoch, d.ID, err)
		}
		if sc.c.Kind != disk.KindFlush {
			b.diskDirty[sc.disk] = true
		}
		if sc.c.Kind == disk.KindWrite {
			bytes += uint64(sc.c.Length)
		}
	}
	b.stats.DiskChangesApplied += uint64(len(b.diskStage))
	b.stats.DiskBytesApplied += bytes
	if b.o.NoDiskSync {
		return nil
	}
	for i, d := range b.disks {
		if !b.diskDirty[i] {
			continue
		}
		if err := d.Image.Flush(ctx); err != nil {
			return fmt.Errorf("epoch %d: flush disk %s: %w", epoch, d.ID, err)
		}
		b.diskDirty[i] = false
		b.stats.DiskFlushes++
	}
	return nil
}

// applyChange applies one validated change to img.
func applyChange(ctx context.Context, img disk.Backend, c disk.Change) error {
	switch c.Kind {
	case disk.KindWrite:
		return img.WriteAt(ctx, c.Data, c.Offset)
	case disk.KindTrim:
		return img.Trim(ctx, c.Offset, c.Length)
	case disk.KindZero:
		return img.WriteZeroes(ctx, c.Offset, c.Length, c.NoHole)
	case disk.KindFlush:
		return nil // the epoch's disks are flushed before its ack
	}
	return fmt.Errorf("unknown change kind %v", c.Kind)
}

// diskSync writes a DiskSync record (the primary's image copied while its
// guest runs, before this link's first epoch) straight to the replica's
// disk. A replica that holds a committed epoch loses its disks' match
// with it: it is not activatable until the next epoch commits.
func (b *Backup) diskSync(h *remuspb.DiskWrites, payload []byte, lim transport.Limits, next map[string]uint32) error {
	i, ok := b.diskIdx[h.DiskId]
	switch {
	case !ok:
		return fmt.Errorf("%w: disk copy for unknown disk %q", ErrProtocol, boundMsg(h.DiskId))
	case h.Epoch != 0:
		return fmt.Errorf("%w: disk copy record for epoch %d (want 0)", ErrProtocol, h.Epoch)
	case h.FirstIndex != next[h.DiskId]:
		return fmt.Errorf("%w: disk %s copy record at change %d, expected %d", ErrProtocol, h.DiskId, h.FirstIndex, next[h.DiskId])
	}
	changes, buf, err := transport.DecodeDiskWrites(h, payload, b.disks[i].Image.Size(), lim, b.diskBuf)
	b.diskBuf = buf
	if err != nil {
		return fmt.Errorf("disk copy: %w", err)
	}
	next[h.DiskId] += uint32(len(changes))
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.activated {
		return ErrActivated
	}
	if b.closed {
		return ErrClosed
	}
	if b.core.Committed() != 0 && !b.diskTorn {
		b.log.Warn("a disk copy overwrites the replica's disks: not activatable until the next epoch commits", zap.String("disk", h.DiskId), zap.Uint64("committed", b.core.Committed()))
	}
	b.diskTorn, b.stats.DiskTorn = b.core.Committed() != 0, b.core.Committed() != 0
	ctx := context.Background()
	for _, c := range changes {
		if err := applyChange(ctx, b.disks[i].Image, c); err != nil {
			return fmt.Errorf("disk copy: disk %s: %w", h.DiskId, err)
		}
		if c.Kind == disk.KindWrite {
			b.stats.DiskBytesSynced += uint64(c.Length)
		}
	}
	b.diskDirty[i] = true
	return nil
}
