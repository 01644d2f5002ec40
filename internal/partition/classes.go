package partition

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/remusd/remusd/netlab"
)

// Class names a kind of fault.
type Class string

// The fault classes. Durations and variants are drawn from the trial's
// seeded RNG; Result.Variant says what was drawn.
const (
	// CutReplication drops the replication network between the hosts
	// (both directions, or only one) for 0.1–4 s; the witness stays
	// reachable, and so does the second network between the hosts (which
	// carries the second heartbeat path in the trials that configure it).
	CutReplication Class = "cut-replication"
	// CutWitnessPrimary drops the primary's traffic with the witness.
	CutWitnessPrimary Class = "cut-witness-from-primary"
	// CutWitnessBackup drops the backup's traffic with the witness.
	CutWitnessBackup Class = "cut-witness-from-backup"
	// IsolatePrimary drops everything to and from the primary host
	// (backup on both networks, witness and client) for 0.1–4 s.
	IsolatePrimary Class = "isolate-primary"
	// IsolateBackup drops everything to and from the backup host.
	IsolateBackup Class = "isolate-backup"
	// Flap cuts the replication link 3–8 times for 50–700 ms, with
	// 50–700 ms between the cuts.
	Flap Class = "flap"
	// KillDuringTakeover SIGKILLs the primary's daemon (its sim guest
	// dies with it; on QEMU, its QEMU too: the host dies), then, 0–400 ms
	// later, the backup (likewise) or the witness, and restarts that one
	// 0–1 s later; on QEMU host A's daemon is restarted as well.
	KillDuringTakeover Class = "kill-during-takeover"
	// StopPrimary SIGSTOPs the primary's daemon (and so its guest) for
	// 0.1–3 s, past its timeouts, then SIGCONTs it.
	StopPrimary Class = "sigstop-primary"
	// StopBackup SIGSTOPs the backup's daemon for 0.1–3 s.
	StopBackup Class = "sigstop-backup"
	// KillWitness SIGKILLs the witness and restarts it 0.2–3 s later
	// (its data kept); in half the trials the replication link is also
	// cut while it is down (then nobody can win until it is back).
	KillWitness Class = "kill-witness"
)

// Classes lists every class in report order.
var Classes = []Class{CutReplication, CutWitnessPrimary, CutWitnessBackup, IsolatePrimary, IsolateBackup,
	Flap, KillDuringTakeover, StopPrimary, StopBackup, KillWitness}

type classSpec struct {
	fault func(ctx context.Context, r *run) error
}

var classes = map[Class]classSpec{
	CutReplication:     {fault: faultCutReplication},
	CutWitnessPrimary:  {fault: func(ctx context.Context, r *run) error { return faultCutWitness(ctx, r, HostA) }},
	CutWitnessBackup:   {fault: func(ctx context.Context, r *run) error { return faultCutWitness(ctx, r, HostB) }},
	IsolatePrimary:     {fault: func(ctx context.Context, r *run) error { return faultIsolate(ctx, r, HostA) }},
	IsolateBackup:      {fault: func(ctx context.Context, r *run) error { return faultIsolate(ctx, r, HostB) }},
	Flap:               {fault: faultFlap},
	KillDuringTakeover: {fault: faultKillDuringTakeover},
	StopPrimary:        {fault: func(ctx context.Context, r *run) error { return faultStop(ctx, r, HostA) }},
	StopBackup:         {fault: func(ctx context.Context, r *run) error { return faultStop(ctx, r, HostB) }},
	KillWitness:        {fault: faultKillWitness},
}

func (r *run) ns(host string) string {
	if host == HostA {
		return r.lab.Net.A
	}
	return r.lab.Net.B
}

func (r *run) variant(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.res.Variant != "" {
		r.res.Variant += "; "
	}
	r.res.Variant += fmt.Sprintf(format, args...)
}

// cutReplication drops the replication link in the primary's namespace:
// dir is "both", "a-to-b" (A's packets to B) or "b-to-a".
func (r *run) cutReplication(ctx context.Context, dir string) error {
	var in, out []string
	switch dir {
	case "both":
		in, out = []string{netlab.HostBIP}, []string{netlab.HostBIP}
	case "a-to-b":
		out = []string{netlab.HostBIP}
	case "b-to-a":
		in = []string{netlab.HostBIP}
	}
	if err := drop(ctx, r.lab.Net.A, in, out); err != nil {
		return err
	}
	r.event("replication cut (%s)", dir)
	return nil
}

func (r *run) pickDirection() string {
	// Both directions most of the time; one-way drops are the nastier
	// case (one side still hears the other).
	return []string{"both", "both", "a-to-b", "b-to-a"}[r.rng.IntN(4)]
}

func faultCutReplication(ctx context.Context, r *run) error {
	dir, d := r.pickDirection(), r.between(100*time.Millisecond, 4*time.Second)
	r.variant("%s for %v", dir, d.Round(time.Millisecond))
	if err := r.cutReplication(ctx, dir); err != nil {
		return err
	}
	return sleep(ctx, d)
}

func faultCutWitness(ctx context.Context, r *run, host string) error {
	d := r.between(300*time.Millisecond, 3*time.Second)
	r.variant("for %v", d.Round(time.Millisecond))
	w := []string{netlab.WitnessIP}
	if err := drop(ctx, r.ns(host), w, w); err != nil {
		return err
	}
	r.event("witness cut from %s", host)
	return sleep(ctx, d)
}

func faultIsolate(ctx context.Context, r *run, host string) error {
	d := r.between(100*time.Millisecond, 4*time.Second)
	r.variant("for %v", d.Round(time.Millisecond))
	all := []string{"10.77.0.0" + netlab.Prefix, SecondNet}
	if err := drop(ctx, r.ns(host), all, all); err != nil {
		return err
	}
	r.mu.Lock()
	r.clientCut[host] = true
	r.mu.Unlock()
	r.event("%s isolated", host)
	return sleep(ctx, d)
}

func faultFlap(ctx context.Context, r *run) error {
	n := 3 + r.rng.IntN(6)
	r.variant("%d cuts", n)
	for i := range n {
		dir := r.pickDirection()
		cut, up := r.between(50*time.Millisecond, 700*time.Millisecond), r.between(50*time.Millisecond, 700*time.Millisecond)
		r.variant("%s %v/%v", dir, cut.Round(time.Millisecond), up.Round(time.Millisecond))
		if err := r.cutReplication(ctx, dir); err != nil {
			return err
		}
		if err := sleep(ctx, cut); err != nil {
			return err
		}
		if err := heal(ctx, r.lab.Net.A); err != nil {
			return err
		}
		r.event("replication healed (%d/%d)", i+1, n)
		if err := sleep(ctx, up); err != nil {
			return err
		}
	}
	return nil
}

func faultKillDuringTakeover(ctx context.Context, r *run) error {
	victim := []string{HostB, "witness"}[r.rng.IntN(2)]
	after, down := r.between(0, 400*time.Millisecond), r.between(0, time.Second)
	r.variant("then %s %v later, restarted %v after", victim, after.Round(time.Millisecond), down.Round(time.Millisecond))
	r.killHost(HostA)
	if err := sleep(ctx, after); err != nil {
		return err
	}
	if victim == "witness" {
		r.lab.KillWitness()
		r.event("witness killed")
	} else {
		r.killHost(HostB)
		// The backup's replica (and, had it taken over, its sim guest)
		// died with it: both copies are gone, nothing may run.
		r.mu.Lock()
		r.liveExpected = false
		r.mu.Unlock()
	}
	if err := sleep(ctx, down); err != nil {
		return err
	}
	if victim == "witness" {
		if err := r.lab.StartWitness(ctx); err != nil {
			return err
		}
		r.event("witness restarted")
	} else if err := r.restartDaemon(ctx, HostB); err != nil {
		return err
	}
	if r.qemu {
		// Host A comes back too: its daemon finds its guest gone and
		// must not start a second copy (the VM may run on B now). (A sim
		// guest has no record to find: a restarted daemon would boot a
		// new one.)
		return r.restartDaemon(ctx, HostA)
	}
	return nil
}

func faultStop(ctx context.Context, r *run, host string) error {
	d := r.between(100*time.Millisecond, 3*time.Second)
	r.variant("for %v", d.Round(time.Millisecond))
	p := r.proc(host)
	if err := sendSignal(p.Cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		return err
	}
	r.event("%s daemon stopped", host)
	if err := sleep(ctx, d); err != nil {
		return err
	}
	if err := sendSignal(p.Cmd.Process.Pid, syscall.SIGCONT); err != nil {
		return err
	}
	r.event("%s daemon continued", host)
	return nil
}

func faultKillWitness(ctx context.Context, r *run) error {
	down := r.between(200*time.Millisecond, 3*time.Second)
	cut := r.rng.IntN(2) == 1
	r.variant("down %v", down.Round(time.Millisecond))
	r.lab.KillWitness()
	r.event("witness killed")
	var cutFor time.Duration
	if cut {
		dir := r.pickDirection()
		cutFor = r.between(200*time.Millisecond, max(down, 300*time.Millisecond))
		r.variant("replication cut %s for %v while it is down", dir, cutFor.Round(time.Millisecond))
		if err := r.cutReplication(ctx, dir); err != nil {
			return err
		}
		if err := sleep(ctx, cutFor); err != nil {
			return err
		}
		if err := heal(ctx, r.lab.Net.A); err != nil {
			return err
		}
		r.event("replication healed")
	}
	if err := sleep(ctx, down-min(cutFor, down)); err != nil {
		return err
	}
	if err := r.lab.StartWitness(ctx); err != nil {
		return err
	}
	r.event("witness restarted")
	return nil
}
