package daemon

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/hypervisor/xen"
)

// watchBackups reports primaries that fell silent and, when the operator
// opted in to unsafe automatic takeover, activates their replicas.
//
// It runs every heartbeat interval, at once when a replica's link ends,
// and at the moment a lost primary's takeover grace runs out: detection
// is not rounded up to the next tick.
func (d *Daemon) watchBackups(ctx context.Context) {
	tick := d.cfg.HeartbeatInterval.D()
	t := time.NewTimer(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.linkDown:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		}
		d.superviseWitness()
		var lost []string
		next := tick
		d.mu.Lock()
		now := time.Now()
		for _, v := range d.vms {
			if v.role != RoleBackup || v.backup == nil || v.busy != "" {
				continue
			}
			st := v.backup.Stats()
			dec := v.detector.Evaluate(observe(v, st), now)
			if dec.Race && d.wit != nil {
				d.raceForVM(ctx, v)
			} else if dec.RaceAt.After(now) {
				next = min(next, dec.RaceAt.Sub(now))
			}
			if !dec.NewlyLost {
				continue
			}
			d.log.Warn("primary lost: no heartbeat beyond timeout", zap.String("vm", v.name), zap.String("owner", v.backup.Owner()),
				zap.Duration("silent", now.Sub(st.LastHeard)), zap.Uint64("committed", st.Committed),
				zap.String("takeover", d.cfg.Takeover))
			if dec.TakeOver {
				lost = append(lost, v.name)
			}
		}
		d.mu.Unlock()
		t.Reset(next)
		for _, name := range lost {
			d.log.Warn("automatic takeover (unsafe mode: no witness)", zap.String("vm", name))
			if err := d.Failover(ctx, FailoverRequest{VM: name}); err != nil {
				d.log.Error("automatic takeover failed", zap.String("vm", name), zap.Error(err))
			}
		}
	}
}

// primaryConnected reports whether the replica's owner is connected and
// was heard from within the heartbeat timeout, or said its daemon
// restarts within the restart grace (its guest runs on). d.mu held.
func (d *Daemon) primaryConnected(v *vm) bool {
	st := v.backup.Stats()
	if st.Restarting && time.Since(st.RestartingSince) < d.cfg.RestartGrace.D() {
		return true
	}
	if d.secondPathAlive(v) {
		return true // its replication link is down, but it lives
	}
	return st.Connected && time.Since(st.LastHeard) < d.cfg.HeartbeatTimeout.D()
}

// failoverLinkGrace is how long Failover waits for a connected primary's
// link to drop (a primary killed a moment ago closes its connection, and
// the backup notices within milliseconds) before refusing.
const failoverLinkGrace = 2 * time.Second

// Failover implements Service: the replica of req.VM takes over here. It
// is refused while the primary is connected and healthy (that would run
// two copies), unless req.Force.
func (d *Daemon) Failover(ctx context.Context, req FailoverRequest) error {
	name := req.VM
	deadline := time.Now().Add(min(failoverLinkGrace, d.cfg.HeartbeatTimeout.D()))
	d.mu.Lock()
	var v *vm
	for {
		var err error
		if v, err = d.lookup("failover", name); err != nil {
			d.mu.Unlock()
			return err
		}
		if v.role != RoleBackup || v.backup == nil {
			d.mu.Unlock()
			return fmt.Errorf("failover %s: this host holds no replica of it (role %s); run failover on the backup host", name, v.role)
		}
		if req.Force || !d.primaryConnected(v) {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			st := v.backup.Stats()
			alt := v.altHeard
			d.mu.Unlock()
			if st.Restarting {
				return fmt.Errorf("failover %s: its primary %s said %v ago that its daemon restarts (its guest runs on): activating now would run two copies of the VM; if that host is really dead or fenced, run failover with --force",
					name, v.backup.Owner(), time.Since(st.RestartingSince).Round(time.Millisecond))
			}
			if !st.Connected && !alt.IsZero() {
				return fmt.Errorf("failover %s: its replication link is down, but its primary %s was heard on the second heartbeat path %v ago: it lives, and activating now would run two copies of the VM; if it is really dead or fenced, run failover with --force",
					name, v.backup.Owner(), time.Since(alt).Round(time.Millisecond))
			}
			return fmt.Errorf("failover %s: its primary %s is connected and was heard from %v ago: activating now would run two copies of the VM; if it is really dead or fenced, run failover with --force",
				name, v.backup.Owner(), time.Since(st.LastHeard).Round(time.Millisecond))
		}
		d.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Millisecond):
		}
		d.mu.Lock()
	}
	if st := v.backup.Stats(); st.DiskTorn {
		// Activate would refuse it anyway; refusing before the witness
		// claim keeps a living primary from being fenced for nothing.
		d.mu.Unlock()
		return fmt.Errorf("failover %s: its replica disks are being copied again (a full copy over the committed replica, after the primary restarted or was away long): they match no epoch until the next one commits, so there is nothing to activate", name)
	}
	if req.Force && !req.fromLink && d.primaryConnected(v) {
		d.log.Error("FORCED FAILOVER while the primary is connected and healthy: two copies of the VM may now run", zap.String("vm", name), zap.String("owner", v.backup.Owner()))
	}
	if d.wit != nil && !req.claimed {
		// An operator's failover is a transition of the active role like
		// any other: it must win the witness record.
		owner, basis := v.backup.Owner(), basisOf(v.backup.Stats())
		v.busy = "claiming the witness record"
		d.mu.Unlock()
		err := d.operatorClaim(name, owner, basis, req.Force)
		d.mu.Lock()
		v.busy = ""
		if err != nil {
			d.mu.Unlock()
			return fmt.Errorf("failover %s: %w", name, err)
		}
	}
	b := v.backup
	// Output goes straight out once the replica runs: it is unprotected
	// until re-protected.
	if v.backend == sim.BackendName {
		if v.sink == nil {
			v.sink = newOutputSink(v.spec.Output, d.cfg.Name, name, d.cfg.HeartbeatTimeout.D()/2, d.log)
		}
		v.setPassThrough()
	}
	v.busy = "activating"
	// A standby xl made is not known to libvirt (for a libvirt VM, found
	// and destroyed through xl); one libvirt made stays libvirt's.
	xlStandby := v.xstandby != nil && !v.xstandby.Managed()
	libvirtStandby := v.xstandby != nil && v.xstandby.Managed()
	d.mu.Unlock()
	start := time.Now()
	activate := b.Activate
	if req.fromLink {
		activate = b.ActivateFromLink
	}
	g, err := activate(ctx)
	var xnet xenNet
	if xg, ok := g.(*xen.Guest); ok && err == nil {
		// Where the activated domain's output leaves (its own vif on this
		// host): recorded for a restarted daemon, held when re-protected.
		var nerr error
		if xnet, nerr = d.xenNetOf(ctx, xg.DomID()); nerr != nil {
			d.log.Warn("cannot read the activated domain's vif yet (protect reads it again)", zap.String("vm", name), zap.Error(nerr))
			xnet = xenNet{domid: xg.DomID()}
		}
		xnet.xlStandby, xnet.libvirtStandby = xlStandby, libvirtStandby
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.busy = ""
	if err != nil {
		return fmt.Errorf("failover %s: %w", name, err)
	}
	v.guest = g
	v.role = RoleActive
	v.activatedAt = time.Now()
	v.activation = time.Since(start)
	v.replicaSize = 0 // it runs now: no longer a replica
	if sg, ok := g.(*sim.Guest); ok {
		v.guest = &simGuest{Guest: sg, spec: v.spec}
	}
	if v.qreplica != nil {
		a := v.qreplica.LastActivation()
		if qg, ok := g.(*qemu.Guest); ok {
			v.pid = qg.Pid()
		}
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
		// The activated standby is this host's guest now.
		v.qreplica = nil
	}
	if v.xstandby != nil {
		a := v.xstandby.LastActivation()
		v.xnet, v.xrecVif = xnet, ""
		v.qnet = qemuNet{tap: xnet.vif, bridged: xnet.bridged}
		d.log.Warn("xen VM activated", zap.String("vm", name), zap.Uint64("epoch", a.Epoch), zap.Bool("suspended", a.Suspended),
			zap.Uint32("domid", xnet.domid), zap.String("vif", xnet.vif), zap.Duration("setcontext", a.Context), zap.Duration("unpause", a.Unpause), zap.Duration("total", a.Total))
		// The activated standby is this host's domain now (Close of the
		// standby would leave it running anyway).
		v.xstandby = nil
	}
	d.saveRecord(v)
	d.log.Warn("VM took over on this host", zap.String("vm", name), zap.Uint64("epoch", b.Committed()), zap.Duration("activation", v.activation))
	return nil
}

// operatorClaim claims VM name's witness record for an operator's
// failover: from the record the backup replicated under, or, forced, from
// whatever the witness holds.
func (d *Daemon) operatorClaim(name, owner string, basis claimBasis, force bool) error {
	if !force {
		won, rec, err := d.backupClaim(name, owner, basis)
		switch {
		case err != nil:
			return fmt.Errorf("the witness does not answer (%w): without it this host cannot prove the primary is gone; --force claims it anyway once it answers", err)
		case !won:
			if basis.stale(rec) {
				return fmt.Errorf("the witness says %s: this replica may lack output it released; --force takes over anyway", basis.refusal(rec))
			}
			return fmt.Errorf("the witness says %s holds the VM at generation %d (this replica is of generation %d): the primary lives, or the VM moved on", rec.Holder, rec.Generation, basis.linkGen)
		}
		d.mu.Lock()
		if v := d.vms[name]; v != nil {
			v.w.rec, v.w.view, v.w.err = rec, WitnessHolder, ""
		}
		d.mu.Unlock()
		return nil
	}
	ctx, cancel := d.witnessCtx()
	defer cancel()
	cur, _, err := d.wit.Get(ctx, name)
	if err != nil {
		return fmt.Errorf("witness: %w", err)
	}
	rec, won, err := d.wit.Claim(ctx, name, d.cfg.Name, cur)
	if err != nil || !won {
		return fmt.Errorf("forced claim of the witness record failed (record %s): %v", rec, err)
	}
	d.log.Error("FORCED witness claim by the operator", zap.String("vm", name), zap.Stringer("record", rec))
	d.mu.Lock()
	if v := d.vms[name]; v != nil {
		v.w.rec, v.w.view, v.w.err = rec, WitnessHolder, ""
	}
	d.mu.Unlock()
	return nil
}
