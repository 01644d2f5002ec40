//go:build xen

package libvirt_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/hypervisor/xen"
	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

// Files the host-side driver puts into dom0 for the guests.
const (
	xenDomUKernel = "/vmtest/domU-vmlinuz"
	xenDomUNetRD  = "/vmtest/domU-net.cpio"
)

// TestXenLibvirt boots Xen under QEMU with libvirtd and its libxl driver
// in dom0 (xentest.Config.Libvirt) and runs TestDom0LibvirtXen there.
func TestXenLibvirt(t *testing.T) {
	if xentest.InDom0() || testing.Short() {
		t.Skip("host-side driver that boots Xen")
	}
	ctx := context.Background()
	k, err := vmtest.FindKernel(ctx, "")
	if errors.Is(err, vmtest.ErrUnavailable) {
		t.Skipf("needs the Debian cloud kernel for the domU: %v (run xentest/setup.sh)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	rd := filepath.Join(t.TempDir(), "domU-net.cpio")
	if err := xentest.BuildNetGuestRamdisk(ctx, "", k, rd, xentest.NetGuestIP+"/24"); err != nil {
		t.Fatal(err)
	}
	xentest.RunInDom0(t, ".", "^TestDom0LibvirtXen$", []string{"xen"}, xentest.Config{
		Libvirt: true,
		Files: []vmtest.File{
			{Src: k.Image, Dst: xenDomUKernel, Mode: 0o644},
			{Src: rd, Dst: xenDomUNetRD, Mode: 0o644},
		},
		Timeout: 240 * time.Second,
	})
}

// xenDomainXML is a libxl PVH domain running the net guest, with one vif
// on the dom0 bridge (vifLines: the <interface> elements).
func xenDomainXML(name, osType, vifLines string) string {
	return fmt.Sprintf(`<domain type='xen'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu cpuset='%d'>1</vcpu>
  <os>
    <type arch='x86_64' machine='xenpvh'>%s</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=hvc0 rdinit=/init dirtier.mib=4 dirtier.sleepms=50</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>preserve</on_crash>
  <devices>
%s  </devices>
</domain>
`, name, xentest.DomUCPU, osType, xenDomUKernel, xenDomUNetRD, vifLines)
}

// TestDom0LibvirtXen, in dom0: libvirtd with the libxl driver starts; a
// PVH domain with a vif on the bridge, defined and started through
// libvirt, is found by LookupXen with the domid xl reports, the vif
// xenstore and /sys/class/net know, its MAC and bridge; a transient
// domain is not persistent; a defined domain that is not running, a name
// libvirt does not know (also a domain made by xl, which the libxl driver
// does not see) and an invalid name are refused, each as what it is.
func TestDom0LibvirtXen(t *testing.T) {
	if !xentest.InDom0() {
		t.Skip("runs in a xentest dom0 (TestXenLibvirt boots one)")
	}
	ctx := context.Background()
	dir := t.TempDir()
	script, err := xentest.SetupNet(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	lv := xentest.StartLibvirtd(t)
	t0 := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	conn, err := libvirt.DialXen(cctx, libvirt.Config{Socket: lv.Socket})
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	ver, err := conn.LibvirtVersion(vctx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dom0: libvirtd %s: socket up %v after exec, %s open %v later (the libxl driver's initialization)",
		ver, lv.Started.Round(time.Millisecond), conn.URI(), time.Since(t0).Round(time.Millisecond))

	virsh := func(args ...string) string {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		out, err := exec.CommandContext(cctx, xentest.HostVirsh, append([]string{"-q", "-c", "xen:///system"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("virsh %v: %v: %s", args, err, out)
		}
		return string(out)
	}
	writeXML := func(name, x string) string {
		p := filepath.Join(dir, name+".xml")
		if err := os.WriteFile(p, []byte(x), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	vif := fmt.Sprintf(`    <interface type='bridge'>
      <source bridge='%s'/>
      <mac address='%s'/>
      <script path='%s'/>
    </interface>
`, xentest.NetBridge, strings.ToUpper(xentest.NetGuestMAC), script)

	// A persistent PVH domain with a vif.
	virsh("define", writeXML("web", xenDomainXML("web", "xenpvh", vif)))
	t1 := time.Now()
	virsh("start", "web")
	t.Logf("dom0: virsh start web: %v", time.Since(t1).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			// Line by line: the host-side driver shows only lines naming
			// the test file.
			out, _ := exec.Command(filepath.Join(xentest.BinDir, "xl"), "list").CombinedOutput()
			for _, l := range strings.Split(string(out), "\n") {
				t.Logf("dom0: xl list: %s", l)
			}
			b, _ := os.ReadFile("/tmp/vif-script.log")
			for _, l := range strings.Split(string(b), "\n") {
				t.Logf("dom0: vif script: %s", l)
			}
			for _, l := range strings.Split(xentest.LibvirtLogs(), "\n") {
				t.Logf("dom0: libvirt log: %s", l)
			}
		}
	})

	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	d, err := conn.LookupXen(lctx, "web")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimRight(d.XML, "\n"), "\n") {
		t.Logf("dom0: xml web: %s", l)
	}
	domid, err := xen.DomainID(ctx, filepath.Join(xentest.BinDir, "xl"), "web")
	if err != nil {
		t.Fatal(err)
	}
	if d.ID != domid {
		t.Fatalf("LookupXen: domid %d, xl domid %d", d.ID, domid)
	}
	if !d.PVH || !d.Persistent || d.HasDisks() || d.Name != "web" || d.UUID == "" || d.MemoryKiB != 128<<10 || d.VCPUs != 1 || d.Kernel != xenDomUKernel {
		t.Fatalf("LookupXen: %+v", d)
	}
	vifs, err := xen.Vifs(ctx, domid)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Interfaces) != 1 || len(vifs) != 1 {
		t.Fatalf("interfaces: libvirt %+v, xenstore %+v", d.Interfaces, vifs)
	}
	nic := d.Interfaces[0]
	if nic.Name != vifs[0].Name || nic.MAC != vifs[0].MAC || nic.MAC != xentest.NetGuestMAC || nic.Bridge != xentest.NetBridge || nic.Type != "bridge" || nic.Script != script {
		t.Fatalf("interface: libvirt %+v, xenstore %+v", nic, vifs[0])
	}
	master, err := os.Readlink("/sys/class/net/" + nic.Name + "/master")
	if err != nil || filepath.Base(master) != xentest.NetBridge {
		t.Fatalf("%s in dom0: master %q (%v), want %s", nic.Name, master, err, xentest.NetBridge)
	}
	t.Logf("dom0: web: domid %d, os type %q machine %q, vif %s (%s) on %s", d.ID, d.OSType, d.Machine, nic.Name, nic.MAC, nic.Bridge)

	// Lookup cost.
	var times []time.Duration
	for range 20 {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		t2 := time.Now()
		_, err := conn.LookupXen(lctx, "web")
		times = append(times, time.Since(t2))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(times)
	t.Logf("dom0: LookupXen x%d: p50 %v, max %v", len(times), times[len(times)/2].Round(10*time.Microsecond), times[len(times)-1].Round(10*time.Microsecond))

	// The vif is a working one.
	if el, ok := xentest.WaitPing(xentest.NetGuestIP, 60*time.Second); !ok {
		t.Errorf("the guest does not answer ping on %s within %v", nic.Name, el)
	} else {
		t.Logf("dom0: the guest answers ping %v after LookupXen", el.Round(time.Millisecond))
	}

	// A transient domain (virsh create), no vif.
	t3 := time.Now()
	virsh("create", writeXML("tmp", xenDomainXML("tmp", "xenpvh", "")))
	t.Logf("dom0: virsh create tmp: %v", time.Since(t3).Round(time.Millisecond))
	lctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	tmp, err := conn.LookupXen(lctx, "tmp")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	tmpID, err := xen.DomainID(ctx, filepath.Join(xentest.BinDir, "xl"), "tmp")
	if err != nil {
		t.Fatal(err)
	}
	if tmp.Persistent || len(tmp.Interfaces) != 0 || tmp.ID != tmpID || tmp.ID == d.ID || !tmp.PVH {
		t.Fatalf("transient domain: %+v (xl domid %d)", tmp, tmpID)
	}
	virsh("destroy", "tmp")

	lookupErr := func(name string) error {
		t.Helper()
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		d, err := conn.LookupXen(lctx, name)
		if err == nil {
			t.Fatalf("LookupXen(%q) = %+v, want an error", name, d)
		}
		t.Logf("dom0: LookupXen(%q): %v", name, err)
		return err
	}
	// Defined, not running.
	virsh("define", writeXML("idle", xenDomainXML("idle", "xenpvh", "")))
	if err := lookupErr("idle"); !errors.Is(err, libvirt.ErrNotRunning) || !strings.Contains(err.Error(), "shut off") {
		t.Fatalf("defined domain: %v", err)
	}
	// The older PVH form (os type xen, machine xenpvh): what libvirt
	// keeps, what Xen runs, what LookupXen says.
	virsh("define", writeXML("legacy", xenDomainXML("legacy", "xen", "")))
	for _, l := range strings.Split(strings.TrimRight(virsh("dumpxml", "--inactive", "legacy"), "\n"), "\n") {
		t.Logf("dom0: xml legacy (inactive): %s", l)
	}
	virsh("start", "legacy")
	lctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	leg, err := conn.LookupXen(lctx, "legacy")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	xenType := xlType(ctx, t, "legacy")
	t.Logf("dom0: legacy: os type %q machine %q: LookupXen PVH %v, Xen runs it as %q", leg.OSType, leg.Machine, leg.PVH, xenType)
	if leg.PVH != (xenType == "pvh") {
		t.Errorf("legacy form: LookupXen says PVH %v, xl says type %q", leg.PVH, xenType)
	}
	if xt := xlType(ctx, t, "web"); xt != "pvh" {
		t.Errorf("web: xl says type %q", xt)
	}
	virsh("destroy", "legacy")
	// Unknown, and invalid.
	if err := lookupErr("nosuch"); !errors.Is(err, libvirt.ErrNoDomain) || !strings.Contains(err.Error(), `"nosuch"`) {
		t.Fatalf("unknown domain: %v", err)
	}
	if err := lookupErr("../web"); errors.Is(err, libvirt.ErrNoDomain) || !strings.Contains(err.Error(), "not valid") {
		t.Fatalf("invalid name: %v", err)
	}
	// A domain xl created: the libxl driver does not know it.
	xlCfg := filepath.Join(dir, "xlmade.cfg")
	if err := os.WriteFile(xlCfg, []byte(fmt.Sprintf("name = \"xlmade\"\ntype = \"pvh\"\nmemory = 128\nkernel = %q\nramdisk = %q\nextra = \"console=hvc0 rdinit=/init\"\non_reboot = \"destroy\"\n%s\n", xenDomUKernel, xenDomUNetRD, xentest.DomUPin)), 0o644); err != nil {
		t.Fatal(err)
	}
	cctx, cancel = context.WithTimeout(ctx, 90*time.Second)
	out, err := exec.CommandContext(cctx, filepath.Join(xentest.BinDir, "xl"), "create", xlCfg).CombinedOutput()
	cancel()
	if err != nil {
		t.Fatalf("xl create: %v: %s", err, out)
	}
	defer exec.Command(filepath.Join(xentest.BinDir, "xl"), "destroy", "xlmade").Run()
	if err := lookupErr("xlmade"); !errors.Is(err, libvirt.ErrNoDomain) {
		t.Fatalf("domain made by xl: %v", err)
	}

	// A domain that stops is no longer found running.
	virsh("destroy", "web")
	if err := lookupErr("web"); !errors.Is(err, libvirt.ErrNotRunning) {
		t.Fatalf("destroyed domain: %v", err)
	}
	// An expired deadline fails the call, not the connection.
	dctx, cancel := context.WithTimeout(ctx, -time.Second)
	_, err = conn.LookupXen(dctx, "web")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("expired deadline: %v", err)
	}
	if err := lookupErr("web"); !errors.Is(err, libvirt.ErrNotRunning) {
		t.Fatalf("after an expired deadline: %v", err)
	}

	// A standby's lifecycle: started paused (it never runs), resumed
	// through libvirt only if it is still the same domain, destroyed. One
	// running guest at a time on the guests' pCPU: xlmade goes first.
	cctx, cancel = context.WithTimeout(ctx, 30*time.Second)
	out, err = exec.CommandContext(cctx, filepath.Join(xentest.BinDir, "xl"), "destroy", "xlmade").CombinedOutput()
	cancel()
	if err != nil {
		t.Fatalf("xl destroy xlmade: %v: %s", err, out)
	}
	// A definition marked autostart is no standby: libvirtd would start
	// it by itself.
	virsh("autostart", "idle")
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = conn.StartXenPaused(sctx, "idle")
	cancel()
	if err == nil || !strings.Contains(err.Error(), "autostart --disable") {
		t.Fatalf("StartXenPaused of an autostart definition: %v, want a refusal", err)
	}
	if s := strings.TrimSpace(virsh("domstate", "idle")); s != "shut off" {
		t.Fatalf("after a refused StartXenPaused: virsh domstate idle: %q, want shut off", s)
	}
	virsh("autostart", "--disable", "idle")
	sctx, cancel = context.WithTimeout(ctx, 90*time.Second)
	t4 := time.Now()
	idleID, err := conn.StartXenPaused(sctx, "idle")
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dom0: StartXenPaused idle: domid %d in %v", idleID, time.Since(t4).Round(time.Millisecond))
	if xid, err := xen.DomainID(ctx, filepath.Join(xentest.BinDir, "xl"), "idle"); err != nil || xid != idleID {
		t.Fatalf("StartXenPaused: domid %d, xl domid %d (%v)", idleID, xid, err)
	}
	st, err := xen.DomainState(ctx, idleID)
	if err != nil || !st.Paused || !st.NeverRan() {
		t.Fatalf("started paused: %+v (%v), want paused and never run", st, err)
	}
	if s := strings.TrimSpace(virsh("domstate", "idle")); s != "paused" {
		t.Fatalf("virsh domstate idle: %q, want paused", s)
	}
	lctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	if p, err := conn.LookupXen(lctx, "idle"); err != nil || p.ID != idleID {
		t.Fatalf("LookupXen of the paused domain: %+v, %v", p, err)
	}
	cancel()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = conn.ResumeXen(rctx, "idle", idleID+1)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "not resuming") {
		t.Fatalf("ResumeXen of another domid: %v, want a refusal", err)
	}
	if st, err := xen.DomainState(ctx, idleID); err != nil || !st.Paused {
		t.Fatalf("after a refused resume: %+v (%v), want still paused", st, err)
	}
	rctx, cancel = context.WithTimeout(ctx, 30*time.Second)
	err = conn.ResumeXen(rctx, "idle", idleID)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if st, err := xen.DomainState(ctx, idleID); err != nil || st.Paused {
		t.Fatalf("after ResumeXen: %+v (%v), want running", st, err)
	}
	if s := strings.TrimSpace(virsh("domstate", "idle")); s != "running" {
		t.Fatalf("virsh domstate idle after ResumeXen: %q, want running", s)
	}
	dctx, cancel = context.WithTimeout(ctx, 30*time.Second)
	err = conn.DestroyXen(dctx, "idle", idleID)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel = context.WithTimeout(ctx, 30*time.Second)
	err = conn.ResumeXen(rctx, "idle", idleID)
	cancel()
	if !errors.Is(err, libvirt.ErrNotRunning) {
		t.Fatalf("ResumeXen of a destroyed domain: %v, want ErrNotRunning", err)
	}
	sctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	_, err = conn.StartXenPaused(sctx, "nosuch")
	cancel()
	if !errors.Is(err, libvirt.ErrNoDomain) {
		t.Fatalf("StartXenPaused of an unknown name: %v, want ErrNoDomain", err)
	}
}

// xlType returns the domain type libxl created domain name with (`xl
// list -l`: c_info.type, "pvh", "pv", "hvm").
func xlType(ctx context.Context, t *testing.T, name string) string {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, filepath.Join(xentest.BinDir, "xl"), "list", "-l", name).Output()
	if err != nil {
		t.Fatalf("xl list -l %s: %v", name, err)
	}
	var doms []struct {
		Config struct {
			CInfo struct {
				Type string `json:"type"`
			} `json:"c_info"`
		} `json:"config"`
	}
	if err := json.Unmarshal(out, &doms); err != nil || len(doms) != 1 {
		t.Fatalf("xl list -l %s: %v: %.300s", name, err, out)
	}
	return doms[0].Config.CInfo.Type
}
