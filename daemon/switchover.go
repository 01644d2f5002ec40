package daemon

// Planned switchover (issue 9, item 6): move a protected VM's active role
// to its backup with no loss and no client-visible error, as XenServer
// and Pacemaker do for host maintenance:
//
//  1. drain: the guest is paused, its last epoch captured, sent and
//     acknowledged, that epoch's output released (the backup's replica now
//     equals the paused guest);
//  2. with a witness, the VM's record is written over to the backup
//     ({self, g} → {backup, g+1}); from here the backup may run the VM;
//  3. handover: the backup activates its replica at that epoch and
//     confirms (checkpoint.Primary.Handover / Backup OnHandover);
//  4. the old primary stops its paused guest and becomes the backup: the
//     new primary protects the VM back towards it.
//
// If a step before 3 fails, the guest resumes here and protection goes on.
// If the handover is not confirmed, with a witness the old primary takes
// the record back (and resumes) only if the backup did not take it; else
// the guest stays paused and the error says so.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/qemu"
)

// switchoverTimeout bounds a switchover's drain and handover.
const switchoverTimeout = 2 * time.Minute

// Switchover implements Service (on the primary).
func (d *Daemon) Switchover(ctx context.Context, name string) (SwitchoverResult, error) {
	res := SwitchoverResult{VM: name}
	d.mu.Lock()
	v, err := d.lookup("switchover", name)
	if err != nil {
		d.mu.Unlock()
		return res, err
	}
	switch {
	case v.role != RolePrimary || v.primary == nil:
		d.mu.Unlock()
		return res, fmt.Errorf("switchover %s: it is not protected from here (role %s): run switchover on its primary", name, v.role)
	case d.backupName(v) == "":
		d.mu.Unlock()
		return res, fmt.Errorf("switchover %s: its backup at %s is not a configured peer (config peers): the new primary must know where to protect it back to", name, v.peer)
	case v.primary.Stats().Link != LinkUp:
		d.mu.Unlock()
		return res, fmt.Errorf("switchover %s: the link to the backup %s is not up", name, d.backupName(v))
	case d.wit != nil && v.w.view != WitnessHolder:
		d.mu.Unlock()
		return res, fmt.Errorf("switchover %s: this host does not hold the VM's witness record (%s)", name, v.w.view)
	}
	p, g, backup, prev := v.primary, v.guest, d.backupName(v), v.w.rec
	v.busy = "switching over"
	d.mu.Unlock()
	done := func() {
		d.mu.Lock()
		v.busy = ""
		d.mu.Unlock()
	}
	ctx, cancel := context.WithTimeout(ctx, switchoverTimeout)
	defer cancel()
	resume := func(why error) error {
		p.EndDrain(ctx)
		rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer rcancel()
		if err := g.Resume(rctx); err != nil {
			return fmt.Errorf("switchover %s: %w; and resuming the guest here failed: %w", name, why, err)
		}
		return fmt.Errorf("switchover %s: %w (the VM runs on here, protected)", name, why)
	}

	start := time.Now()
	epoch, err := p.Drain(ctx)
	if err != nil {
		done()
		return res, resume(err)
	}
	res.Epoch = epoch
	res.DrainMs = checkpoint.Ms(time.Since(start))
	t := time.Now()
	if d.wit != nil {
		wctx, wcancel := d.witnessCtx()
		rec, won, err := d.wit.Claim(wctx, name, backup, prev)
		wcancel()
		if err != nil || !won {
			done()
			if err == nil {
				err = fmt.Errorf("the witness record is %s, not this host's", rec)
			}
			return res, resume(fmt.Errorf("writing the witness record over to %s: %w", backup, err))
		}
		res.Generation = rec.Generation
		res.WitnessMs = checkpoint.Ms(time.Since(t))
		d.mu.Lock()
		v.w.rec, v.w.view = rec, WitnessStandby
		d.mu.Unlock()
	}
	t = time.Now()
	if err := p.Handover(ctx, epoch, res.Generation); err != nil {
		err = d.handoverFailed(v, name, backup, res.Generation, err)
		done()
		return res, err
	}
	res.HandoverMs = checkpoint.Ms(time.Since(t))
	res.PausedMs = checkpoint.Ms(time.Since(start))
	res.NewPrimary = backup
	d.log.Warn("switchover: the VM runs on the new primary", zap.String("vm", name), zap.String("new_primary", backup),
		zap.Uint64("epoch", epoch), zap.Float64("paused_ms", res.PausedMs), zap.Float64("drain_ms", res.DrainMs), zap.Float64("handover_ms", res.HandoverMs))
	d.retire(v, "switched over to "+backup)
	done()
	return res, nil
}

// handoverFailed decides what an unconfirmed handover leaves: with a
// witness, the record says whether the backup may run the VM; without
// one, nothing tells, so the guest stays paused.
func (d *Daemon) handoverFailed(v *vm, name, backup string, gen uint64, cause error) error {
	if d.wit == nil {
		return fmt.Errorf("switchover %s: %w; the backup may or may not run the VM now: the guest stays PAUSED here (check %s; `remusd stop %s` here if it runs there)", name, cause, backup, name)
	}
	ctx, cancel := d.witnessCtx()
	defer cancel()
	cur, _, err := d.wit.Get(ctx, name)
	if err == nil && cur.Holder == backup && cur.Generation == gen {
		// The backup did not take it further (it would have if it ran
		// the VM and was re-protecting it): take the record back.
		rec, won, cerr := d.wit.Claim(ctx, name, d.cfg.Name, cur)
		if cerr == nil && won {
			d.mu.Lock()
			v.w.rec, v.w.view = rec, WitnessHolder
			p, g := v.primary, v.guest
			d.mu.Unlock()
			p.EndDrain(ctx)
			if rerr := g.Resume(ctx); rerr != nil {
				return fmt.Errorf("switchover %s: %w; took the witness record back but resuming the guest failed: %w", name, cause, rerr)
			}
			return fmt.Errorf("switchover %s: %w (the witness record was taken back: the VM runs on here, protected)", name, cause)
		}
	}
	return fmt.Errorf("switchover %s: %w; the witness says %s: the guest stays PAUSED here (fenced) until an operator looks", name, cause, cur)
}

// retire ends a VM's life on this host after its active role moved away
// (a switchover): protection stops (the link is closed by the new
// primary), the paused guest is stopped, and the VM is left stopped here,
// ready to be the new primary's backup.
func (d *Daemon) retire(v *vm, why string) {
	d.mu.Lock()
	stop, doneCh, netOut, g := v.stop, v.done, v.netOut, v.guest
	v.netOut = nil
	d.mu.Unlock()
	stop()
	<-doneCh
	// The guest goes first, then its buffer: the buffer must hold until
	// nothing can send through it.
	serr := d.stopGuest(context.Background(), g)
	if errors.Is(serr, qemu.ErrQEMUExited) {
		serr = nil
	}
	if netOut != nil {
		var err error
		if serr != nil {
			// The old copy may still exist (paused): keep holding and
			// dropping whatever it might send.
			err = netOut.Detach()
		} else {
			// What is held belongs to epochs after the last one, which
			// never happened for clients.
			err = netOut.Close()
		}
		if err != nil {
			d.log.Warn("switchover: close the output buffer", zap.String("vm", v.name), zap.Error(err))
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if serr != nil {
		d.log.Error("switchover: the old copy could not be stopped: it is left paused with its output held; stop it by hand", zap.String("vm", v.name), zap.Error(serr))
		why = fmt.Sprintf("%s; the old copy here could not be stopped (%v): it is paused with its output held, stop it by hand (xl destroy / kill its QEMU)", why, serr)
	}
	if o := v.out.Load(); o != nil {
		o.Close()
	}
	v.role, v.primary, v.stop, v.done, v.guest, v.stoppedWhy = RoleStopped, nil, nil, nil, nil, why
	v.protectionID, v.resume = "", nil
	if rerr := d.records.remove(v.name); rerr != nil {
		d.log.Error("remove state record", zap.String("vm", v.name), zap.Error(rerr))
	}
}

// onHandover is a backup's answer to its owner's planned handover (on the
// replica's link): the witness record must name this host at gen; then
// the replica activates from the link, and the VM is protected back
// towards the old primary.
func (d *Daemon) onHandover(v *vm, gen uint64) error {
	if d.wit != nil {
		ctx, cancel := d.witnessCtx()
		defer cancel()
		cur, held, err := d.wit.Get(ctx, v.name)
		if err != nil {
			return fmt.Errorf("witness: %w", err)
		}
		if !held || cur.Holder != d.cfg.Name || cur.Generation != gen {
			return fmt.Errorf("the witness record is %s, not this host's at generation %d", cur, gen)
		}
		// Claim it from {this host, gen} before activating: should the
		// answer to Activate be lost, the old primary takes {this host,
		// gen} back by compare-and-swap (handoverFailed); exactly one of
		// the two claims wins, and only the winner runs the VM.
		rec, won, err := d.wit.Claim(ctx, v.name, d.cfg.Name, cur)
		if err != nil {
			return fmt.Errorf("witness: %w", err)
		}
		if !won {
			return fmt.Errorf("the witness record moved to %s: the old primary took it back", rec)
		}
		cur = rec
		d.mu.Lock()
		v.w.rec, v.w.view, v.w.err = cur, WitnessHolder, ""
		d.mu.Unlock()
	}
	owner := v.backup.Owner()
	ctx, cancel := context.WithTimeout(context.Background(), switchoverTimeout)
	defer cancel()
	if err := d.Failover(ctx, FailoverRequest{VM: v.name, Force: true, claimed: true, fromLink: true}); err != nil {
		return err
	}
	// Protect it back towards the old primary, once the link that carried
	// the handover has ended (the old primary becomes the backup).
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		time.Sleep(d.cfg.ReconnectBackoff.D())
		if _, ok := d.peerByName(owner); !ok {
			d.log.Warn("switchover: the old primary is not a configured peer: not protected back", zap.String("vm", v.name), zap.String("old_primary", owner))
			return
		}
		if err := d.Protect(context.Background(), ProtectRequest{VM: v.name, Peer: owner}); err != nil {
			d.log.Error("switchover: protecting the VM back towards the old primary failed", zap.String("vm", v.name), zap.String("peer", owner), zap.Error(err))
		}
	}()
	return nil
}
