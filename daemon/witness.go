package daemon

// Automatic failover that never runs two copies (issue 9): every change
// of a VM's active role is a compare-and-swap on its witness record
// (failover/witness).
//
// Only two transitions can make a second copy that clients see: the
// backup activating, and the primary going on without its backup
// (releasing output it holds). Both are gated on winning the record:
//
//   - Primary: when its link to the backup ends, it claims the record at
//     once (the living primary's priority): {self, g} → {self, g+1}. The
//     backup, which replicated under generation g, can then no longer
//     win. If the backup does not come back within the ack timeout, it
//     claims again ({self, g+2}) and, having won, releases what it held
//     and runs unprotected (ack_timeout_policy unprotect, the default
//     with a witness). If it loses a claim (the backup won), it fences
//     itself: pauses the guest and drops its held output. If it can reach
//     neither the backup nor the witness for fence_after, it pauses the
//     guest until one of them answers.
//   - Backup: once its primary is lost (silent beyond the heartbeat
//     timeout, or its side closed the link) and takeover_grace has
//     passed, it claims the record it replicated under ({primary, g} →
//     {self, g+1}); only if it wins does it run the fencing command and
//     activate. A record that moved on (the primary claimed first) means
//     the primary lives: it stays a standby.
//
// The generation travels in the replication handshake: a backup refuses a
// primary whose generation is older than one it has seen.

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/hypervisor/xen"
)

func (w *WitnessConfig) witnessConfig() witness.Config {
	return witness.Config{
		Endpoints:   w.Endpoints,
		TLS:         witness.TLS{Cert: w.TLS.Cert, Key: w.TLS.Key, CA: w.TLS.CA},
		Prefix:      w.Prefix,
		DialTimeout: w.DialTimeout.D(),
		OpTimeout:   w.OpTimeout.D(),
	}
}

// Witness views of a VM, shown in status.
const (
	WitnessHolder      = "holder"      // this host holds the record
	WitnessStandby     = "standby"     // the record names the primary this host backs up
	WitnessFenced      = "fenced"      // another host holds it: this side stopped
	WitnessUnreachable = "unreachable" // the witness did not answer the last call
)

// wstate is a VM's witness bookkeeping (guarded by d.mu).
type wstate struct {
	rec   witness.Record // the record this side holds (primary) or may claim from (backup)
	view  string
	err   string
	since time.Time // start of the primary's current outage (zero: link up)
	// claiming: a claim is in flight (one at a time per VM).
	claiming bool
	// takingOver: a backup won its race and runs the fencing command and
	// the activation; no other race starts meanwhile (it would adopt the
	// record just won and fence and activate again).
	takingOver bool
	// paused: the primary paused its guest for lack of both backup and
	// witness (self-fencing); it resumes when either answers.
	paused bool
	// blocked: a backup's race found the record moved on from this
	// basis (or not yet covered by its replica); it does not race again
	// until a link or a commit changes the basis.
	blocked claimBasis
	// claimTook is the last claim's round trip to the witness.
	claimTook time.Duration
	// heldAt is when this side last won (or registered) the record.
	heldAt time.Time
	// refreshedAt is when a primary whose link is up last re-read its
	// record after the witness had not answered (refreshView).
	refreshedAt time.Time
}

// dialWitness connects to the configured witness (nil if none). Dial does
// not wait for the cluster: an unreachable witness shows in status.
func dialWitness(cfg Config, log *zap.Logger) (*witness.Witness, error) {
	if cfg.Witness == nil {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := witness.Dial(ctx, cfg.Witness.witnessConfig(), log.Named("witness"))
	if err != nil {
		return nil, fmt.Errorf("config field witness: %w", err)
	}
	return w, nil
}

func (d *Daemon) witnessCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d.wit.OpTimeout()+time.Second)
}

// witnessInit registers this host as the holder of v's record at protect
// time (a resumed protection finds its own record). It refuses a VM the
// witness says another host holds.
func (d *Daemon) witnessInit(v *vm) error {
	if d.wit == nil {
		return nil
	}
	ctx, cancel := d.witnessCtx()
	defer cancel()
	rec, err := d.wit.Init(ctx, v.name, d.cfg.Name)
	if err != nil {
		if errors.Is(err, witness.ErrHeldByOther) {
			return fmt.Errorf("%w: the witness says %s holds VM %s (generation %d): it runs there, or a failover left it there; it cannot be protected from %s", witness.ErrHeldByOther, rec.Holder, v.name, rec.Generation, d.cfg.Name)
		}
		return fmt.Errorf("witness: %w", err)
	}
	d.mu.Lock()
	v.w.rec, v.w.view, v.w.err, v.w.heldAt = rec, WitnessHolder, "", time.Now()
	v.wgen.Store(rec.Generation)
	d.mu.Unlock()
	return nil
}

// onPrimaryLink is the primary runner's link report: the second path
// hears of a loss at once; the witness record is claimed.
func (d *Daemon) onPrimaryLink(v *vm, up bool, linkErr error) {
	if !up {
		d.primaryLinkDown(v)
	}
	if d.wit == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if up {
		v.w.since = time.Time{}
		if v.w.paused {
			// The backup answers (and, having accepted our Hello, has not
			// taken over): the guest may run again. The runner's next
			// checkpoint resumes a QEMU guest (a resume now could land in
			// a capture); a Xen domain's fence pause is a reference of its
			// own, which no checkpoint drops: dropped now.
			if _, isXen := v.guest.(*xen.Guest); isXen {
				d.resumeSelfFenced(v)
			} else {
				v.w.paused = false
			}
			d.log.Warn("backup reachable again: the self-fenced guest runs again", zap.String("vm", v.name))
		}
		return
	}
	if v.w.since.IsZero() {
		v.w.since = time.Now()
	}
	d.primaryClaim(v, false, "link to the backup ended: "+errString(linkErr))
}

func errString(err error) string {
	if err == nil {
		return "closed"
	}
	return err.Error()
}

// primaryClaim starts (d.mu held) a claim of v's record by this primary:
// on a link loss, to keep the backup from taking over (solo false); at the
// ack timeout, to run unprotected (solo true).
func (d *Daemon) primaryClaim(v *vm, solo bool, why string) {
	// Only a primary that holds the record claims it (after it wrote it
	// over to its backup in a switchover, the backup holds it), and one
	// claim at a time. An unreachable witness left the view unknown:
	// claiming from the last record held is still safe (CAS).
	if v.w.claiming || v.role != RolePrimary || v.primary == nil || v.busy != "" ||
		(v.w.view != WitnessHolder && v.w.view != WitnessUnreachable) {
		return
	}
	v.w.claiming = true
	prev, p := v.w.rec, v.primary
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := d.witnessCtx()
		t := time.Now()
		claim := d.wit.Claim
		if solo {
			claim = d.wit.ClaimUnprotected
		}
		rec, won, err := claim(ctx, v.name, d.cfg.Name, prev)
		took := time.Since(t)
		cancel()
		d.mu.Lock()
		defer d.mu.Unlock()
		v.w.claiming, v.w.claimTook = false, took
		if v.primary != p {
			return // protection ended meanwhile
		}
		switch {
		case err != nil:
			v.w.view, v.w.err = WitnessUnreachable, err.Error()
			d.log.Warn("witness claim failed: holding output", zap.String("vm", v.name), zap.Bool("solo", solo), zap.String("why", why), zap.Error(err))
		case !won:
			v.w.view, v.w.err = WitnessFenced, fmt.Sprintf("%s holds the VM at generation %d", rec.Holder, rec.Generation)
			d.log.Error("lost the VM's witness record: fencing this copy", zap.String("vm", v.name), zap.Stringer("record", rec), zap.String("why", why))
			d.fenceLocked(v, "the witness record moved to "+rec.Holder)
		default:
			v.w.rec, v.w.view, v.w.err, v.w.heldAt = rec, WitnessHolder, "", time.Now()
			v.wgen.Store(rec.Generation)
			d.log.Warn("claimed the VM's witness record: the backup cannot take over", zap.String("vm", v.name), zap.Uint64("generation", rec.Generation), zap.Bool("solo", solo), zap.String("why", why))
			if v.w.paused {
				d.resumeSelfFenced(v)
			}
			if solo {
				d.log.Error("backup gone beyond the ack timeout: releasing held output and running UNPROTECTED until it is back", zap.String("vm", v.name))
				go p.Unprotect(context.Background())
			}
		}
	}()
}

// superviseWitness runs the primaries' witness duties every tick: retry a
// claim the witness did not answer, go solo at the ack timeout, pause a
// guest that can prove nothing for fence_after.
func (d *Daemon) superviseWitness() {
	if d.wit == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	now := time.Now()
	for _, v := range d.vms {
		if v.role == RolePrimary && v.primary != nil && v.w.since.IsZero() && v.w.view == WitnessUnreachable &&
			!v.w.claiming && now.Sub(v.w.refreshedAt) >= time.Second {
			// The backup is back, but the witness's last answer was none:
			// ask it again, so that status says what holds now.
			d.refreshView(v, now)
		}
		if v.role != RolePrimary || v.primary == nil || v.w.since.IsZero() || v.w.view == WitnessFenced {
			continue
		}
		out := now.Sub(v.w.since)
		switch {
		case v.w.view == WitnessUnreachable && !v.w.claiming:
			d.primaryClaim(v, false, "retry")
		case out >= d.cfg.AckTimeout.D() && d.cfg.ackTimeoutPolicy() == AckTimeoutUnprotect && !v.primary.Stats().Unprotected && !v.w.claiming && v.w.view == WitnessHolder:
			d.primaryClaim(v, true, "backup gone beyond the ack timeout")
		}
		if out >= d.cfg.FenceAfter.D() && v.w.view == WitnessUnreachable && !v.w.paused {
			d.selfFence(v, out)
		}
	}
}

// refreshView reads v's record again for a primary whose link is up but
// whose last witness call failed (d.mu held; the read runs on its own
// goroutine, counted as the VM's one witness call in flight). The record
// still this host's: holder again. Another host's: this copy is stale and
// is fenced (a backup claims only once the link is gone; whoever wrote
// it, it is not this side's any more).
func (d *Daemon) refreshView(v *vm, now time.Time) {
	v.w.claiming, v.w.refreshedAt = true, now
	p := v.primary
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := d.witnessCtx()
		cur, held, err := d.wit.Get(ctx, v.name)
		cancel()
		d.mu.Lock()
		defer d.mu.Unlock()
		v.w.claiming = false
		if v.primary != p || v.w.view != WitnessUnreachable {
			return // protection ended, or a claim answered, meanwhile
		}
		switch {
		case err != nil:
			v.w.err = err.Error()
		case held && cur.Holder == d.cfg.Name && cur.Generation >= v.w.rec.Generation:
			v.w.rec, v.w.view, v.w.err = cur, WitnessHolder, ""
			v.wgen.Store(cur.Generation)
			d.log.Info("the witness answers again: this host holds the VM", zap.String("vm", v.name), zap.Stringer("record", cur))
		default:
			v.w.view, v.w.err = WitnessFenced, fmt.Sprintf("the witness record is %s", cur)
			d.log.Error("the witness record is no longer this host's: fencing this copy", zap.String("vm", v.name), zap.Stringer("record", cur))
			d.fenceLocked(v, "the witness record moved to "+cur.Holder)
		}
	}()
}

// selfFence pauses a primary's guest that has had neither its backup nor
// the witness for fence_after (d.mu held): the backup may be taking over
// on the other side of a partition. Its output is held already; pausing
// keeps the guest from doing more.
func (d *Daemon) selfFence(v *vm, out time.Duration) {
	g := v.guest
	v.w.paused = true
	d.log.Error("neither the backup nor the witness answers: pausing the guest (self-fencing) until one does", zap.String("vm", v.name), zap.Duration("for", out))
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := fencePause(ctx, g); err != nil {
			d.log.Error("self-fencing: pause failed", zap.String("vm", v.name), zap.Error(err))
		}
	}()
}

// resumeSelfFenced resumes a guest self-fencing paused once this primary
// proved it holds the VM again (d.mu held).
func (d *Daemon) resumeSelfFenced(v *vm) {
	g := v.guest
	v.w.paused = false
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := fenceResume(ctx, g); err != nil {
			d.log.Error("resume after self-fencing failed", zap.String("vm", v.name), zap.Error(err))
		}
	}()
}

// fenceLocked stops a primary that lost its VM's record (d.mu held): the
// protection stops (no goodbye), the guest is paused and its held output
// dropped. It stays so until an operator acts (`remusd stop`).
func (d *Daemon) fenceLocked(v *vm, why string) {
	g, stop, done, netOut := v.guest, v.stop, v.done, v.netOut
	v.netOut = nil
	v.runErr.Store("fenced: " + why)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := fencePause(ctx, g); err != nil {
			d.log.Error("fencing: pause failed", zap.String("vm", v.name), zap.Error(err))
		}
		stop()
		// A capture in flight resumes the guest when it ends: pause again
		// once the runner is gone.
		if done != nil {
			select {
			case <-done:
			case <-time.After(15 * time.Second):
			}
			pctx, pcancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := fencePause(pctx, g); err != nil {
				d.log.Error("fencing: pause failed", zap.String("vm", v.name), zap.Error(err))
			}
			pcancel()
		}
		if netOut != nil {
			// Hold first: a buffer letting output pass (a protection that
			// ran unprotected, or started live) must not be left so: a
			// detached plug keeps whatever state it had.
			if err := netOut.Hold(); err != nil {
				d.log.Error("fencing: hold output", zap.String("vm", v.name), zap.Error(err))
			}
			// Detach, not Close: the rules stay, so the kernel drops what
			// is held and whatever the guest might still send (should it
			// run again, nothing of it leaves).
			if err := netOut.Detach(); err != nil {
				d.log.Error("fencing: drop held output", zap.String("vm", v.name), zap.Error(err))
			}
		} else if o := v.out.Load(); o != nil {
			o.Close()
		}
	}()
}

// raceForVM runs a backup's claim of v's record, and, if it wins, the
// fencing command and the activation (witness mode). d.mu held; the work
// runs on its own goroutine.
func (d *Daemon) raceForVM(ctx context.Context, v *vm) {
	if v.w.claiming || v.w.takingOver {
		return
	}
	st := v.backup.Stats()
	basis := basisOf(st)
	if st.Generation == 0 || basis == v.w.blocked {
		return
	}
	v.w.claiming = true
	owner := v.backup.Owner()
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		t := time.Now()
		won, rec, err := d.backupClaim(v.name, owner, basis)
		d.mu.Lock()
		v.w.claiming, v.w.claimTook = false, time.Since(t)
		switch {
		case err != nil:
			v.w.view, v.w.err = WitnessUnreachable, err.Error()
			d.mu.Unlock()
			d.log.Warn("primary lost but the witness does not answer: staying a standby", zap.String("vm", v.name), zap.Error(err))
			return
		case !won:
			v.w.view, v.w.err, v.w.blocked = WitnessStandby, basis.refusal(rec), basis
			d.mu.Unlock()
			if basis.stale(rec) {
				d.log.Error("the primary ran unprotected in a generation no epoch of which committed here: this replica may lack output it released; staying a standby", zap.String("vm", v.name), zap.Stringer("record", rec), zap.Uint64("committed_generation", basis.committedGen))
			} else {
				d.log.Warn("the primary is alive (it holds a newer witness record): staying a standby", zap.String("vm", v.name), zap.Stringer("record", rec))
			}
			return
		}
		v.w.rec, v.w.view, v.w.err = rec, WitnessHolder, ""
		v.w.takingOver = true
		d.mu.Unlock()
		defer func() {
			d.mu.Lock()
			v.w.takingOver = false
			d.mu.Unlock()
		}()
		d.log.Warn("won the VM's witness record: taking over", zap.String("vm", v.name), zap.Uint64("generation", rec.Generation), zap.String("old_primary", owner))
		if err := d.runFence(ctx, v.name, owner); err != nil {
			if d.cfg.Fence.OnFailure != FenceProceed {
				d.mu.Lock()
				v.w.err = "fencing failed, not activated: " + err.Error()
				// No automatic retry (on_failure abort: an operator acts);
				// a newer link or commit changes the basis.
				v.w.blocked = basis
				d.mu.Unlock()
				d.log.Error("fencing command failed: NOT activating (fence.on_failure abort); the VM runs nowhere until an operator acts", zap.String("vm", v.name), zap.Error(err))
				return
			}
			d.log.Error("fencing command failed: activating anyway (fence.on_failure proceed)", zap.String("vm", v.name), zap.Error(err))
		}
		if err := d.Failover(ctx, FailoverRequest{VM: v.name, Force: true, claimed: true}); err != nil {
			d.log.Error("automatic takeover failed", zap.String("vm", v.name), zap.Error(err))
		}
	}()
}

// claimBasis is what a backup's replica can vouch for: the generation
// its owner's newest link carried, and the generation of the link that
// committed its newest epoch.
type claimBasis struct {
	linkGen, committedGen uint64
}

func basisOf(st checkpoint.BackupStats) claimBasis {
	return claimBasis{linkGen: st.Generation, committedGen: st.CommittedGeneration}
}

// covers reports whether a replica on basis b may take over from the
// owner's record rec: rec must be the owner's record the replica was
// built under, and if the owner claimed it to run unprotected, an epoch of
// that very generation must have committed here (before it, the owner
// may have released output this replica lacks).
func (b claimBasis) covers(rec witness.Record) bool {
	switch rec.Generation {
	case b.committedGen:
		return true
	case b.linkGen:
		return !rec.Unprotected
	}
	return false
}

// stale reports whether rec is the owner's newest link's generation but
// one this replica does not cover (unprotected, nothing committed since).
func (b claimBasis) stale(rec witness.Record) bool {
	return rec.Generation == b.linkGen && !b.covers(rec)
}

// refusal says why a claim from basis b over rec was not made.
func (b claimBasis) refusal(rec witness.Record) string {
	if b.stale(rec) {
		return fmt.Sprintf("%s ran unprotected at generation %d and no epoch of it committed here (newest committed under generation %d)", rec.Holder, rec.Generation, b.committedGen)
	}
	return fmt.Sprintf("%s holds the VM at generation %d", rec.Holder, rec.Generation)
}

// backupClaim claims VM name's record for this host if it still is the
// owner's record the replica covers (claimBasis.covers).
func (d *Daemon) backupClaim(name, owner string, basis claimBasis) (bool, witness.Record, error) {
	ctx, cancel := d.witnessCtx()
	defer cancel()
	cur, held, err := d.wit.Get(ctx, name)
	if err != nil {
		return false, witness.Record{}, err
	}
	if held && cur.Holder == d.cfg.Name && (cur.Generation == basis.linkGen+1 || cur.Generation == basis.committedGen+1) {
		// {this host, gen+1} over the owner's {owner, gen}: an earlier
		// claim of ours whose answer was lost, or the owner's switchover
		// writing the record over to us before an Activate that never
		// came. Either way it names us, but a read proves nothing to the
		// others: the old primary's switchover takes {this host, gen+1}
		// back when its handover failed, by compare-and-swap from that
		// very record. Claim from it too, so that exactly one of us wins.
		rec, won, err := d.wit.Claim(ctx, name, d.cfg.Name, cur)
		return won, rec, err
	}
	if !held || cur.Holder != owner || !basis.covers(cur) {
		return false, cur, nil
	}
	rec, won, err := d.wit.Claim(ctx, name, d.cfg.Name, cur)
	return won, rec, err
}

// runFence runs the configured fencing command against the old primary.
func (d *Daemon) runFence(ctx context.Context, vm, host string) error {
	f := d.cfg.Fence
	if len(f.Command) == 0 {
		return nil
	}
	timeout := f.Timeout.D()
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	args := make([]string, len(f.Command)-1)
	for i, a := range f.Command[1:] {
		args[i] = strings.NewReplacer("%vm", vm, "%host", host).Replace(a)
	}
	cmd := exec.CommandContext(ctx, f.Command[0], args...)
	cmd.WaitDelay = time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("fencing %s (VM %s) with %s: %w: %s", host, vm, f.Command[0], err, strings.TrimSpace(string(tail(out, 2048))))
	}
	d.log.Warn("fenced the old primary", zap.String("vm", vm), zap.String("host", host), zap.Duration("took", time.Since(start)))
	return nil
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// witnessStatus fills a VM's witness fields in status (d.mu held).
func (d *Daemon) witnessStatus(v *vm, s *VMStatus) {
	if d.wit == nil {
		if v.w.view == WitnessFenced {
			// Fenced without a witness (a device hot-plugged into a
			// protected Xen domain): said all the same.
			s.WitnessView, s.WitnessError = v.w.view, v.w.err
		}
		return
	}
	s.WitnessHolder, s.WitnessGeneration, s.WitnessView, s.WitnessError = v.w.rec.Holder, v.w.rec.Generation, v.w.view, v.w.err
	s.WitnessClaimMs = checkpoint.Ms(v.w.claimTook)
	if v.backup != nil && v.role == RoleBackup && s.WitnessGeneration == 0 {
		s.WitnessHolder, s.WitnessGeneration = v.backup.Owner(), v.backup.Stats().Generation
		if s.WitnessView == "" {
			s.WitnessView = WitnessStandby
		}
	}
}
