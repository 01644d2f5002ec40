package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/hypervisor/xen"
	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/transport"
)

// resolvePeer turns protect's --peer (a configured peer's name, or
// HOST:PORT) into the address to dial and the identity the backup's
// certificate must carry ("" = any configured peer).
func (d *Daemon) resolvePeer(peer string) (addr, name string, err error) {
	if p, ok := d.peerByName(peer); ok {
		if p.Address == "" {
			return "", "", fmt.Errorf("peer %s has no address in the configuration (peers[].address): give --peer HOST:PORT", peer)
		}
		return p.Address, p.Name, nil
	}
	if _, _, err := net.SplitHostPort(peer); err != nil {
		return "", "", fmt.Errorf("peer %q is neither a configured peer's name nor HOST:PORT: %w", printable(peer), err)
	}
	for _, p := range d.cfg.Peers {
		if p.Address == peer {
			return peer, p.Name, nil
		}
	}
	if len(d.cfg.Peers) == 0 {
		return "", "", fmt.Errorf("no peers are configured on %s: add the backup to config peers (its certificate name and address)", d.cfg.Name)
	}
	if d.cfg.Insecure && !d.cfg.InsecureNonLoopback && !isLoopbackAddr(peer) {
		return "", "", fmt.Errorf("peer %s is not a loopback address: plaintext (insecure) replication to it needs insecure_non_loopback", peer)
	}
	return peer, "", nil
}

// Protect implements Service.
func (d *Daemon) Protect(ctx context.Context, req ProtectRequest) error {
	if req.Peer == "" {
		return errors.New("protect: a peer (a configured peer's name or HOST:PORT) is required")
	}
	addr, peerName, err := d.resolvePeer(req.Peer)
	if err != nil {
		return fmt.Errorf("protect: %w", err)
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
	v, err := d.lookup("protect", req.VM)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	if v.role != RoleLocal && v.role != RoleActive {
		d.mu.Unlock()
		return fmt.Errorf("protect %s: VM is in role %s (it must run here, unprotected)", req.VM, v.role)
	}
	v.busy = "starting protection"
	d.mu.Unlock()
	pr := protectionRecord{ID: newProtectionID(), Peer: addr, PeerName: peerName, EpochInterval: Duration(interval), MaxInflight: inflight}
	err = d.startProtection(v, pr, false)
	d.mu.Lock()
	v.busy = ""
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("protect %s: %w", req.VM, err)
	}
	return nil
}

// resumeProtections resumes the protections a previous daemon ran for the
// guests it re-attached (Run calls it before serving).
func (d *Daemon) resumeProtections() {
	d.mu.Lock()
	var todo []*vm
	for _, v := range d.vms {
		if v.resume != nil {
			todo = append(todo, v)
		}
	}
	d.mu.Unlock()
	for _, v := range todo {
		pr := *v.resume
		err := d.startProtection(v, pr, true)
		d.mu.Lock()
		v.busy = ""
		if errors.Is(err, witness.ErrHeldByOther) {
			// The VM moved to the backup while this daemon was down: this
			// copy is the old one. Fence it.
			v.w.view, v.w.err = WitnessFenced, err.Error()
			v.runErr.Store("fenced: " + err.Error())
			g := v.guest
			d.log.Error("the VM moved on while this daemon was down: pausing this copy (fenced)", zap.String("vm", v.name), zap.Error(err))
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_ = fencePause(ctx, g)
			}()
		} else if err != nil {
			// Its output stays held by what the previous daemon left (the
			// kernel drops it): fail closed. The operator sees why.
			v.runErr.Store("resuming protection failed: " + err.Error())
			d.log.Error("cannot resume protection: the guest runs with its output held", zap.String("vm", v.name), zap.Error(err))
		} else {
			v.resume = nil
		}
		d.mu.Unlock()
	}
}

// startProtection sets up the output buffer and the primary runner of v
// and starts it. resume continues the protection pr of a previous daemon
// (same protection id: the backup keeps its replica and the first epoch
// carries only what differs from it). Called with v busy and d.mu free.
func (d *Daemon) startProtection(v *vm, pr protectionRecord, resume bool) error {
	d.mu.Lock()
	g, backend, dctx := v.guest, v.backend, d.ctx
	// QEMU and Xen guests send through a host interface (tap, vif) where
	// their output is held; a sim guest's output is the daemon's own.
	hostNIC := backend != sim.BackendName
	queue := pr.Queue
	if hostNIC && queue == 0 {
		queue = d.nextQueue
		d.nextQueue++
	} else if queue >= d.nextQueue {
		d.nextQueue = queue + 1
	}
	d.mu.Unlock()
	if g == nil {
		return errors.New("the VM does not run here")
	}
	if backend == xen.BackendName {
		if err := d.prepareXenProtection(dctx, v, resume); err != nil {
			return err
		}
		d.mu.Lock()
		g = v.guest
		d.mu.Unlock()
	}
	if err := d.witnessInit(v); err != nil {
		return err
	}
	if seam := guestDiskSeam(g); seam != nil {
		// A libvirt domain's disks: from here on every write the guest
		// completes is in a journal first (a previous daemon's mirror job
		// is taken over).
		sctx, cancel := context.WithTimeout(d.ctx, diskSeamTimeout)
		err := seam.Start(sctx)
		cancel()
		if err != nil {
			return fmt.Errorf("disks: %w", err)
		}
	}
	interval, inflight := pr.EpochInterval.D(), pr.MaxInflight
	var (
		buf    outbuf.Buffer
		memBuf *outbuf.Memory
	)
	if hostNIC {
		recorded := ""
		if resume {
			recorded = pr.OutBuf
		}
		nb, forceOne, err := d.openQemuBuffer(dctx, v, interval, queue, recorded)
		if err != nil {
			return err
		}
		if forceOne && inflight != 1 {
			d.log.Info("plug output buffer tracks one closed epoch: max_inflight forced to 1", zap.String("vm", v.name), zap.Int("requested", inflight))
			inflight = 1
		}
		buf = nb
		pr.OutBuf = nb.Kind()
		if pg, ok := g.(interface{ Paused() bool }); ok && resume && pg.Paused() {
			// The previous daemon died inside an epoch's pause (a Xen
			// domain's suspend and pause were adopted by Recover). The
			// buffer holds the guest's output now, and the witness let
			// this host go on: it may run again, whether or not the
			// backup is reachable.
			rctx, cancel := context.WithTimeout(dctx, 30*time.Second)
			err := g.Resume(rctx)
			cancel()
			if err != nil {
				buf.Detach()
				return fmt.Errorf("resume the guest the previous daemon left paused: %w", err)
			}
			d.log.Warn("resumed a guest the previous daemon left paused", zap.String("vm", v.name))
		}
	} else {
		memBuf = outbuf.NewMemory(0, v.sink.send)
		buf = memBuf
	}
	if resume {
		if _, ok := g.(hypervisor.Rebaseliner); !ok {
			// Cannot compare pages with the replica: a new protection
			// (full copy) is the honest fallback.
			d.log.Warn("backend cannot resume a protection from page hashes: starting a new one (full copy)", zap.String("vm", v.name))
			pr.ID, resume = newProtectionID(), false
		}
	}
	audit := openAudit(d.cfg.StateDir, v.name, "primary", d.log, resume)
	dialer := &net.Dialer{Timeout: d.cfg.DialTimeout.D()}
	p, err := checkpoint.NewPrimary(checkpoint.PrimaryOptions{
		Guest: g,
		Out:   buf,
		Dial: func(ctx context.Context) (net.Conn, error) {
			c, err := d.dialPeer(ctx, dialer, pr.Peer, pr.PeerName)
			if ic, ok := c.(*identifiedConn); ok && err == nil {
				v.linkPeer.Store(ic.identity)
			}
			return c, err
		},
		ProtectionID: pr.ID,
		Host:         d.cfg.Name,
		Core: checkpoint.PrimaryConfig{
			Interval:    interval,
			MaxInflight: inflight,
			AckTimeout:  d.cfg.AckTimeout.D(),
			// With a witness the primary goes on without its backup only
			// after winning the VM's record (superviseWitness).
			UnprotectOnAckTimeout: d.wit == nil && d.cfg.ackTimeoutPolicy() == AckTimeoutUnprotect,
			Resume:                resume,
		},
		Generation: v.wgen.Load,
		// A new protection starts live: output flows and memory streams to
		// the backup until the first checkpoint (a resumed one holds from
		// the start: its replica exists).
		LiveStart: !resume,
		OnLink: func(up bool, err error, _ bool) {
			d.onPrimaryLink(v, up, err)
		},
		Encoder: transport.EncoderConfig{PageSize: hypervisor.PageSize, CachePages: d.cfg.DeltaCachePages},
		// The backup's limits: the engine refuses disks whose journals
		// could make an epoch the backup would not stage.
		Limits:            replicaLimits(g.Backend()),
		HeartbeatInterval: d.cfg.HeartbeatInterval.D(),
		HeartbeatTimeout:  d.cfg.HeartbeatTimeout.D(),
		ReconnectBackoff:  d.cfg.ReconnectBackoff.D(),
		Log:               d.log,
		OnCapture: func(ci checkpoint.CaptureInfo) {
			audit.record(auditRecord{Event: "capture", Epoch: ci.Epoch, Pages: ci.Pages, PauseMs: checkpoint.Ms(ci.Pause), Sim: simInfo(ci.DeviceState)})
		},
		OnAck: func(epoch uint64) {
			audit.record(auditRecord{Event: "ack", Epoch: epoch})
		},
	})
	if err != nil {
		audit.close()
		if memBuf == nil {
			// Nothing was released: the host keeps holding the guest's
			// output until a protection or unprotect takes it over.
			buf.Detach()
		}
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// From here on the guest's output is held per epoch.
	if memBuf != nil {
		v.out.Store(memBuf)
	} else {
		v.netOut = buf
	}
	if v.audit != nil {
		v.audit.close()
	}
	v.audit = audit
	pctx, cancel := context.WithCancel(d.ctx)
	v.role, v.peer, v.peerName, v.protectionID, v.primary, v.stop, v.done = RolePrimary, pr.Peer, pr.PeerName, pr.ID, p, cancel, make(chan struct{})
	v.interval, v.inflight, v.queue = interval, inflight, queue
	v.runErr.Store("")
	d.saveRecord(v)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer close(v.done)
		if err := p.Run(pctx); err != nil {
			v.runErr.Store(err.Error())
			d.log.Error("protection failed: holding output", zap.String("vm", v.name), zap.Error(err))
		}
	}()
	if xg, ok := g.(*xen.Guest); ok {
		domid, vif := xg.DomID(), v.xnet.vif
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			d.guardXenDevices(pctx, v, p, domid, vif, xenDeviceCheckEvery, xenDeviceCheckFailures)
		}()
	}
	d.log.Info("protecting", zap.String("vm", v.name), zap.String("peer", pr.Peer), zap.String("peer_name", pr.PeerName),
		zap.String("protection_id", pr.ID), zap.Bool("resumed", resume), zap.Bool("insecure", d.cfg.Insecure),
		zap.Duration("epoch_interval", interval), zap.Int("max_inflight", inflight))
	return nil
}

// Unprotect implements Service.
func (d *Daemon) Unprotect(ctx context.Context, name string) error {
	d.mu.Lock()
	v, err := d.lookup("unprotect", name)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	if v.role == RolePrimary && v.w.view == WitnessFenced {
		// Unprotecting would let its held output go and make it a local
		// VM beside the copy the witness names.
		why := v.w.err
		d.mu.Unlock()
		return fmt.Errorf("unprotect %s: this copy is fenced (%s): it may not run or release output; `remusd stop %s` ends it", name, why, name)
	}
	if v.role == RolePrimary && v.primary == nil && v.resume != nil {
		// Resuming the protection failed: what the previous daemon left on
		// the tap still holds the guest's output. Take it over and let go.
		pr := *v.resume
		v.busy = "unprotecting"
		d.mu.Unlock()
		err := d.releaseLeftover(ctx, v, pr)
		d.mu.Lock()
		defer d.mu.Unlock()
		v.busy = ""
		if err != nil {
			return fmt.Errorf("unprotect %s: %w", name, err)
		}
		v.role, v.resume, v.protectionID = RoleLocal, nil, ""
		v.runErr.Store("")
		d.saveRecord(v)
		d.log.Info("unprotected (its protection had not resumed)", zap.String("vm", name))
		return nil
	}
	if v.role != RolePrimary || v.primary == nil {
		d.mu.Unlock()
		return fmt.Errorf("unprotect %s: VM is not protected here (role %s)", name, v.role)
	}
	p, stop, done := v.primary, v.stop, v.done
	v.busy = "unprotecting"
	d.mu.Unlock()
	p.StopWithGoodbye()
	stop()
	if d.wit != nil {
		// Protection ended on purpose: no one may take the VM over from
		// this record any more.
		d.mu.Lock()
		rec := v.w.rec
		d.mu.Unlock()
		ctx, cancel := d.witnessCtx()
		if err := d.wit.Release(ctx, name, d.cfg.Name, rec.Generation); err != nil {
			d.log.Warn("witness: could not release the VM's record (the backup was told goodbye anyway)", zap.String("vm", name), zap.Error(err))
		}
		cancel()
	}
	select {
	case <-done:
	case <-ctx.Done():
		d.mu.Lock()
		v.busy = ""
		d.mu.Unlock()
		return fmt.Errorf("unprotect %s: %w", name, ctx.Err())
	}
	d.mu.Lock()
	netOut := v.netOut
	v.netOut = nil
	mem := v.out.Load()
	g := v.guest
	d.mu.Unlock()
	if seam := guestDiskSeam(g); seam != nil {
		// The guest keeps its disks; its writes no longer wait for remusd.
		sctx, cancel := context.WithTimeout(d.ctx, diskSeamTimeout)
		if err := seam.Remove(sctx); err != nil {
			d.log.Warn("unprotect: could not take the disk seam out of the domain", zap.String("vm", name), zap.Error(err))
		}
		cancel()
	}
	// The primary keeps running, so its held output is legitimate: let it
	// go (outside d.mu: tearing a buffer down may take seconds).
	err = nil
	if netOut != nil {
		err = netOut.ReleaseAll()
		if cerr := netOut.Close(); err == nil {
			err = cerr
		}
	} else if mem != nil {
		err = mem.ReleaseAll()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.busy = ""
	v.role, v.primary, v.stop, v.done, v.protectionID = RoleLocal, nil, nil, nil, ""
	d.saveRecord(v)
	if err != nil {
		return fmt.Errorf("unprotect %s: release output: %w", name, err)
	}
	d.log.Info("unprotected", zap.String("vm", name))
	return nil
}

// releaseLeftover takes over the output buffer a previous daemon left on
// a VM's tap (protection pr) and lets the guest's output go.
func (d *Daemon) releaseLeftover(ctx context.Context, v *vm, pr protectionRecord) error {
	if v.backend == sim.BackendName || pr.OutBuf == "" || pr.OutBuf == "memory" || pr.OutBuf == "none" {
		return nil
	}
	buf, _, err := d.openQemuBuffer(ctx, v, pr.EpochInterval.D(), pr.Queue, pr.OutBuf)
	if err != nil {
		return fmt.Errorf("take over the output buffer left on the tap: %w", err)
	}
	err = buf.ReleaseAll()
	if cerr := buf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("release output: %w", err)
	}
	return nil
}

// dialPeer connects to a peer daemon's replication address: over mutual
// TLS, the backup's certificate must name peerName (or, if that is empty,
// a configured peer); in insecure mode, plain TCP.
func (d *Daemon) dialPeer(ctx context.Context, dialer *net.Dialer, addr, peerName string) (net.Conn, error) {
	conn, err := dialer.DialContext(ctx, "tcp", addr)
	if err != nil || d.cfg.Insecure {
		return conn, err
	}
	var verified string // the identity the handshake verified
	cfg, err := d.cfg.TLS.ClientConfig(func(identity string) error {
		if peerName != "" && identity != peerName {
			return fmt.Errorf("the backup at %s presents the certificate of %q, expected %q", addr, identity, peerName)
		}
		if err := d.acceptIdentity(identity); err != nil {
			return err
		}
		verified = identity
		return nil
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	tc := tls.Client(conn, cfg)
	hctx, cancel := context.WithTimeout(ctx, d.cfg.DialTimeout.D())
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("TLS handshake with %s: %w", addr, err)
	}
	if verified != "" {
		d.learnLinkKey(verified, tc.ConnectionState())
	}
	return &identifiedConn{Conn: tc, identity: verified}, nil
}
