package daemon

// The replication listener: who may connect, and which replicas they may
// create or change (issue 8, items 1-4).
//
// Every connection is authenticated before it can send a frame: over
// mutual TLS (the default) the peer's certificate must be signed by the
// configured CA and name one of the configured peers; in the explicit
// insecure mode the peer is who its Hello says. Then its Hello is read
// under a deadline with small limits, the VM name is checked against the
// one naming rule, and the VM must be one this host accepts from that
// peer (peers[].vms). A new replica is created only within the memory
// budget and, for QEMU, from this host's own configuration of the VM; an
// existing replica accepts links only from its owner (checkpoint.Backup).

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/hypervisor/xen"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// replicaLimits bounds what a replica's links may make the backup read at
// once: a page batch of 4096 pages, a device state of the backend's size
// (QEMU's is ~80 KB; 16 MiB is its own limit; a sim guest's is tiny).
func replicaLimits(backend string) transport.Limits {
	dev := 16 << 20
	if backend == sim.BackendName {
		dev = 1 << 20
	}
	const batch = 4096
	return transport.Limits{MaxFrame: max(batch*hypervisor.PageSize, dev) + 2<<20, MaxHeader: 1 << 20, MaxBatchPages: batch, MaxDeviceState: dev,
		MaxEpochDiskBytes: replicaDiskStaging, MaxEpochDiskChanges: replicaDiskChanges}
}

// The disk part of an epoch a backup stages at most: the write data and
// the changes (each held as a small struct besides its data). A primary's
// journals (disk_journal_mib plus the pause overdraft, per disk) must fit.
const (
	replicaDiskStaging = 256 << 20
	replicaDiskChanges = 1 << 20
	diskChangeCost     = 96
)

// replicaCost is what a replica may hold at most: its memory, a staging
// area as large (a full epoch is staged whole before it is applied), a
// link's frame buffer and three copies of a device state (staged,
// committed, the replica's own).
func replicaCost(memory int64, backend string, disks bool) int64 {
	l := replicaLimits(backend)
	c := 2*memory + int64(l.MaxFrame) + 3*int64(l.MaxDeviceState)
	if disks {
		// The staged data grows by appending (up to twice its bound in
		// capacity), plus one record's decompression scratch.
		l = l.WithDefaults()
		c += 2*l.MaxEpochDiskBytes + int64(l.MaxDiskBatchBytes) + int64(l.MaxEpochDiskChanges)*diskChangeCost
	}
	return c
}

// helloLimits bounds what a peer may send before it is known to be a
// primary this host accepts: one Hello of modest size.
func helloLimits() transport.Limits {
	return transport.Limits{MaxFrame: 1 << 20, MaxHeader: 1 << 20, MaxBatchPages: 1, MaxDeviceState: 1}
}

// peerByName returns the configured peer called name.
func (d *Daemon) peerByName(name string) (Peer, bool) {
	for _, p := range d.cfg.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return Peer{}, false
}

// acceptIdentity is the TLS listener's check: only configured peers get
// past the handshake.
func (d *Daemon) acceptIdentity(identity string) error {
	if _, ok := d.peerByName(identity); !ok {
		return fmt.Errorf("peer %q is not configured on %s (config peers)", identity, d.cfg.Name)
	}
	return nil
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
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		release, ok := d.handshakes.take(conn.RemoteAddr())
		if !ok {
			d.log.Warn("too many connections without a Hello from this address: refusing one", zap.String("remote", conn.RemoteAddr().String()))
			conn.Close()
			continue
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.servePeer(conn, release)
		}()
	}
}

// tlsHandshakeTimeout bounds a new connection's TLS handshake (a few
// milliseconds between healthy peers; a connection that stalls in it
// holds a pre-Hello slot until then).
const tlsHandshakeTimeout = 3 * time.Second

// handshakeSlots bounds the connections between accept and a valid Hello:
// per source address (so that one stranger cannot use them all) and in
// total, with slots of their own for the addresses configured peers
// resolve to (so that strangers cannot lock the owner out).
type handshakeSlots struct {
	mu      sync.Mutex
	byIP    map[string]int
	total   int
	peerIPs map[string]bool
}

const (
	maxHandshakesPerIP   = 4
	maxHandshakesPerPeer = 8
)

func newHandshakeSlots(peers []Peer, log *zap.Logger) *handshakeSlots {
	h := &handshakeSlots{byIP: map[string]int{}, peerIPs: map[string]bool{}}
	for _, p := range peers {
		host, _, err := net.SplitHostPort(p.Address)
		if err != nil || host == "" {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		ips, err := net.DefaultResolver.LookupIPAddr(ctx, host)
		cancel()
		if err != nil {
			log.Warn("cannot resolve a peer's address: its connections share the strangers' slots", zap.String("peer", p.Name), zap.Error(err))
			continue
		}
		for _, ip := range ips {
			h.peerIPs[ip.IP.String()] = true
		}
	}
	return h
}

// take reserves a slot for a connection from addr; release frees it.
func (h *handshakeSlots) take(addr net.Addr) (release func(), ok bool) {
	ip := addr.String()
	if ta, isTCP := addr.(*net.TCPAddr); isTCP {
		ip = ta.IP.String()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	peer := h.peerIPs[ip]
	switch {
	case peer && h.byIP[ip] >= maxHandshakesPerPeer:
		return nil, false
	case !peer && (h.byIP[ip] >= maxHandshakesPerIP || h.total >= maxHandshakes):
		return nil, false
	}
	h.byIP[ip]++
	if !peer {
		h.total++
	}
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.byIP[ip]--; h.byIP[ip] == 0 {
			delete(h.byIP, ip)
		}
		if !peer {
			h.total--
		}
	}, true
}

// handshakeTimeout bounds the TLS handshake and the Hello of a new
// connection.
func (d *Daemon) handshakeTimeout() time.Duration {
	return max(3*d.cfg.HeartbeatTimeout.D(), 5*time.Second)
}

// servePeer authenticates a connection, reads its Hello and hands the link
// to the replica it may serve.
func (d *Daemon) servePeer(conn net.Conn, releaseSlot func()) {
	released := false
	release := func() {
		if !released {
			released = true
			releaseSlot()
		}
	}
	defer release()
	d.mu.Lock()
	ctx := d.ctx
	d.mu.Unlock()
	log := d.log.With(zap.String("remote", conn.RemoteAddr().String()))
	_ = conn.SetDeadline(time.Now().Add(d.handshakeTimeout()))
	identity := ""
	if d.tlsServer != nil {
		tc := tls.Server(conn, d.tlsServer)
		hctx, cancel := context.WithTimeout(ctx, tlsHandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			log.Warn("peer refused in the TLS handshake", zap.Error(err))
			conn.Close()
			return
		}
		if identity, err = transport.PeerIdentity(tc.ConnectionState()); err != nil {
			log.Warn("peer refused: no usable certificate identity", zap.Error(err))
			tc.Close()
			return
		}
		conn = tc
		log = log.With(zap.String("peer", identity))
		d.learnLinkKey(identity, tc.ConnectionState())
	}
	r := transport.NewReader(conn, helloLimits())
	w := transport.NewWriter(conn)
	refuse := func(vmName string, err error) {
		log.Warn("refusing primary", zap.String("vm", vmName), zap.Error(err))
		_ = w.WriteFrame(transport.KindWelcome, &remuspb.Welcome{ProtocolVersion: checkpoint.ProtocolVersion, Error: err.Error()}, nil)
		conn.Close()
	}
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
	if d.tlsServer == nil {
		// Insecure: the peer is who it says it is (logged loudly at start).
		identity = hello.Host
		if _, ok := d.peerByName(identity); !ok {
			refuse(printable(hello.VmName), fmt.Errorf("peer %q is not configured on %s (config peers)", printable(identity), d.cfg.Name))
			return
		}
	} else if hello.Host != identity {
		refuse(printable(hello.VmName), fmt.Errorf("hello says host %q but the certificate is %q's", printable(hello.Host), identity))
		return
	}
	if err := hypervisor.ValidateVMName(hello.VmName); err != nil {
		refuse(printable(hello.VmName), err)
		return
	}
	if p, _ := d.peerByName(identity); !p.accepts(hello.VmName) {
		refuse(hello.VmName, fmt.Errorf("%s does not back up VM %s for %s (config peers[].vms)", d.cfg.Name, hello.VmName, identity))
		return
	}
	b, err := d.backupFor(ctx, hello, identity)
	if err != nil {
		refuse(hello.VmName, err)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	release()
	// From here on the replica's limits apply (page batches, device state).
	r.SetLimits(replicaLimits(hello.Backend))
	if err := b.Serve(ctx, conn, r, w, hello, identity); err != nil && ctx.Err() == nil {
		log.Warn("replication link ended", zap.String("vm", hello.VmName), zap.Error(err))
	}
}

// printable quotes untrusted text for logs and error messages, bounded.
func printable(s string) string {
	if len(s) > 80 {
		s = s[:80] + "…"
	}
	q := strconv.Quote(s)
	return q[1 : len(q)-1]
}

// replicaBytes is what the replicas this daemon holds use. d.mu held.
func (d *Daemon) replicaBytes() int64 {
	var n int64
	for _, v := range d.vms {
		n += v.replicaSize
	}
	return n
}

// backupFor finds or creates the replica a Hello from identity asks for.
// A new replica is refused (nothing allocated) beyond the memory budget;
// a QEMU replica's standby is started without holding d.mu.
func (d *Daemon) backupFor(ctx context.Context, h *remuspb.Hello, identity string) (*checkpoint.Backup, error) {
	d.mu.Lock()
	// A primary that gave up waiting for its first Welcome while this
	// host starts the standby reconnects: its new link waits for the
	// replica being built for it (bounded), rather than being refused.
	for deadline := time.Now().Add(d.handshakeTimeout()); ; {
		v, ok := d.vms[h.VmName]
		if !ok || v.role != RoleStarting || v.peerName != identity || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		d.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		d.mu.Lock()
	}
	if v, ok := d.vms[h.VmName]; ok {
		switch {
		case v.busy != "":
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s on %s: %s; try again", h.VmName, d.cfg.Name, v.busy)
		case v.role == RoleBackup && v.backup != nil:
			d.mu.Unlock()
			return v.backup, nil // the replica checks the owner
		case v.role == RoleActive:
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s already took over on %s: refusing to replicate over it", h.VmName, d.cfg.Name)
		case v.role != RoleStopped:
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s runs on %s (role %s): a host cannot back up a VM it runs", h.VmName, d.cfg.Name, v.role)
		}
	}
	if h.MemoryBytes == 0 || h.MemoryBytes%hypervisor.PageSize != 0 || h.MemoryBytes > 1<<40 {
		d.mu.Unlock()
		return nil, fmt.Errorf("VM %s: memory size %d is not a positive multiple of the page size (at most 1 TiB)", h.VmName, h.MemoryBytes)
	}
	cost := replicaCost(int64(h.MemoryBytes), h.Backend, len(h.Disks) > 0)
	if used := d.replicaBytes(); used+cost > d.budget {
		d.mu.Unlock()
		return nil, fmt.Errorf("VM %s needs %d MiB for its replica (%d MiB of memory, as much again to stage a full epoch, and link buffers) but %s has %d MiB of its %d MiB replica budget left (config replica_budget_mib)",
			h.VmName, cost>>20, h.MemoryBytes>>20, d.cfg.Name, (d.budget-used)>>20, d.budget>>20)
	}
	var (
		local  *QemuVM
		xlocal *XenVM
	)
	if prev, ok := d.vms[h.VmName]; ok {
		local, xlocal = prev.qcfg, prev.xcfg
	} else {
		local, xlocal = d.qemuConfig(h.VmName), d.xenConfig(h.VmName)
	}
	switch h.Backend {
	case qemu.BackendName:
		if local == nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s: %s has no configuration of this QEMU VM to build its standby from; add a qemu_vms entry named %s (autostart false) describing it", h.VmName, d.cfg.Name, h.VmName)
		}
	case xen.BackendName:
		if xlocal == nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s: %s has no configuration of this Xen VM to build its standby from; add a xen_vms entry named %s with its xl_config (or libvirt: true, with the domain defined in this host's libvirt)", h.VmName, d.cfg.Name, h.VmName)
		}
	case sim.BackendName:
	default:
		d.mu.Unlock()
		return nil, fmt.Errorf("backend %q is not supported by this daemon (have: sim, qemu, xen)", printable(h.Backend))
	}
	// Reserve the name (and the budget) while the replica is built.
	placeholder := &vm{name: h.VmName, backend: h.Backend, role: RoleStarting, busy: "starting a replica", qcfg: local, xcfg: xlocal, replicaSize: cost, peerName: identity}
	prev := d.vms[h.VmName]
	d.vms[h.VmName] = placeholder
	d.mu.Unlock()

	var (
		v   *vm
		err error
	)
	switch h.Backend {
	case qemu.BackendName:
		v, err = d.newQemuReplica(ctx, h, identity, *local)
	case xen.BackendName:
		v, err = d.newXenReplica(ctx, h, identity, *xlocal)
	default:
		v, err = d.newSimReplica(h, identity)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		if prev != nil {
			d.vms[h.VmName] = prev
		} else {
			delete(d.vms, h.VmName)
		}
		return nil, err
	}
	v.qcfg, v.xcfg = local, xlocal
	v.replicaSize = cost
	d.vms[h.VmName] = v
	return v.backup, nil
}

// qemuConfig returns this host's configuration of a QEMU VM. d.mu held.
func (d *Daemon) qemuConfig(name string) *QemuVM {
	for i := range d.cfg.QemuVMs {
		if d.cfg.QemuVMs[i].Name == name {
			q := d.cfg.QemuVMs[i]
			return &q
		}
	}
	return nil
}

// newSimReplica builds a sim replica. A sim guest is a pure function of
// its configuration; the configuration is validated like a local one and
// nothing of it reaches a path or a process.
func (d *Daemon) newSimReplica(h *remuspb.Hello, identity string) (*vm, error) {
	var spec simSpec
	if err := unmarshalStrict(h.BackendConfig, &spec); err != nil {
		return nil, fmt.Errorf("VM %s: bad sim backend config: %w", h.VmName, err)
	}
	spec.Sim = spec.Sim.WithDefaults()
	if err := spec.Sim.Validate(); err != nil {
		return nil, fmt.Errorf("VM %s: sim backend config: %w", h.VmName, err)
	}
	if spec.Output != "" && !isLoopbackAddr(spec.Output) {
		// After a failover this host would connect there: a peer must not
		// point it anywhere but at a local sink.
		return nil, fmt.Errorf("VM %s: sim output address %q is not a loopback HOST:PORT", h.VmName, printable(spec.Output))
	}
	if uint64(spec.Sim.MemoryBytes) != h.MemoryBytes {
		return nil, fmt.Errorf("VM %s: hello says %d bytes of memory, backend config %d", h.VmName, h.MemoryBytes, spec.Sim.MemoryBytes)
	}
	rep, err := sim.NewReplica(h.VmName, spec.Sim, d.log)
	if err != nil {
		return nil, fmt.Errorf("VM %s: replica: %w", h.VmName, err)
	}
	v := &vm{name: h.VmName, backend: sim.BackendName, role: RoleBackup, spec: spec}
	d.attachBackup(v, rep, identity, sim.BackendVersion,
		func(epoch uint64, dev []byte) auditRecord {
			return auditRecord{Event: "commit", Epoch: epoch, Sim: simInfo(dev)}
		},
		func(epoch uint64, mem, dev []byte) auditRecord {
			// Record what is about to run, so that it can be audited
			// against the primary's log (the demo does).
			return auditRecord{Event: "activate", Epoch: epoch, Sim: simInfo(dev),
				MemoryXXH: transport.PageHash(mem), DeviceXXH: transport.PageHash(dev)}
		})
	// The activated guest's first output must find its way out.
	rep.SetOutput(v.emit)
	d.log.Info("new replica", zap.String("vm", h.VmName), zap.String("owner", identity), zap.Int64("memory_bytes", spec.Sim.MemoryBytes))
	return v, nil
}

// attachBackup gives a backup-role v its replica runner: owned by
// identity, audited with the records the two functions make, freed when
// its owner ends the protection.
func (d *Daemon) attachBackup(v *vm, rep hypervisor.Replica, identity, version string,
	commit func(epoch uint64, dev []byte) auditRecord, activate func(epoch uint64, mem, dev []byte) auditRecord) {
	v.detector = d.newDetector()
	v.audit = openAudit(d.cfg.StateDir, v.name, "backup", d.log)
	v.backup = checkpoint.NewBackup(checkpoint.BackupOptions{
		VMName:            v.name,
		Replica:           rep,
		Owner:             identity,
		Backend:           v.backend,
		BackendVersion:    version,
		HeartbeatInterval: d.cfg.HeartbeatInterval.D(),
		HeartbeatTimeout:  d.cfg.HeartbeatTimeout.D(),
		Limits:            replicaLimits(v.backend),
		NoDiskSync:        !d.cfg.diskSync(),
		Log:               d.log,
		OnCommit:          func(epoch uint64, dev []byte) { v.audit.record(commit(epoch, dev)) },
		BeforeActivate:    func(epoch uint64, mem, dev []byte) { v.audit.record(activate(epoch, mem, dev)) },
		OnGoodbye:         func(restart bool) { d.onGoodbye(v, restart) },
		OnHandover:        func(_, gen uint64) error { return d.onHandover(v, gen) },
		OnLinkDown: func() {
			select {
			case d.linkDown <- struct{}{}:
			default:
			}
		},
	})
}

func (d *Daemon) newDetector() *failover.Detector {
	policy := failover.Manual
	switch d.cfg.takeover() {
	case TakeoverAutoUnsafe:
		policy = failover.AutoUnsafe
	case TakeoverAuto:
		policy = failover.Witness
	}
	det := &failover.Detector{Timeout: d.cfg.HeartbeatTimeout.D(), Policy: policy, RestartGrace: d.cfg.RestartGrace.D(), Grace: d.cfg.TakeoverGrace.D(), ClosedGrace: d.cfg.TakeoverGraceClosed.D()}
	if d.cfg.SecondPath.Listen != "" {
		_, det.AltTimeout = d.cfg.secondPathTimes()
	}
	return det
}

// onGoodbye frees a replica whose protection its owner ended on purpose
// (issue 8, item 4); a restart notice keeps it. It runs on the link's
// goroutine, inside the replica's Serve: the replica is closed once that
// link has ended.
func (d *Daemon) onGoodbye(v *vm, restart bool) {
	if restart {
		return
	}
	d.mu.Lock()
	if d.vms[v.name] != v || v.role != RoleBackup || v.busy != "" {
		d.mu.Unlock()
		return
	}
	d.log.Info("protection ended by its primary: freeing the replica", zap.String("vm", v.name), zap.Int64("mib", v.replicaSize>>20))
	release := d.dropReplica(v)
	d.mu.Unlock()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		release()
	}()
}

// dropReplica takes a backup-role VM off the books (d.mu held) and returns
// the function that frees its replica, to be called without d.mu: it ends
// the replica's links (waiting until none uses its memory), then stops
// the standby and unmaps the replica.
func (d *Daemon) dropReplica(v *vm) (release func()) {
	b, rep, xsb, audit := v.backup, v.qreplica, v.xstandby, v.audit
	v.backup, v.qreplica, v.xstandby, v.audit, v.replicaSize = nil, nil, nil, nil, 0
	if v.qcfg != nil || v.xcfg != nil {
		// This host still knows the VM (it may run it later).
		v.role, v.stoppedWhy = RoleStopped, "replica released"
	} else {
		delete(d.vms, v.name)
	}
	return func() {
		if b != nil {
			b.Close()
		}
		if rep != nil {
			rep.Close()
		}
		if xsb != nil {
			xsb.Close()
		}
		if audit != nil {
			audit.close()
		}
	}
}

// Forget implements Service: on a backup, it drops the replica of name
// (its standby stops, its memory is freed), so that another peer may
// protect the VM to this host. Refused while the owner is connected: the
// owner would only reconnect and copy everything again (unprotect it on
// the primary instead).
func (d *Daemon) Forget(ctx context.Context, name string) error {
	d.mu.Lock()
	v, err := d.lookup("forget", name)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	if v.role != RoleBackup || v.backup == nil {
		d.mu.Unlock()
		return fmt.Errorf("forget %s: this host holds no replica of it (role %s)", name, v.role)
	}
	owner := v.backup.Owner()
	if d.primaryConnected(v) {
		d.mu.Unlock()
		return fmt.Errorf("forget %s: its owner %s is connected and replicating; run `remusd unprotect %s` on %s (which frees the replica here), or stop it first", name, owner, name, owner)
	}
	release := d.dropReplica(v)
	d.mu.Unlock()
	release()
	d.log.Warn("replica forgotten by the operator", zap.String("vm", name), zap.String("owner", owner))
	return nil
}

// hostMemory is the host's physical memory in bytes (0 if unknown).
func hostMemory() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}
