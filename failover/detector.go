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
	case d.Policy == Witness && o.PeerClosed && !o.DisconnectedAt.IsZero():
		s = Lost // the primary's side closed the link: race without waiting out the timeout
	case now.Sub(o.LastHeard) < d.Timeout:
		s = Waiting
		if d.Policy == Witness && !o.Connected {
			d.reported = false
			return Decision{State: s, RaceAt: o.LastHeard.Add(d.Timeout + d.Grace)}
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
		raceAt := o.LastHeard.Add(d.Timeout + d.Grace)
		if o.PeerClosed && !o.DisconnectedAt.IsZero() {
			if at := o.DisconnectedAt.Add(d.ClosedGrace); at.Before(raceAt) {
				raceAt = at
			}
		}
		dec.RaceAt = raceAt
		dec.Race = !now.Before(dec.RaceAt)
	}
	d.reported = true
	return dec
}
