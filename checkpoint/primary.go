package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/outbuf"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// ProtocolVersion is the replication protocol spoken by this build.
// Version 2: disks (DiskWrites and DiskSync records, Hello.disks, disk
// change counts in EpochBegin/EpochEnd, disk changes in the digest).
const ProtocolVersion = 2

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// PrimaryOptions configures a Primary runner.
type PrimaryOptions struct {
	Guest hypervisor.Guest
	Out   outbuf.Buffer
	// Dial opens a new connection to the backup's daemon.
	Dial func(ctx context.Context) (net.Conn, error)
	// ProtectionID identifies this protection (see proto Hello).
	ProtectionID string
	// Host is this daemon's name, sent in Hello (over mutual TLS the backup
	// checks it against the certificate's identity).
	Host    string
	Core    PrimaryConfig
	Encoder transport.EncoderConfig
	Limits  transport.Limits

	HeartbeatInterval time.Duration
	HeartbeatTimeout  time.Duration
	ReconnectBackoff  time.Duration
	// WelcomeTimeout bounds the wait for the backup's Welcome (and replica
	// hashes) after Hello: a backup starts the VM's standby before it
	// answers the first Hello. Default max(HeartbeatTimeout, 30 s).
	WelcomeTimeout time.Duration

	Log *zap.Logger
	// Now is the clock (time.Now if nil).
	Now func() time.Time
	// OnCapture, if set, is called (on the engine goroutine, guest running)
	// after each epoch is captured.
	OnCapture func(CaptureInfo)
	// OnAck, if set, is called after an ack is received and before the
	// epoch's output is released.
	OnAck func(epoch uint64)
	// Generation, if set, gives the witness generation carried in each
	// Hello (0: no witness).
	Generation func() uint64
	// OnLink, if set, is called (on the link goroutine) when a link to the
	// backup comes up (err nil) or ends (err says why; peerClosed: the
	// backup's side closed it, EOF or reset, rather than a timeout or a
	// local close).
	OnLink func(up bool, err error, peerClosed bool)
	// LiveStart starts a new protection the way Remus does: the guest is
	// not protected before the backup holds a replica, so its output
	// passes until the first checkpoint (which holds it from its boundary
	// on), and, where the backup's replica holds nothing yet and the guest
	// can be read while it runs (hypervisor.LiveReader and Rebaseliner),
	// its memory is streamed before that checkpoint (Preload records):
	// the first epoch then carries only what changed meanwhile, so output
	// is held for a short epoch rather than for a copy of all of memory.
	// Ignored for a resumed protection (Core.Resume).
	LiveStart bool
}

// CaptureInfo describes a captured epoch.
type CaptureInfo struct {
	Epoch, Base uint64
	Full        bool
	Pages       int
	Pause       time.Duration
	DeviceState []byte // valid during the callback only
}

// PrimaryStats are a Primary's counters.
type PrimaryStats struct {
	Epoch, Acked    uint64
	Link            string
	Unprotected     bool
	PauseLast       time.Duration
	PauseP50        time.Duration
	PauseP99        time.Duration
	AckLast         time.Duration
	AckP50, AckP99  time.Duration
	DirtyPagesLast  uint64
	PagesSent       uint64
	RawBytes        uint64 // page + device-state bytes of the epochs sent, uncompressed and unframed
	Reconnects      uint64
	HeartbeatAge    time.Duration
	LastError       string
	EpochsCommitted uint64

	// WireBytesSent counts every byte the primary wrote on its links to
	// the backup: frame prefixes, protobuf headers and payloads of Hello,
	// the epoch records, heartbeats and Goodbye.
	WireBytesSent uint64
	// EpochWireBytes is the part of WireBytesSent that carried epochs:
	// EpochBegin, PageBatch, DeviceState and EpochEnd frames, and the
	// Preload frames streamed ahead of the first, headers included. The
	// compression ratio is RawBytes ÷ EpochWireBytes.
	EpochWireBytes uint64
	// PagesPreloaded: pages streamed before the first epoch (LiveStart);
	// Preload is how long that took.
	PagesPreloaded uint64
	Preload        time.Duration

	// Disks (hypervisor.DiskGuest). DiskBytesLast and DiskChangesLast:
	// the write data and changes the last captured epoch carries;
	// DiskBytesSent and DiskChangesSent: of the epochs sent (write data,
	// uncompressed; also counted in RawBytes); DiskWireBytes: the
	// DiskWrites and DiskSync payloads as sent (after lz4). DiskBytesCopied
	// is the data of the full copies of the images (DiskSync, while the
	// guest ran), DiskCopy how long the last one took.
	DiskBytesLast   uint64
	DiskChangesLast uint64
	DiskBytesSent   uint64
	DiskChangesSent uint64
	DiskWireBytes   uint64
	DiskBytesCopied uint64
	DiskCopy        time.Duration
	// DiskCopying: a copy of the images runs now, DiskCopyDone of
	// DiskCopyTotal bytes of image space covered (holes included).
	DiskCopying                 bool
	DiskCopyDone, DiskCopyTotal uint64
}

// staged is one captured epoch waiting to be sent.
type staged struct {
	epoch, base uint64
	full        bool
	preloaded   bool // full, over this link's preload: only changed pages
	pfns        []uint64
	pages       []byte
	dev         []byte
	// disks are the epoch's disk changes, per disk, sent after the pages.
	disks []stagedDisk
}

// diskChanges is how many disk changes st carries.
func (st *staged) diskChanges() (n int, bytes int64) {
	for _, d := range st.disks {
		n += len(d.changes)
		bytes += d.bytes
	}
	return n, bytes
}

// reserve makes room for n pages, touching new memory so that its page
// faults are taken now rather than inside a later pause.
func (st *staged) reserve(n int) {
	need := n * hypervisor.PageSize
	if cap(st.pages) >= need {
		return
	}
	b := make([]byte, need)
	for i := 0; i < len(b); i += hypervisor.PageSize {
		b[i] = 0
	}
	st.pages = b[:0]
}

// Primary runs the epoch loop of one protected guest.
type Primary struct {
	o    PrimaryOptions
	log  *zap.Logger
	core *PrimaryCore
	enc  *transport.Encoder

	// engine-goroutine state
	harvest *dirtymap.Bitmap
	scratch *dirtymap.Bitmap
	// carry holds the pages harvested by a capture that failed afterwards
	// (the guest's dirty map no longer has them): the next capture
	// includes them.
	carry      *dirtymap.Bitmap
	epochDirty map[uint64]*dirtymap.Bitmap // own dirty set of each unacked epoch
	freeMaps   []*dirtymap.Bitmap
	pool       chan *staged
	captured   map[uint64]time.Time
	// expect is how many pages a staging buffer should hold before the
	// next pause: grown (and first-touched) while the guest runs, so the
	// pause never pays for page faults on fresh memory.
	expect int

	events chan event

	pause, ack *Samples
	// replicaHashes are the backup's page hashes for a rebuild epoch.
	replicaHashes []uint64
	// preloadHashes are the hashes of what the current link preloaded: the
	// next full epoch carries only the pages that differ (nil: none).
	preloadHashes []uint64
	// everCaptured is set once any epoch was captured: a preload only
	// starts a protection.
	everCaptured atomic.Bool
	// preloadFails counts failed preloads of this protection.
	preloadFails atomic.Int32
	// drain: a switchover's last epoch, answered on its ack (engine
	// goroutine only).
	drainEpoch uint64
	drainReply chan drainResult
	drainAcked chan drainResult // to answer after this event's actions
	// curLink is the link up now (engine goroutine writes; Handover reads
	// under linkMu).
	linkMu  sync.Mutex
	curLink *primaryLink

	mu    sync.Mutex
	stats PrimaryStats
	// heard is the unix-nano time of the last frame from the backup.
	heard atomic.Int64
	// acked mirrors core.Acked() for the heartbeat goroutine.
	acked atomic.Uint64
	// goodbye: on stop, tell the backup protection ended on purpose;
	// restarting: ... that the daemon restarts and will resume it.
	goodbye    atomic.Bool
	restarting atomic.Bool
	// needHashes: a resumed protection has not captured its rebuild epoch
	// yet; each link asks the backup for its replica's page hashes.
	needHashes atomic.Bool
	// progress is the unix-nano time the sender last wrote a frame.
	progress atomic.Int64

	// disks is the disk engine (nil: memory-only guest); engine
	// goroutine, see disks.go.
	disks *diskState
	// diskKnown: the backup's disks are known to equal the primary's at
	// its committed epoch (an epoch was acknowledged after a copy); else
	// the next link copies the images first.
	diskKnown atomic.Bool
	// diskCopied: a link copied the images since the last capture;
	// diskSyncedAt: the first epoch captured after the last copy (a
	// backup that committed it or a later epoch holds the disks).
	diskCopied   atomic.Bool
	diskSyncedAt atomic.Uint64
	// diskEnc encodes DiskWrites on the sender (one link at a time).
	diskEnc *transport.DiskEncoder
}

// StopWithGoodbye makes the next stop of Run (its ctx being cancelled)
// tell the backup that protection ended on purpose, so that it does not
// treat the silence as a lost primary.
func (p *Primary) StopWithGoodbye() { p.goodbye.Store(true) }

// StopForRestart makes the next stop of Run tell the backup that this
// daemon restarts and will resume the protection: the backup keeps the
// replica and does not mistake the silence for a lost primary.
func (p *Primary) StopForRestart() { p.restarting.Store(true) }

// Unprotect makes the runner release everything held and run unprotected
// until the backup is back (see PrimaryCore.Unprotect). It returns false
// if the runner is not running.
func (p *Primary) Unprotect(ctx context.Context) bool {
	select {
	case p.events <- event{kind: evUnprotect}:
		return true
	case <-ctx.Done():
		return false
	}
}

// Drain takes the last epoch of a planned switchover: the guest is paused
// and left paused, its state captured, sent and acknowledged, and the
// output of that epoch released. It returns that epoch: the backup's
// replica then equals the paused guest. On an error the guest may be
// paused; EndDrain resumes checkpointing (the caller resumes the guest).
func (p *Primary) Drain(ctx context.Context) (uint64, error) {
	reply := make(chan drainResult, 1)
	select {
	case p.events <- event{kind: evDrain, drained: reply}:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	select {
	case r := <-reply:
		return r.epoch, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// EndDrain abandons a drain: checkpoints go on.
func (p *Primary) EndDrain(ctx context.Context) {
	select {
	case p.events <- event{kind: evEndDrain}:
	case <-ctx.Done():
	}
}

// Handover asks the backup to activate its replica at epoch (after Drain;
// generation is the witness record's, written over to the backup) and
// waits for its answer. An error means the backup did not confirm: it
// may or may not run the VM.
func (p *Primary) Handover(ctx context.Context, epoch, generation uint64) error {
	p.linkMu.Lock()
	l := p.curLink
	p.linkMu.Unlock()
	if l == nil {
		return errors.New("handover: no link to the backup")
	}
	select {
	case <-l.activated:
	default:
	}
	_ = l.conn.SetWriteDeadline(time.Now().Add(p.o.WelcomeTimeout))
	if err := l.w.WriteFrame(transport.KindActivate, &remuspb.Activate{Reason: "planned switchover", Epoch: epoch, Generation: generation}, nil); err != nil {
		return fmt.Errorf("handover: send activate: %w", err)
	}
	select {
	case a := <-l.activated:
		if a.Error != "" {
			return fmt.Errorf("handover: the backup refused: %s", a.Error)
		}
		if a.Epoch != epoch {
			return fmt.Errorf("handover: the backup activated epoch %d, not %d", a.Epoch, epoch)
		}
		return nil
	case <-l.done:
		// The answer may have arrived just before the link ended.
		select {
		case a := <-l.activated:
			if a.Error == "" && a.Epoch == epoch {
				return nil
			}
		default:
		}
		return errors.New("handover: the link ended before the backup answered")
	case <-ctx.Done():
		return fmt.Errorf("handover: %w", ctx.Err())
	}
}

// Held is how many captured epochs the primary keeps state for (dirty
// sets, capture times): at most MaxInflight + 1 whatever the backup does.
// Only for tests and status, read on the caller's goroutine after Run
// returned.
func (p *Primary) Held() (epochs, dirtyMaps int) { return p.core.Held(), len(p.epochDirty) }

type eventKind int

const (
	evAck eventKind = iota + 1
	evLinkUp
	evLinkDown
	evUnprotect
	evDrain
	evEndDrain
)

type event struct {
	kind      eventKind
	epoch     uint64
	committed uint64
	err       error
	link      *primaryLink
	// hashes are the backup's replica page hashes at committed (a resumed
	// protection's first link), nil otherwise.
	hashes []uint64
	// preload are the hashes of the pages this link preloaded (nil: none).
	preload []uint64
	// drained answers evDrain: the epoch acked with the guest paused, or
	// an error.
	drained chan drainResult
}

type drainResult struct {
	epoch uint64
	err   error
}

// NewPrimary validates options and prepares the runner.
func NewPrimary(o PrimaryOptions) (*Primary, error) {
	if o.Guest == nil || o.Out == nil || o.Dial == nil {
		return nil, errors.New("checkpoint: primary needs Guest, Out and Dial")
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Core.Interval <= 0 {
		o.Core.Interval = 25 * time.Millisecond
	}
	if o.Core.MaxInflight < 1 {
		o.Core.MaxInflight = 1
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = 100 * time.Millisecond
	}
	if o.HeartbeatTimeout <= 0 {
		o.HeartbeatTimeout = 10 * o.HeartbeatInterval
	}
	if o.ReconnectBackoff <= 0 {
		o.ReconnectBackoff = 200 * time.Millisecond
	}
	if o.WelcomeTimeout <= 0 {
		o.WelcomeTimeout = max(o.HeartbeatTimeout, 30*time.Second)
	}
	if o.Limits.MaxFrame == 0 {
		o.Limits = transport.DefaultLimits()
	}
	if o.Encoder.PageSize == 0 {
		o.Encoder.PageSize = hypervisor.PageSize
	}
	enc, err := transport.NewEncoder(o.Encoder)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if _, ok := o.Guest.(hypervisor.Rebaseliner); o.Core.Resume && !ok {
		return nil, fmt.Errorf("checkpoint: cannot resume protection of %s: backend %s cannot compare its pages with the replica (start a new protection)", o.Guest.Name(), o.Guest.Backend())
	}
	disks, err := guestDisks(o.Guest)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	var journals int64
	for _, d := range disks {
		st := d.Journal.Stats()
		journals += st.Limit + st.Overdraft
	}
	if lim := o.Limits.WithDefaults().MaxEpochDiskBytes; journals > lim {
		return nil, fmt.Errorf("checkpoint: the disk journals may hold %d bytes (limits plus overdraft), more than an epoch may carry (%d, transport.Limits.MaxEpochDiskBytes)", journals, lim)
	}
	if n, lim := journals/disk.ChangeOverhead, int64(o.Limits.WithDefaults().MaxEpochDiskChanges); n > lim {
		return nil, fmt.Errorf("checkpoint: the disk journals may hold %d changes (limits plus overdraft at %d bytes each), more than an epoch may carry (%d, transport.Limits.MaxEpochDiskChanges)", n, disk.ChangeOverhead, lim)
	}
	n := o.Guest.NumPages()
	p := &Primary{
		o:          o,
		log:        o.Log.With(zap.String("vm", o.Guest.Name()), zap.String("role", "primary")),
		core:       NewPrimaryCore(o.Core, o.Now()),
		enc:        enc,
		harvest:    dirtymap.New(n),
		scratch:    dirtymap.New(n),
		carry:      dirtymap.New(n),
		epochDirty: map[uint64]*dirtymap.Bitmap{},
		pool:       make(chan *staged, o.Core.MaxInflight+1),
		captured:   map[uint64]time.Time{},
		events:     make(chan event, 16),
		pause:      NewSamples(1024),
		ack:        NewSamples(1024),
	}
	for i := 0; i < o.Core.MaxInflight+1; i++ {
		p.pool <- &staged{}
	}
	p.stats.Link = "connecting"
	p.needHashes.Store(o.Core.Resume)
	if len(disks) > 0 {
		p.disks = newDiskState(disks)
		p.diskEnc = transport.NewDiskEncoder(o.Limits)
	}
	return p, nil
}

// Stats returns a snapshot of the runner's counters.
func (p *Primary) Stats() PrimaryStats {
	p.mu.Lock()
	s := p.stats
	p.mu.Unlock()
	q := p.pause.Quantiles(0.5, 0.99)
	s.PauseLast, s.PauseP50, s.PauseP99 = p.pause.Last(), q[0], q[1]
	q = p.ack.Quantiles(0.5, 0.99)
	s.AckLast, s.AckP50, s.AckP99 = p.ack.Last(), q[0], q[1]
	if h := p.heard.Load(); h != 0 {
		s.HeartbeatAge = p.o.Now().Sub(time.Unix(0, h))
	}
	return s
}

func (p *Primary) update(f func(s *PrimaryStats)) {
	p.mu.Lock()
	f(&p.stats)
	p.mu.Unlock()
}

// Run drives the epoch loop until ctx is done. On return the output buffer
// still holds whatever was not acknowledged (the caller decides whether to
// release it, e.g. on a clean unprotect, or to drop it by closing it).
func (p *Primary) Run(ctx context.Context) error {
	// Last, once the engine and its link are gone: nothing will cut or
	// release the journals any more, so they must not wait for acks (the
	// guest may run on unprotected, e.g. after unprotect).
	defer p.journalsTrack()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if p.o.LiveStart && !p.o.Core.Resume && !p.everCaptured.Load() {
		// Not protected until the backup holds a replica: output passes
		// until the first checkpoint, which holds it from its boundary on.
		if err := p.o.Out.ReleaseAll(); err != nil {
			return fmt.Errorf("checkpoint: let output pass until the first checkpoint: %w", err)
		}
		p.core.StartUnheld()
		p.log.Info("protection starts live: output passes until the first checkpoint, which holds it from its boundary on")
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()

	wg.Add(1)
	go func() {
		defer wg.Done()
		p.linkLoop(ctx)
	}()

	// The ticker drives timeouts; the timer fires exactly when the next
	// checkpoint is due, so that epochs are not stretched to the next tick.
	tick := time.NewTicker(p.tickPeriod())
	defer tick.Stop()
	due := time.NewTimer(p.o.Core.Interval)
	defer due.Stop()
	var link *primaryLink
	for {
		var acts []Action
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if t := p.progress.Load(); t != 0 {
				p.core.Progress(time.Unix(0, t))
			}
			acts = p.core.Tick(p.o.Now())
		case <-due.C:
			acts = p.core.Tick(p.o.Now())
		case ev := <-p.events:
			var err error
			acts, link, err = p.handle(ev, link)
			if err != nil {
				p.log.Warn("dropping link", zap.Error(err))
				p.setErr(err)
				if link != nil {
					link.close()
				}
			}
		}
		if err := p.perform(ctx, acts, link); err != nil {
			p.failDrain(err)
			return err
		}
		if r := p.drainAcked; r != nil {
			p.drainAcked = nil
			r <- drainResult{epoch: p.drainEpoch}
		}
		if next, ok := p.core.NextCheckpoint(); ok {
			due.Reset(max(next.Sub(p.o.Now()), 0))
		} else {
			due.Stop()
		}
	}
}

// journalsTrack puts every disk journal in tracking mode for good.
func (p *Primary) journalsTrack() {
	if p.disks != nil {
		p.disks.track()
	}
}

func (p *Primary) tickPeriod() time.Duration {
	t := p.o.Core.Interval / 5
	return max(t, 500*time.Microsecond)
}

func (p *Primary) setErr(err error) {
	p.update(func(s *PrimaryStats) { s.LastError = err.Error() })
}

func (p *Primary) handle(ev event, link *primaryLink) ([]Action, *primaryLink, error) {
	now := p.o.Now()
	switch ev.kind {
	case evLinkUp:
		p.enc.InvalidateAll()
		committed := ev.committed
		if p.needHashes.Load() {
			if ev.hashes == nil && committed != 0 {
				// Nothing to compare with: the backup must be rebuilt.
				p.log.Warn("resumed protection without the replica's page hashes: full resync", zap.Uint64("backup_committed", committed))
				committed = 0
			}
			p.replicaHashes = ev.hashes
		}
		p.preloadHashes = ev.preload
		acts, err := p.core.LinkUp(committed, now)
		if err != nil {
			return nil, ev.link, err
		}
		p.dropDirtyThrough(p.core.Acked())
		if p.disks != nil {
			p.disks.spill(false) // acks can come again: back to backpressure
			p.disks.ack(p.core.Acked())
		}
		p.acked.Store(p.core.Acked())
		p.linkMu.Lock()
		p.curLink = ev.link
		p.linkMu.Unlock()
		p.update(func(s *PrimaryStats) { s.Link = "up" })
		p.log.Info("link up", zap.Uint64("backup_committed", ev.committed), zap.Uint64("acked", p.core.Acked()))
		return acts, ev.link, nil
	case evLinkDown:
		if ev.link != link {
			return nil, link, nil // an old link's late report
		}
		p.failDrain(fmt.Errorf("drain: link to the backup lost: %v", ev.err))
		p.linkMu.Lock()
		p.curLink = nil
		p.linkMu.Unlock()
		p.core.LinkDown(now)
		if p.disks != nil {
			// Nobody acknowledges now: a journal that would make the guest
			// wait switches to tracking dirty blocks instead.
			p.disks.spill(true)
		}
		p.update(func(s *PrimaryStats) { s.Link = "connecting" })
		if ev.err != nil {
			p.setErr(ev.err)
		}
		return nil, nil, nil
	case evUnprotect:
		return p.core.Unprotect(now), link, nil
	case evDrain:
		a, ok := p.core.Drain(now)
		if !ok || link == nil {
			ev.drained <- drainResult{err: errors.New("drain: the link to the backup is not up (or an epoch must be resent first): try again")}
			return nil, link, nil
		}
		p.drainEpoch, p.drainReply = a.Epoch, ev.drained
		return []Action{a}, link, nil
	case evEndDrain:
		p.core.EndDrain()
		p.failDrain(errors.New("drain abandoned"))
		return p.core.Tick(now), link, nil
	case evAck:
		if ev.link != link {
			return nil, link, nil
		}
		if link.sent.stale(now, p.o.HeartbeatTimeout) {
			// This side sent the backup nothing for longer than the
			// heartbeat timeout (a stopped or starved daemon): the
			// backup may have declared it lost and taken over since it
			// sent this ack, and releasing now would put this copy's
			// output on the wire beside the new primary's. Drop the link
			// instead: a new handshake proves the backup is still ours,
			// and its Welcome's committed epoch releases what it holds.
			return nil, link, fmt.Errorf("ack of epoch %d after this side was silent towards the backup beyond the heartbeat timeout (%v): re-handshaking before releasing", ev.epoch, p.o.HeartbeatTimeout)
		}
		acts, err := p.core.Ack(ev.epoch, now)
		if err != nil {
			return nil, link, err
		}
		if t, ok := p.captured[ev.epoch]; ok {
			p.ack.Add(now.Sub(t))
		}
		if p.o.OnAck != nil {
			p.o.OnAck(ev.epoch)
		}
		p.dropDirtyThrough(ev.epoch)
		if p.disks != nil {
			p.disks.ack(ev.epoch)
			p.diskKnown.Store(true)
		}
		p.acked.Store(ev.epoch)
		p.update(func(s *PrimaryStats) { s.Acked = ev.epoch; s.EpochsCommitted++ })
		if p.drainReply != nil && ev.epoch >= p.drainEpoch {
			// Answered once the release below is performed: the caller
			// hands over only after the drained epoch's output is out.
			p.drainAcked, p.drainReply = p.drainReply, nil
		}
		return acts, link, nil
	}
	return nil, link, nil
}

// failDrain answers a drain in progress with err.
func (p *Primary) failDrain(err error) {
	if p.drainReply != nil {
		p.drainReply <- drainResult{err: err}
		p.drainReply = nil
	}
}

func (p *Primary) dropDirtyThrough(epoch uint64) {
	for e, m := range p.epochDirty {
		if e <= epoch {
			p.freeMaps = append(p.freeMaps, m)
			delete(p.epochDirty, e)
			delete(p.captured, e)
		}
	}
}

func (p *Primary) perform(ctx context.Context, acts []Action, link *primaryLink) error {
	for len(acts) > 0 {
		a := acts[0]
		acts = acts[1:]
		switch a.Kind {
		case ActCheckpoint:
			if p.disks != nil && link != nil {
				fold := a.Full || a.Rebuild || a.ResyncTo != 0 || a.Base != a.Epoch-1
				lims := p.o.Limits.WithDefaults()
				if est, changes := p.disks.estimate(fold); est > lims.MaxEpochDiskBytes || changes > int64(lims.MaxEpochDiskChanges) {
					// The blocks tracked while the backup was away (or the
					// changes held) would not fit one epoch on the backup:
					// copy the images again instead (on a new link, while
					// the guest runs).
					p.log.Warn("disk changes to resend exceed what one epoch may carry: copying the disks again", zap.Int64("estimate_bytes", est), zap.Int64("estimate_changes", changes),
						zap.Int64("limit_bytes", lims.MaxEpochDiskBytes), zap.Int("limit_changes", lims.MaxEpochDiskChanges))
					p.core.CheckpointFailed()
					p.diskKnown.Store(false)
					p.diskSyncedAt.Store(0)
					link.close()
					continue
				}
			}
			st, err := p.capture(ctx, a)
			if err != nil {
				p.core.CheckpointFailed()
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("checkpoint: epoch %d: %w", a.Epoch, err)
			}
			more, err := p.core.CheckpointDone(a.Epoch, p.o.Now())
			if err != nil {
				return err
			}
			for _, m := range more {
				if m.Kind == ActSend && link != nil {
					if !link.enqueue(st) {
						p.pool <- st
					}
					st = nil
					continue
				}
				acts = append(acts, m)
			}
			if st != nil {
				p.pool <- st // not sent on its own (link down or superseded)
			}
		case ActRelease:
			if err := p.o.Out.Release(a.Epoch); err != nil {
				return fmt.Errorf("checkpoint: release epoch %d: %w", a.Epoch, err)
			}
		case ActReleaseAll:
			p.log.Error("backup unreachable beyond ack timeout: releasing held output and running UNPROTECTED", zap.String("reason", a.Reason))
			if err := p.o.Out.ReleaseAll(); err != nil {
				return fmt.Errorf("checkpoint: release all: %w", err)
			}
			if p.disks != nil {
				p.disks.track() // nothing will be acknowledged: track dirty blocks
			}
			p.update(func(s *PrimaryStats) { s.Unprotected = true })
		case ActDropLink:
			p.log.Warn("dropping link", zap.String("reason", a.Reason))
			if link != nil {
				link.close()
			}
		}
	}
	return nil
}

// capture performs one checkpoint: the guest is paused only for the
// harvest, the copy into staging and the device-state save.
func (p *Primary) capture(ctx context.Context, a Action) (*staged, error) {
	var st *staged
	select {
	case st = <-p.pool:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	mine := p.newMap()
	g := p.o.Guest
	want := p.expect
	// A full epoch over this link's preload carries only the pages whose
	// content differs from what was preloaded (found as a rebuild does).
	preloaded := a.Full && p.preloadHashes != nil
	if preloaded {
		p.replicaHashes = p.preloadHashes
		if err := p.rebuildCandidates(ctx, "first epoch over the preload"); err != nil {
			p.log.Warn("cannot compare pages with the preload: a plain full epoch instead", zap.Error(err))
			preloaded = false
		}
		p.preloadHashes, p.replicaHashes = nil, nil
	}
	switch {
	case preloaded:
		want = min(g.NumPages(), p.scratch.Count()+2*p.expect)
	case a.Full:
		want = g.NumPages()
	case a.Rebuild:
		// Candidates: pages whose content differs from the replica's, taken
		// while the guest runs; the harvest at the pause adds what changed
		// since (Rebaseliner's contract makes the union exact).
		if err := p.rebuildCandidates(ctx, "resumed protection"); err != nil {
			p.pool <- st
			p.freeMaps = append(p.freeMaps, mine)
			return nil, fmt.Errorf("rebuild from the replica's page hashes: %w", err)
		}
		want = min(g.NumPages(), p.scratch.Count()+2*p.expect)
	case a.ResyncTo != 0:
		want = min(g.NumPages(), p.expect*int(a.ResyncTo-a.ResyncFrom+2))
	case cap(st.pages) > 4*want*hypervisor.PageSize:
		// A guest-sized buffer left over from a full sync: give it back
		// rather than keep max_inflight+1 copies of guest memory.
		st.pages = nil
	}
	st.reserve(want)
	start := time.Now()
	if p.disks != nil {
		p.disks.beginPause()
	}
	if err := g.Pause(ctx); err != nil {
		if p.disks != nil {
			// The journals admitted an overdraft for the pause: cut them
			// anyway (which ends it); the next epoch carries the cut.
			p.disks.cut()
		}
		p.pool <- st
		return nil, fmt.Errorf("pause: %w", err)
	}
	if p.disks != nil {
		p.disks.cut()
	}
	resumed, captured := false, false
	defer func() {
		if !resumed {
			_ = g.Resume(context.WithoutCancel(ctx))
		}
	}()
	if err := g.HarvestDirty(ctx, mine); err != nil {
		p.pool <- st
		p.freeMaps = append(p.freeMaps, mine)
		return nil, fmt.Errorf("harvest: %w", err)
	}
	mine.Union(p.carry)
	p.carry.Reset()
	defer func() {
		if !captured {
			p.carry.Union(mine) // harvested, not captured: the next epoch's
		}
	}()
	send := mine
	switch {
	case preloaded:
		p.scratch.Union(mine)
		send = p.scratch
	case a.Full:
		p.scratch.Reset()
		p.scratch.SetRange(0, p.scratch.Len())
		send = p.scratch
	case a.Rebuild || a.ResyncTo != 0:
		if !a.Rebuild {
			p.scratch.Reset()
		}
		p.scratch.Union(mine)
		for e := a.ResyncFrom; a.ResyncTo != 0 && e <= a.ResyncTo; e++ {
			if m, ok := p.epochDirty[e]; ok {
				p.scratch.Union(m)
			}
		}
		send = p.scratch
	}
	st.epoch, st.base, st.full, st.preloaded = a.Epoch, a.Base, a.Full, preloaded
	st.pfns = send.AppendSet(st.pfns[:0])
	st.reserve(len(st.pfns)) // only allocates if the dirty set outgrew the estimate
	st.pages = st.pages[:len(st.pfns)*hypervisor.PageSize]
	mem := g.Memory()
	off := 0
	send.Runs(func(first, n int) bool {
		b := first * hypervisor.PageSize
		off += copy(st.pages[off:], mem[b:b+n*hypervisor.PageSize])
		return true
	})
	st.disks = nil
	if p.disks != nil {
		fold := a.Full || a.Rebuild || a.ResyncTo != 0 || a.Base != a.Epoch-1
		disks, err := p.disks.build(ctx, a.Epoch, fold)
		if err != nil {
			p.pool <- st
			p.freeMaps = append(p.freeMaps, mine)
			return nil, err
		}
		st.disks = disks
		defer func() {
			if !captured {
				p.disks.dropFailed(a.Epoch) // carried by the next epoch
				st.disks = nil
			}
		}()
	}
	dev, err := g.SaveDeviceState(ctx, st.dev[:0])
	if err != nil {
		p.pool <- st
		return nil, fmt.Errorf("save device state: %w", err)
	}
	st.dev = dev
	if a.Hold {
		// The buffer ran in pass-through (unprotected): hold again before
		// this epoch's boundary. If that fails the buffer may still let
		// output out unacknowledged: leave the guest paused (fail closed).
		if err := p.o.Out.Hold(); err != nil {
			resumed = true
			p.pool <- st
			p.freeMaps = append(p.freeMaps, mine)
			p.log.Error("cannot hold output again: guest left PAUSED so that nothing leaves unacknowledged", zap.Error(err))
			return nil, fmt.Errorf("hold output again (guest left paused): %w", err)
		}
		if p.everCaptured.Load() {
			p.log.Warn("backup is back: holding output again from this epoch on", zap.Uint64("epoch", a.Epoch))
		} else {
			p.log.Info("protection starts: output held from this epoch's boundary on", zap.Uint64("epoch", a.Epoch))
		}
		p.update(func(s *PrimaryStats) { s.Unprotected = false })
	}
	if err := p.o.Out.Checkpoint(a.Epoch); err != nil {
		p.pool <- st
		return nil, fmt.Errorf("output checkpoint: %w", err)
	}
	if a.KeepPaused {
		resumed = true // the drain's last epoch: the guest stays paused
	} else if err := g.Resume(ctx); err != nil {
		resumed = true
		p.pool <- st
		return nil, fmt.Errorf("resume: %w", err)
	}
	resumed = true
	pause := time.Since(start)
	p.pause.Add(pause)
	if !a.Full && a.ResyncTo == 0 && !a.Rebuild {
		p.expect = min(g.NumPages(), max(p.expect, 2*len(st.pfns)))
	}
	dirtyN := uint64(mine.Count())
	if a.Full || a.Rebuild || a.Base != a.Epoch-1 {
		// A full, rebuild or resync epoch supersedes every unacked epoch
		// (the core folds them): keep one dirty set, the union it carries,
		// so that a later resync still includes all of it.
		for e, m := range p.epochDirty {
			p.freeMaps = append(p.freeMaps, m)
			delete(p.epochDirty, e)
			delete(p.captured, e)
		}
		mine.CopyFrom(send)
	}
	if a.Rebuild || a.Full {
		p.needHashes.Store(false)
		p.replicaHashes = nil
	}
	p.epochDirty[a.Epoch] = mine
	p.everCaptured.Store(true)
	captured = true
	if p.disks != nil && p.diskCopied.Swap(false) {
		p.diskSyncedAt.Store(a.Epoch)
	}
	if p.disks != nil {
		n, b := st.diskChanges()
		p.update(func(s *PrimaryStats) { s.DiskChangesLast, s.DiskBytesLast = uint64(n), uint64(b) })
	}
	now := p.o.Now()
	p.captured[a.Epoch] = now
	p.update(func(s *PrimaryStats) { s.Epoch = a.Epoch; s.DirtyPagesLast = dirtyN })
	if p.o.OnCapture != nil {
		p.o.OnCapture(CaptureInfo{Epoch: a.Epoch, Base: a.Base, Full: a.Full, Pages: len(st.pfns), Pause: pause, DeviceState: st.dev})
	}
	return st, nil
}

// rebuildCandidates restarts the guest's dirty tracking from its current
// contents and marks in p.scratch every page whose content then differed
// from the backup's replica.
func (p *Primary) rebuildCandidates(ctx context.Context, why string) error {
	rb, ok := p.o.Guest.(hypervisor.Rebaseliner)
	if !ok {
		return fmt.Errorf("backend %s cannot rebaseline", p.o.Guest.Backend())
	}
	if len(p.replicaHashes) != p.o.Guest.NumPages() {
		return fmt.Errorf("have %d replica page hashes for %d pages", len(p.replicaHashes), p.o.Guest.NumPages())
	}
	start := time.Now()
	hashes, err := rb.Rebaseline(ctx)
	if err != nil {
		return err
	}
	if len(hashes) != len(p.replicaHashes) {
		return fmt.Errorf("rebaseline returned %d hashes for %d pages", len(hashes), len(p.replicaHashes))
	}
	p.scratch.Reset()
	for pfn, h := range hashes {
		if h != p.replicaHashes[pfn] {
			p.scratch.Set(pfn)
		}
	}
	p.log.Info(why+": pages differing from the replica", zap.Int("pages", p.scratch.Count()),
		zap.Int("of", len(hashes)), zap.Duration("took", time.Since(start)))
	return nil
}

func (p *Primary) newMap() *dirtymap.Bitmap {
	if n := len(p.freeMaps); n > 0 {
		m := p.freeMaps[n-1]
		p.freeMaps = p.freeMaps[:n-1]
		m.Reset()
		return m
	}
	return dirtymap.New(p.o.Guest.NumPages())
}

// linkLoop keeps a link to the backup: dial, handshake, serve, and on
// failure wait and redial. Only one link exists at a time.
func (p *Primary) linkLoop(ctx context.Context) {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		if attempt > 0 {
			p.update(func(s *PrimaryStats) { s.Reconnects++ })
			select {
			case <-ctx.Done():
				return
			case <-time.After(p.o.ReconnectBackoff):
			}
		}
		l, committed, hashes, pre, err := p.connect(ctx)
		if err != nil {
			if ctx.Err() == nil {
				p.log.Debug("connect to backup failed", zap.Error(err))
				p.setErr(err)
			}
			continue
		}
		select {
		case p.events <- event{kind: evLinkUp, committed: committed, link: l, hashes: hashes, preload: pre}:
		case <-ctx.Done():
			l.close()
			return
		}
		if p.o.OnLink != nil {
			p.o.OnLink(true, nil, false)
		}
		err = l.serve(ctx)
		if p.o.OnLink != nil && ctx.Err() == nil {
			p.o.OnLink(false, err, peerClosed(err))
		}
		select {
		case p.events <- event{kind: evLinkDown, link: l, err: err}:
		case <-ctx.Done():
			return
		}
		if err != nil && ctx.Err() == nil {
			p.log.Warn("link to backup lost", zap.Error(err))
		}
	}
}

func (p *Primary) connect(ctx context.Context) (*primaryLink, uint64, []uint64, []uint64, error) {
	conn, err := p.o.Dial(ctx)
	if err != nil {
		return nil, 0, nil, nil, fmt.Errorf("dial backup: %w", err)
	}
	// The handshake's reads wait up to WelcomeTimeout; a stop must not.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	needHashes := p.needHashes.Load()
	g := p.o.Guest
	w := transport.NewWriter(conn)
	sent := &sendClock{base: p.o.Now()}
	w.Observe(func(k transport.Kind, n int) {
		p.update(func(s *PrimaryStats) {
			s.WireBytesSent += uint64(n)
			if k.IsEpochRecord() {
				s.EpochWireBytes += uint64(n)
			}
			if k == transport.KindDiskWrites || k == transport.KindDiskSync {
				s.DiskWireBytes += uint64(n)
			}
		})
	})
	r := transport.NewReader(conn, p.o.Limits)
	hello := &remuspb.Hello{
		ProtocolVersion:   ProtocolVersion,
		VmName:            g.Name(),
		ProtectionId:      p.o.ProtectionID,
		MemoryBytes:       uint64(g.NumPages()) * hypervisor.PageSize,
		PageSize:          hypervisor.PageSize,
		Backend:           g.Backend(),
		BackendVersion:    g.BackendVersion(),
		BackendConfig:     g.Config(),
		PrimaryAckedEpoch: p.acked.Load(),
		Host:              p.o.Host,
		NeedReplicaHashes: needHashes,
	}
	if p.disks != nil {
		hello.Disks = p.disks.hello()
	}
	if p.o.Generation != nil {
		hello.Generation = p.o.Generation()
	}
	_ = conn.SetDeadline(time.Now().Add(p.o.WelcomeTimeout))
	if err := w.WriteFrame(transport.KindHello, hello, nil); err != nil {
		conn.Close()
		return nil, 0, nil, nil, fmt.Errorf("send hello: %w", err)
	}
	f, err := r.ReadFrame()
	if err != nil {
		conn.Close()
		return nil, 0, nil, nil, fmt.Errorf("read welcome: %w", err)
	}
	wel, ok := f.Header.(*remuspb.Welcome)
	if !ok {
		conn.Close()
		return nil, 0, nil, nil, fmt.Errorf("%w: expected Welcome, got %v", ErrProtocol, f.Kind)
	}
	if wel.Error != "" {
		conn.Close()
		return nil, 0, nil, nil, fmt.Errorf("backup refused protection: %s", wel.Error)
	}
	if wel.ProtocolVersion != ProtocolVersion {
		conn.Close()
		return nil, 0, nil, nil, fmt.Errorf("%w: backup speaks protocol %d, we speak %d", ErrProtocol, wel.ProtocolVersion, ProtocolVersion)
	}
	committed := wel.CommittedEpoch
	if wel.ProtectionId != p.o.ProtectionID {
		committed = 0
	}
	var hashes []uint64
	if wel.ReplicaHashes {
		if !needHashes || committed == 0 {
			conn.Close()
			return nil, 0, nil, nil, fmt.Errorf("%w: backup sent replica hashes nobody asked for", ErrProtocol)
		}
		// The backup hashes its whole replica first: allow for it.
		_ = conn.SetDeadline(time.Now().Add(p.o.WelcomeTimeout + time.Duration(g.NumPages())*time.Microsecond))
		hashes = make([]uint64, g.NumPages())
		if err := transport.ReadReplicaHashes(r, hashes); err != nil {
			conn.Close()
			return nil, 0, nil, nil, fmt.Errorf("read the replica's page hashes: %w", err)
		}
	}
	_ = conn.SetDeadline(time.Time{})
	var pre []uint64
	if p.o.LiveStart && wel.AcceptsPreload && committed == 0 && !needHashes && !p.everCaptured.Load() && p.preloadFails.Load() < maxPreloadFails {
		lr, live := g.(hypervisor.LiveReader)
		_, rebase := g.(hypervisor.Rebaseliner)
		if live && rebase {
			if pre, err = p.preload(ctx, conn, w, lr); err != nil {
				if p.preloadFails.Add(1) == maxPreloadFails {
					p.log.Warn("preload failed twice: the first epoch will be a plain full copy", zap.Error(err))
				}
				conn.Close()
				return nil, 0, nil, nil, err
			}
		}
	}
	if s := p.diskSyncedAt.Load(); p.disks != nil && !p.diskCopied.Load() && s != 0 && committed >= s {
		p.diskKnown.Store(true) // its acks were lost, but it committed past the copy
	}
	if p.disks != nil && (committed == 0 || committed < p.acked.Load() || !p.diskKnown.Load()) {
		// The backup's disks are not known to be the primary's at its
		// committed epoch: copy the images while the guest runs; the
		// journals track what changes meanwhile for the next epoch.
		p.diskKnown.Store(false)
		p.diskSyncedAt.Store(0)
		if err := p.copyDisks(ctx, conn, w); err != nil {
			conn.Close()
			return nil, 0, nil, nil, err
		}
		p.diskCopied.Store(true)
	}
	p.heard.Store(p.o.Now().UnixNano())
	// The backup's wait for the handshake (it may build a standby first)
	// is not silence: its detector runs from the link's start.
	sent.reset(p.o.Now())
	return &primaryLink{p: p, conn: conn, w: w, r: r, sent: sent, sendq: make(chan *staged, p.o.Core.MaxInflight+1), done: make(chan struct{}), activated: make(chan *remuspb.Activated, 1)}, committed, hashes, pre, nil
}

// preloadChunk is how many pages the preload reads, encodes and sends at
// a time.
const preloadChunk = 4096

// maxPreloadFails: after this many failed preloads (a link too slow or
// unstable to stream memory over), links go straight to a full epoch.
const maxPreloadFails = 2

// preload streams every page of the running guest to a backup whose
// replica holds nothing yet (Preload records, epoch 0) and returns the
// hash of each page as sent. The backup's heartbeats wait in the socket
// until the link is served; the frames written keep the backup's read
// deadline from lapsing.
func (p *Primary) preload(ctx context.Context, conn net.Conn, w *transport.Writer, lr hypervisor.LiveReader) ([]uint64, error) {
	n := p.o.Guest.NumPages()
	ps := hypervisor.PageSize
	// No delta cache: the backup's replica is not a base to encode against
	// (XOR and SAME need one), and this encoder is used once.
	cfg := p.o.Encoder
	cfg.CachePages = 0
	enc, err := transport.NewEncoder(cfg)
	if err != nil {
		return nil, fmt.Errorf("preload: %w", err)
	}
	hashes := make([]uint64, n)
	buf := make([]byte, min(n, preloadChunk)*ps)
	pfns := make([]uint64, 0, preloadChunk)
	start := time.Now()
	for lo := 0; lo < n; lo += preloadChunk {
		hi := min(lo+preloadChunk, n)
		chunk := buf[:(hi-lo)*ps]
		if err := lr.ReadLive(ctx, lo, hi-lo, chunk); err != nil {
			return nil, fmt.Errorf("preload: read guest memory: %w", err)
		}
		pfns = pfns[:0]
		for pfn := lo; pfn < hi; pfn++ {
			pfns = append(pfns, uint64(pfn))
		}
		sum, err := enc.EncodeEpoch(ctx, 0, pfns, chunk, func(hdr *remuspb.PageBatch, payload []byte) error {
			// Each frame must get through within the heartbeat timeout, as
			// the backup's reads must (a stalled backup ends the preload).
			_ = conn.SetWriteDeadline(time.Now().Add(p.o.HeartbeatTimeout))
			return w.WriteFrame(transport.KindPreload, hdr, payload)
		})
		if err != nil {
			return nil, fmt.Errorf("preload: send pages %d-%d: %w", lo, hi-1, err)
		}
		copy(hashes[lo:hi], sum.PageHashes)
		p.update(func(s *PrimaryStats) {
			s.PagesPreloaded += uint64(hi - lo)
			s.RawBytes += uint64(len(chunk))
		})
	}
	_ = conn.SetWriteDeadline(time.Time{})
	took := time.Since(start)
	p.update(func(s *PrimaryStats) { s.Preload = took })
	p.log.Info("preloaded the backup's replica while the guest ran", zap.Int("pages", n), zap.Duration("took", took))
	return hashes, nil
}

// sendClock records when this process last ran during a link (a ticker
// of its own stamps it) and whether it ever stopped running for longer
// than the heartbeat timeout: the backup's failure detector then may have
// declared this side lost, and acks that waited meanwhile must not
// release. It is not fed by frame writes: a write that blocks because the
// backup is busy applying an epoch (not reading, but connected, and its
// read deadline not running) is no silence the backup can act on.
type sendClock struct {
	// base is the clock's origin; stamps are offsets from it, read on the
	// monotonic clock (a wall-clock step is no silence, and does not hide
	// one).
	base   time.Time
	last   atomic.Int64 // ns since base of the last stamp
	silent atomic.Bool
}

func (c *sendClock) at(now time.Time) int64 { return int64(now.Sub(c.base)) }

// wrote stamps now (one goroutine at a time). silent is stored before
// last, so that a reader that sees the new stamp also sees the gap.
func (c *sendClock) wrote(now time.Time, timeout time.Duration) {
	n := c.at(now)
	if prev := c.last.Load(); prev != 0 && time.Duration(n-prev) > timeout {
		c.silent.Store(true)
	}
	c.last.Store(n)
}

func (c *sendClock) reset(now time.Time) {
	c.last.Store(c.at(now))
	c.silent.Store(false)
}

// stale reports whether the backup may have gone without a frame from
// this side for longer than timeout on this link, at some point or now.
func (c *sendClock) stale(now time.Time, timeout time.Duration) bool {
	last := c.last.Load()
	return c.silent.Load() || (last != 0 && time.Duration(c.at(now)-last) > timeout)
}

// primaryLink is one connection to the backup.
type primaryLink struct {
	p     *Primary
	conn  net.Conn
	w     *transport.Writer
	r     *transport.Reader
	sendq chan *staged
	once  sync.Once
	done  chan struct{}
	// activated carries the backup's answer to Activate (Handover).
	activated chan *remuspb.Activated
	// sent tracks whether this process ran all along on this link (see
	// sendClock).
	sent *sendClock

	qmu     sync.Mutex
	qclosed bool
}

func (l *primaryLink) close() {
	l.once.Do(func() {
		close(l.done)
		l.conn.Close()
	})
}

// enqueue hands a captured epoch to the link's sender.
// The queue holds as many entries as there are staging buffers, so the
// send never blocks.
func (l *primaryLink) enqueue(st *staged) bool {
	l.qmu.Lock()
	defer l.qmu.Unlock()
	if l.qclosed {
		return false
	}
	l.sendq <- st
	return true
}

// serve runs the link's sender, receiver and heartbeat until one fails.
func (l *primaryLink) serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 3)
	var wg sync.WaitGroup
	wg.Add(4)
	go func() {
		// This process's liveness on this link (see sendClock).
		defer wg.Done()
		t := time.NewTicker(max(l.p.o.HeartbeatInterval/2, time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-l.done:
				return
			case <-t.C:
				l.sent.wrote(l.p.o.Now(), l.p.o.HeartbeatTimeout)
			}
		}
	}()
	go func() { defer wg.Done(); errc <- l.recvLoop() }()
	go func() { defer wg.Done(); errc <- l.sendLoop(ctx) }()
	go func() {
		defer wg.Done()
		errc <- heartbeatLoop(ctx, l.done, l.w, l.p.o.HeartbeatInterval, "primary", l.p.acked.Load)
	}()
	var err error
	select {
	case err = <-errc:
	case <-ctx.Done():
		switch {
		case l.p.restarting.Load():
			_ = l.conn.SetWriteDeadline(time.Now().Add(time.Second))
			_ = l.w.WriteFrame(transport.KindGoodbye, &remuspb.Goodbye{Reason: "primary daemon restarting", Restart: true}, nil)
		case l.p.goodbye.Load():
			_ = l.conn.SetWriteDeadline(time.Now().Add(time.Second))
			_ = l.w.WriteFrame(transport.KindGoodbye, &remuspb.Goodbye{Reason: "protection ended"}, nil)
		}
	case <-l.done:
	}
	l.close()
	wg.Wait()
	// Staged epochs left in the queue go back to the pool.
	l.qmu.Lock()
	defer l.qmu.Unlock()
	l.qclosed = true
	for {
		select {
		case st := <-l.sendq:
			l.p.pool <- st
		default:
			return err
		}
	}
}

func (l *primaryLink) recvLoop() error {
	p := l.p
	for {
		_ = l.conn.SetReadDeadline(time.Now().Add(p.o.HeartbeatTimeout))
		f, err := l.r.ReadFrame()
		if err != nil {
			return fmt.Errorf("receive from backup: %w", err)
		}
		p.heard.Store(p.o.Now().UnixNano())
		switch h := f.Header.(type) {
		case *remuspb.Ack:
			select {
			case p.events <- event{kind: evAck, epoch: h.Epoch, link: l}:
			case <-l.done:
				return nil
			}
		case *remuspb.Heartbeat:
		case *remuspb.Activated:
			select {
			case l.activated <- h:
			default:
			}
		case *remuspb.Goodbye:
			return fmt.Errorf("backup closed the link: %s", h.Reason)
		default:
			return fmt.Errorf("%w: unexpected %v from backup", ErrProtocol, f.Kind)
		}
	}
}

func (l *primaryLink) sendLoop(ctx context.Context) error {
	p := l.p
	for {
		var st *staged
		select {
		case st = <-l.sendq:
		case <-l.done:
			return nil
		}
		err := l.sendEpoch(ctx, st)
		// Once on the wire the staging copy is not needed again: a resync
		// after a lost link re-reads guest memory (and the engine keeps
		// the disk cuts until the ack).
		st.disks = nil
		p.pool <- st
		if err != nil {
			return err
		}
	}
}

func (l *primaryLink) sendEpoch(ctx context.Context, st *staged) error {
	p := l.p
	nDisk, diskBytes := st.diskChanges()
	begin := &remuspb.EpochBegin{Epoch: st.epoch, BaseEpoch: st.base, PageCount: uint32(len(st.pfns)), Full: st.full, Preloaded: st.preloaded, DiskChanges: uint32(nDisk)}
	if err := l.w.WriteFrame(transport.KindEpochBegin, begin, nil); err != nil {
		return fmt.Errorf("send epoch %d begin: %w", st.epoch, err)
	}
	sum, err := p.enc.EncodeEpoch(ctx, st.epoch, st.pfns, st.pages, func(hdr *remuspb.PageBatch, payload []byte) error {
		if err := l.w.WriteFrame(transport.KindPageBatch, hdr, payload); err != nil {
			return err
		}
		p.progress.Store(p.o.Now().UnixNano())
		return nil
	})
	if err != nil {
		return fmt.Errorf("send epoch %d pages: %w", st.epoch, err)
	}
	var idx uint32
	for _, sd := range st.disks {
		if _, err := p.diskEnc.Encode(st.epoch, sd.id, idx, sd.changes, func(hdr *remuspb.DiskWrites, payload []byte) error {
			if err := l.w.WriteFrame(transport.KindDiskWrites, hdr, payload); err != nil {
				return err
			}
			p.progress.Store(p.o.Now().UnixNano())
			return nil
		}); err != nil {
			return fmt.Errorf("send epoch %d disk %s: %w", st.epoch, sd.id, err)
		}
		idx += uint32(len(sd.changes))
	}
	ds := &remuspb.DeviceState{Epoch: st.epoch, PayloadCrc32C: crc32.Checksum(st.dev, crcTable)}
	if err := l.w.WriteFrame(transport.KindDeviceState, ds, st.dev); err != nil {
		return fmt.Errorf("send epoch %d device state: %w", st.epoch, err)
	}
	var d transport.Digest
	for i, pfn := range st.pfns {
		d.AddPage(pfn, sum.PageHashes[i])
	}
	for _, sd := range st.disks {
		for _, c := range sd.changes {
			d.AddDiskChange(sd.id, c)
		}
	}
	end := &remuspb.EpochEnd{Epoch: st.epoch, PageCount: uint32(len(st.pfns)), Digest: d.Sum(st.dev), DiskChanges: uint32(nDisk)}
	if err := l.w.WriteFrame(transport.KindEpochEnd, end, nil); err != nil {
		return fmt.Errorf("send epoch %d end: %w", st.epoch, err)
	}
	p.update(func(s *PrimaryStats) {
		s.PagesSent += uint64(len(st.pfns))
		s.RawBytes += uint64(len(st.pages)+len(st.dev)) + uint64(diskBytes)
		s.DiskBytesSent += uint64(diskBytes)
		s.DiskChangesSent += uint64(nDisk)
	})
	return nil
}

// peerClosed reports whether a link error says the other side closed the
// connection (EOF, reset) rather than a timeout or a local close: evidence
// (not proof) that its host or daemon is gone.
func peerClosed(err error) bool {
	if err == nil {
		return false
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	return false
}

// heartbeatLoop sends a heartbeat every interval until done or an error.
func heartbeatLoop(ctx context.Context, done <-chan struct{}, w *transport.Writer, every time.Duration, role string, epoch func() uint64) error {
	t := time.NewTicker(every)
	defer t.Stop()
	var seq uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-done:
			return nil
		case now := <-t.C:
			seq++
			hb := &remuspb.Heartbeat{Seq: seq, SentUnixNanos: now.UnixNano(), Role: role, CommittedEpoch: epoch()}
			if err := w.WriteFrame(transport.KindHeartbeat, hb, nil); err != nil {
				return fmt.Errorf("send heartbeat: %w", err)
			}
		}
	}
}
