package daemon

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/failover/watchdog"
	"github.com/remusd/remusd/failover/witness"
)

func TestWatchdogConfig(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.Insecure = true
		c.StateDir = "/var/lib/remusd"
		return c
	}
	qvm := QemuVM{Name: "g", MemoryMiB: 128}
	// Defaults: on with a witness and QEMU VMs, timeout fence_after.
	c := base()
	if c.watchdogEnabled() {
		t.Fatal("enabled without a witness")
	}
	c.QemuVMs = []QemuVM{qvm}
	c.Witness = &WitnessConfig{Endpoints: []string{"http://127.0.0.1:2379"}}
	if !c.watchdogEnabled() || c.watchdogTimeout() != c.FenceAfter.D() {
		t.Fatalf("enabled %v, timeout %v", c.watchdogEnabled(), c.watchdogTimeout())
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	// A heartbeat timeout beyond fence_after raises the default.
	c.HeartbeatTimeout = Duration(30 * time.Second)
	if c.watchdogTimeout() != 30*time.Second {
		t.Fatalf("default timeout %v with heartbeat_timeout 30s", c.watchdogTimeout())
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.Watchdog.Enabled = boolp(false)
	if c.watchdogEnabled() {
		t.Fatal("enabled: false ignored")
	}
	for _, tc := range []struct {
		name  string
		tweak func(c *Config)
		want  string
	}{
		{"timeout too short", func(c *Config) { c.Watchdog.Timeout = Duration(50 * time.Millisecond) }, "config field watchdog.timeout: 50ms out of range"},
		{"timeout too long", func(c *Config) { c.Watchdog.Timeout = Duration(2 * time.Hour) }, "config field watchdog.timeout: 2h0m0s out of range"},
		{"negative", func(c *Config) { c.Watchdog.Timeout = Duration(-time.Second) }, "config field watchdog.timeout:"},
		{"below heartbeat timeout", func(c *Config) {
			c.Witness = &WitnessConfig{Endpoints: []string{"http://127.0.0.1:2379"}}
			c.QemuVMs = []QemuVM{qvm}
			c.Watchdog.Timeout = Duration(500 * time.Millisecond)
		}, "config field watchdog.timeout: 500ms is shorter than heartbeat_timeout 1s"},
		{"no VMs", func(c *Config) { c.Watchdog.Enabled = boolp(true) }, "config field watchdog.enabled: the watchdog stops QEMU guests and Xen domains and neither qemu_vms nor xen_vms are configured"},
		{"socket path", func(c *Config) {
			c.QemuVMs = []QemuVM{qvm}
			c.Watchdog.Enabled = boolp(true)
			c.StateDir = "/" + strings.Repeat("d", 100)
		}, "config field watchdog.enabled: its socket"},
	} {
		c := base()
		tc.tweak(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v (want %q)", tc.name, err, tc.want)
		}
	}
	// On by default with a witness and Xen VMs too, and the daemon names
	// their domains to the watchdog.
	c = base()
	c.XenVMs = []XenVM{{Name: "web", XLConfig: "/etc/xen/web.cfg"}, {Name: "db", Domain: "db-sb", XLConfig: "/etc/xen/db.cfg"}}
	c.Witness = &WitnessConfig{Endpoints: []string{"http://127.0.0.1:2379"}}
	if !c.watchdogEnabled() {
		t.Fatal("not enabled by default with a witness and xen_vms")
	}
	if got := (&Daemon{cfg: c}).xenDomains(); strings.Join(got, ",") != "db-sb,web" {
		t.Fatalf("xenDomains = %v, want [db-sb web]", got)
	}
	// Enabled without a witness: allowed (the watchdog then guards the
	// daemon's liveness only).
	c = base()
	c.QemuVMs = []QemuVM{qvm}
	c.Watchdog.Enabled = boolp(true)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestProofValidFor(t *testing.T) {
	now := time.Unix(1000, 0)
	l := proofLimits{timeout: 3 * time.Second, hbTimeout: time.Second, fenceAfter: 3 * time.Second, margin: 500 * time.Millisecond}
	at := func(d time.Duration) time.Time { return now.Add(d) }
	for _, tc := range []struct {
		name string
		p    proof
		want time.Duration
	}{
		{"no witness: liveness only", proof{}, 3 * time.Second},
		{"link up, heard", proof{witness: true, linkUp: true, hbAge: 100 * time.Millisecond, holder: true, heldAt: at(-time.Hour)}, 3 * time.Second},
		// Heard 800 ms ago, not yet timed out: still proof.
		{"link up, late heartbeat", proof{witness: true, linkUp: true, hbAge: 800 * time.Millisecond}, 3 * time.Second},
		// Silent beyond the heartbeat timeout, link not yet dropped: the
		// proof ends fence_after (+margin) after the last heartbeat.
		{"link up, silent", proof{witness: true, linkUp: true, hbAge: 2 * time.Second, holder: true, heldAt: at(-time.Hour)}, 1500 * time.Millisecond},
		// Link lost 1 s ago, claim in flight or failed.
		{"lost, no claim", proof{witness: true, hbAge: 2 * time.Second, since: at(-time.Second), holder: false, heldAt: at(-time.Hour)}, 2500 * time.Millisecond},
		{"lost long ago", proof{witness: true, hbAge: time.Minute, since: at(-10 * time.Second), heldAt: at(-time.Hour)}, -6500 * time.Millisecond},
		// A claim won after the loss: the backup cannot win any more.
		{"lost, claim won", proof{witness: true, hbAge: 2 * time.Second, since: at(-time.Second), holder: true, heldAt: at(-500 * time.Millisecond)}, 3 * time.Second},
		// The registration before the loss proves nothing after it.
		{"lost, held before", proof{witness: true, hbAge: 2 * time.Second, since: at(-time.Second), holder: true, heldAt: at(-2 * time.Second)}, 2500 * time.Millisecond},
		// The witness confirmed the record after the loss (a recovery):
		// fence_after from that confirmation.
		{"lost, confirmed", proof{witness: true, hbAge: time.Minute, since: at(-10 * time.Second), confirmedAt: at(-100 * time.Millisecond)}, 3 * time.Second},
		{"lost, confirmed earlier", proof{witness: true, hbAge: time.Minute, since: at(-10 * time.Second), confirmedAt: at(-3 * time.Second)}, 500 * time.Millisecond},
	} {
		if got := proofValidFor(tc.p, now, l); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestRenderWatchdog(t *testing.T) {
	var b bytes.Buffer
	err := RenderStatus(&b, []VMStatus{
		{VM: "a", Role: RolePrimary, Watchdog: WatchdogStopped, WatchdogError: "the daemon's proof that this host holds the VM ran out"},
		{VM: "b", Role: RolePrimary, WatchdogError: "refused: pid 7 runs /bin/sh"},
		{VM: "c", Role: RolePrimary, Watchdog: WatchdogSupervised},
	})
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"a: guest STOPPED by the watchdog (SIGSTOP): the daemon's proof", "b: watchdog: refused: pid 7"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "c: ") {
		t.Errorf("a supervised guest needs no note:\n%s", out)
	}
}

// TestXenBeforeAttach: at start, a Xen primary the watchdog holds paused
// is not attached (its pause would be adopted as a dead daemon's, and
// dropped) unless the witness says this host holds the VM and the
// watchdog dropped its pause: another holder, a witness that cannot be
// asked and a watchdog that cannot be reached each leave it paused,
// saying why.
func TestXenBeforeAttach(t *testing.T) {
	ctx, w, d := witnessDaemon(t, "hosta")
	dir := t.TempDir()
	s, err := newRecordStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	d.records = s
	x := XenVM{Name: "web", XLConfig: "/etc/xen/web.cfg"}
	d.cfg.XenVMs = []XenVM{x}
	if err := s.save(vmRecord{Name: "web", Backend: "xen", Role: RolePrimary, Xen: &xenRecord{DomID: 7, Vif: "vif7.0"}}); err != nil {
		t.Fatal(err)
	}
	stopped := map[string]watchdog.StoppedVM{"web": {Name: "web", XenDomID: 7, Why: "its daemon's connection closed"}}
	check := func(what, want string) {
		t.Helper()
		d.xenWatchdogHeld = nil
		d.xenBeforeAttach(x, stopped)
		got := d.xenWatchdogHeld["web"]
		if want == "" {
			if got != "" {
				t.Fatalf("%s: left paused: %s", what, got)
			}
			return
		}
		if !strings.Contains(got, want) {
			t.Fatalf("%s: %q, want it left paused saying %q", what, got, want)
		}
		// Not attached: the bring-up stops at it.
		d.mu.Lock()
		err := d.bringUpXen(x)
		v := d.vms["web"]
		d.mu.Unlock()
		if err != nil || v == nil || v.stoppedWhy != got || v.guest != nil {
			t.Fatalf("%s: bring-up: %v, %+v", what, err, v)
		}
	}
	// Another host holds the record.
	if _, ok, err := w.Claim(ctx, "web", "hostb", witness.Record{}); err != nil || !ok {
		t.Fatalf("claim for hostb: %v %v", ok, err)
	}
	check("another holder", "another host holds the VM")
	// A stop of another domain id is not this record's: nothing to do.
	stopped["web"] = watchdog.StoppedVM{Name: "web", XenDomID: 8}
	check("another domid", "")
	stopped["web"] = watchdog.StoppedVM{Name: "web", XenDomID: 7}
	// This host holds it, but no watchdog answers to drop the pause.
	rec, _, err := w.Get(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := w.Claim(ctx, "web", "hosta", rec); err != nil || !ok {
		t.Fatalf("claim for hosta: %v %v", ok, err)
	}
	check("watchdog unreachable", "the watchdog could not drop its pause")
	// The witness cannot be asked.
	w.Close()
	check("witness down", "the witness cannot be asked")
}
