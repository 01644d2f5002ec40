package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/xen"
)

// fakeXenHost is a Xen with domains by id.
type fakeXenHost struct {
	mu         sync.Mutex
	names      map[uint32]string
	vifs       map[uint32][]xen.Vif
	created    []string
	destroyed  []uint32
	waited     []uint32 // WaitSuspendable's domids
	neverRan   map[uint32]bool
	devices    map[uint32][]string
	devicesErr error
	ifindex    map[string]int
	bootFails  error // WaitSuspendable's answer
	noDeadline bool
}

func (h *fakeXenHost) WaitSuspendable(ctx context.Context, domid uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	h.waited = append(h.waited, domid)
	return h.bootFails
}

func (h *fakeXenHost) check(ctx context.Context) {
	if _, ok := ctx.Deadline(); !ok {
		h.noDeadline = true
	}
}

func (h *fakeXenHost) DomainID(ctx context.Context, name string) (uint32, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	for id, n := range h.names {
		if n == name {
			return id, nil
		}
	}
	return 0, fmt.Errorf("%w: %s", xen.ErrNoDomain, name)
}

func (h *fakeXenHost) DomainState(ctx context.Context, domid uint32) (xen.DomainStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	if _, ok := h.names[domid]; !ok {
		return xen.DomainStatus{}, fmt.Errorf("%w: %d", xen.ErrNoDomain, domid)
	}
	if h.neverRan[domid] {
		return xen.DomainStatus{Paused: true}, nil
	}
	return xen.DomainStatus{CPUTimeNs: 1}, nil
}

func (h *fakeXenHost) DomainName(ctx context.Context, domid uint32) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	n, ok := h.names[domid]
	if !ok {
		return "", fmt.Errorf("%w: %d", xen.ErrNoDomain, domid)
	}
	return n, nil
}

func (h *fakeXenHost) Vifs(ctx context.Context, domid uint32) ([]xen.Vif, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	return h.vifs[domid], nil
}

func (h *fakeXenHost) Devices(ctx context.Context, domid uint32) ([]string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	return h.devices[domid], h.devicesErr
}

func (h *fakeXenHost) IfIndex(ctx context.Context, name string) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	i, ok := h.ifindex[name]
	if !ok {
		return 0, fmt.Errorf("no interface %s", name)
	}
	return i, nil
}

func (h *fakeXenHost) Create(ctx context.Context, configPath, domain string) (uint32, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	h.created = append(h.created, domain)
	h.names[9] = domain
	h.vifs[9] = []xen.Vif{{DevID: 0, Name: "vif9.0", MAC: "00:16:3e:00:00:01"}}
	return 9, nil
}

func (h *fakeXenHost) Destroy(ctx context.Context, domid uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.check(ctx)
	h.destroyed = append(h.destroyed, domid)
	return nil
}

// fakeLibvirt is libvirt's libxl driver knowing one domain (dom), or
// answering err.
type fakeLibvirt struct {
	mu         sync.Mutex
	dom        libvirt.XenDomain
	running    bool
	err        error // every call's answer, if set
	destroyErr error
	lookups    int
	started    []string
	paused     []string // StartPaused's names
	resumed    []uint32
	destroyed  []uint32
	noDeadline bool
}

func (l *fakeLibvirt) Lookup(ctx context.Context, name string) (libvirt.XenDomain, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		l.noDeadline = true
	}
	l.lookups++
	switch {
	case l.err != nil:
		return libvirt.XenDomain{}, l.err
	case name != l.dom.Name:
		return libvirt.XenDomain{}, fmt.Errorf("libvirt: no domain %q: %w", name, libvirt.ErrNoDomain)
	case !l.running:
		return libvirt.XenDomain{}, fmt.Errorf("libvirt: domain %q is shut off: %w", name, libvirt.ErrNotRunning)
	}
	return l.dom, nil
}

func (l *fakeLibvirt) Start(ctx context.Context, name string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		l.noDeadline = true
	}
	if l.err != nil {
		return l.err
	}
	l.started = append(l.started, name)
	l.running = true
	return nil
}

func (l *fakeLibvirt) StartPaused(ctx context.Context, name string) (uint32, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		l.noDeadline = true
	}
	switch {
	case l.err != nil:
		return 0, l.err
	case name != l.dom.Name:
		return 0, fmt.Errorf("libvirt: no domain %q: %w", name, libvirt.ErrNoDomain)
	}
	l.paused = append(l.paused, name)
	l.running = true
	return l.dom.ID, nil
}

func (l *fakeLibvirt) Resume(ctx context.Context, name string, domid uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		l.noDeadline = true
	}
	if l.err != nil {
		return l.err
	}
	if name != l.dom.Name || domid != l.dom.ID {
		return fmt.Errorf("libvirt: domain %q is domain %d now, not %d: not resuming it", name, l.dom.ID, domid)
	}
	l.resumed = append(l.resumed, domid)
	return nil
}

func (l *fakeLibvirt) Destroy(ctx context.Context, name string, domid uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := ctx.Deadline(); !ok {
		l.noDeadline = true
	}
	if l.destroyErr != nil {
		return l.destroyErr
	}
	l.destroyed = append(l.destroyed, domid)
	return nil
}

var errDialFailed = errors.New("libvirt: connect /run/libvirt/libvirt-sock (xen:///system): dial unix: connection refused")

// webDomain is a PVH domain 7 with vif7.0, as libvirt and xenstore agree.
func webDomain() (*fakeXenHost, *fakeLibvirt) {
	h := &fakeXenHost{names: map[uint32]string{7: "web"}, vifs: map[uint32][]xen.Vif{7: {{DevID: 0, Name: "vif7.0", MAC: "00:16:3e:00:00:01"}}}}
	l := &fakeLibvirt{running: true, dom: libvirt.XenDomain{Name: "web", ID: 7, OSType: "xenpvh", Machine: "xenpvh", PVH: true,
		Interfaces: []libvirt.XenInterface{{Type: "bridge", Name: "vif7.0", MAC: "00:16:3e:00:00:01", Bridge: "xenbr0"}}}}
	return h, l
}

func TestConfigXenLibvirt(t *testing.T) {
	mk := func(lv libvirt.Config, vms ...XenVM) Config {
		c := DefaultConfig()
		c.Insecure = true
		c.XenVMs = vms
		c.Xen.Libvirt = lv
		return c
	}
	for _, c := range []Config{
		mk(libvirt.Config{}, XenVM{Name: "web", Libvirt: true}),
		mk(libvirt.Config{URI: "xen:///system"}, XenVM{Name: "web", Libvirt: true, XLConfig: "/etc/xen/web.cfg"}),
		mk(libvirt.Config{URI: "xen+unix:///system?socket=/run/lv/sock"}, XenVM{Name: "web", Domain: "web-dom", Libvirt: true}),
		mk(libvirt.Config{Socket: "/run/lv/sock"}, XenVM{Name: "web", Libvirt: true}, XenVM{Name: "db"}),
	} {
		if err := c.Validate(); err != nil {
			t.Errorf("valid config %+v %+v: %v", c.Xen.Libvirt, c.XenVMs, err)
		}
	}
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{mk(libvirt.Config{URI: "qemu:///system"}, XenVM{Name: "web", Libvirt: true}), "config field xen.libvirt.uri"},
		{mk(libvirt.Config{URI: "xen:///session"}, XenVM{Name: "web", Libvirt: true}), "config field xen.libvirt.uri"},
		{mk(libvirt.Config{Socket: "run/sock"}, XenVM{Name: "web", Libvirt: true}), "config field xen.libvirt.socket"},
		{mk(libvirt.Config{URI: "xen+unix:///system?socket=rel"}, XenVM{Name: "web", Libvirt: true}), "config field xen.libvirt.uri"},
		{mk(libvirt.Config{URI: "xen+unix:///system?socket=/a", Socket: "/b"}, XenVM{Name: "web", Libvirt: true}), "names socket"},
		{mk(libvirt.Config{}, XenVM{Name: "web", Libvirt: true, Type: "hvm"}), "xen_vms[0].type"},
	} {
		err := tc.c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %+v %+v: got %v, want an error naming %q", tc.c.Xen.Libvirt, tc.c.XenVMs, err, tc.want)
		}
	}
}

// TestLookupLibvirtXen: a PVH domain whose vifs xenstore confirms is
// found; PV, HVM, disks and every disagreement with xenstore are refused
// naming both sides; a domain libvirt does not know or run is "no
// domain", and a libvirtd that does not answer is not.
func TestLookupLibvirtXen(t *testing.T) {
	x := XenVM{Name: "web", Libvirt: true}
	lookup := func(h *fakeXenHost, l *fakeLibvirt) (uint32, error) {
		d := &Daemon{cfg: DefaultConfig(), log: testLogger(t), xh: h, xlv: l}
		id, err := d.lookupLibvirtXen(context.Background(), x)
		if h.noDeadline || l.noDeadline {
			t.Error("a call without a deadline")
		}
		return id, err
	}
	h, l := webDomain()
	if id, err := lookup(h, l); err != nil || id != 7 {
		t.Fatalf("PVH domain: %d, %v", id, err)
	}
	for _, tc := range []struct {
		name   string
		change func(*fakeXenHost, *fakeLibvirt)
		want   []string
	}{
		{"hvm", func(_ *fakeXenHost, l *fakeLibvirt) { l.dom.PVH, l.dom.OSType, l.dom.Machine = false, "hvm", "xenfv" }, []string{"HVM", "device model", "xenpvh"}},
		{"pv", func(_ *fakeXenHost, l *fakeLibvirt) { l.dom.PVH, l.dom.OSType, l.dom.Machine = false, "linux", "xenpv" }, []string{"PV domain", "dirty memory", "xenpvh"}},
		{"disks", func(_ *fakeXenHost, l *fakeLibvirt) { l.dom.Disks = []string{"xvda"} }, []string{"disks (xvda)"}},
		{"vif name", func(h *fakeXenHost, _ *fakeLibvirt) { h.vifs[7][0].Name = "web-vif" }, []string{"vif7.0", "web-vif"}},
		{"mac", func(h *fakeXenHost, _ *fakeLibvirt) { h.vifs[7][0].MAC = "00:16:3e:00:00:02" }, []string{"00:16:3e:00:00:01", "00:16:3e:00:00:02"}},
		{"xenstore has more", func(h *fakeXenHost, _ *fakeLibvirt) {
			h.vifs[7] = append(h.vifs[7], xen.Vif{DevID: 1, Name: "vif7.1", MAC: "00:16:3e:00:00:03"})
		}, []string{"libvirt lists 1 vifs and xenstore 2", "vif7.1"}},
		{"libvirt has more", func(_ *fakeXenHost, l *fakeLibvirt) {
			l.dom.Interfaces = append(l.dom.Interfaces, libvirt.XenInterface{Name: "vif7.1", MAC: "00:16:3e:00:00:03"})
		}, []string{"libvirt lists 2 vifs and xenstore 1"}},
		{"no vif in xenstore", func(h *fakeXenHost, _ *fakeLibvirt) { h.vifs[7] = nil }, []string{"libvirt lists 1 vifs and xenstore 0"}},
		{"order", func(h *fakeXenHost, l *fakeLibvirt) {
			l.dom.Interfaces = append(l.dom.Interfaces, libvirt.XenInterface{Name: "vif7.1", MAC: "00:16:3e:00:00:03"})
			h.vifs[7] = []xen.Vif{{DevID: 1, Name: "vif7.0", MAC: "00:16:3e:00:00:01"}, {DevID: 0, Name: "vif7.1", MAC: "00:16:3e:00:00:03"}}
		}, []string{"vif 0 differs"}},
		{"xenstore name", func(h *fakeXenHost, _ *fakeLibvirt) { h.names[7] = "other" }, []string{`names domain 7 "other"`}},
	} {
		h, l := webDomain()
		tc.change(h, l)
		_, err := lookup(h, l)
		if !errors.Is(err, errXenRefused) || errors.Is(err, xen.ErrNoDomain) || errors.Is(err, errLibvirtDown) {
			t.Errorf("%s: %v, want a refusal", tc.name, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %v does not say %q", tc.name, err, w)
			}
		}
	}
	// Two vifs listed in another order by xenstore, same devices: fine.
	h, l = webDomain()
	l.dom.Interfaces = append(l.dom.Interfaces, libvirt.XenInterface{Name: "vif7.1", MAC: "00:16:3e:00:00:03"})
	h.vifs[7] = []xen.Vif{{DevID: 1, Name: "vif7.1", MAC: "00:16:3e:00:00:03"}, {DevID: 0, Name: "vif7.0", MAC: "00:16:3E:00:00:01"}}
	if _, err := lookup(h, l); err != nil {
		t.Errorf("two matching vifs: %v", err)
	}

	for _, tc := range []struct {
		name           string
		change         func(*fakeXenHost, *fakeLibvirt)
		noDomain, down bool
	}{
		{"unknown to libvirt", func(_ *fakeXenHost, l *fakeLibvirt) { l.dom.Name = "other" }, true, false},
		{"shut off", func(_ *fakeXenHost, l *fakeLibvirt) { l.running = false }, true, false},
		{"libvirtd unreachable", func(_ *fakeXenHost, l *fakeLibvirt) { l.err = errDialFailed }, false, true},
		{"libvirtd hung", func(_ *fakeXenHost, l *fakeLibvirt) {
			l.err = fmt.Errorf("libvirt: domain \"web\": DomainLookupByName: %w", libvirt.ErrTimeout)
		}, false, true},
		{"xenstore lost the domain", func(h *fakeXenHost, _ *fakeLibvirt) { delete(h.names, 7) }, true, false},
	} {
		h, l := webDomain()
		tc.change(h, l)
		_, err := lookup(h, l)
		if err == nil || errors.Is(err, xen.ErrNoDomain) != tc.noDomain || errors.Is(err, errLibvirtDown) != tc.down || errors.Is(err, errXenRefused) {
			t.Errorf("%s: %v: want no-domain %v, libvirt-down %v", tc.name, err, tc.noDomain, tc.down)
		}
	}
}

// xenBuilt reports whether the xen tag is in: then Open is real and the
// tests below, which stop at it, do not apply.
func xenBuilt(t *testing.T) bool {
	_, err := xen.DomainID(t.Context(), "", "web")
	return !errors.Is(err, xen.ErrNotBuilt)
}

func newXenLibvirtDaemon(t *testing.T, dir string, h *fakeXenHost, l *fakeLibvirt, vms ...XenVM) *Daemon {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Insecure = true
	cfg.StateDir = dir
	cfg.XenVMs = vms
	d, err := New(cfg, testLogger(t), withXenSeams(h, l))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.closeAll)
	return d
}

// TestBringUpXenLibvirt: at daemon start a libvirt VM is looked up
// through libvirt; "not running", "libvirtd down" and "refused" are told
// apart; a restarted daemon whose recorded domain Xen still runs attaches
// to it when libvirtd is down, and leaves it alone (its record kept) when
// libvirt does not know it.
func TestBringUpXenLibvirt(t *testing.T) {
	if xenBuilt(t) {
		t.Skip("built with the xen tag: attaching is real (the dom0 e2e covers it)")
	}
	x := XenVM{Name: "web", Libvirt: true}
	for _, tc := range []struct {
		name   string
		change func(*fakeXenHost, *fakeLibvirt)
		want   string
	}{
		// Discovery passed: it stops at the attach this build cannot do.
		{"found", func(*fakeXenHost, *fakeLibvirt) {}, "exists but cannot be attached"},
		{"shut off", func(_ *fakeXenHost, l *fakeLibvirt) { l.running = false }, "virsh -c xen:///system start web"},
		{"libvirtd down", func(_ *fakeXenHost, l *fakeLibvirt) { l.err = errDialFailed }, "cannot tell whether domain web runs here"},
		{"vif mismatch", func(h *fakeXenHost, _ *fakeLibvirt) { h.vifs[7][0].Name = "vifX" }, "runs here but is not attached"},
	} {
		h, l := webDomain()
		tc.change(h, l)
		d := newXenLibvirtDaemon(t, t.TempDir(), h, l, x)
		v := d.vms["web"]
		if v == nil || v.role != RoleStopped || !strings.Contains(v.stoppedWhy, tc.want) {
			t.Errorf("%s: vm %+v, want stopped saying %q", tc.name, v, tc.want)
		}
		if l.lookups == 0 {
			t.Errorf("%s: libvirt was not asked", tc.name)
		}
	}

	// Restarts: a record of domain 7, protected here.
	for _, tc := range []struct {
		name   string
		change func(*fakeXenHost, *fakeLibvirt)
		want   string
	}{
		{"libvirtd down", func(_ *fakeXenHost, l *fakeLibvirt) { l.err = errDialFailed }, "exists but cannot be attached"},
		{"libvirt does not know it", func(_ *fakeXenHost, l *fakeLibvirt) { l.dom.Name = "other" }, "but libvirt does not"},
		{"shut off in libvirt", func(_ *fakeXenHost, l *fakeLibvirt) { l.running = false }, "but libvirt does not"},
	} {
		dir := t.TempDir()
		s, err := newRecordStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.save(vmRecord{Name: "web", Backend: xen.BackendName, Role: RolePrimary, Xen: &xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true}}); err != nil {
			t.Fatal(err)
		}
		h, l := webDomain()
		tc.change(h, l)
		d := newXenLibvirtDaemon(t, dir, h, l, x)
		v := d.vms["web"]
		if v == nil || !strings.Contains(v.stoppedWhy, tc.want) {
			t.Errorf("restart, %s: vm %+v, want %q", tc.name, v, tc.want)
		}
		if r, err := d.records.load("web"); err != nil || r == nil || r.Xen == nil || r.Xen.DomID != 7 {
			t.Errorf("restart, %s: record %+v, %v: want it kept", tc.name, r, err)
		}
	}

	// A failed-over VM protected again is an xl-made domain (the activated
	// standby) whatever its role: found through xl, not libvirt, which
	// does not know it.
	{
		dir := t.TempDir()
		s, err := newRecordStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.save(vmRecord{Name: "web", Backend: xen.BackendName, Role: RolePrimary, Xen: &xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true, XLStandby: true}}); err != nil {
			t.Fatal(err)
		}
		h, l := webDomain()
		l.dom.Name = "other"
		d := newXenLibvirtDaemon(t, dir, h, l, x)
		v := d.vms["web"]
		if v == nil || !strings.Contains(v.stoppedWhy, "exists but cannot be attached") {
			t.Errorf("restart of a re-protected activated standby: vm %+v, want it found through xl (and stopped only at the attach this build cannot do)", v)
		}
		if l.lookups != 0 {
			t.Errorf("restart of a re-protected activated standby: libvirt asked %d times, want 0", l.lookups)
		}
	}
	// An activated standby: one xl made (marked, or an active record
	// from before standbys could be libvirt's) is found through xl; one
	// libvirt made through libvirt.
	for _, tc := range []struct {
		name        string
		rec         xenRecord
		wantLibvirt bool
	}{
		{"xl-made, marked", xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true, XLStandby: true}, false},
		{"active record without a mark", xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true}, false},
		{"libvirt-made", xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true, LibvirtStandby: true}, true},
	} {
		dir := t.TempDir()
		s, err := newRecordStore(dir)
		if err != nil {
			t.Fatal(err)
		}
		rec := tc.rec
		if err := s.save(vmRecord{Name: "web", Backend: xen.BackendName, Role: RoleActive, Xen: &rec}); err != nil {
			t.Fatal(err)
		}
		h, l := webDomain()
		d := newXenLibvirtDaemon(t, dir, h, l, x)
		v := d.vms["web"]
		if v == nil || !strings.Contains(v.stoppedWhy, "exists but cannot be attached") {
			t.Errorf("restart, active, %s: vm %+v, want it found (and stopped only at the attach this build cannot do)", tc.name, v)
		}
		if (l.lookups > 0) != tc.wantLibvirt {
			t.Errorf("restart, active, %s: libvirt asked %d times, want libvirt %v", tc.name, l.lookups, tc.wantLibvirt)
		}
	}
}

// TestXenLifecycleLibvirt: `remusd start` of a libvirt VM starts the
// domain through libvirt (xl create is not run), of another VM with xl;
// destroying goes through libvirt for a libvirt VM (xl for a domain
// libvirt does not run, an activated standby), through xl otherwise, and
// a libvirtd that does not answer fails the destroy without xl.
func TestXenLifecycleLibvirt(t *testing.T) {
	if xenBuilt(t) {
		t.Skip("built with the xen tag: attaching is real (the dom0 e2e covers it)")
	}
	h, l := webDomain()
	l.running = false
	delete(h.names, 7)
	d := newXenLibvirtDaemon(t, t.TempDir(), h, l, XenVM{Name: "web", Libvirt: true}, XenVM{Name: "db", XLConfig: "/etc/xen/db.cfg"})
	h.names[7] = "web" // what libvirt's start makes
	err := d.startXen(t.Context(), d.vms["web"])
	if !errors.Is(err, xen.ErrNotBuilt) {
		t.Fatalf("start web: %v (want it to reach the attach)", err)
	}
	if len(l.started) != 1 || l.started[0] != "web" || len(h.created) != 0 {
		t.Fatalf("start web: libvirt started %v, xl created %v", l.started, h.created)
	}
	err = d.startXen(t.Context(), d.vms["db"])
	if !errors.Is(err, xen.ErrNotBuilt) {
		t.Fatalf("start db: %v", err)
	}
	if len(l.started) != 1 || len(h.created) != 1 || h.created[0] != "db" {
		t.Fatalf("start db: libvirt started %v, xl created %v", l.started, h.created)
	}
	// Both attached only after their guest could suspend.
	if len(h.waited) != 2 || h.waited[0] != 7 || h.waited[1] != 9 {
		t.Fatalf("start waited for the guests' suspend readiness on %v, want [7 9]", h.waited)
	}
	// A guest that never becomes able to suspend is not attached to.
	h.bootFails = errors.New("guest has not announced that it can suspend")
	delete(h.names, 9)
	if err := d.startXen(t.Context(), d.vms["db"]); err == nil || !strings.Contains(err.Error(), "announced") {
		t.Fatalf("start of a guest that cannot suspend: %v", err)
	}
	h.bootFails = nil
	// A libvirt VM whose domain libvirt has no definition for.
	l.dom.Name = "nosuch"
	l.running = false
	delete(h.names, 7)
	if err := d.startXen(t.Context(), d.vms["web"]); err == nil || len(h.created) != 2 {
		t.Fatalf("start of a domain libvirt refuses: %v, xl created %v", err, h.created)
	}

	web, db := d.xenConfig("web"), d.xenConfig("db")
	if err := d.destroyXenDomain(t.Context(), web, 7); err != nil || len(l.destroyed) != 1 || len(h.destroyed) != 0 {
		t.Fatalf("destroy web: %v, libvirt %v, xl %v", err, l.destroyed, h.destroyed)
	}
	if err := d.destroyXenDomain(t.Context(), db, 9); err != nil || len(l.destroyed) != 1 || len(h.destroyed) != 1 || h.destroyed[0] != 9 {
		t.Fatalf("destroy db: %v, libvirt %v, xl %v", err, l.destroyed, h.destroyed)
	}
	l.destroyErr = fmt.Errorf("libvirt: no domain \"web\": %w", libvirt.ErrNoDomain)
	h.names[12] = "web"
	if err := d.destroyXenDomain(t.Context(), web, 12); err != nil || len(h.destroyed) != 2 || h.destroyed[1] != 12 {
		t.Fatalf("destroy an activated standby: %v, xl %v", err, h.destroyed)
	}
	// xl destroys by domid only what Xen still names as the VM's domain.
	h.names[13] = "other"
	if err := d.destroyXenDomain(t.Context(), web, 13); err == nil || !strings.Contains(err.Error(), `is "other" now`) || len(h.destroyed) != 2 {
		t.Fatalf("destroy of a domid that is another domain now: %v, xl %v", err, h.destroyed)
	}
	l.destroyErr = errDialFailed
	if err := d.destroyXenDomain(t.Context(), web, 7); err == nil || !strings.Contains(err.Error(), "connection refused") || len(h.destroyed) != 2 {
		t.Fatalf("destroy with libvirtd down: %v, xl %v", err, h.destroyed)
	}
	if l.noDeadline || h.noDeadline {
		t.Error("a call without a deadline")
	}
}

// TestLibvirtStandby: a libvirt VM's standby on a backup is libvirt's
// definition started paused, accepted only once libvirt and xenstore
// agree on it (else destroyed through libvirt), resumed and destroyed
// through libvirt; a backup whose libvirt lacks the definition says so.
func TestLibvirtStandby(t *testing.T) {
	var _ xen.DomainManager = libvirtStandby{}
	x := XenVM{Name: "web", Domain: "web-b", Libvirt: true}
	standby := func() (*fakeXenHost, *fakeLibvirt, libvirtStandby) {
		h, l := webDomain()
		l.running = false
		l.dom.Name, l.dom.ID = "web-b", 11
		l.dom.Interfaces[0].Name = "vif11.0"
		h.names = map[uint32]string{11: "web-b"}
		h.vifs = map[uint32][]xen.Vif{11: {{DevID: 0, Name: "vif11.0", MAC: "00:16:3e:00:00:01"}}}
		h.neverRan = map[uint32]bool{11: true}
		d := &Daemon{log: testLogger(t), xh: h, xlv: l}
		return h, l, libvirtStandby{d: d, x: x}
	}
	deadlines := func(what string, h *fakeXenHost, l *fakeLibvirt) {
		t.Helper()
		if l.noDeadline || h.noDeadline {
			t.Errorf("%s: a call without a deadline", what)
		}
	}

	h, l, s := standby()
	if s.String() != "libvirt domain web-b" {
		t.Fatalf("String() = %q", s.String())
	}
	domid, err := s.CreatePaused(t.Context())
	if err != nil || domid != 11 || len(l.paused) != 1 || l.paused[0] != "web-b" || len(h.created) != 0 {
		t.Fatalf("CreatePaused: %d, %v; libvirt started paused %v, xl created %v", domid, err, l.paused, h.created)
	}
	if len(l.destroyed) != 0 || len(h.destroyed) != 0 {
		t.Fatalf("an accepted standby was destroyed: libvirt %v, xl %v", l.destroyed, h.destroyed)
	}
	if err := s.Unpause(t.Context(), 11); err != nil || len(l.resumed) != 1 || l.resumed[0] != 11 {
		t.Fatalf("Unpause: %v, libvirt resumed %v", err, l.resumed)
	}
	if err := s.Unpause(t.Context(), 12); err == nil || len(l.resumed) != 1 {
		t.Fatalf("Unpause of another domid: %v, libvirt resumed %v", err, l.resumed)
	}
	if err := s.Destroy(t.Context(), 11); err != nil || len(l.destroyed) != 1 || l.destroyed[0] != 11 || len(h.destroyed) != 0 {
		t.Fatalf("Destroy: %v, libvirt %v, xl %v", err, l.destroyed, h.destroyed)
	}
	deadlines("accepted standby", h, l)

	// A domain that ran (a definition libvirt restored, or started and
	// let run) is no standby: refused and destroyed.
	h, l, s = standby()
	h.neverRan = nil
	if _, err := s.CreatePaused(t.Context()); err == nil || !strings.Contains(err.Error(), "not a fresh standby") || len(l.destroyed) != 1 || l.destroyed[0] != 11 {
		t.Fatalf("CreatePaused of a domain that ran: %v, libvirt destroyed %v", err, l.destroyed)
	}
	deadlines("a domain that ran", h, l)

	// libvirt and xenstore disagree on the vif: refused and destroyed.
	h, l, s = standby()
	h.vifs[11][0].MAC = "00:16:3e:00:00:99"
	if _, err := s.CreatePaused(t.Context()); err == nil || !strings.Contains(err.Error(), "refused") || !strings.Contains(err.Error(), "vif 0 differs") {
		t.Fatalf("CreatePaused of a mismatched domain: %v", err)
	}
	if len(l.destroyed) != 1 || l.destroyed[0] != 11 {
		t.Fatalf("the refused standby: libvirt destroyed %v, want [11]", l.destroyed)
	}
	deadlines("mismatched vif", h, l)

	// This host's libvirt has no definition of the domain.
	h, l, s = standby()
	l.dom.Name = "other"
	if _, err := s.CreatePaused(t.Context()); !errors.Is(err, libvirt.ErrNoDomain) || !strings.Contains(err.Error(), "virsh -c xen:///system define") {
		t.Fatalf("CreatePaused without a definition: %v", err)
	}
	deadlines("no definition", h, l)
	// libvirtd down: an error, nothing started.
	h, l, s = standby()
	l.err = errDialFailed
	if _, err := s.CreatePaused(t.Context()); err == nil || len(l.paused) != 0 {
		t.Fatalf("CreatePaused with libvirtd down: %v, started %v", err, l.paused)
	}
	deadlines("libvirtd down", h, l)
}

// TestDestroyLeftoverLibvirtStandby: before a new standby of a libvirt VM
// is made, a paused never-run domain of its name (a standby a killed
// daemon left) is destroyed, through libvirt if libvirt runs it, else
// through xl; one that ran is refused and left alone.
func TestDestroyLeftoverLibvirtStandby(t *testing.T) {
	x := XenVM{Name: "web", Libvirt: true}
	h, l := webDomain()
	h.neverRan = map[uint32]bool{7: true}
	d := &Daemon{log: testLogger(t), xh: h, xlv: l}
	if err := d.destroyLeftoverStandby(t.Context(), x); err != nil || len(l.destroyed) != 1 || l.destroyed[0] != 7 || len(h.destroyed) != 0 {
		t.Fatalf("libvirt's leftover standby: %v, libvirt destroyed %v, xl %v", err, l.destroyed, h.destroyed)
	}
	// One libvirt does not know (xl made it).
	h, l = webDomain()
	l.dom.Name = "other"
	h.neverRan = map[uint32]bool{7: true}
	d = &Daemon{log: testLogger(t), xh: h, xlv: l}
	if err := d.destroyLeftoverStandby(t.Context(), x); err != nil || len(h.destroyed) != 1 || h.destroyed[0] != 7 || len(l.destroyed) != 0 {
		t.Fatalf("xl's leftover standby: %v, libvirt destroyed %v, xl %v", err, l.destroyed, h.destroyed)
	}
	// A domain that ran may be the VM itself.
	h, l = webDomain()
	d = &Daemon{log: testLogger(t), xh: h, xlv: l}
	if err := d.destroyLeftoverStandby(t.Context(), x); err == nil || !strings.Contains(err.Error(), "has run") || len(l.destroyed)+len(h.destroyed) != 0 {
		t.Fatalf("a domain that ran: %v, libvirt destroyed %v, xl %v", err, l.destroyed, h.destroyed)
	}
	// libvirtd down: whether libvirt runs a leftover is unknown: an
	// error, and nothing destroyed (not even through xl).
	h, l = webDomain()
	h.neverRan = map[uint32]bool{7: true}
	l.err = errDialFailed
	d = &Daemon{log: testLogger(t), xh: h, xlv: l}
	if err := d.destroyLeftoverStandby(t.Context(), x); err == nil || len(l.destroyed)+len(h.destroyed) != 0 {
		t.Fatalf("libvirtd down: %v, libvirt destroyed %v, xl %v", err, l.destroyed, h.destroyed)
	}
	// Nothing of that name: nothing to do.
	h, l = webDomain()
	l.running = false
	delete(h.names, 7)
	d = &Daemon{log: testLogger(t), xh: h, xlv: l}
	if err := d.destroyLeftoverStandby(t.Context(), x); err != nil || len(l.destroyed)+len(h.destroyed) != 0 {
		t.Fatalf("no domain: %v, libvirt destroyed %v, xl %v", err, l.destroyed, h.destroyed)
	}
}

// TestGuardXenDevices: a vif or disk hot-plugged into a protected domain
// (in its own xenstore area, whichever domain runs the backend), or its
// held vif replaced by another interface of the name, fences the copy at
// once (paused, fenced, held output dropped); a device that went away,
// a busy VM, or another protection than the guard's does not; checks
// that keep failing fence too.
func TestGuardXenDevices(t *testing.T) {
	base := xenDevices{frontends: map[string]bool{"vif/0": true, "suspend/event-channel": true}, vifIndex: 12}
	for _, tc := range []struct {
		name string
		now  xenDevices
		want string
	}{
		{"unchanged", base, ""},
		{"vif gone", xenDevices{frontends: map[string]bool{"suspend/event-channel": true}}, ""},
		{"second vif", xenDevices{frontends: map[string]bool{"vif/0": true, "vif/1": true}, vifIndex: 12}, "vif vif/1 was plugged"},
		{"disk", xenDevices{frontends: map[string]bool{"vif/0": true, "vbd/51712": true}, vifIndex: 12}, "writes are not replicated"},
		{"9pfs", xenDevices{frontends: map[string]bool{"vif/0": true, "9pfs/0": true}, vifIndex: 12}, "neither held nor replicated"},
		{"vif replaced", xenDevices{frontends: base.frontends, vifIndex: 31}, "was replaced"},
	} {
		got := xenDevicesChanged(base, tc.now, 7, "vif7.0")
		if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}

	type run struct {
		h    *fakeXenHost
		d    *Daemon
		v    *vm
		g    *fenceGuest
		done chan struct{}
	}
	start := func(p *checkpoint.Primary, failures time.Duration) *run {
		h, _ := webDomain()
		h.devices = map[uint32][]string{7: {"vif/0"}}
		h.ifindex = map[string]int{"vif7.0": 12}
		r := &run{h: h, d: &Daemon{log: testLogger(t), xh: h, vms: map[string]*vm{}}, g: &fenceGuest{}, done: make(chan struct{})}
		r.v = &vm{name: "web", role: RolePrimary, guest: r.g, stop: func() {}}
		r.d.vms["web"] = r.v
		ctx, cancel := context.WithCancel(t.Context())
		t.Cleanup(func() { cancel(); <-r.done })
		go func() {
			defer close(r.done)
			r.d.guardXenDevices(ctx, r.v, p, 7, "vif7.0", 5*time.Millisecond, failures)
		}()
		time.Sleep(30 * time.Millisecond)
		return r
	}
	fenced := func(r *run) (bool, string) {
		r.d.mu.Lock()
		defer r.d.mu.Unlock()
		return r.v.w.view == WitnessFenced, r.v.w.err
	}
	waitDone := func(r *run, what string) {
		t.Helper()
		select {
		case <-r.done:
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: the guard did not act", what)
		}
		r.d.wg.Wait()
	}

	// A second vif appears.
	r := start(nil, time.Hour)
	if f, _ := fenced(r); f {
		t.Fatal("fenced with no new device")
	}
	r.h.mu.Lock()
	r.h.devices[7] = []string{"vif/0", "vif/1"}
	r.h.mu.Unlock()
	waitDone(r, "second vif")
	if f, why := fenced(r); !f || !strings.Contains(why, "vif/1") || !strings.Contains(why, "not held") {
		t.Fatalf("after a hot-plugged vif: fenced %v, %q", f, why)
	}
	r.g.mu.Lock()
	paused := r.g.paused
	r.g.mu.Unlock()
	if !paused || r.h.noDeadline {
		t.Fatalf("paused %v, a call without a deadline %v", paused, r.h.noDeadline)
	}

	// Another protection than the guard's: not fenced, the guard ends.
	r = start(&checkpoint.Primary{}, time.Hour)
	r.h.mu.Lock()
	r.h.devices[7] = []string{"vif/0", "vbd/51712"}
	r.h.mu.Unlock()
	waitDone(r, "stale guard")
	if f, _ := fenced(r); f {
		t.Fatal("a stale guard fenced")
	}

	// Checks that keep failing fence after the budget.
	r = start(nil, 50*time.Millisecond)
	r.h.mu.Lock()
	r.h.devicesErr = errors.New("xenstore: connection refused")
	r.h.mu.Unlock()
	waitDone(r, "failing checks")
	if f, why := fenced(r); !f || !strings.Contains(why, "could not be checked") {
		t.Fatalf("after failing checks: fenced %v, %q", f, why)
	}
}

func testLogger(t *testing.T) *zap.Logger { return zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)) }
