// Package failover decides when a backup considers its primary lost and
// whether it may take over. The decision is pure (time is passed in), so it
// is tested with logical time; the daemon feeds it the replication link's
// observations.
//
// Invariant 3 (one active copy) rests here: a silent link alone never
// triggers a takeover unless the operator chose the unsafe automatic mode
// explicitly. A witness and fencing come later and plug in as another
// Policy.
package failover

import (
	"fmt"
	"time"
)

// State is the backup's view of its primary.
type State int

const (
	// Up: a link from the primary is connected and heard from.
	Up State = iota
	// Waiting: no link right now, but the primary was heard from within the
	// timeout (it may be reconnecting).
	Waiting
	// Lost: silent beyond the timeout.
	Lost
	// Ended: the primary ended protection on purpose (unprotect).
	Ended
	// Never: no committed epoch yet; nothing could be taken over.
	Never
	// Restarting: the primary's daemon said it restarts and will resume;
	// its silence is not a loss until the restart grace has passed.
	Restarting
	// SecondPath: the replication link is down, but the primary's
	// heartbeats arrive on the second path: it lives, it is not lost.
	SecondPath
)

func (s State) String() string {
	switch s {
	case Up:
		return "up"
	case Waiting:
		return "connecting"
	case Lost:
		return "lost"
	case Ended:
		return "closed"
	case Never:
		return "none"
	case Restarting:
		return "restarting"
	case SecondPath:
		return "second-path"
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// Policy says what a lost primary leads to.
type Policy int

const (
	// Manual: report the loss; an operator runs `remusd failover`.
	Manual Policy = iota
	// AutoUnsafe: take over on silence alone. Under a network partition
	// both copies may run. An explicit opt-in.
	AutoUnsafe
	// Witness: race for the VM's witness record once the primary is lost
	// (silent beyond the timeout, or its side closed the link) and the
	// grace has passed; only the winner takes over. Safe under partitions.
	Witness
)

// Observation is what the replication link reports about a primary.
type Observation struct {
	Connected bool
	LastHeard time.Time
	Committed uint64
	Goodbye   bool
	// Restarting: the primary said its daemon restarts (at
	// RestartingSince).
	Restarting      bool
	RestartingSince time.Time
	// DisconnectedAt is when the last link ended; PeerClosed says the
	// primary's side closed it (EOF, reset): evidence its host or daemon
	// died, before any heartbeat timeout.
	DisconnectedAt time.Time
	PeerClosed     bool
	// AltHeard is when the primary's last heartbeat for this VM arrived on
	// the second path (zero: never, or no second path).
	AltHeard time.Time
}

// Detector tracks one replica's primary.
type Detector struct {
	Timeout time.Duration
	Policy  Policy
	// RestartGrace is how long a primary that said it restarts may stay
	// silent before it counts as lost (the heartbeat timeout then runs
	// from the end of the grace).
	RestartGrace time.Duration
	// Grace (Witness policy) is how long after the primary is lost the
	// backup waits before it races: a living primary claims the record
	// first (its priority), so that a blip does not move the VM.
	Grace time.Duration
	// ClosedGrace replaces Grace when the primary's side closed the link
	// (PeerClosed): a living primary saw the close too and claims at once.
	ClosedGrace time.Duration
	// AltTimeout is the second path's timeout: a primary heard on it
	// within AltTimeout is alive whatever its replication link does.
	AltTimeout time.Duration

	reported bool
}

// Decision is the outcome of one evaluation.
type Decision struct {
	State State
	// NewlyLost is true the first time State becomes Lost (log it once).
	NewlyLost bool
	// TakeOver is true when the policy allows activating the replica now
	// (AutoUnsafe: once, when first lost).
	TakeOver bool
	// Race is true (Witness policy) while the backup should race for the
	// witness record: lost, past the grace. The caller claims, and
	// activates only if it wins; it may be true on every evaluation.
	Race bool
	// RaceAt (Witness policy) is when Race becomes true if nothing is
	// heard from the primary until then (zero: not foreseeable), so a
	// caller can evaluate again at that moment rather than at its next
	// tick.
	RaceAt time.Time
}

// Evaluate classifies the observation at time now.
func (d *Detector) Evaluate(o Observation, now time.Time) Decision {
	var s State
	// closedQuiet: the primary's side closed the link and nothing came on
	// the second path since (a living primary sends a heartbeat there the
	// moment its link ends; a dead one cannot).
	closedQuiet := o.PeerClosed && !o.DisconnectedAt.IsZero() && !o.AltHeard.After(o.DisconnectedAt)
	altAlive := !o.AltHeard.IsZero() && now.Sub(o.AltHeard) < d.AltTimeout && !closedQuiet
	switch {
	case o.Goodbye:
		s = Ended
	case o.Connected:
		s = Up
	case o.Committed == 0:
		s = Never
	case o.Restarting && now.Sub(o.RestartingSince) < d.RestartGrace:
		s = Restarting
	case o.Restarting && now.Sub(o.RestartingSince) < d.RestartGrace+d.Timeout:
		s = Waiting
	case altAlive:
		// The link is down but the primary lives: not lost.
		d.reported = false
		return Decision{State: SecondPath, RaceAt: d.raceAt(o)}
	case d.Policy == Witness && closedQuiet:
		s = Lost // the primary's side closed the link: race without waiting out the timeout
	case now.Sub(o.LastHeard) < d.Timeout:
		s = Waiting
		if d.Policy == Witness && !o.Connected {
			d.reported = false
			return Decision{State: s, RaceAt: d.raceAt(o)}
		}
	default:
		s = Lost
	}
	if s != Lost {
		d.reported = false
		return Decision{State: s}
	}
	dec := Decision{State: Lost, NewlyLost: !d.reported}
	dec.TakeOver = dec.NewlyLost && d.Policy == AutoUnsafe
	if d.Policy == Witness {
		dec.RaceAt = d.raceAt(o)
		dec.Race = !now.Before(dec.RaceAt)
	}
	d.reported = true
	return dec
}

// raceAt is when a backup whose primary stays silent from now on races
// (Witness policy; zero otherwise): the grace after both paths have timed
// out, or the closed-link grace after the primary's side closed the link
// with nothing heard on the second path since.
func (d *Detector) raceAt(o Observation) time.Time {
	if d.Policy != Witness {
		return time.Time{}
	}
	at := o.LastHeard.Add(d.Timeout)
	if !o.AltHeard.IsZero() {
		if alt := o.AltHeard.Add(d.AltTimeout); alt.After(at) {
			at = alt
		}
	}
	at = at.Add(d.Grace)
	if o.PeerClosed && !o.DisconnectedAt.IsZero() && !o.AltHeard.After(o.DisconnectedAt) {
		if c := o.DisconnectedAt.Add(d.ClosedGrace); c.Before(at) {
			at = c
		}
	}
	return at
}
