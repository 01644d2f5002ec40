package failover

import (
	"testing"
	"time"
)

func TestDetector(t *testing.T) {
	t0 := time.Unix(100, 0)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	steps := []struct {
		o        Observation
		now      time.Time
		want     State
		newly    bool
		takeOver bool
	}{
		{Observation{}, ms(0), Never, false, false},
		{Observation{Connected: true, LastHeard: ms(0), Committed: 1}, ms(10), Up, false, false},
		{Observation{LastHeard: ms(10), Committed: 5}, ms(500), Waiting, false, false},
		{Observation{LastHeard: ms(10), Committed: 5}, ms(1010), Lost, true, true},
		{Observation{LastHeard: ms(10), Committed: 5}, ms(2000), Lost, false, false}, // reported once
		{Observation{Connected: true, LastHeard: ms(2100), Committed: 6}, ms(2100), Up, false, false},
		{Observation{LastHeard: ms(2100), Committed: 6}, ms(3200), Lost, true, true}, // lost again
		{Observation{LastHeard: ms(2100), Committed: 6, Goodbye: true}, ms(9000), Ended, false, false},
	}
	d := &Detector{Timeout: time.Second, Policy: AutoUnsafe}
	for i, s := range steps {
		got := d.Evaluate(s.o, s.now)
		if got.State != s.want || got.NewlyLost != s.newly || got.TakeOver != s.takeOver {
			t.Fatalf("step %d: got %+v (%v), want state %v newly %v takeover %v", i, got, got.State, s.want, s.newly, s.takeOver)
		}
	}
}

func TestDetectorManualNeverTakesOver(t *testing.T) {
	d := &Detector{Timeout: time.Second, Policy: Manual}
	o := Observation{LastHeard: time.Unix(0, 0), Committed: 9}
	for i := 0; i < 5; i++ {
		got := d.Evaluate(o, time.Unix(int64(10+i), 0))
		if got.State != Lost || got.TakeOver {
			t.Fatalf("manual policy: %+v", got)
		}
		if got.NewlyLost != (i == 0) {
			t.Fatalf("loss reported %v at evaluation %d", got.NewlyLost, i)
		}
	}
}

func TestDetectorSilenceBeforeTimeoutIsNotLoss(t *testing.T) {
	d := &Detector{Timeout: time.Second, Policy: AutoUnsafe}
	o := Observation{LastHeard: time.Unix(0, 0), Committed: 1}
	if got := d.Evaluate(o, time.Unix(0, int64(999*time.Millisecond))); got.State != Waiting || got.TakeOver {
		t.Fatalf("%+v", got)
	}
}

func TestDetectorRestartGrace(t *testing.T) {
	t0 := time.Unix(1000, 0)
	d := &Detector{Timeout: time.Second, Policy: AutoUnsafe, RestartGrace: 30 * time.Second}
	o := Observation{Committed: 5, LastHeard: t0, Restarting: true, RestartingSince: t0}
	for _, c := range []struct {
		after time.Duration
		want  State
	}{{2 * time.Second, Restarting}, {29 * time.Second, Restarting}, {30500 * time.Millisecond, Waiting}, {32 * time.Second, Lost}} {
		dec := d.Evaluate(o, t0.Add(c.after))
		if dec.State != c.want {
			t.Fatalf("%v after a restart notice: %v, want %v", c.after, dec.State, c.want)
		}
		if c.want != Lost && dec.TakeOver {
			t.Fatalf("%v after a restart notice: take over", c.after)
		}
	}
}

func TestDetectorWitnessRace(t *testing.T) {
	t0 := time.Unix(1000, 0)
	d := &Detector{Timeout: time.Second, Policy: Witness, Grace: 300 * time.Millisecond}
	// Silent primary: lost at the timeout, races after the grace.
	o := Observation{Committed: 5, LastHeard: t0, DisconnectedAt: t0}
	for _, c := range []struct {
		at         time.Duration
		state      State
		race, take bool
	}{{500 * time.Millisecond, Waiting, false, false}, {1100 * time.Millisecond, Lost, false, false}, {1300 * time.Millisecond, Lost, true, false}, {5 * time.Second, Lost, true, false}} {
		dec := d.Evaluate(o, t0.Add(c.at))
		if dec.State != c.state || dec.Race != c.race || dec.TakeOver != c.take {
			t.Fatalf("silent primary at +%v: %+v", c.at, dec)
		}
		// Whether waiting or lost, the race's moment is known in advance.
		if !dec.RaceAt.Equal(t0.Add(1300 * time.Millisecond)) {
			t.Fatalf("silent primary at +%v: race at %v, want +1.3s", c.at, dec.RaceAt.Sub(t0))
		}
	}
	// The primary's side closed the link: lost at once, races after the
	// grace, long before the heartbeat timeout.
	// The closed link's own (shorter) grace applies.
	d = &Detector{Timeout: time.Second, Policy: Witness, Grace: 300 * time.Millisecond, ClosedGrace: 50 * time.Millisecond}
	o = Observation{Committed: 5, LastHeard: t0, DisconnectedAt: t0, PeerClosed: true}
	if dec := d.Evaluate(o, t0.Add(20*time.Millisecond)); dec.State != Lost || dec.Race || !dec.RaceAt.Equal(t0.Add(50*time.Millisecond)) {
		t.Fatalf("closed link within the grace: %+v", dec)
	}
	if dec := d.Evaluate(o, t0.Add(50*time.Millisecond)); !dec.Race {
		t.Fatalf("closed link after the grace: %+v", dec)
	}
	// A link closed long after the primary fell silent: the silence's
	// race time is earlier and stands.
	late := Observation{Committed: 5, LastHeard: t0, DisconnectedAt: t0.Add(1500 * time.Millisecond), PeerClosed: true}
	if dec := d.Evaluate(late, t0.Add(2*time.Second)); !dec.Race || !dec.RaceAt.Equal(t0.Add(1300*time.Millisecond)) {
		t.Fatalf("late close: %+v", dec)
	}
	// Reconnected: no race.
	o.Connected = true
	if dec := d.Evaluate(o, t0.Add(400*time.Millisecond)); dec.State != Up || dec.Race {
		t.Fatalf("reconnected: %+v", dec)
	}
	// A manual detector never races, even on a closed link.
	m := &Detector{Timeout: time.Second, Policy: Manual}
	o.Connected = false
	if dec := m.Evaluate(o, t0.Add(10*time.Second)); dec.Race || dec.TakeOver {
		t.Fatalf("manual: %+v", dec)
	}
}

// TestDetectorSecondPath: a primary heard on the second path is alive
// whatever its replication link does; a closed link with nothing on the
// second path since still races after the closed-link grace.
func TestDetectorSecondPath(t *testing.T) {
	t0 := time.Unix(1000, 0)
	for _, p := range []Policy{Witness, AutoUnsafe, Manual} {
		d := &Detector{Timeout: time.Second, Policy: p, Grace: 150 * time.Millisecond, ClosedGrace: 30 * time.Millisecond, AltTimeout: time.Second}
		// Replication silent for 5 s, second path heard 100 ms ago.
		o := Observation{Committed: 5, LastHeard: t0, DisconnectedAt: t0, AltHeard: t0.Add(4900 * time.Millisecond)}
		dec := d.Evaluate(o, t0.Add(5*time.Second))
		if dec.State != SecondPath || dec.Race || dec.TakeOver || dec.NewlyLost {
			t.Fatalf("%v: silent link, live second path: %+v", p, dec)
		}
		// The second path falls silent too: lost after its timeout.
		dec = d.Evaluate(o, t0.Add(6100*time.Millisecond)) // past its timeout and the grace
		if dec.State != Lost || (p == AutoUnsafe) != dec.TakeOver || (p == Witness) != dec.Race {
			t.Fatalf("%v: both paths silent: %+v", p, dec)
		}
	}
	d := &Detector{Timeout: time.Second, Policy: Witness, Grace: 150 * time.Millisecond, ClosedGrace: 30 * time.Millisecond, AltTimeout: time.Second}
	// Closed link; the last second-path heartbeat came before the close:
	// the primary may be dead, so the closed-link grace applies.
	o := Observation{Committed: 5, LastHeard: t0, DisconnectedAt: t0.Add(10 * time.Millisecond), PeerClosed: true, AltHeard: t0}
	if dec := d.Evaluate(o, t0.Add(40*time.Millisecond)); dec.State != Lost || !dec.Race || !dec.RaceAt.Equal(t0.Add(40*time.Millisecond)) {
		t.Fatalf("closed link, second path quiet since: %+v", dec)
	}
	// The living primary's heartbeat arrives on the second path after the
	// close: it is alive; the race moves to both paths' timeouts.
	o.AltHeard = t0.Add(12 * time.Millisecond)
	dec := d.Evaluate(o, t0.Add(40*time.Millisecond))
	if dec.State != SecondPath || dec.Race || !dec.RaceAt.Equal(t0.Add(1162*time.Millisecond)) {
		t.Fatalf("closed link, second path alive after it: %+v", dec)
	}
	// Connected: up, whatever the second path says.
	if dec := d.Evaluate(Observation{Committed: 5, Connected: true, LastHeard: t0}, t0.Add(50*time.Millisecond)); dec.State != Up {
		t.Fatalf("connected: %+v", dec)
	}
}
