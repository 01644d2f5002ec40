package partition

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/remusd/remusd/daemon"
)

// settleTimeout bounds how long after the heal the VM may take to run
// somewhere again and the other side to stop.
const settleTimeout = 20 * time.Second

// qemuSettleTimeout is settleTimeout for the QEMU guest: after a long
// cut the client's TCP retransmission backs off to seconds.
const qemuSettleTimeout = 60 * time.Second

func other(host string) string {
	if host == HostA {
		return HostB
	}
	return HostA
}

func (r *run) isDead(host string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dead[host]
}

func (r *run) live() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.liveExpected
}

// settle waits until the witness names a holder, the holder runs the VM
// and its output reaches the client again (liveness, when one copy
// survived), and the other side is a standby or fenced. It records a
// violation if that does not happen within settleTimeout, and returns the
// holder.
func (r *run) settle(ctx context.Context, healed time.Time) string {
	if !r.live() {
		// A double fault: nothing can run. Give the restarted daemon
		// time to do whatever it would do.
		_ = sleep(ctx, 2*time.Second)
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		rec, err := r.lab.ReadRecord(rctx, r.prefix, VM)
		cancel()
		if err == nil {
			r.res.Holder, r.res.Generation = rec.Holder, rec.Generation
		}
		return r.res.Holder
	}
	limit := settleTimeout
	if r.qemu {
		limit = qemuSettleTimeout
	}
	deadline := healed.Add(limit)
	for {
		holder, why := r.settled(ctx, healed)
		if why == "" {
			if r.staleView != "" {
				r.note("stale status: %s", r.staleView)
			}
			r.event("settled: %s holds generation %d", holder, r.res.Generation)
			return holder
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			kind := "no-service"
			if strings.HasPrefix(why, "not stopped") {
				kind = "fenced-not-stopped"
			}
			r.violate(kind, "%v after the heal: %s", limit, why)
			return holder
		}
		_ = sleep(ctx, 100*time.Millisecond)
	}
}

// settled reports the holder, and why the trial has not settled yet ("":
// it has).
func (r *run) settled(ctx context.Context, healed time.Time) (string, string) {
	if r.qemu {
		return r.qemuSettled(ctx, healed)
	}
	h, why := r.holderSettled(ctx)
	if why != "" {
		return h, why
	}
	if n := r.countSince(h, healed); n < 3 {
		return h, fmt.Sprintf("holder %s: %d output messages at the client since the heal", h, n)
	}
	return h, r.otherStopped(ctx, h)
}

// holderSettled reads the witness record and checks that its holder runs
// the VM.
func (r *run) holderSettled(ctx context.Context) (string, string) {
	rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	rec, err := r.lab.ReadRecord(rctx, r.prefix, VM)
	cancel()
	if err != nil {
		return "", "witness record unreadable: " + err.Error()
	}
	r.res.Holder, r.res.Generation = rec.Holder, rec.Generation
	if !rec.Held() {
		return "", "witness record " + rec.String()
	}
	h := rec.Holder
	if h != HostA && h != HostB {
		return h, "witness record names " + h
	}
	st, err := r.status(ctx, h)
	if err != nil {
		return h, fmt.Sprintf("holder %s status: %v", h, err)
	}
	switch {
	case h == HostA && (st.Role != daemon.RolePrimary || st.WitnessView == daemon.WitnessFenced):
		return h, fmt.Sprintf("holder %s is %s, witness view %s (%s)", h, st.Role, st.WitnessView, st.LastError)
	case h == HostB && st.Role != daemon.RoleActive:
		return h, fmt.Sprintf("holder %s is %s (%s)", h, st.Role, st.WitnessError)
	}
	if h == HostA && st.WitnessView != daemon.WitnessHolder {
		// Not a safety matter (the record is its own), but status says
		// otherwise: noted once settled.
		r.staleView = fmt.Sprintf("the holder %s's status shows witness view %q", h, st.WitnessView)
	} else {
		r.staleView = ""
	}
	return h, ""
}

// otherStopped checks that the side without the record is a standby, is
// fenced, or is gone ("": it is).
func (r *run) otherStopped(ctx context.Context, h string) string {
	o := other(h)
	if r.isDead(o) {
		return ""
	}
	ost, err := r.status(ctx, o)
	switch {
	case errors.Is(err, daemon.ErrUnknownVM):
		return "" // a restarted daemon that lost its replica
	case err != nil:
		return fmt.Sprintf("not stopped? %s status: %v", o, err)
	case ost.Role == daemon.RoleBackup, ost.Role == daemon.RoleStopped:
		return ""
	case ost.Role == daemon.RolePrimary && ost.WitnessView == daemon.WitnessFenced:
		return ""
	}
	return fmt.Sprintf("not stopped: %s (not the holder) is %s, witness view %s, outbuf %s (%s)", o, ost.Role, ost.WitnessView, ost.OutBuf, ost.LastError)
}

func (r *run) countSince(host string, since time.Time) int {
	n := 0
	for _, m := range r.obs.Received() {
		if m.Host == host && m.At.After(since) {
			n++
		}
	}
	return n
}

// verdictWindow is how long the settled state is watched: the side that
// does not hold the VM must release nothing and (unless it is a standby)
// run no guest in it. It outlasts every timer a fault may have armed
// before the trial settled (the ack timeout, fence_after), so that one
// firing late is seen.
func (r *run) verdictWindow() time.Duration {
	t := r.o.Timing
	return max(t.AckTimeout, t.FenceAfter) + 300*time.Millisecond
}

func (r *run) verdict(ctx context.Context, holder string, healed time.Time) {
	type snap struct {
		st  daemon.VMStatus
		err error
	}
	take := func() map[string]snap {
		m := map[string]snap{}
		for _, h := range []string{HostA, HostB} {
			if !r.isDead(h) {
				st, err := r.status(ctx, h)
				m[h] = snap{st, err}
			}
		}
		return m
	}
	t0 := time.Now()
	s0 := take()
	window := r.verdictWindow()
	_ = sleep(ctx, window)
	s1 := take()
	r.event("verdict window %v", window)
	live := r.live()
	switch {
	case !live:
		r.res.Outcome = VMLost
	case holder == HostB:
		r.res.Outcome = BackupTookOver
	case holder == HostA:
		r.res.Outcome = PrimaryKept
		r.mu.Lock()
		for _, s := range r.samples {
			if s.Host == HostA && s.OK && strings.Contains(s.St.OutBuf, "unprotected") {
				r.res.Outcome = PrimaryUnprotected
				break
			}
		}
		r.mu.Unlock()
	}
	if live && holder != "" && !r.qemu {
		a, b := s0[holder], s1[holder]
		if a.err == nil && b.err == nil && b.st.GuestOps <= a.st.GuestOps {
			r.violate("no-service", "the holder %s's guest did not run in the verdict window (ops %d → %d)", holder, a.st.GuestOps, b.st.GuestOps)
		}
	}
	for _, h := range []string{HostA, HostB} {
		if h == holder && live {
			continue
		}
		a, ok0 := s0[h]
		b, ok1 := s1[h]
		if !ok0 || !ok1 || a.err != nil || b.err != nil {
			continue // dead, or a restarted daemon that knows no such VM
		}
		switch st := b.st; {
		case st.Role == daemon.RoleLocal, st.Role == daemon.RoleActive,
			st.Role == daemon.RolePrimary && st.WitnessView != daemon.WitnessFenced:
			r.violate("two-copies", "%s (not the holder) runs the VM: %s, witness view %s (%s)", h, st.Role, st.WitnessView, st.LastError)
		}
		if b.st.OutputReleased > a.st.OutputReleased {
			r.violate("fenced-released", "%s (not the holder, %s) released %d messages in the verdict window", h, b.st.Role, b.st.OutputReleased-a.st.OutputReleased)
		}
		if !r.qemu && b.st.Role != daemon.RoleBackup && b.st.GuestOps > a.st.GuestOps {
			r.violate("fenced-running", "%s (not the holder, %s, view %s) ran its guest in the verdict window (ops %d → %d)", h, b.st.Role, b.st.WitnessView, a.st.GuestOps, b.st.GuestOps)
		}
	}
	// Messages of the non-holder arriving in the verdict window are
	// judged with the others in checkOutput.
	r.mu.Lock()
	r.verdictAt = t0
	r.mu.Unlock()
	_ = healed
}

// checkOutput judges the guest's output: as released (recorded on each
// host the moment its daemon let it go: strict, one clock) and as the
// client received it (where output a host released before its path to
// the client was cut may arrive late).
func (r *run) checkOutput() {
	for _, e := range r.obs.Errors() {
		r.note("output stream: %s", e)
	}
	rel := r.judge("released", r.obs.Released(), false)
	r.res.MsgsA, r.res.MsgsB, r.res.LastSeqA, r.res.FirstSeqB, r.res.Unreleased = rel.nA, rel.nB, rel.lastA, rel.firstB, rel.unreleased
	recv := r.judge("client", r.obs.Received(), true)
	r.res.LateDeliveries = recv.late
}

type judged struct {
	nA, nB                    int
	lastA, firstB, unreleased uint64
	late                      int
}

// judge checks one trace of output messages; at the client (client true)
// old output of a host whose path to the client was cut may arrive late.
func (r *run) judge(where string, msgs []Msg, client bool) judged {
	var j judged
	violate := func(kind, format string, args ...any) {
		r.violate(kind, where+": "+format, args...)
	}
	last := map[int]uint64{}
	var seqA, seqB []uint64
	for _, m := range msgs {
		if p, ok := last[m.Conn]; ok && m.Seq <= p {
			violate("reordered", "%s's output connection %d carried seq %d after %d", m.Host, m.Conn, m.Seq, p)
		}
		last[m.Conn] = m.Seq
		switch m.Host {
		case HostA:
			seqA = append(seqA, m.Seq)
			j.lastA = max(j.lastA, m.Seq)
		case HostB:
			seqB = append(seqB, m.Seq)
		default:
			violate("unknown-host", "output from %q", m.Host)
		}
	}
	j.nA, j.nB = len(seqA), len(seqB)
	holder, live := r.res.Holder, r.live()
	r.mu.Lock()
	cutA := client && r.clientCut[HostA]
	cutB := client && r.clientCut[HostB]
	vat := r.verdictAt
	r.mu.Unlock()
	if len(seqB) > 0 {
		if holder == HostA {
			violate("two-copies", "the backup released %d messages but the witness record names the primary (generation %d)", len(seqB), r.res.Generation)
		}
		firstIdx := slices.IndexFunc(msgs, func(m Msg) bool { return m.Host == HostB })
		fB := msgs[firstIdx].Seq
		j.firstB = fB
		if mb := slices.Min(seqB); mb != fB && !cutB {
			violate("reordered", "the backup's first message carried seq %d, its smallest is %d", fB, mb)
		}
		inA := map[uint64]bool{}
		for _, s := range seqA {
			inA[s] = true
		}
		var dups []uint64
		for _, s := range seqB {
			if inA[s] {
				dups = append(dups, s)
			}
		}
		if len(dups) > 0 {
			violate("two-copies", "%d sequence numbers released by both hosts (first %d)", len(dups), dups[0])
		}
		var lost, after, interleaved []Msg
		for i, m := range msgs {
			if m.Host != HostA {
				continue
			}
			switch {
			case m.Seq >= fB && i < firstIdx:
				lost = append(lost, m)
			case m.Seq >= fB:
				after = append(after, m)
			case i > firstIdx && cutA:
				j.late++
			case i > firstIdx:
				interleaved = append(interleaved, m)
			}
		}
		if len(lost) > 0 {
			violate("lost-acked", "the backup resumed at seq %d but the primary had released up to %d", fB, lost[len(lost)-1].Seq)
		}
		if len(after) > 0 {
			violate("two-copies", "the primary released %d messages at or beyond the backup's resume point %d after the backup began (seq %d at %s)",
				len(after), fB, after[0].Seq, after[0].At.Format("15:04:05.000"))
		}
		if len(interleaved) > 0 {
			violate("interleaved", "%d messages of the primary came after the backup's first (seq %d at %s; the backup's first, %d, at %s)",
				len(interleaved), interleaved[0].Seq, interleaved[0].At.Format("15:04:05.000"), fB, msgs[firstIdx].At.Format("15:04:05.000"))
		}
		if fB > j.lastA {
			j.unreleased = fB - j.lastA - 1
		}
	}
	// The host that released the newest output holds the record.
	if live && holder != "" && len(msgs) > 0 {
		newest := msgs[0]
		for _, m := range msgs {
			if m.Seq > newest.Seq {
				newest = m
			}
		}
		if newest.Host != holder {
			violate("holder-mismatch", "the newest output (seq %d) came from %s, the witness record names %s", newest.Seq, newest.Host, holder)
		}
	}
	// Nothing from the side that does not hold the VM once the verdict
	// began, except (at the client) old output delayed by a cut of its
	// own path.
	if vat.IsZero() {
		return j
	}
	for _, m := range msgs {
		if m.At.Before(vat) || (m.Host == holder && live) {
			continue
		}
		if client && ((m.Host == HostA && cutA) || (m.Host == HostB && cutB)) && j.firstB != 0 && m.Seq < j.firstB {
			continue
		}
		violate("fenced-released", "%s (not the holder) delivered seq %d after the verdict began", m.Host, m.Seq)
		break
	}
	return j
}
