// Package daemon is remusd's per-host daemon: it runs guests (sim, QEMU),
// protects them towards a peer daemon (primary role), keeps replicas for
// authenticated peers (backup role), detects a lost primary and activates
// replicas.
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
	"github.com/remusd/remusd/failover/heartbeat"
	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/hypervisor/xen"
	"github.com/remusd/remusd/outbuf"
)

// ErrUnknownVM is returned for a VM this daemon does not know.
var ErrUnknownVM = errors.New("unknown VM")

// ErrBusy is returned while another operation on the same VM runs.
var ErrBusy = errors.New("another operation on this VM is in progress")

// Daemon is one host's remusd.
type Daemon struct {
	cfg Config
	log *zap.Logger

	// mu guards vms and every vm's fields. It is never held across a
	// backend operation that can take long (starting a standby QEMU,
	// setting up an output buffer, activating): those mark the VM busy,
	// release mu, and re-take it to install the result.
	mu  sync.Mutex
	vms map[string]*vm
	wg  sync.WaitGroup
	// ctx is what protections and replica links live under. Run cancels it
	// only at the end of its shutdown sequence, after every primary was
	// paused and told the backup it restarts.
	ctx    context.Context
	cancel context.CancelFunc

	// probeOnce finds what output buffering this host offers (once).
	probeOnce sync.Once
	probe     outbuf.ProbeResult
	// nextQueue is the next NFQUEUE queue number for a protected VM.
	nextQueue uint16
	// tlsServer is the replication listener's TLS config (nil: insecure).
	tlsServer *tls.Config
	// handshakes bounds the connections that have not yet sent a valid
	// Hello (each holds a goroutine and a small buffer until its deadline).
	handshakes *handshakeSlots
	// budget is the memory (bytes) all replicas together may use.
	budget int64
	// records keeps per-VM state across daemon restarts.
	records *recordStore
	// newStandby builds a qemu replica and its hot standby (a seam for
	// tests; qemu.NewReplica by default).
	newStandby func(ctx context.Context, spec qemu.Spec, log *zap.Logger, opts ...qemu.ReplicaOption) (*qemu.Replica, error)
	// xh is this host's Xen (xl, libxc, xenstore) and xlv its libvirt
	// libxl driver, for xen_vms (seams for tests: daemon/xenlibvirt.go).
	xh  xenHost
	xlv xenLibvirt
	// running is closed once Run has started.
	running chan struct{}
	runOnce sync.Once
	// wit is the witness (nil: none configured).
	wit *witness.Witness
	// linkDown wakes watchBackups when a replica's link ends, so a
	// takeover race does not wait for its next tick.
	linkDown chan struct{}
	// hb is the second heartbeat path (nil: none; set by Run, d.mu), and
	// hbKeys the keys of its datagrams, learnt from replication
	// connections.
	hb     *heartbeat.Endpoint
	hbKeys *heartbeat.Keyring
	// wd is the watchdog channel (nil: disabled); watchdogExe the binary
	// that starts one (see watchdog.go).
	wd *wdog
	// xenWatchdogHeld: Xen VMs the watchdog held paused at start that
	// this daemon could not show it holds (not attached: why).
	xenWatchdogHeld map[string]string
	watchdogExe     string
}

// vm is one guest known to this daemon, in any role.
type vm struct {
	name    string
	backend string
	role    string
	spec    simSpec
	// busy names a long operation in progress ("" = none).
	busy string
	// stoppedWhy says why a stopped VM is not running here.
	stoppedWhy string

	guest hypervisor.Guest
	// out is where a sim guest's output goes (a buffer while protected, a
	// pass-through otherwise).
	out  atomic.Pointer[outbuf.Memory]
	sink *outputSink

	// primary role
	peer         string // the address dialled
	peerName     string // the backup's identity
	protectionID string
	primary      *checkpoint.Primary
	stop         context.CancelFunc
	done         chan struct{}
	runErr       atomic.Value // string
	interval     time.Duration
	inflight     int
	queue        uint16 // NFQUEUE queue number on its tap
	// resume is the protection a previous daemon ran; Run resumes it.
	resume *protectionRecord
	// w is the VM's witness bookkeeping, wgen the generation a primary's
	// Hello carries (read by the runner's link goroutine).
	w    wstate
	wgen atomic.Uint64
	pid  int // the guest's QEMU process (0: unknown)
	// linkPeer is the identity the backup's certificate showed on the
	// last link (string; read by the runner's dial).
	linkPeer atomic.Value

	// backup role
	backup      *checkpoint.Backup
	detector    *failover.Detector
	activatedAt time.Time
	activation  time.Duration
	replicaSize int64 // bytes charged to the replica budget
	// altHeard is when the owner's last second-path heartbeat naming
	// this VM arrived.
	altHeard time.Time

	audit *auditLog

	// qemu backend
	qcfg     *QemuVM // this host's configuration of the VM (nil: none)
	qnet     qemuNet
	attached bool          // attached to a QEMU launched by someone else
	netOut   outbuf.Buffer // the NIC's output buffer while protected
	qreplica *qemu.Replica // backup role: the replica and hot standby

	// xen backend (daemon/xen.go)
	xcfg     *XenVM       // this host's configuration of the VM
	xnet     xenNet       // the domain and its vif (qnet.tap names the vif too)
	xstandby *xen.Standby // backup role: the hot standby domain
	// xrecVif is the vif the recorded protection held output on (a
	// resumed protection must find the same one).
	xrecVif string
}

// simSpec is what a sim VM's backend config carries between hosts: the
// guest's configuration and where its network output goes (which, like a
// real VM's MAC and IP, moves with the VM on failover).
type simSpec struct {
	Sim    sim.Config `json:"sim"`
	Output string     `json:"output,omitempty"`
}

// New builds a daemon: it starts the sim guests its configuration names,
// and for each configured QEMU VM re-attaches to the guest a previous
// daemon left running (its state directory says where), launches it, or
// leaves it stopped (see QemuVM.Autostart).
func New(cfg Config, log *zap.Logger, opts ...Option) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	records, err := newRecordStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: log.With(zap.String("host", cfg.Name)), vms: map[string]*vm{}, nextQueue: firstQueueNum, linkDown: make(chan struct{}, 1), hbKeys: heartbeat.NewKeyring(),
		running: make(chan struct{}), handshakes: newHandshakeSlots(cfg.Peers, log), records: records, newStandby: qemu.NewReplica}
	for _, o := range opts {
		o(d)
	}
	if d.xh == nil {
		d.xh = xlHost{xl: cfg.Xen.xl()}
	}
	if d.xlv == nil {
		d.xlv = libvirtXen{cfg: cfg.Xen.Libvirt}
	}
	d.budget = replicaBudget(cfg.ReplicaBudgetMiB)
	if d.wit, err = dialWitness(cfg, d.log); err != nil {
		return nil, err
	}
	d.watchdogInit()
	if cfg.Insecure {
		d.log.Warn("INSECURE: the replication link is plaintext and unauthenticated (config insecure); any host that reaches the listener is trusted by the name it claims",
			zap.String("listen", cfg.Listen), zap.Bool("non_loopback_allowed", cfg.InsecureNonLoopback))
	} else {
		srv, err := cfg.TLS.ServerConfigAccept(d.acceptIdentity)
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
		v.sink = newOutputSink(s.Output, cfg.Name, s.Name, cfg.HeartbeatTimeout.D()/2, d.log)
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
	for i := range cfg.QemuVMs {
		q := cfg.QemuVMs[i]
		if err := d.bringUpQemu(q); err != nil {
			d.closeAll()
			return nil, fmt.Errorf("config field qemu_vms[%d] (%s): start: %w", i, q.Name, err)
		}
	}
	for i := range cfg.XenVMs {
		if err := d.bringUpXen(cfg.XenVMs[i]); err != nil {
			d.closeAll()
			return nil, fmt.Errorf("config field xen_vms[%d] (%s): %w", i, cfg.XenVMs[i].Name, err)
		}
	}
	d.log.Info("replica memory budget", zap.Int64("mib", d.budget>>20))
	return d, nil
}

// maxHandshakes bounds connections that have not completed a Hello.
const maxHandshakes = 32

// replicaBudget is the configured budget in bytes, or half of the host's
// memory.
func replicaBudget(mib int) int64 {
	if mib > 0 {
		return int64(mib) << 20
	}
	if total := hostMemory(); total > 0 {
		return total / 2
	}
	return 4 << 30
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

// record is what the state directory keeps of v (nil for VMs that do not
// outlive the daemon: sim guests, replicas). d.mu held.
func (d *Daemon) record(v *vm) *vmRecord {
	switch v.role {
	case RoleLocal, RolePrimary, RoleActive:
	default:
		return nil
	}
	var r *vmRecord
	switch g := v.guest.(type) {
	case *qemu.Guest:
		sp := g.Spec()
		if p := g.Pid(); p > 0 {
			v.pid = p
		}
		r = &vmRecord{Name: v.name, Backend: v.backend, Role: v.role,
			QEMU: &qemuRecord{Pid: v.pid, QMP: sp.QMPPath, RAM: sp.RAMPath, Serial: sp.SerialPath, Launched: !v.attached}}
	case *xen.Guest:
		r = &vmRecord{Name: v.name, Backend: v.backend, Role: v.role,
			Xen: &xenRecord{DomID: v.xnet.domid, Vif: v.xnet.vif, Bridged: v.xnet.bridged, XLStandby: v.xnet.xlStandby, LibvirtStandby: v.xnet.libvirtStandby}}
	default:
		return nil
	}
	if v.role == RolePrimary && v.primary == nil && v.resume != nil {
		pr := *v.resume
		r.Protection = &pr
	} else if v.role == RolePrimary {
		ob := ""
		if v.netOut != nil {
			ob = v.netOut.Kind()
		}
		r.Protection = &protectionRecord{ID: v.protectionID, Peer: v.peer, PeerName: v.peerName,
			EpochInterval: Duration(v.interval), MaxInflight: v.inflight, OutBuf: ob, Queue: v.queue}
	}
	return r
}

// saveRecord writes v's record (or removes it when v no longer runs
// here). d.mu held. A failure is logged: the VM runs on, but a restarted
// daemon would not find it.
func (d *Daemon) saveRecord(v *vm) {
	r := d.record(v)
	var err error
	if r == nil {
		if v.role != RoleStopped {
			err = d.records.remove(v.name)
		}
	} else {
		err = d.records.save(*r)
	}
	if err != nil {
		d.log.Error("cannot write the VM's state record: a restarted daemon would not find this guest", zap.String("vm", v.name), zap.Error(err))
	}
}

// closeAll releases everything at once (New failing): sim guests stop,
// QEMU guests are left running (detached), replicas are closed.
func (d *Daemon) closeAll() {
	for _, v := range d.vms {
		d.closeVM(v)
	}
}

// closeVM lets go of v on daemon exit, leaving QEMU guests running. A
// protected guest's output stays held by the host (Detach) and the guest
// was paused while that happened (see shutdown). d.mu held.
func (d *Daemon) closeVM(v *vm) {
	if v.netOut != nil {
		if err := v.netOut.Detach(); err != nil {
			d.log.Error("detach output buffer", zap.String("vm", v.name), zap.Error(err))
		}
		v.netOut = nil
	}
	if v.backup != nil && v.role == RoleBackup {
		v.backup.Close()
	}
	if v.qreplica != nil {
		v.qreplica.Close()
		v.qreplica = nil
	}
	if v.xstandby != nil {
		v.xstandby.Close()
		v.xstandby = nil
	}
	switch g := v.guest.(type) {
	case *qemu.Guest:
		g.Detach()
	case *xen.Guest:
		// Let go of the domain as it is: a fenced or mid-checkpoint
		// domain stays stopped (Close would run it).
		g.Release()
	case nil:
	default:
		g.Close()
	}
	if o := v.out.Load(); o != nil {
		o.Close()
	}
	if v.sink != nil {
		v.sink.close()
	}
	if v.audit != nil {
		v.audit.close()
	}
}

// Run serves peers until ctx is done, then shuts down in an order that
// never lets a protected guest's output out unacknowledged: each primary
// is paused, tells its backup it restarts, has its output buffer detached
// (the host keeps holding it) and is resumed; QEMU guests keep running
// for the next daemon to re-attach. Sim guests live in the daemon and stop
// with it.
func (d *Daemon) Run(ctx context.Context) error {
	pctx, pcancel := context.WithCancel(context.WithoutCancel(ctx))
	defer pcancel()
	d.mu.Lock()
	d.ctx, d.cancel = pctx, pcancel
	d.mu.Unlock()
	probe := d.outbufProbe()
	d.log.Info("output buffering available on this host for VM network interfaces",
		zap.String("mechanism", probe.Kind), zap.String("why", probe.Reason), zap.String("output_buffer", d.cfg.OutputBuffer))
	d.resumeProtections()
	d.watchdogRun()

	lctx, lcancel := context.WithCancel(ctx)
	defer lcancel()
	errc := make(chan error, 1)
	var lwg sync.WaitGroup
	if d.cfg.Listen != "" {
		ln, err := (&net.ListenConfig{}).Listen(lctx, "tcp", d.cfg.Listen)
		if err != nil {
			d.shutdown()
			return fmt.Errorf("listen for peers on %s: %w", d.cfg.Listen, err)
		}
		d.log.Info("listening for primaries", zap.String("addr", ln.Addr().String()), zap.Bool("mutual_tls", d.tlsServer != nil))
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			errc <- d.acceptLoop(lctx, ln)
		}()
	}
	hb, hbErr := d.startSecondPath()
	if hbErr != nil {
		lcancel()
		lwg.Wait()
		d.shutdown()
		return hbErr
	}
	if hb != nil {
		d.mu.Lock()
		d.hb = hb
		d.mu.Unlock()
		lwg.Add(1)
		go func() {
			defer lwg.Done()
			d.runSecondPath(lctx, hb)
		}()
	}
	lwg.Add(1)
	go func() {
		defer lwg.Done()
		d.watchBackups(lctx)
	}()
	d.runOnce.Do(func() { close(d.running) })
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	lcancel()
	lwg.Wait()
	d.shutdown()
	return err
}

// Running is closed once Run serves (guests re-attached, protections
// resuming, the listener up).
func (d *Daemon) Running() <-chan struct{} { return d.running }

// shutdown is Run's exit sequence (see Run).
func (d *Daemon) shutdown() {
	d.watchdogShutdownBegin()
	d.mu.Lock()
	var prim []*vm
	for _, v := range d.vms {
		if v.role == RolePrimary && v.primary != nil {
			prim = append(prim, v)
		}
	}
	d.mu.Unlock()
	var pwg sync.WaitGroup
	for _, v := range prim {
		pwg.Add(1)
		go func() {
			defer pwg.Done()
			d.stopPrimaryForRestart(v)
		}()
	}
	pwg.Wait()
	d.watchdogShutdownEnd()
	d.mu.Lock()
	if d.cancel != nil {
		d.cancel() // replica links end
	}
	d.mu.Unlock()
	d.wg.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, v := range d.vms {
		if v.role == RolePrimary || v.role == RoleLocal || v.role == RoleActive {
			d.saveRecord(v)
		}
		d.closeVM(v)
	}
	if d.wit != nil {
		d.wit.Close()
	}
}

// stopPrimaryForRestart stops one protection at daemon exit: the runner
// stops first, telling the backup the daemon restarts (it keeps the
// replica and does not take over on the silence; what the guest sends
// meanwhile stays held in the buffer); then the guest is paused while the
// output buffer is detached (the host keeps holding, or dropping, what the
// guest sends: nothing is released), and a QEMU guest is resumed: it runs
// on until the next daemon resumes the protection. A sim guest lives in
// the daemon and stops with it (no restart notice: its backup may take
// over).
func (d *Daemon) stopPrimaryForRestart(v *vm) {
	d.mu.Lock()
	g, p, stop, done, netOut := v.guest, v.primary, v.stop, v.done, v.netOut
	// A QEMU or Xen guest outlives the daemon; a sim guest does not.
	isQemu := v.backend != sim.BackendName
	// A fenced or self-fenced guest stays stopped as it is.
	fenced := v.w.view == WitnessFenced || v.w.paused
	d.mu.Unlock()
	if isQemu {
		p.StopForRestart()
	}
	stop()
	<-done
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Paused while the buffer is detached; undo runs it again.
	var undo func() error
	switch xg, isXen := g.(*xen.Guest); {
	case fenced:
	case isXen:
		// At once: a cooperative suspend could take longer than the
		// deadline and take effect after the daemon is gone.
		if xg.PauseNow(ctx) == nil {
			undo = func() error { return xg.UnpauseNow(ctx) }
		}
	case g.Pause(ctx) == nil && isQemu:
		undo = func() error { return g.Resume(ctx) }
	}
	d.mu.Lock()
	if netOut != nil {
		if err := netOut.Detach(); err != nil {
			d.log.Error("detach output buffer", zap.String("vm", v.name), zap.Error(err))
		}
		v.netOut = nil
	} else if o := v.out.Load(); o != nil {
		o.Close() // sim: held output is dropped
	}
	d.mu.Unlock()
	if undo != nil {
		if err := undo(); err != nil {
			d.log.Error("resume guest after detaching its protection", zap.String("vm", v.name), zap.Error(err))
		}
	}
	d.log.Info("protection stopped for a daemon restart: the guest runs on with its output held", zap.String("vm", v.name), zap.Bool("qemu", isQemu))
}

// Status implements Service.
func (d *Daemon) Status(ctx context.Context) ([]VMStatus, error) {
	d.mu.Lock()
	out := make([]VMStatus, 0, len(d.vms))
	var bufs []outbuf.Buffer
	var guests []any
	for _, v := range d.vms {
		out = append(out, d.statusOf(v))
		bufs = append(bufs, v.netOut)
		guests = append(guests, v.guest)
	}
	d.mu.Unlock()
	fillGuestStates(ctx, out, guests)
	// A kernel buffer's counters may take a netlink round trip: read them
	// without the daemon lock.
	for i, b := range bufs {
		if b != nil {
			out[i].setOutput(b.Stats())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VM < out[j].VM })
	return out, nil
}

// setOutput copies an output buffer's counters.
func (s *VMStatus) setOutput(st outbuf.Stats) {
	s.OutputHeld, s.OutputReleased, s.OutputDropped = st.HeldPackets, st.ReleasedPackets, st.DroppedPackets
	s.OutputHoldRepairs = st.HoldRepairs
}

func (d *Daemon) statusOf(v *vm) VMStatus {
	s := VMStatus{VM: v.name, Role: v.role, Backend: v.backend, Link: LinkNone, Peer: v.peer, PeerName: v.peerName,
		Busy: v.busy, StoppedWhy: v.stoppedWhy, Insecure: d.cfg.Insecure}
	if v.netOut != nil {
		s.OutBuf = v.netOut.Kind() // counters: see Status
	} else if o := v.out.Load(); o != nil && v.role != RoleBackup {
		s.OutBuf = o.Kind()
		s.setOutput(o.Stats())
	}
	if sg, ok := v.guest.(*simGuest); ok {
		s.GuestOps, s.GuestOutputSeq = sg.Ops(), sg.OutputSeq()
	}
	if v.backend == xen.BackendName {
		s.XenDomID, s.XenVif = v.xnet.domid, v.xnet.vif
		if v.xstandby != nil {
			s.XenDomID = v.xstandby.DomID()
		}
		if v.role == RoleStopped {
			s.XenDomID, s.XenVif = 0, ""
		}
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
		s.DiskBytesLast, s.DiskChangesLast, s.DiskBytesSent, s.DiskChangesSent = p.DiskBytesLast, p.DiskChangesLast, p.DiskBytesSent, p.DiskChangesSent
		s.DiskWireBytes, s.DiskBytesCopied, s.DiskCopyMs = p.DiskWireBytes, p.DiskBytesCopied, checkpoint.Ms(p.DiskCopy)
		s.DiskCopying, s.DiskCopyDoneBytes, s.DiskCopyTotalBytes = p.DiskCopying, p.DiskCopyDone, p.DiskCopyTotal
		if p.EpochWireBytes > 0 {
			s.CompressionRatio = float64(p.RawBytes) / float64(p.EpochWireBytes)
		}
		s.Reconnects, s.HeartbeatAgeMs, s.LastError = p.Reconnects, checkpoint.Ms(p.HeartbeatAge), p.LastError
		if p.Unprotected {
			s.OutBuf += " (released: unprotected)"
			s.Unprotected = true
		}
	case v.backup != nil:
		b := v.backup.Stats()
		s.PeerName = v.backup.Owner()
		s.Epoch, s.AckedEpoch, s.EpochsCommitted = b.Committed, b.Committed, b.EpochsCommitted
		s.PagesReceived, s.WireBytesReceived = b.PagesReceived, b.WireBytesReceived
		s.DiskBytesApplied, s.DiskBytesSynced, s.DiskFlushes = b.DiskBytesApplied, b.DiskBytesSynced, b.DiskFlushes
		s.TornEpochsDiscarded, s.LastError, s.LinksRefused = b.TornEpochsDiscarded, b.LastError, b.Refused
		if !b.LastHeard.IsZero() {
			s.HeartbeatAgeMs = checkpoint.Ms(time.Since(b.LastHeard))
		}
		if v.role == RoleActive {
			s.Link = LinkClosed
			s.ActivatedAtUnixMs = v.activatedAt.UnixMilli()
			s.ActivationMs = checkpoint.Ms(v.activation)
		} else {
			// A copy of the detector: status must not consume the
			// watcher's one-time loss report.
			det := d.newDetector()
			if v.detector != nil {
				det = v.detectorCopy()
			}
			s.Link = det.Evaluate(observe(v, b), time.Now()).State.String()
		}
		s.LinkLastHeardUnixMs = unixMs(b.LastHeard)
		s.SecondPathLastHeardUnixMs = unixMs(v.altHeard)
	}
	if v.primary != nil && d.hb != nil {
		s.SecondPathLastHeardUnixMs = unixMs(d.hb.LastHeard(d.backupName(v)))
	}
	if e, _ := v.runErr.Load().(string); e != "" {
		s.LastError = e
	}
	d.witnessStatus(v, &s)
	d.watchdogStatus(v, &s)
	return s
}

// unixMs is t in Unix milliseconds (0 for the zero time).
func unixMs(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

// detectorCopy is a copy of v's detector to evaluate without side effects.
func (v *vm) detectorCopy() *failover.Detector {
	c := *v.detector
	return &c
}

// observe is what the detector sees of v's primary. d.mu held. A replica
// whose disks are being copied again matches no committed epoch: like one
// that never committed, it has nothing to take over with (so it does not
// race for the witness).
func observe(v *vm, st checkpoint.BackupStats) failover.Observation {
	committed := st.Committed
	if st.DiskTorn {
		committed = 0
	}
	return failover.Observation{Connected: st.Connected, LastHeard: st.LastHeard, Committed: committed, Goodbye: st.Goodbye,
		Restarting: st.Restarting, RestartingSince: st.RestartingSince, DisconnectedAt: st.DisconnectedAt, PeerClosed: st.PeerClosed,
		AltHeard: v.altHeard}
}

func newProtectionID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// lookup returns the VM name refers to, or an error naming it. d.mu held.
func (d *Daemon) lookup(op, name string) (*vm, error) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	v, ok := d.vms[name]
	if !ok {
		return nil, fmt.Errorf("%s %s: %w on %s", op, name, ErrUnknownVM, d.cfg.Name)
	}
	if v.busy != "" {
		return nil, fmt.Errorf("%s %s: %w (%s)", op, name, ErrBusy, v.busy)
	}
	return v, nil
}
