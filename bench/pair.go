// Package bench is remusd's benchmark harness: what protection costs,
// measured against the physical limits of the machine it runs on.
//
// Engine bounds: checkpoint pause time against a memcpy of the same dirty
// set (MeasurePause), delta-codec throughput against raw lz4 and an
// XOR+RLE codec like Xen Remus's (MeasureEncode), end-to-end
// primary→backup throughput over loopback TCP against the single-core lz4
// bound (MeasurePipeline). Operator figures: client-observed latency of a
// request/response service whose replies go through the output buffer,
// beside the output-commit floor (MeasureLatency); failover time with two
// real daemon processes (MeasureFailover); sweeps of epoch interval ×
// workload × dirty rate × guest size on a pluggable Backend (Sweep); and
// scale with the dirty set and with many VMs (MeasureDirtyScale,
// MeasureMultiVM). RunWith runs them all and returns a Report (Markdown,
// JSON, CSV and PNG plots).
//
// Every figure is reported beside its bound, measured in the same run, on
// the same machine, under the same conditions: the machines we run on are
// shared and noisy, so absolute numbers are only meaningful beside their
// bound. Nothing here asserts a speed.
package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/outbuf"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

const pageSize = hypervisor.PageSize

// dirtyGuest is a sim guest whose harvest also reports a chosen set of
// pages as dirty, so that a benchmark controls the dirty-set size and
// layout exactly. The extra pages are real guest pages, copied and sent as
// any dirty page: the replica still matches the guest byte for byte.
type dirtyGuest struct {
	*sim.Guest
	extra atomic.Pointer[dirtymap.Bitmap]
	// svc is held for reading by the request/response service while it
	// handles a request, and for writing while the guest is paused: the
	// service runs only while the guest runs, like code inside a guest.
	svc    sync.RWMutex
	svcOut atomic.Bool // svc is write-locked by Pause
}

func (d *dirtyGuest) Pause(ctx context.Context) error {
	d.svc.Lock()
	if err := d.Guest.Pause(ctx); err != nil {
		d.svc.Unlock()
		return err
	}
	d.svcOut.Store(true)
	return nil
}

func (d *dirtyGuest) Resume(ctx context.Context) error {
	err := d.Guest.Resume(ctx)
	if d.svcOut.CompareAndSwap(true, false) {
		d.svc.Unlock()
	}
	return err
}

func (d *dirtyGuest) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error {
	if err := d.Guest.HarvestDirty(ctx, dst); err != nil {
		return err
	}
	if m := d.extra.Load(); m != nil {
		dst.Union(m)
	}
	return nil
}

var _ hypervisor.Guest = (*dirtyGuest)(nil)

// pairConfig wires a primary and a backup.
type pairConfig struct {
	sim  sim.Config
	core checkpoint.PrimaryConfig
	enc  transport.EncoderConfig
	// tcp: connect over real loopback TCP; otherwise transport.Pipe.
	tcp bool
	log *zap.Logger
	// onCapture, if set, is called on the engine goroutine after each
	// capture (after the pair's own bookkeeping).
	onCapture func(checkpoint.CaptureInfo)
	// sink receives the output released by the output buffer (called
	// with the buffer's lock held: it must not block or call back).
	sink func(epoch uint64, msg []byte)
	// noGuestOutput: the sim guest's own periodic output is not routed
	// into the buffer (the latency service emits its replies itself).
	noGuestOutput bool
	// name of the VM (default "bench").
	name string
}

// pair is a primary and a backup joined by a link, with the bookkeeping
// needed to count acknowledged pages and to verify the replica.
type pair struct {
	cfg     pairConfig
	guest   *dirtyGuest
	replica *sim.Replica
	backup  *checkpoint.Backup
	primary *checkpoint.Primary
	out     *outbuf.Memory
	ln      net.Listener

	mu         sync.Mutex
	epochs     map[uint64]captured // captured, not yet acknowledged
	opsAt      map[uint64]uint64   // ops of the guest at each epoch's capture
	acked      uint64
	ackedPages int64
	ackedEps   int64
	// rec: while set, every non-full capture is recorded in caps.
	rec   bool
	caps  []captureSample
	capAt map[uint64]time.Time // recorded captures awaiting their ack
	acks  []time.Duration      // capture → ack of recorded epochs

	ctx     context.Context
	cancel  context.CancelFunc
	runDone chan struct{} // closed when Primary.Run returned
	runErr  error         // Run's result, valid after runDone
	started bool
	wg      sync.WaitGroup
}

// captureSample is one recorded capture.
type captureSample struct {
	at    time.Time
	pause time.Duration
	pages int
}

type captured struct {
	pages int
	full  bool
}

// newPair allocates guest, replica and engines (first-touching guest and
// replica memory here, not later inside a measurement).
// benchOwner is the primary's identity in the in-process pairs (the links
// are in-process or loopback and unauthenticated).
const benchOwner = "bench-primary"

func newPair(cfg pairConfig) (*pair, error) {
	if cfg.log == nil {
		cfg.log = zap.NewNop()
	}
	if cfg.name == "" {
		cfg.name = "bench"
	}
	cfg.sim = cfg.sim.WithDefaults()
	g, err := sim.New(cfg.name, cfg.sim, cfg.log)
	if err != nil {
		return nil, err
	}
	rep, err := sim.NewReplica(cfg.name, cfg.sim, cfg.log)
	if err != nil {
		g.Close()
		return nil, err
	}
	p := &pair{
		cfg:     cfg,
		guest:   &dirtyGuest{Guest: g},
		replica: rep,
		epochs:  map[uint64]captured{},
		opsAt:   map[uint64]uint64{},
		runDone: make(chan struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.backup = checkpoint.NewBackup(checkpoint.BackupOptions{
		VMName: cfg.name, Replica: rep, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, Owner: benchOwner,
		HeartbeatInterval: 100 * time.Millisecond, HeartbeatTimeout: 10 * time.Second, Log: cfg.log,
	})
	out := outbuf.NewMemory(0, cfg.sink)
	p.out = out
	if !cfg.noGuestOutput {
		g.SetOutput(func(_ uint64, msg []byte) { out.Emit(msg) })
	}
	dial := p.dialPipe
	if cfg.tcp {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			p.close()
			return nil, fmt.Errorf("bench: listen: %w", err)
		}
		p.ln = ln
		p.wg.Add(1)
		go p.acceptLoop()
		dial = p.dialTCP
	}
	pr, err := checkpoint.NewPrimary(checkpoint.PrimaryOptions{
		Guest: p.guest, Out: out, Dial: dial, ProtectionID: cfg.name,
		Core: cfg.core, Encoder: cfg.enc,
		HeartbeatInterval: 100 * time.Millisecond, HeartbeatTimeout: 10 * time.Second,
		ReconnectBackoff: 50 * time.Millisecond,
		Log:              cfg.log,
		OnCapture:        p.onCapture,
		OnAck:            p.onAck,
	})
	if err != nil {
		p.close()
		return nil, err
	}
	p.primary = pr
	return p, nil
}

func (p *pair) onCapture(ci checkpoint.CaptureInfo) {
	info, err := sim.DecodeDeviceState(ci.DeviceState)
	p.mu.Lock()
	p.epochs[ci.Epoch] = captured{pages: ci.Pages, full: ci.Full}
	if p.rec && !ci.Full {
		now := time.Now()
		p.caps = append(p.caps, captureSample{at: now, pause: ci.Pause, pages: ci.Pages})
		if p.capAt == nil {
			p.capAt = map[uint64]time.Time{}
		}
		p.capAt[ci.Epoch] = now
	}
	if err == nil {
		p.opsAt[ci.Epoch] = info.Ops
	}
	p.mu.Unlock()
	if p.cfg.onCapture != nil {
		p.cfg.onCapture(ci)
	}
}

// onAck counts the pages of every epoch up to the acknowledged one (the
// initial full epoch excluded: it is a sync, not steady-state traffic).
func (p *pair) onAck(epoch uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for e, c := range p.epochs {
		if e <= epoch {
			if !c.full {
				p.ackedPages += int64(c.pages)
				p.ackedEps++
			}
			delete(p.epochs, e)
		}
	}
	p.acked = max(p.acked, epoch)
	if len(p.capAt) > 0 {
		now := time.Now()
		for e, t := range p.capAt {
			if e <= epoch {
				p.acks = append(p.acks, now.Sub(t))
				delete(p.capAt, e)
			}
		}
	}
}

// counts returns the acknowledged epoch, steady-state pages and epochs.
func (p *pair) counts() (acked uint64, pages, epochs int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acked, p.ackedPages, p.ackedEps
}

// record starts (on) or stops recording captures and returns (and
// clears) what was recorded so far: the captures, and the capture → ack
// time of those acknowledged (measured here rather than taken from the
// Primary's stats, whose ring also holds the initial full sync).
func (p *pair) record(on bool) ([]captureSample, []time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, a := p.caps, p.acks
	p.caps, p.acks, p.capAt = nil, nil, nil
	p.rec = on
	return c, a
}

func (p *pair) dialPipe(ctx context.Context) (net.Conn, error) {
	a, b := transport.Pipe()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.serve(b)
	}()
	return a, nil
}

func (p *pair) dialTCP(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", p.ln.Addr().String())
}

func (p *pair) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c)
		}()
	}
}

// serve is the backup daemon's side of one link: read Hello, then Serve.
func (p *pair) serve(c net.Conn) {
	r := transport.NewReader(c, transport.DefaultLimits())
	w := transport.NewWriter(c)
	f, err := r.ReadFrame()
	if err != nil {
		c.Close()
		return
	}
	h, ok := f.Header.(*remuspb.Hello)
	if !ok {
		c.Close()
		return
	}
	_ = p.backup.Serve(p.ctx, c, r, w, h, benchOwner)
}

// start runs the primary.
func (p *pair) start() {
	p.started = true
	go func() {
		p.runErr = p.primary.Run(p.ctx)
		close(p.runDone)
	}()
}

// waitAcked waits until an epoch >= n is acknowledged.
func (p *pair) waitAcked(ctx context.Context, n uint64, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		a, _, _ := p.counts()
		if a >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("bench: no ack of epoch %d within %v (acked %d; primary %+v)", n, within, a, p.primary.Stats())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// stop ends the primary and the links and waits for them. It returns the
// primary's error, if any. Safe to call more than once.
func (p *pair) stop() error {
	if p.cancel == nil {
		return nil
	}
	p.cancel()
	var err error
	if p.started {
		select {
		case <-p.runDone:
			err = p.runErr
		case <-time.After(30 * time.Second):
			err = errors.New("bench: primary did not stop within 30s")
		}
	}
	if p.ln != nil {
		p.ln.Close()
	}
	p.wg.Wait()
	p.cancel = nil
	return err
}

// close stops everything and closes the guest and the replica.
func (p *pair) close() error {
	err := p.stop()
	p.guest.Close()
	p.replica.Close()
	return err
}

// verify checks, after stop, that the replica is byte for byte the guest's
// state at the backup's committed epoch (by replaying the sim guest to the
// op count captured with that epoch). Replay allocates a whole guest: call
// it on small guests only.
func (p *pair) verify() error {
	committed := p.backup.Committed()
	if committed == 0 {
		return errors.New("bench: backup committed no epoch")
	}
	p.mu.Lock()
	ops, ok := p.opsAt[committed]
	p.mu.Unlock()
	if !ok {
		return fmt.Errorf("bench: backup committed epoch %d the primary never captured", committed)
	}
	mem, dev, err := sim.Replay(p.cfg.sim, ops)
	if err != nil {
		return err
	}
	if !bytes.Equal(mem, p.replica.Memory()) {
		return fmt.Errorf("bench: replica memory at epoch %d differs from the guest's", committed)
	}
	if _, got := p.replica.DeviceState(); !bytes.Equal(got, dev) {
		return fmt.Errorf("bench: replica device state at epoch %d differs", committed)
	}
	return nil
}

// pretouch writes one byte per page so first-touch faults are taken now.
func pretouch(b []byte) {
	for i := 0; i < len(b); i += pageSize {
		b[i] = 0
	}
}

// quantile returns the q-quantile of v (sorted in place); 0 if empty.
func quantile(v []time.Duration, q float64) time.Duration {
	if len(v) == 0 {
		return 0
	}
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	k := int(q*float64(len(v)-1) + 0.5)
	return v[max(0, min(k, len(v)-1))]
}

func medianInt(v []int) int {
	if len(v) == 0 {
		return 0
	}
	s := append([]int(nil), v...)
	sort.Ints(s)
	return s[len(s)/2]
}

func medianFloat(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}
