package watchdog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/hypervisor/xen"
)

// fakeXen is a Xen with domains by id, counting pause references.
type fakeXen struct {
	doms map[uint32]*fakeDom
}

type fakeDom struct {
	name   string
	handle [16]byte
	pauses int // references, everyone's
}

func (f *fakeXen) dom(domid uint32) (*fakeDom, error) {
	d := f.doms[domid]
	if d == nil {
		return nil, fmt.Errorf("%w: domain %d", xen.ErrNoDomain, domid)
	}
	return d, nil
}

func (f *fakeXen) Name(_ context.Context, domid uint32) (string, error) {
	d, err := f.dom(domid)
	if err != nil {
		return "", err
	}
	return d.name, nil
}

func (f *fakeXen) Handle(_ context.Context, domid uint32) ([16]byte, error) {
	d, err := f.dom(domid)
	if err != nil {
		return [16]byte{}, err
	}
	return d.handle, nil
}

func (f *fakeXen) Paused(_ context.Context, domid uint32) (bool, error) {
	d, err := f.dom(domid)
	if err != nil {
		return false, err
	}
	return d.pauses > 0, nil
}

func (f *fakeXen) Pause(_ context.Context, domid uint32) error {
	d, err := f.dom(domid)
	if err != nil {
		return err
	}
	d.pauses++
	return nil
}

func (f *fakeXen) Unpause(_ context.Context, domid uint32) error {
	d, err := f.dom(domid)
	if err != nil {
		return err
	}
	if d.pauses == 0 {
		return fmt.Errorf("domain %d is not paused", domid)
	}
	d.pauses--
	return nil
}

func webXen() *fakeXen {
	return &fakeXen{doms: map[uint32]*fakeDom{7: {name: "web", handle: [16]byte{1, 2, 3}}, 8: {name: "db", handle: [16]byte{4}}}}
}

// TestXenTargets: a Xen target is a domain id and name of the domains the
// watchdog was started with, which xenstore gives that id; anything else
// is refused before Xen is touched.
func TestXenTargets(t *testing.T) {
	fx := webXen()
	x, err := NewXenProcs(fx, []string{"web"})
	if err != nil {
		t.Fatal(err)
	}
	for name, tg := range map[string]Target{
		"a pid too":         {VM: "web", Pid: 42, XenDomID: 7, XenDomain: "web"},
		"dom0":              {VM: "web", XenDomain: "web"},
		"reserved id":       {VM: "web", XenDomID: 0x7ff0, XenDomain: "web"},
		"bad name":          {VM: "web", XenDomID: 7, XenDomain: "../web"},
		"not its domains":   {VM: "db", XenDomID: 8, XenDomain: "db"},
		"another domain's":  {VM: "web", XenDomID: 8, XenDomain: "web"},
		"no such domain":    {VM: "web", XenDomID: 9, XenDomain: "web"},
		"a QEMU process":    {VM: "web", Pid: 42, QMP: "/run/web.qmp"},
		"a name in the vm ": {VM: "web/x", XenDomID: 7, XenDomain: "web"},
	} {
		if _, err := x.Open(tg); err == nil || !strings.Contains(err.Error(), ErrInvalidTarget.Error()) {
			t.Errorf("%s: Open(%+v) = %v, want ErrInvalidTarget", name, tg, err)
		}
	}
	if _, err := NewXenProcs(fx, []string{"a b"}); err == nil {
		t.Error("a bad domain name in the list accepted")
	}
	if fx.doms[7].pauses != 0 || fx.doms[8].pauses != 0 {
		t.Fatal("a refused target was paused")
	}
	// Without Xen procs, Xen targets are refused; QEMU ones go to qemu.
	tp := targetProcs{qemu: newFakeProcs()}
	if _, err := tp.Open(Target{VM: "web", XenDomID: 7, XenDomain: "web"}); err == nil || !strings.Contains(err.Error(), "--xen-domain") {
		t.Errorf("Xen target without Xen procs: %v", err)
	}
}

// TestXenProc: the watchdog pauses with a reference of its own and drops
// only its own; one dropped by someone else is taken again; a domain that
// is gone (or replaced under its id) is never touched.
func TestXenProc(t *testing.T) {
	fx := webXen()
	x, _ := NewXenProcs(fx, []string{"web", "db"})
	p, err := x.Open(Target{VM: "web", XenDomID: 7, XenDomain: "web"})
	if err != nil {
		t.Fatal(err)
	}
	web := fx.doms[7]
	// Cont of a domain it did not pause drops nobody's reference (the
	// daemon's checkpoint pause, say).
	web.pauses = 1
	if err := p.Cont(); err != nil || web.pauses != 1 {
		t.Fatalf("Cont without a stop: %v, pauses %d, want 1", err, web.pauses)
	}
	if err := p.Stop(); err != nil || web.pauses != 2 {
		t.Fatalf("Stop: %v, pauses %d, want 2", err, web.pauses)
	}
	if st, err := p.Stopped(); err != nil || !st {
		t.Fatalf("Stopped: %v, %v", st, err)
	}
	if err := p.Cont(); err != nil || web.pauses != 1 {
		t.Fatalf("Cont: %v, pauses %d, want the other's 1 left", err, web.pauses)
	}
	// Someone drops every reference (xl unpause twice): Stopped says so,
	// the next Stop takes one, and Cont drops only that one.
	web.pauses = 0
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	web.pauses = 0
	if st, _ := p.Stopped(); st {
		t.Fatal("Stopped after someone unpaused: true")
	}
	web.pauses = 1 // the daemon's, say
	if err := p.Stop(); err != nil || web.pauses != 2 {
		t.Fatalf("Stop again: %v, pauses %d", err, web.pauses)
	}
	if err := p.Cont(); err != nil || web.pauses != 1 {
		t.Fatalf("Cont after a re-stop: %v, pauses %d, want 1", err, web.pauses)
	}
	// Replaced under its id: not touched, and exited.
	web.pauses = 0
	web.handle = [16]byte{9}
	if err := p.Stop(); err == nil || web.pauses != 0 {
		t.Fatalf("Stop of a replaced domain: %v, pauses %d", err, web.pauses)
	}
	if !p.Exited() {
		t.Fatal("a replaced domain is not exited")
	}
	delete(fx.doms, 7)
	if !p.Exited() {
		t.Fatal("a destroyed domain is not exited")
	}
}

// TestXenCore: through the core, a Xen primary's deadline passing pauses
// its domain, a pet keeps it stopped, the daemon's Cont unpauses it, and a
// stop undone by someone else is redone at the next check.
func TestXenCore(t *testing.T) {
	fx := webXen()
	x, _ := NewXenProcs(fx, []string{"web"})
	clk := &fakeClock{t: time.Unix(1000, 0)}
	c := NewCore(clk.now, targetProcs{qemu: newFakeProcs(), xen: x}, zaptest.NewLogger(t))
	pet := []PetVM{{Name: "web", XenDomID: 7, XenDomain: "web", ValidForNs: int64(time.Second)}}
	if rep := c.Pet(1, pet); len(rep.Refused) != 0 {
		t.Fatalf("pet refused: %+v", rep.Refused)
	}
	clk.advance(500 * time.Millisecond)
	c.Tick()
	if fx.doms[7].pauses != 0 {
		t.Fatal("paused before its deadline")
	}
	clk.advance(600 * time.Millisecond)
	c.Tick()
	if fx.doms[7].pauses != 1 {
		t.Fatalf("after the deadline: pauses %d, want 1", fx.doms[7].pauses)
	}
	st := c.Stopped()
	if len(st) != 1 || st[0].XenDomID != 7 || st[0].Pid != 0 {
		t.Fatalf("Stopped: %+v", st)
	}
	c.Pet(1, pet) // a pet does not lift a stop
	fx.doms[7].pauses = 0
	clk.advance(DefaultRecheck)
	c.Tick()
	if fx.doms[7].pauses != 1 {
		t.Fatalf("a stop undone by someone else: pauses %d, want 1 again", fx.doms[7].pauses)
	}
	if err := c.Cont("web", time.Second, false); err != nil || fx.doms[7].pauses != 0 {
		t.Fatalf("Cont: %v, pauses %d", err, fx.doms[7].pauses)
	}
	// The daemon dies: due at once.
	c.Disconnected(1, false)
	c.Tick()
	if fx.doms[7].pauses != 1 {
		t.Fatalf("after the daemon's death: pauses %d, want 1", fx.doms[7].pauses)
	}
}

// TestServeXenOnly: a watchdog for Xen domains starts on a host where no
// QEMU binary resolves, pauses a Xen primary whose daemon stops vouching
// for it, refuses QEMU targets and domains it was not given.
func TestServeXenOnly(t *testing.T) {
	dir := shortDir(t)
	lx := &lockedXen{x: webXen()}
	startServer(t, dir, ServerOptions{Binaries: []string{"/nonexistent/qemu-system-x86_64"}, XenDomains: []string{"web"}, XenOps: lx})
	c := dial(t, dir)
	rep, err := c.Pet(context.Background(), []PetVM{
		{Name: "web", XenDomID: 7, XenDomain: "web", ValidForNs: int64(200 * time.Millisecond)},
		{Name: "db", XenDomID: 8, XenDomain: "db", ValidForNs: int64(time.Hour)},
		{Name: "vm1", Pid: os.Getpid(), QMP: filepath.Join(dir, "vm1.qmp"), ValidForNs: int64(time.Hour)},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Refused) != 2 || rep.Refused[0].Name == "web" || rep.Refused[1].Name == "web" {
		t.Fatalf("refused %+v, want db and vm1", rep.Refused)
	}
	defer c.Close()
	// No pet follows: the proof runs out.
	deadline := time.Now().Add(5 * time.Second)
	for !lx.paused(7) {
		if time.Now().After(deadline) {
			t.Fatal("domain 7 not paused once its daemon's proof ran out")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if lx.paused(8) {
		t.Fatal("domain 8 (not given) paused")
	}
}

// lockedXen serializes a fakeXen for the server's goroutines and the
// test's reads.
type lockedXen struct {
	mu sync.Mutex
	x  *fakeXen
}

func (l *lockedXen) paused(domid uint32) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.doms[domid].pauses > 0
}
func (l *lockedXen) Name(ctx context.Context, d uint32) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.Name(ctx, d)
}
func (l *lockedXen) Handle(ctx context.Context, d uint32) ([16]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.Handle(ctx, d)
}
func (l *lockedXen) Paused(ctx context.Context, d uint32) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.Paused(ctx, d)
}
func (l *lockedXen) Pause(ctx context.Context, d uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.Pause(ctx, d)
}
func (l *lockedXen) Unpause(ctx context.Context, d uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.x.Unpause(ctx, d)
}

// TestXenPauseOutlivesWatchdog: a watchdog that exits while holding a
// Xen domain paused leaves a record; the next one restores the stop (the
// domain still the one recorded), reports it, and drops exactly its
// references when the daemon continues the guest. A stale record (the
// domain replaced) is not restored.
func TestXenPauseOutlivesWatchdog(t *testing.T) {
	dir := shortDir(t)
	lx := &lockedXen{x: webXen()}
	run := func() (stop func()) {
		return startServer(t, dir, ServerOptions{Binaries: []string{"/nonexistent/qemu"}, XenDomains: []string{"web"}, XenOps: lx})
	}
	stop := run()
	c := dial(t, dir)
	if _, err := c.Pet(context.Background(), []PetVM{{Name: "web", XenDomID: 7, XenDomain: "web", ValidForNs: int64(50 * time.Millisecond)}}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !lx.paused(7); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not paused")
		}
	}
	c.Close()
	stop()
	if _, err := os.Stat(filepath.Join(dir, XenStateName)); err != nil {
		t.Fatalf("no record of the pause: %v", err)
	}
	// The daemon's own pause besides the watchdog's.
	lx.mu.Lock()
	lx.x.doms[7].pauses++
	lx.mu.Unlock()

	stop = run()
	c = dial(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rep, err := c.Hello(ctx)
	if err != nil || len(rep.Stopped) != 1 || rep.Stopped[0].Name != "web" || rep.Stopped[0].XenDomID != 7 {
		t.Fatalf("the next watchdog's hello: %+v, %v (want web reported stopped)", rep, err)
	}
	if _, err := c.Cont(ctx, "web", time.Hour, false); err != nil {
		t.Fatal(err)
	}
	lx.mu.Lock()
	left := lx.x.doms[7].pauses
	lx.mu.Unlock()
	if left != 1 {
		t.Fatalf("after Cont: %d pause references, want the daemon's 1", left)
	}
	c.Close()
	stop()
	if _, err := os.Stat(filepath.Join(dir, XenStateName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the record outlives the stop it recorded: %v", err)
	}

	// Records that must not be restored: the domain replaced under its
	// id, not paused any more (the reference was dropped), or claiming
	// more references than a watchdog takes (one).
	record := func(handle string, held int) {
		t.Helper()
		rec := fmt.Sprintf(`[{"vm":"web","domid":7,"domain":"web","handle":%q,"held":%d,"at_unix_ms":1,"why":"x"}]`, handle, held)
		if err := os.WriteFile(filepath.Join(dir, XenStateName), []byte(rec), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	restored := func(what string) int {
		t.Helper()
		stop := run()
		defer stop()
		c := dial(t, dir)
		defer c.Close()
		rep, err := c.Hello(ctx)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return len(rep.Stopped)
	}
	webHandle := "01020300000000000000000000000000"
	record("09000000000000000000000000000000", 1)
	if n := restored("replaced domain"); n != 0 {
		t.Fatal("a record of a replaced domain restored")
	}
	record(webHandle, 1) // web has the daemon's 1 reference: paused
	lx.mu.Lock()
	lx.x.doms[7].pauses = 0
	lx.mu.Unlock()
	if n := restored("unpaused domain"); n != 0 {
		t.Fatal("a record of a domain that is not paused restored")
	}
	lx.mu.Lock()
	lx.x.doms[7].pauses = 5
	lx.mu.Unlock()
	record(webHandle, 5)
	if n := restored("five references"); n != 0 {
		t.Fatal("a record claiming five references restored")
	}
	// A malformed record is set aside, not deleted.
	if err := os.WriteFile(filepath.Join(dir, XenStateName), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if n := restored("malformed"); n != 0 {
		t.Fatal("a malformed record restored something")
	}
	if b, err := os.ReadFile(filepath.Join(dir, XenStateName+".bad")); err != nil || string(b) != "{not json" {
		t.Fatalf("the malformed record was not set aside: %q, %v", b, err)
	}
	lx.mu.Lock()
	defer lx.mu.Unlock()
	if lx.x.doms[7].pauses != 5 {
		t.Fatalf("refused records changed the domain's pauses: %d, want 5", lx.x.doms[7].pauses)
	}
}
