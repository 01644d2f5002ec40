package watchdog

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// fakeClock is a manual clock.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// fakeProcs knows a fixed set of "QEMU processes" by pid.
type fakeProcs struct {
	qemu  map[int]Target // pid → the VM it runs
	procs map[int]*fakeProc
	opens int
}

type fakeProc struct {
	pid                int
	stopped, exited    bool
	stops, conts, shut int
}

func newFakeProcs(ts ...Target) *fakeProcs {
	f := &fakeProcs{qemu: map[int]Target{}, procs: map[int]*fakeProc{}}
	for _, t := range ts {
		f.qemu[t.Pid] = t
		f.procs[t.Pid] = &fakeProc{pid: t.Pid}
	}
	return f
}

func (f *fakeProcs) Open(t Target) (Proc, error) {
	f.opens++
	if err := t.validate(); err != nil {
		return nil, err
	}
	q, ok := f.qemu[t.Pid]
	if !ok {
		return nil, fmt.Errorf("%w: pid %d is not QEMU", ErrInvalidTarget, t.Pid)
	}
	if q != t {
		return nil, fmt.Errorf("%w: pid %d is VM %s at %s", ErrInvalidTarget, t.Pid, q.VM, q.QMP)
	}
	return f.procs[t.Pid], nil
}

func (p *fakeProc) Stop() error {
	if p.exited {
		return errors.New("esrch")
	}
	p.stopped = true
	p.stops++
	return nil
}

func (p *fakeProc) Cont() error {
	p.stopped = false
	p.conts++
	return nil
}
func (p *fakeProc) Stopped() (bool, error) { return p.stopped, nil }
func (p *fakeProc) Exited() bool           { return p.exited }
func (p *fakeProc) Close() error           { p.shut++; return nil }

var (
	vmA = Target{VM: "a", Pid: 100, QMP: "/run/a.qmp"}
	vmB = Target{VM: "b", Pid: 200, QMP: "/run/b.qmp"}
)

func pet(t Target, valid time.Duration) PetVM {
	return PetVM{Name: t.VM, Pid: t.Pid, QMP: t.QMP, ValidForNs: int64(valid)}
}

func newTestCore(t *testing.T, ts ...Target) (*Core, *fakeClock, *fakeProcs) {
	clk := &fakeClock{t: time.Unix(1_000_000, 0)}
	procs := newFakeProcs(ts...)
	return NewCore(clk.now, procs, zaptest.NewLogger(t)), clk, procs
}

func TestDeadlineStopsAndKeepsStopped(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA)
	if rep := c.Pet(1, []PetVM{pet(vmA, 3*time.Second)}); !rep.OK || len(rep.Refused) != 0 {
		t.Fatalf("pet: %+v", rep)
	}
	if next := c.Tick(); !next.Equal(clk.t.Add(time.Second)) {
		// The recheck period bounds the sleep even before the deadline.
		t.Fatalf("next tick %v, want now+1s", next.Sub(clk.t))
	}
	clk.advance(2999 * time.Millisecond)
	c.Tick()
	if p := procs.procs[100]; p.stopped {
		t.Fatal("stopped before the deadline")
	}
	clk.advance(time.Millisecond)
	c.Tick()
	p := procs.procs[100]
	if !p.stopped || p.stops != 1 {
		t.Fatalf("not stopped at the deadline: %+v", p)
	}
	st := c.Stopped()
	if len(st) != 1 || st[0].Name != "a" || st[0].Pid != 100 || st[0].LateMs != 0 {
		t.Fatalf("stopped list %+v", st)
	}
	// A later pet does not continue it: only Cont does.
	if rep := c.Pet(1, []PetVM{pet(vmA, time.Hour)}); len(rep.Stopped) != 1 {
		t.Fatalf("pet after the stop: %+v", rep)
	}
	if !p.stopped || p.conts != 0 {
		t.Fatal("a pet continued a stopped guest")
	}
	// Someone else continues it: the watchdog stops it again.
	p.stopped = false
	clk.advance(DefaultRecheck)
	c.Tick()
	if !p.stopped || p.stops != 2 {
		t.Fatalf("not stopped again after an outside SIGCONT: %+v", p)
	}
	// The daemon continues it and vouches for it again.
	if err := c.Cont("a", 5*time.Second, false); err != nil {
		t.Fatal(err)
	}
	if p.stopped || p.conts != 1 || len(c.Stopped()) != 0 {
		t.Fatalf("after cont: %+v, stopped %v", p, c.Stopped())
	}
	if dl, _ := c.Deadline("a"); !dl.Equal(clk.t.Add(5 * time.Second)) {
		t.Fatalf("deadline after cont: %v", dl.Sub(clk.t))
	}
}

func TestPetsMoveTheDeadline(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA)
	for i := 0; i < 10; i++ {
		c.Pet(1, []PetVM{pet(vmA, time.Second)})
		clk.advance(900 * time.Millisecond)
		c.Tick()
	}
	if procs.procs[100].stopped || procs.opens != 1 {
		t.Fatalf("regular pets: stopped %v, validated %d times", procs.procs[100].stopped, procs.opens)
	}
	// A pet that cannot prove anything (valid for ≤ 0) is due at once.
	c.Pet(1, []PetVM{pet(vmA, -time.Second)})
	c.Tick()
	if !procs.procs[100].stopped {
		t.Fatal("a pet with no proof left did not stop the guest")
	}
}

func TestRestartGrace(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA, vmB)
	c.Pet(1, []PetVM{pet(vmA, 3*time.Second), pet(vmB, 3*time.Second)})
	// The daemon restarts cleanly; its goodbye reached a's backup, not b's.
	c.Restart(1, []string{"a"}, time.Minute)
	c.Disconnected(1, true)
	clk.advance(3 * time.Second)
	c.Tick()
	if procs.procs[100].stopped || !procs.procs[200].stopped {
		t.Fatalf("at +3s: a stopped %v (grace), b stopped %v (its own deadline)", procs.procs[100].stopped, procs.procs[200].stopped)
	}
	// The next daemon pets but has not resumed a yet: a keeps its grace.
	c.Pet(2, nil)
	if _, ok := c.Deadline("a"); !ok {
		t.Fatal("a pet of the next daemon without a dropped the restart grace")
	}
	clk.advance(57 * time.Second)
	c.Tick()
	if !procs.procs[100].stopped {
		t.Fatal("a not stopped when the restart grace ran out")
	}
	st := c.Stopped()
	if len(st) != 2 || !strings.Contains(st[0].Why, "restart grace") {
		t.Fatalf("stopped %+v", st)
	}
}

func TestRestartedDaemonTakesOver(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA)
	c.Pet(1, []PetVM{pet(vmA, 3*time.Second)})
	c.Restart(1, []string{"a"}, time.Minute)
	c.Disconnected(1, true)
	clk.advance(10 * time.Second)
	c.Pet(2, []PetVM{pet(vmA, 3*time.Second)}) // resumed: normal deadlines again
	clk.advance(3 * time.Second)
	c.Tick()
	if !procs.procs[100].stopped {
		t.Fatal("the restart grace outlived the next daemon's pet")
	}
}

func TestDaemonDeathStopsAtOnce(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA, vmB)
	c.Pet(1, []PetVM{pet(vmA, time.Hour), pet(vmB, time.Hour)})
	// The daemon reconnected (connection 2) and pets a: a is its now; the
	// end of connection 1 then concerns only b, last vouched for there.
	c.Pet(2, []PetVM{pet(vmA, time.Hour), pet(vmB, time.Hour)})
	c.Disconnected(1, false)
	c.Tick()
	if procs.procs[100].stopped || procs.procs[200].stopped {
		t.Fatal("the end of a connection the daemon replaced stopped a guest")
	}
	c.Disconnected(2, false)
	c.Tick()
	if !procs.procs[100].stopped || !procs.procs[200].stopped {
		t.Fatal("the guests of a daemon that died without a restart notice run on")
	}
	clk.advance(time.Millisecond)
	if st := c.Stopped(); len(st) != 2 || !strings.Contains(st[0].Why, "closed without a restart notice") {
		t.Fatalf("stopped %+v", st)
	}
}

func TestRefusals(t *testing.T) {
	c, _, procs := newTestCore(t, vmA)
	rep := c.Pet(1, []PetVM{
		{Name: "a", Pid: 1, QMP: "/run/a.qmp", ValidForNs: int64(time.Second)},             // init
		{Name: "self", Pid: 0, QMP: "/run/a.qmp", ValidForNs: int64(time.Second)},          // no pid
		{Name: "../x", Pid: 100, QMP: "/run/a.qmp", ValidForNs: int64(time.Second)},        // bad name
		{Name: "b", Pid: 100, QMP: "/run/a.qmp", ValidForNs: int64(time.Second)},           // a's process named b
		{Name: "c", Pid: 100, QMP: "relative.qmp", ValidForNs: int64(time.Second)},         // relative path
		{Name: "d", Pid: 100, QMP: "/run/a.qmp,server=on", ValidForNs: int64(time.Second)}, // option injection
		{Name: "e", Pid: 4242, QMP: "/run/e.qmp", ValidForNs: int64(time.Second)},          // not QEMU
	})
	if !rep.OK || len(rep.Refused) != 7 {
		t.Fatalf("refusals: %+v", rep)
	}
	for _, r := range rep.Refused {
		if !strings.Contains(r.Error, ErrInvalidTarget.Error()) {
			t.Errorf("refusal of %s: %q", r.Name, r.Error)
		}
	}
	if !c.Idle() {
		t.Fatal("a refused process is supervised")
	}
	c.Tick()
	if procs.procs[100].stops != 0 {
		t.Fatal("signalled a process it refused")
	}
	// A refusal stands for a while: the same target is not validated
	// (nor logged) again on every pet.
	opens := procs.opens
	rep = c.Pet(1, []PetVM{{Name: "e", Pid: 4242, QMP: "/run/e.qmp", ValidForNs: int64(time.Second)}})
	if len(rep.Refused) != 1 || procs.opens != opens {
		t.Fatalf("refusal not remembered: %+v, %d opens", rep, procs.opens-opens)
	}
	// The same VM twice in one pet.
	rep = c.Pet(1, []PetVM{pet(vmA, time.Second), pet(vmA, time.Second)})
	if len(rep.Refused) != 1 || rep.Refused[0].Error != "listed twice" {
		t.Fatalf("duplicate: %+v", rep)
	}
	// Cont of an unknown VM.
	if err := c.Cont("zz", time.Second, false); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("cont unknown: %v", err)
	}
}

func TestPidChangeWhileStopped(t *testing.T) {
	a2 := Target{VM: "a", Pid: 101, QMP: "/run/a.qmp"}
	c, _, procs := newTestCore(t, vmA, a2)
	c.Pet(1, []PetVM{pet(vmA, 0)})
	c.Tick()
	if !procs.procs[100].stopped {
		t.Fatal("not stopped")
	}
	// The daemon names another process for the VM while the old one is
	// held stopped: refused until the daemon decides about the old one.
	rep := c.Pet(1, []PetVM{pet(a2, time.Second)})
	if len(rep.Refused) != 1 || len(rep.Stopped) != 1 || rep.Stopped[0].Pid != 100 {
		t.Fatalf("pid change while stopped: %+v", rep)
	}
	// Released (the daemon fenced it itself): the new process is taken.
	if err := c.Cont("a", 0, true); err != nil {
		t.Fatal(err)
	}
	if procs.procs[100].stopped || procs.procs[100].shut != 1 {
		t.Fatalf("released process: %+v", procs.procs[100])
	}
	rep = c.Pet(1, []PetVM{pet(a2, time.Second)})
	if len(rep.Refused) != 0 {
		t.Fatalf("after release: %+v", rep)
	}
}

func TestUnlistedAndExited(t *testing.T) {
	c, clk, procs := newTestCore(t, vmA, vmB)
	c.Pet(1, []PetVM{pet(vmA, time.Second), pet(vmB, time.Second)})
	// b is no longer protected here: left out, no longer supervised.
	c.Pet(1, []PetVM{pet(vmA, time.Second)})
	if _, ok := c.Deadline("b"); ok || procs.procs[200].shut != 1 {
		t.Fatal("an unlisted VM is still supervised")
	}
	// a stopped, then left out: it stays stopped and reported.
	clk.advance(time.Second)
	c.Tick()
	if rep := c.Pet(1, nil); len(rep.Stopped) != 1 {
		t.Fatalf("a stopped guest left out of a pet: %+v", rep)
	}
	// Its process exits: forgotten.
	procs.procs[100].exited = true
	c.Tick()
	if !c.Idle() {
		t.Fatal("an exited process is still supervised")
	}
}
