// Package daemon is remusd's per-host daemon: it runs guests (sim), protects
// them towards a peer daemon (primary role), keeps replicas for peers
// (backup role), detects a lost primary and activates replicas.
package daemon

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/outbuf"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// ErrUnknownVM is returned for a VM this daemon does not know.
var ErrUnknownVM = errors.New("unknown VM")

// Daemon is one host's remusd.
type Daemon struct {
	cfg Config
	log *zap.Logger

	mu  sync.Mutex
	vms map[string]*vm
	wg  sync.WaitGroup
	ctx context.Context // set by Run; protections live under it

	// probeOnce finds what output buffering this host offers (once).
	probeOnce sync.Once
	probe     outbuf.ProbeResult
	// nextQueue is the next NFQUEUE queue number for a protected VM.
	nextQueue uint16
	// tlsServer is the replication listener's TLS config (nil: plain TCP).
	tlsServer *tls.Config
	// running is closed once Run has started.
	running chan struct{}
	runOnce sync.Once
}

// vm is one guest known to this daemon, in any role.
type vm struct {
	name    string
	backend string
	role    string
	spec    simSpec

	guest hypervisor.Guest
	// out is where the guest's output goes (a buffer while protected, a
	// pass-through otherwise).
	out  atomic.Pointer[outbuf.Memory]
	sink *outputSink

	// primary role
	peer    string
	primary *checkpoint.Primary
	stop    context.CancelFunc
	done    chan struct{}
	runErr  atomic.Value // string

	// backup role
	backup      *checkpoint.Backup
	detector    *failover.Detector
	activatedAt time.Time
	activation  time.Duration

	audit *auditLog

	// qemu backend
	qnet     qemuNet
	attached bool          // attached to a QEMU launched by someone else: left running on exit
	netOut   outbuf.Buffer // the NIC's output buffer while protected
	qreplica *qemu.Replica // backup role: the replica and hot standby
}

// simSpec is what a sim VM's backend config carries between hosts: the
// guest's configuration and where its network output goes (which, like a
// real VM's MAC and IP, moves with the VM on failover).
type simSpec struct {
	Sim    sim.Config `json:"sim"`
	Output string     `json:"output,omitempty"`
}

// New builds a daemon and starts the sim guests its configuration names.
func New(cfg Config, log *zap.Logger) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	d := &Daemon{cfg: cfg, log: log.With(zap.String("host", cfg.Name)), vms: map[string]*vm{}, nextQueue: firstQueueNum, running: make(chan struct{})}
	if cfg.TLS.Enabled() {
		srv, err := cfg.TLS.ServerConfig()
		if err != nil {
			return nil, fmt.Errorf("config field tls: %w", err)
		}
		d.tlsServer = srv
	}
	for _, s := range cfg.SimVMs {
		spec := simSpec{Sim: sim.Config{MemoryBytes: s.MemoryBytes, Workload: s.Workload, Rate: s.Rate, Seed: s.Seed, OutputEvery: s.OutputEvery}.WithDefaults(), Output: s.Output}
		if err := spec.Sim.Validate(); err != nil {
			d.closeAll()
			return nil, fmt.Errorf("config field sim_vms[%s]: %w", s.Name, err)
		}
		v := &vm{name: s.Name, backend: sim.BackendName, role: RoleLocal, spec: spec}
		v.sink = newOutputSink(s.Output, cfg.Name, s.Name, d.log)
		v.setPassThrough()
		g, err := sim.New(s.Name, spec.Sim, d.log, sim.WithOutput(v.emit))
		if err != nil {
			v.sink.close()
			d.closeAll()
			return nil, fmt.Errorf("start sim VM %s: %w", s.Name, err)
		}
		v.guest = &simGuest{Guest: g, spec: spec}
		d.vms[s.Name] = v
	}
	for i, q := range cfg.QemuVMs {
		ctx, cancel := context.WithTimeout(context.Background(), qemuStartTimeout)
		g, attached, err := d.startQemu(ctx, q)
		cancel()
		if err != nil {
			d.closeAll()
			return nil, fmt.Errorf("config field qemu_vms[%d] (%s): start: %w", i, q.Name, err)
		}
		v := &vm{name: q.Name, backend: qemu.BackendName, role: RoleLocal, guest: g, attached: attached,
			qnet: qemuNet{tap: q.Tap, bridge: q.Bridge, bridged: q.Bridge != "" || q.Bridged}}
		d.vms[q.Name] = v
		d.log.Info("qemu VM running", zap.String("vm", q.Name), zap.Bool("attached", attached), zap.Int("pid", g.Pid()),
			zap.String("tap", q.Tap), zap.String("serial", g.Spec().SerialPath))
	}
	return d, nil
}

// outbufProbe returns what output buffering this host offers, probing the
// kernel on first use (bounded).
func (d *Daemon) outbufProbe() outbuf.ProbeResult {
	d.probeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		d.probe = outbuf.Probe(ctx)
	})
	return d.probe
}

// qemuStartTimeout bounds starting one configured QEMU VM (building the
// guest image included).
const qemuStartTimeout = 5 * time.Minute

// firstQueueNum is the NFQUEUE queue number of the first protected VM.
const firstQueueNum = 7100

// simGuest carries the simSpec (not just the sim config) in the handshake.
type simGuest struct {
	*sim.Guest
	spec simSpec
}

func (g *simGuest) Config() []byte { return mustJSON(g.spec) }

func (v *vm) emit(_ uint64, msg []byte) {
	if o := v.out.Load(); o != nil {
		o.Emit(msg)
	}
}

func (v *vm) setPassThrough() {
	o := outbuf.NewMemory(0, v.sink.send)
	_ = o.ReleaseAll()
	v.out.Store(o)
}

func (d *Daemon) closeAll() {
	for _, v := range d.vms {
		if v.netOut != nil {
			// Fails closed: output of unacknowledged epochs is dropped.
			v.netOut.Close()
		}
		if v.qreplica != nil {
			v.qreplica.Close()
		}
		if qg, ok := v.guest.(*qemu.Guest); ok && v.attached {
			qg.Detach()
		} else if v.guest != nil {
			v.guest.Close()
		}
		if v.sink != nil {
			v.sink.close()
		}
		if v.audit != nil {
			v.audit.close()
		}
	}
}

// Run serves peers until ctx is done, then stops every protection and
// guest. A primary's guest dies with its daemon (sim guests live in it).
func (d *Daemon) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer func() {
		d.mu.Lock()
		d.closeAll()
		d.mu.Unlock()
	}()
	d.mu.Lock()
	d.ctx = ctx
	d.mu.Unlock()
	d.runOnce.Do(func() { close(d.running) })
	probe := d.outbufProbe()
	d.log.Info("output buffering available on this host for VM network interfaces",
		zap.String("mechanism", probe.Kind), zap.String("why", probe.Reason), zap.String("output_buffer", d.cfg.OutputBuffer))
	errc := make(chan error, 1)
	if d.cfg.Listen != "" {
		ln, err := (&net.ListenConfig{}).Listen(ctx, "tcp", d.cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen for peers on %s: %w", d.cfg.Listen, err)
		}
		if d.tlsServer != nil {
			// The handshake runs on the first read, under servePeer's
			// Hello deadline; a peer without a valid certificate never
			// gets to send a frame.
			ln = tls.NewListener(ln, d.tlsServer)
		}
		d.log.Info("listening for primaries", zap.String("addr", ln.Addr().String()))
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			errc <- d.acceptLoop(ctx, ln)
		}()
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		d.watchBackups(ctx)
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	cancel()
	d.wg.Wait()
	return err
}

func (d *Daemon) acceptLoop(ctx context.Context, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.servePeer(ctx, conn)
		}()
	}
}

// servePeer reads a primary's Hello and hands the link to the replica.
func (d *Daemon) servePeer(ctx context.Context, conn net.Conn) {
	log := d.log.With(zap.String("remote", conn.RemoteAddr().String()))
	r := transport.NewReader(conn, transport.DefaultLimits())
	w := transport.NewWriter(conn)
	_ = conn.SetDeadline(time.Now().Add(d.cfg.HeartbeatTimeout.D()))
	f, err := r.ReadFrame()
	if err != nil {
		log.Warn("bad hello from peer", zap.Error(err))
		conn.Close()
		return
	}
	hello, ok := f.Header.(*remuspb.Hello)
	if !ok {
		log.Warn("peer did not start with Hello", zap.Stringer("kind", f.Kind))
		conn.Close()
		return
	}
	_ = conn.SetDeadline(time.Time{})
	b, err := d.backupFor(hello)
	if err != nil {
		log.Warn("refusing primary", zap.String("vm", hello.VmName), zap.Error(err))
		_ = w.WriteFrame(transport.KindWelcome, &remuspb.Welcome{ProtocolVersion: checkpoint.ProtocolVersion, Error: err.Error()}, nil)
		conn.Close()
		return
	}
	if err := b.Serve(ctx, conn, r, w, hello); err != nil && ctx.Err() == nil {
		log.Warn("replication link ended", zap.String("vm", hello.VmName), zap.Error(err))
	}
}

// backupFor finds or creates the replica a Hello asks for.
func (d *Daemon) backupFor(h *remuspb.Hello) (*checkpoint.Backup, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if v, ok := d.vms[h.VmName]; ok {
		switch {
		case v.role == RoleBackup && v.backup != nil:
			return v.backup, nil
		case v.role == RoleActive:
			return nil, fmt.Errorf("VM %s already took over on %s: refusing to replicate over it", h.VmName, d.cfg.Name)
		default:
			return nil, fmt.Errorf("VM %s runs on %s (role %s): a host cannot back up a VM it runs", h.VmName, d.cfg.Name, v.role)
		}
	}
	if h.Backend == qemu.BackendName {
		return d.qemuBackupFor(h)
	}
	if h.Backend != sim.BackendName {
		return nil, fmt.Errorf("backend %q is not supported by this daemon (have: sim, qemu)", h.Backend)
	}
	var spec simSpec
	if err := unmarshalStrict(h.BackendConfig, &spec); err != nil {
		return nil, fmt.Errorf("VM %s: bad sim backend config: %w", h.VmName, err)
	}
	spec.Sim = spec.Sim.WithDefaults()
	if uint64(spec.Sim.MemoryBytes) != h.MemoryBytes {
		return nil, fmt.Errorf("VM %s: hello says %d bytes of memory, backend config %d", h.VmName, h.MemoryBytes, spec.Sim.MemoryBytes)
	}
	rep, err := sim.NewReplica(h.VmName, spec.Sim, d.log)
	if err != nil {
		return nil, fmt.Errorf("VM %s: replica: %w", h.VmName, err)
	}
	policy := failover.Manual
	if d.cfg.Takeover == TakeoverAutoUnsafe {
		policy = failover.AutoUnsafe
	}
	v := &vm{name: h.VmName, backend: sim.BackendName, role: RoleBackup, spec: spec,
		detector: &failover.Detector{Timeout: d.cfg.HeartbeatTimeout.D(), Policy: policy}}
	v.audit = openAudit(d.cfg.StateDir, h.VmName, "backup", d.log)
	v.backup = checkpoint.NewBackup(checkpoint.BackupOptions{
		VMName:            h.VmName,
		Replica:           rep,
		Backend:           sim.BackendName,
		BackendVersion:    sim.BackendVersion,
		HeartbeatInterval: d.cfg.HeartbeatInterval.D(),
		HeartbeatTimeout:  d.cfg.HeartbeatTimeout.D(),
		Log:               d.log,
		OnCommit: func(epoch uint64, dev []byte) {
			v.audit.record(auditRecord{Event: "commit", Epoch: epoch, Sim: simInfo(dev)})
		},
		BeforeActivate: func(epoch uint64, mem, dev []byte) {
			// Record what is about to run, so that it can be audited
			// against the primary's log (the demo does).
			v.audit.record(auditRecord{Event: "activate", Epoch: epoch, Sim: simInfo(dev),
				MemoryXXH: transport.PageHash(mem), DeviceXXH: transport.PageHash(dev)})
		},
	})
	// The activated guest's first output must find its way out.
	rep.SetOutput(v.emit)
	d.vms[h.VmName] = v
	d.log.Info("new replica", zap.String("vm", h.VmName), zap.Int64("memory_bytes", spec.Sim.MemoryBytes))
	return v.backup, nil
}

// watchBackups reports primaries that fell silent and, when the operator
// opted in to unsafe automatic takeover, activates their replicas.
func (d *Daemon) watchBackups(ctx context.Context) {
	t := time.NewTicker(d.cfg.HeartbeatInterval.D())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var lost []string
		d.mu.Lock()
		now := time.Now()
		for _, v := range d.vms {
			if v.role != RoleBackup || v.backup == nil {
				continue
			}
			st := v.backup.Stats()
			dec := v.detector.Evaluate(observe(st), now)
			if !dec.NewlyLost {
				continue
			}
			d.log.Warn("primary lost: no heartbeat beyond timeout", zap.String("vm", v.name),
				zap.Duration("silent", now.Sub(st.LastHeard)), zap.Uint64("committed", st.Committed),
				zap.String("takeover", d.cfg.Takeover))
			if dec.TakeOver {
				lost = append(lost, v.name)
			}
		}
		d.mu.Unlock()
		for _, name := range lost {
			d.log.Warn("automatic takeover (unsafe mode: no witness)", zap.String("vm", name))
			if err := d.Failover(ctx, name); err != nil {
				d.log.Error("automatic takeover failed", zap.String("vm", name), zap.Error(err))
			}
		}
	}
}

// Protect implements Service.
func (d *Daemon) Protect(ctx context.Context, req ProtectRequest) error {
	if req.Peer == "" {
		return errors.New("protect: a peer HOST:PORT is required")
	}
	if _, _, err := net.SplitHostPort(req.Peer); err != nil {
		return fmt.Errorf("protect: peer %q: %w", req.Peer, err)
	}
	interval := d.cfg.EpochInterval.D()
	if req.EpochInterval != 0 {
		interval = req.EpochInterval
	}
	if interval < time.Millisecond || interval > 10*time.Second {
		return fmt.Errorf("protect: epoch interval %v out of range [1ms, 10s]", interval)
	}
	inflight := d.cfg.MaxInflight
	if req.MaxInflight != 0 {
		inflight = req.MaxInflight
	}
	if inflight < 1 || inflight > 64 {
		return fmt.Errorf("protect: max inflight %d out of range [1, 64]", inflight)
	}
	// The control socket may answer before Run has started: wait for it.
	select {
	case <-d.running:
	case <-ctx.Done():
		return fmt.Errorf("protect: daemon is not running yet: %w", ctx.Err())
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx == nil {
		return errors.New("protect: daemon is not running")
	}
	v, ok := d.vms[req.VM]
	if !ok {
		return fmt.Errorf("protect %s: %w on %s", req.VM, ErrUnknownVM, d.cfg.Name)
	}
	if v.role != RoleLocal && v.role != RoleActive {
		return fmt.Errorf("protect %s: VM is already in role %s", req.VM, v.role)
	}
	id := newProtectionID()
	var (
		buf    outbuf.Buffer
		memBuf *outbuf.Memory
	)
	if v.backend == qemu.BackendName {
		nb, forceOne, err := d.openQemuBuffer(v, interval)
		if err != nil {
			return fmt.Errorf("protect %s: %w", req.VM, err)
		}
		if forceOne && inflight != 1 {
			d.log.Info("plug output buffer tracks one closed epoch: max_inflight forced to 1", zap.String("vm", v.name), zap.Int("requested", inflight))
			inflight = 1
		}
		buf = nb
	} else {
		memBuf = outbuf.NewMemory(0, v.sink.send)
		buf = memBuf
	}
	v.audit = openAudit(d.cfg.StateDir, v.name, "primary", d.log)
	dialer := &net.Dialer{Timeout: d.cfg.DialTimeout.D()}
	p, err := checkpoint.NewPrimary(checkpoint.PrimaryOptions{
		Guest: v.guest,
		Out:   buf,
		Dial: func(ctx context.Context) (net.Conn, error) {
			return d.dialPeer(ctx, dialer, req.Peer)
		},
		ProtectionID: id,
		Core: checkpoint.PrimaryConfig{
			Interval:              interval,
			MaxInflight:           inflight,
			AckTimeout:            d.cfg.AckTimeout.D(),
			UnprotectOnAckTimeout: d.cfg.AckTimeoutPolicy == AckTimeoutUnprotect,
		},
		Encoder:           transport.EncoderConfig{PageSize: hypervisor.PageSize, CachePages: d.cfg.DeltaCachePages},
		HeartbeatInterval: d.cfg.HeartbeatInterval.D(),
		HeartbeatTimeout:  d.cfg.HeartbeatTimeout.D(),
		ReconnectBackoff:  d.cfg.ReconnectBackoff.D(),
		Log:               d.log,
		OnCapture: func(ci checkpoint.CaptureInfo) {
			v.audit.record(auditRecord{Event: "capture", Epoch: ci.Epoch, Pages: ci.Pages, PauseMs: checkpoint.Ms(ci.Pause), Sim: simInfo(ci.DeviceState)})
		},
		OnAck: func(epoch uint64) {
			v.audit.record(auditRecord{Event: "ack", Epoch: epoch})
		},
	})
	if err != nil {
		if memBuf == nil {
			buf.Close()
		}
		return fmt.Errorf("protect %s: %w", req.VM, err)
	}
	// From here on the guest's output is held per epoch.
	if memBuf != nil {
		v.out.Store(memBuf)
	} else {
		v.netOut = buf
	}
	pctx, cancel := context.WithCancel(d.ctx)
	v.role, v.peer, v.primary, v.stop, v.done = RolePrimary, req.Peer, p, cancel, make(chan struct{})
	v.runErr.Store("")
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(v.done)
		if err := p.Run(pctx); err != nil {
			v.runErr.Store(err.Error())
			d.log.Error("protection failed: holding output", zap.String("vm", v.name), zap.Error(err))
		}
	}()
	d.log.Info("protecting", zap.String("vm", v.name), zap.String("peer", req.Peer), zap.String("protection_id", id),
		zap.Duration("epoch_interval", interval), zap.Int("max_inflight", inflight))
	return nil
}

// Unprotect implements Service.
func (d *Daemon) Unprotect(ctx context.Context, name string) error {
	d.mu.Lock()
	v, ok := d.vms[name]
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("unprotect %s: %w on %s", name, ErrUnknownVM, d.cfg.Name)
	}
	if v.role != RolePrimary {
		d.mu.Unlock()
		return fmt.Errorf("unprotect %s: VM is not protected here (role %s)", name, v.role)
	}
	p, stop, done := v.primary, v.stop, v.done
	d.mu.Unlock()
	p.StopWithGoodbye()
	stop()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("unprotect %s: %w", name, ctx.Err())
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// The primary keeps running, so its held output is legitimate: let it go.
	if v.netOut != nil {
		err := v.netOut.ReleaseAll()
		if cerr := v.netOut.Close(); err == nil {
			err = cerr
		}
		v.netOut = nil
		if err != nil {
			return fmt.Errorf("unprotect %s: release output: %w", name, err)
		}
	} else if err := v.out.Load().ReleaseAll(); err != nil {
		return fmt.Errorf("unprotect %s: release output: %w", name, err)
	}
	v.role, v.primary, v.stop, v.done = RoleLocal, nil, nil, nil
	d.log.Info("unprotected", zap.String("vm", name))
	return nil
}

// Failover implements Service: the replica of name takes over here.
func (d *Daemon) Failover(ctx context.Context, name string) error {
	d.mu.Lock()
	v, ok := d.vms[name]
	if !ok {
		d.mu.Unlock()
		return fmt.Errorf("failover %s: %w on %s", name, ErrUnknownVM, d.cfg.Name)
	}
	if v.role != RoleBackup || v.backup == nil {
		d.mu.Unlock()
		return fmt.Errorf("failover %s: this host holds no replica of it (role %s); run failover on the backup host", name, v.role)
	}
	b := v.backup
	// Output goes straight out once the replica runs: it is unprotected
	// until re-protected.
	if v.backend == sim.BackendName {
		if v.sink == nil {
			v.sink = newOutputSink(v.spec.Output, d.cfg.Name, name, d.log)
		}
		v.setPassThrough()
	}
	d.mu.Unlock()
	start := time.Now()
	g, err := b.Activate(ctx)
	if err != nil {
		return fmt.Errorf("failover %s: %w", name, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.guest = g
	v.role = RoleActive
	v.activatedAt = time.Now()
	v.activation = time.Since(start)
	if sg, ok := g.(*sim.Guest); ok {
		v.guest = &simGuest{Guest: sg, spec: v.spec}
	}
	if v.qreplica != nil {
		a := v.qreplica.LastActivation()
		if a.Cold && v.qnet.tap != "" {
			// A cold-started QEMU created a fresh tap: attach it, then
			// announce the guest again (the first announcement went nowhere).
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := setupTap(sctx, v.qnet.tap, v.qnet.bridge)
			if err == nil {
				if qg, ok := g.(*qemu.Guest); ok {
					err = qg.QMP().Execute(sctx, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100}, nil)
				}
			}
			cancel()
			if err != nil {
				d.log.Error("cold-started VM's network setup failed", zap.String("vm", name), zap.Error(err))
			}
		}
		d.log.Warn("qemu VM activated", zap.String("vm", name), zap.Uint64("epoch", a.Epoch), zap.Bool("cold", a.Cold),
			zap.Duration("probe", a.Probe), zap.Duration("start", a.Start), zap.Duration("incoming", a.Incoming),
			zap.Duration("announce", a.Announce), zap.Duration("total", a.Total))
	}
	d.log.Warn("VM took over on this host", zap.String("vm", name), zap.Uint64("epoch", b.Committed()), zap.Duration("activation", v.activation))
	return nil
}

// Status implements Service.
func (d *Daemon) Status(ctx context.Context) ([]VMStatus, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]VMStatus, 0, len(d.vms))
	for _, v := range d.vms {
		out = append(out, d.statusOf(v))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, nil
}

func (d *Daemon) statusOf(v *vm) VMStatus {
	s := VMStatus{VM: v.name, Role: v.role, Backend: v.backend, Link: LinkNone, Peer: v.peer}
	if v.netOut != nil {
		st := v.netOut.Stats()
		s.OutBuf = v.netOut.Kind()
		s.OutputHeld, s.OutputReleased, s.OutputDropped = st.HeldPackets, st.ReleasedPackets, st.DroppedPackets
	} else if o := v.out.Load(); o != nil && v.role != RoleBackup {
		st := o.Stats()
		s.OutBuf = o.Kind()
		s.OutputHeld, s.OutputReleased, s.OutputDropped = st.HeldPackets, st.ReleasedPackets, st.DroppedPackets
	}
	if sg, ok := v.guest.(*simGuest); ok {
		s.GuestOps, s.GuestOutputSeq = sg.Ops(), sg.OutputSeq()
	}
	switch {
	case v.primary != nil:
		p := v.primary.Stats()
		s.Link = p.Link
		s.Epoch, s.AckedEpoch, s.EpochsCommitted = p.Epoch, p.Acked, p.EpochsCommitted
		s.PauseMsLast, s.PauseMsP50, s.PauseMsP99 = checkpoint.Ms(p.PauseLast), checkpoint.Ms(p.PauseP50), checkpoint.Ms(p.PauseP99)
		s.AckMsLast, s.AckMsP50, s.AckMsP99 = checkpoint.Ms(p.AckLast), checkpoint.Ms(p.AckP50), checkpoint.Ms(p.AckP99)
		s.DirtyPagesLast, s.PagesSent, s.RawBytes = p.DirtyPagesLast, p.PagesSent, p.RawBytes
		s.WireBytesSent, s.EpochWireBytes = p.WireBytesSent, p.EpochWireBytes
		if p.EpochWireBytes > 0 {
			s.CompressionRatio = float64(p.RawBytes) / float64(p.EpochWireBytes)
		}
		s.Reconnects, s.HeartbeatAgeMs, s.LastError = p.Reconnects, checkpoint.Ms(p.HeartbeatAge), p.LastError
		if p.Unprotected {
			s.OutBuf += " (released: unprotected)"
		}
		if e, _ := v.runErr.Load().(string); e != "" {
			s.LastError = e
		}
	case v.backup != nil:
		b := v.backup.Stats()
		s.Epoch, s.AckedEpoch, s.EpochsCommitted = b.Committed, b.Committed, b.EpochsCommitted
		s.PagesReceived, s.WireBytesReceived = b.PagesReceived, b.WireBytesReceived
		s.TornEpochsDiscarded, s.LastError = b.TornEpochsDiscarded, b.LastError
		if !b.LastHeard.IsZero() {
			s.HeartbeatAgeMs = checkpoint.Ms(time.Since(b.LastHeard))
		}
		if v.role == RoleActive {
			s.Link = LinkClosed
			s.ActivatedAtUnixMs = v.activatedAt.UnixMilli()
			s.ActivationMs = checkpoint.Ms(v.activation)
		} else {
			// A fresh detector: status must not consume the watcher's
			// one-time loss report.
			det := failover.Detector{Timeout: d.cfg.HeartbeatTimeout.D()}
			s.Link = det.Evaluate(observe(b), time.Now()).State.String()
		}
	}
	return s
}

// dialPeer connects to a peer daemon's replication address, over mutual
// TLS when configured.
func (d *Daemon) dialPeer(ctx context.Context, dialer *net.Dialer, peer string) (net.Conn, error) {
	conn, err := dialer.DialContext(ctx, "tcp", peer)
	if err != nil || !d.cfg.TLS.Enabled() {
		return conn, err
	}
	host, _, _ := net.SplitHostPort(peer)
	cfg, err := d.cfg.TLS.ClientConfig(host)
	if err != nil {
		conn.Close()
		return nil, err
	}
	tc := tls.Client(conn, cfg)
	hctx, cancel := context.WithTimeout(ctx, d.cfg.DialTimeout.D())
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", peer, err)
	}
	return tc, nil
}

func observe(st checkpoint.BackupStats) failover.Observation {
	return failover.Observation{Connected: st.Connected, LastHeard: st.LastHeard, Committed: st.Committed, Goodbye: st.Goodbye}
}

func newProtectionID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
