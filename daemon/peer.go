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
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

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
		select {
		case d.handshakes <- struct{}{}:
		default:
			d.log.Warn("too many connections without a Hello: refusing one", zap.String("remote", conn.RemoteAddr().String()), zap.Int("limit", maxHandshakes))
			conn.Close()
			continue
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.servePeer(conn)
		}()
	}
}

// handshakeTimeout bounds the TLS handshake and the Hello of a new
// connection.
func (d *Daemon) handshakeTimeout() time.Duration {
	return max(3*d.cfg.HeartbeatTimeout.D(), 5*time.Second)
}

// servePeer authenticates a connection, reads its Hello and hands the link
// to the replica it may serve.
func (d *Daemon) servePeer(conn net.Conn) {
	released := false
	release := func() {
		if !released {
			released = true
			<-d.handshakes
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
		hctx, cancel := context.WithTimeout(ctx, d.handshakeTimeout())
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
	r.SetLimits(transport.DefaultLimits())
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
	if used := d.replicaBytes(); used+int64(h.MemoryBytes) > d.budget {
		d.mu.Unlock()
		return nil, fmt.Errorf("VM %s needs %d MiB for its replica but %s has %d MiB of its %d MiB replica budget left (config replica_budget_mib)",
			h.VmName, h.MemoryBytes>>20, d.cfg.Name, (d.budget-used)>>20, d.budget>>20)
	}
	var local *QemuVM
	if prev, ok := d.vms[h.VmName]; ok {
		local = prev.qcfg
	} else {
		local = d.qemuConfig(h.VmName)
	}
	switch h.Backend {
	case qemu.BackendName:
		if local == nil {
			d.mu.Unlock()
			return nil, fmt.Errorf("VM %s: %s has no configuration of this QEMU VM to build its standby from; add a qemu_vms entry named %s (autostart false) describing it", h.VmName, d.cfg.Name, h.VmName)
		}
	case sim.BackendName:
	default:
		d.mu.Unlock()
		return nil, fmt.Errorf("backend %q is not supported by this daemon (have: sim, qemu)", printable(h.Backend))
	}
	// Reserve the name (and the budget) while the replica is built.
	placeholder := &vm{name: h.VmName, backend: h.Backend, role: RoleStarting, busy: "starting a replica", qcfg: local, replicaSize: int64(h.MemoryBytes), peerName: identity}
	prev := d.vms[h.VmName]
	d.vms[h.VmName] = placeholder
	d.mu.Unlock()

	var (
		v   *vm
		err error
	)
	if h.Backend == qemu.BackendName {
		v, err = d.newQemuReplica(ctx, h, identity, *local)
	} else {
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
	v.qcfg = local
	v.replicaSize = int64(h.MemoryBytes)
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
	if spec.Output != "" {
		if _, _, err := net.SplitHostPort(spec.Output); err != nil {
			return nil, fmt.Errorf("VM %s: sim output address %q: %w", h.VmName, printable(spec.Output), err)
		}
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
		Log:               d.log,
		OnCommit:          func(epoch uint64, dev []byte) { v.audit.record(commit(epoch, dev)) },
		BeforeActivate:    func(epoch uint64, mem, dev []byte) { v.audit.record(activate(epoch, mem, dev)) },
		OnGoodbye:         func(restart bool) { d.onGoodbye(v, restart) },
	})
}

func (d *Daemon) newDetector() *failover.Detector {
	policy := failover.Manual
	if d.cfg.Takeover == TakeoverAutoUnsafe {
		policy = failover.AutoUnsafe
	}
	return &failover.Detector{Timeout: d.cfg.HeartbeatTimeout.D(), Policy: policy, RestartGrace: d.cfg.RestartGrace.D()}
}

// onGoodbye frees a replica whose protection its owner ended on purpose
// (issue 8, item 4); a restart notice keeps it.
func (d *Daemon) onGoodbye(v *vm, restart bool) {
	if restart {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.vms[v.name] != v || v.role != RoleBackup {
		return
	}
	d.log.Info("protection ended by its primary: freeing the replica", zap.String("vm", v.name), zap.Int64("mib", v.replicaSize>>20))
	d.dropReplica(v)
}

// dropReplica removes a backup-role VM and frees its replica. d.mu held.
func (d *Daemon) dropReplica(v *vm) {
	if v.qreplica != nil {
		v.qreplica.Close()
		v.qreplica = nil
	}
	if v.audit != nil {
		v.audit.close()
	}
	v.backup, v.replicaSize = nil, 0
	if v.qcfg != nil {
		// This host still knows the VM (it may run it later).
		v.role, v.stoppedWhy = RoleStopped, "replica released"
		return
	}
	delete(d.vms, v.name)
}

// Forget implements Service: on a backup, it drops the replica of name
// (its standby stops, its memory is freed), so that another peer may
// protect the VM to this host.
func (d *Daemon) Forget(ctx context.Context, name string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	v, err := d.lookup("forget", name)
	if err != nil {
		return err
	}
	if v.role != RoleBackup || v.backup == nil {
		return fmt.Errorf("forget %s: this host holds no replica of it (role %s)", name, v.role)
	}
	owner := v.backup.Owner()
	d.dropReplica(v)
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
