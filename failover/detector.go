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
}

// Detector tracks one replica's primary.
type Detector struct {
	Timeout time.Duration
	Policy  Policy
	// RestartGrace is how long a primary that said it restarts may stay
	// silent before it counts as lost (the heartbeat timeout then runs
	// from the end of the grace).
	RestartGrace time.Duration

	reported bool
}

// Decision is the outcome of one evaluation.
type Decision struct {
	State State
	// NewlyLost is true the first time State becomes Lost (log it once).
	NewlyLost bool
	// TakeOver is true when the policy allows activating the replica now.
	TakeOver bool
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
	case now.Sub(o.LastHeard) < d.Timeout:
		s = Waiting
	default:
		s = Lost
	}
	if s != Lost {
		d.reported = false
		return Decision{State: s}
	}
	dec := Decision{State: Lost, NewlyLost: !d.reported}
	dec.TakeOver = dec.NewlyLost && d.Policy == AutoUnsafe
	d.reported = true
	return dec
}
