package daemon

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/remusd/remusd/hypervisor/xen"
)

func TestConfigXenVMs(t *testing.T) {
	mk := func(vms ...XenVM) Config {
		c := DefaultConfig()
		c.Insecure = true
		c.XenVMs = vms
		return c
	}
	if err := mk(XenVM{Name: "web", XLConfig: "/etc/xen/web.cfg"}, XenVM{Name: "db", Domain: "db-standby"}).Validate(); err != nil {
		t.Fatalf("valid xen_vms: %v", err)
	}
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{mk(XenVM{Name: "web", XLConfig: "web.cfg"}), "xen_vms[0].xl_config"},
		{mk(XenVM{Name: "web", Type: "hvm"}), "hvm is not supported"},
		{mk(XenVM{Name: "web", Type: "pv"}), "xen_vms[0].type"},
		{mk(XenVM{Name: "web", Domain: "-x"}), "xen_vms[0].domain"},
		{mk(XenVM{Name: "web"}, XenVM{Name: "web", Domain: "other"}), `xen_vms[1].name: "web" defined twice`},
		{mk(XenVM{Name: "a", Domain: "d"}, XenVM{Name: "b", Domain: "d"}), "xen_vms[1].domain"},
		{func() Config {
			c := mk(XenVM{Name: "web"})
			c.QemuVMs = []QemuVM{{Name: "web", MemoryMiB: 128, Kernel: "/k"}}
			return c
		}(), `xen_vms[0].name: "web" defined twice`},
		{func() Config { c := mk(); c.Xen.XL = "bin/xl"; return c }(), "xen.xl"},
		{func() Config { c := mk(); c.Xen.SuspendTimeout = Duration(-1); return c }(), "xen.suspend_timeout"},
	} {
		err := tc.c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %+v: got %v, want an error naming %q", tc.c.XenVMs, err, tc.want)
		}
	}
}

func TestRecordXen(t *testing.T) {
	dir := t.TempDir()
	s, err := newRecordStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	good := vmRecord{Name: "web", Backend: xen.BackendName, Role: RolePrimary, Xen: &xenRecord{DomID: 7, Vif: "vif7.0", Bridged: true}}
	if err := s.save(good); err != nil {
		t.Fatal(err)
	}
	r, err := s.load("web")
	if err != nil || r == nil || r.Xen == nil || r.Xen.DomID != 7 || r.Xen.Vif != "vif7.0" || !r.Xen.Bridged {
		t.Fatalf("load: %+v, %v", r, err)
	}
	for _, bad := range []string{
		`{"name":"web","backend":"xen","role":"primary","xen":{"domid":0}}`,
		`{"name":"web","backend":"xen","role":"primary","xen":{"domid":32752}}`,
		`{"name":"web","backend":"xen","role":"primary","xen":{"domid":5,"vif":"../../etc"}}`,
		`{"name":"web","backend":"xen","role":"primary"}`,
		`{"name":"web","backend":"qemu","role":"primary","xen":{"domid":5}}`,
	} {
		if err := os.WriteFile(filepath.Join(dir, "vms", "web.json"), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := s.load("web"); err == nil {
			t.Errorf("record %s accepted", bad)
		}
	}
}

// Without the xen build tag a xen_vms entry does not stop the daemon: the
// VM is listed as stopped, saying why.
func TestXenVMWithoutXenBuild(t *testing.T) {
	if _, err := xen.DomainID(t.Context(), "", "web"); !errors.Is(err, xen.ErrNotBuilt) {
		t.Skip("built with the xen tag: the dom0 tests (e2e, -tags xen) cover this build")
	}
	cfg := DefaultConfig()
	cfg.Insecure = true
	cfg.StateDir = t.TempDir()
	cfg.XenVMs = []XenVM{{Name: "web", XLConfig: "/etc/xen/web.cfg"}}
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.closeAll()
	v := d.vms["web"]
	if v == nil || v.role != RoleStopped || !strings.Contains(v.stoppedWhy, "without Xen support") {
		t.Fatalf("vm %+v", v)
	}
}
