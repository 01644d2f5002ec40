package libvirt

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

// readTestdata returns testdata/name.
func readTestdata(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestParseXenLive parses live XML libvirt 9.0's libxl driver gave for a
// running PVH domain with one vif (captured in a xentest dom0 by
// TestDom0LibvirtXen).
func TestParseXenLive(t *testing.T) {
	x := readTestdata(t, "xen-pvh-live.xml")
	d, err := parseXenDomain(x)
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "web" || d.ID != 1 || !d.PVH || d.OSType != "xenpvh" || d.Machine != "xenpvh" || d.MemoryKiB != 131072 || d.VCPUs != 1 ||
		d.Kernel != "/vmtest/domU-vmlinuz" || d.Initrd != "/vmtest/domU-net.cpio" || d.HasDisks() || len(d.UUID) != 36 || d.XML != x {
		t.Fatalf("%+v", d)
	}
	want := XenInterface{Type: "bridge", Name: "vif1.0", MAC: "00:16:3e:52:4d:01", Bridge: "xenbr0", Script: "/tmp/TestDom0LibvirtXen378790966/001/vif-script"}
	if len(d.Interfaces) != 1 || d.Interfaces[0] != want {
		t.Fatalf("interfaces %+v, want %+v", d.Interfaces, want)
	}
}

// TestParseXenLegacy parses what libvirt 9.0 kept for a domain defined
// with the older PVH form (<type machine='xenpvh'>xen</type>): os type
// linux, which libxl ran as a PV domain (TestDom0LibvirtXen checks it with
// xl), so it is not PVH. Inactive XML has no id.
func TestParseXenLegacy(t *testing.T) {
	d, err := parseXenDomain(readTestdata(t, "xen-legacy-inactive.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "legacy" || d.ID != 0 || d.PVH || d.OSType != "linux" || d.Machine != "xenpvh" || len(d.Interfaces) != 0 || d.HasDisks() {
		t.Fatalf("%+v", d)
	}
}

func TestParseXenForms(t *testing.T) {
	x := readTestdata(t, "xen-pvh-live.xml")
	for _, c := range []struct {
		from, to string
		check    func(XenDomain) bool
	}{
		// The older PVH form is PV (see TestParseXenLegacy).
		{">xenpvh</type>", ">xen</type>", func(d XenDomain) bool { return !d.PVH && d.OSType == "xen" }},
		{">xenpvh</type>", ">linux</type>", func(d XenDomain) bool { return !d.PVH && d.OSType == "linux" }},
		// PV and HVM are found, not PVH.
		{"machine='xenpvh'>xenpvh<", "machine='xenpv'>xen<", func(d XenDomain) bool { return !d.PVH && d.Machine == "xenpv" }},
		{"machine='xenpvh'>xenpvh<", "machine='xenfv'>hvm<", func(d XenDomain) bool { return !d.PVH && d.OSType == "hvm" }},
		// Upper-case MAC, a named vif, a disk, units.
		{"00:16:3e:52:4d:01", "00:16:3E:52:4D:01", func(d XenDomain) bool { return d.Interfaces[0].MAC == "00:16:3e:52:4d:01" }},
		{"dev='vif1.0'", "dev='web-eth0'", func(d XenDomain) bool { return d.Interfaces[0].Name == "web-eth0" }},
		{"<devices>", "<devices><disk type='file' device='disk'><source file='/x.img'/><target dev='xvda' bus='xen'/></disk>", func(d XenDomain) bool { return d.HasDisks() && d.Disks[0] == "xvda" }},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='MiB'>256</memory>", func(d XenDomain) bool { return d.MemoryKiB == 256<<10 }},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='GiB'>2</memory>", func(d XenDomain) bool { return d.MemoryKiB == 2<<20 }},
		{"<memory unit='KiB'>131072</memory>", "<memory>1024</memory>", func(d XenDomain) bool { return d.MemoryKiB == 1024 }},
		{"<domain type='xen' id='1'>", "<domain type='xen' id='32751'>", func(d XenDomain) bool { return d.ID == 0x7fef }},
		// An inactive domain's XML has no id: parsed with ID 0 (LookupXen refuses it).
		{"<domain type='xen' id='1'>", "<domain type='xen'>", func(d XenDomain) bool { return d.ID == 0 }},
	} {
		y := strings.Replace(x, c.from, c.to, 1)
		if y == x {
			t.Fatalf("%q not in the sample", c.from)
		}
		d, err := parseXenDomain(y)
		if err != nil {
			t.Errorf("%s -> %s: %v", c.from, c.to, err)
		} else if !c.check(d) {
			t.Errorf("%s -> %s: %+v", c.from, c.to, d)
		}
	}
}

func TestParseXenRefusals(t *testing.T) {
	x := readTestdata(t, "xen-pvh-live.xml")
	for _, c := range []struct{ from, to, want string }{
		{"<domain type='xen' id='1'>", "<domain type='xen' id='0'>", "domain id"},
		{"<domain type='xen' id='1'>", "<domain type='xen' id='32752'>", "domain id"},
		{"<domain type='xen' id='1'>", "<domain type='xen' id='-2'>", "domain id"},
		{"<domain type='xen' id='1'>", "<domain type='xen' id='1x'>", "domain id"},
		{"<domain type='xen' id='1'>", "<domain type='xen' id='4294967297'>", "domain id"},
		{"<domain type='xen' id='1'>", "<domain type='qemu' id='1'>", "domain type"},
		{"dev='vif1.0'", "dev='vif1.0-and-much-longer'", "not a valid interface name"},
		{"dev='vif1.0'", "dev='vif1/0'", "not a valid interface name"},
		{"dev='vif1.0'", "dev='vif 1'", "not a valid interface name"},
		{"<target dev='vif1.0'/>", "", "not a valid interface name"},
		{"00:16:3e:52:4d:01", "00:16:3e:52:4d", "not a MAC address"},
		{"00:16:3e:52:4d:01", "00-16-3e-52-4d-01", "not a MAC address"},
		{"00:16:3e:52:4d:01", "00:16:3e:52:4d:0g", "not a MAC address"},
		{"bridge='xenbr0'", "bridge='br;rm -rf'", "bridge"},
		{"machine='xenpvh'>xenpvh<", "machine='xenpvh'>exe<", "os type"},
		{"<name>web</name>", "<name>-web</name>", "not valid"},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='KiB'>lots</memory>", "memory"},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='parsec'>1</memory>", "memory"},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='GiB'>99999999999999999</memory>", "too large"},
		{"<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>0</vcpu>", "vcpu"},
		{"<uuid>", "<uuid>x", "uuid"},
		{"<devices>", "<devices><disk type='file' device='disk'><source file='/x.img'/></disk>", "disk"},
		{"</domain>", "", "unusable"},
	} {
		y := strings.Replace(x, c.from, c.to, 1)
		if y == x {
			t.Fatalf("%q not in the sample", c.from)
		}
		d, err := parseXenDomain(y)
		if err == nil {
			t.Errorf("%s -> %s: accepted: %+v", c.from, c.to, d)
			continue
		}
		if !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s -> %s: %v, want ErrBadXML and %q", c.from, c.to, err, c.want)
		}
	}
	// Two interfaces with the same dom0 name.
	i := strings.Index(x, "<interface")
	j := strings.Index(x, "</interface>") + len("</interface>")
	two := x[:j] + x[i:j] + x[j:]
	if _, err := parseXenDomain(two); !errors.Is(err, ErrBadXML) || !strings.Contains(err.Error(), "twice") {
		t.Errorf("duplicate vif: %v", err)
	}
}

func TestXenURIs(t *testing.T) {
	for _, c := range []struct{ uri, sock, wantSock, wantURI string }{
		{"", "", DefaultSocket, DefaultXenURI},
		{"xen:///system", "", DefaultSocket, "xen:///system"},
		{"xen+unix:///system?socket=/tmp/x/libvirt-sock", "", "/tmp/x/libvirt-sock", "xen:///system"},
		{"", "/tmp/s", "/tmp/s", DefaultXenURI},
	} {
		s, u, err := Config{URI: c.uri, Socket: c.sock}.resolveFor("xen", DefaultXenURI, "xen:///system", "system")
		if err != nil || s != c.wantSock || u != c.wantURI {
			t.Errorf("%q %q: %q %q %v", c.uri, c.sock, s, u, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, uri := range []string{"qemu:///system", "xen:///session", "xenx:///system", "lxc:///"} {
		if _, err := DialXen(ctx, Config{URI: uri}); err == nil || !strings.Contains(err.Error(), "want xen:///system") {
			t.Errorf("DialXen(%q): %v", uri, err)
		}
	}
	if _, err := DialXen(ctx, Config{Socket: "/nonexistent/libvirt-sock"}); err == nil || !strings.Contains(err.Error(), "/nonexistent/libvirt-sock") {
		t.Errorf("DialXen of a missing socket: %v", err)
	}
}

// TestLookupXenBeforeCalling: an invalid name and an expired deadline
// are refused before libvirtd is asked (the Conn has no connection).
func TestLookupXenBeforeCalling(t *testing.T) {
	c := &Conn{socket: "/nonexistent", uri: DefaultXenURI}
	ctx := context.Background()
	for _, name := range []string{"", "../web", "-web", strings.Repeat("a", 65), "web dev"} {
		if _, err := c.LookupXen(ctx, name); err == nil || !strings.Contains(err.Error(), "not valid") {
			t.Errorf("LookupXen(%q): %v", name, err)
		}
	}
	dctx, cancel := context.WithTimeout(ctx, -time.Second)
	defer cancel()
	if _, err := c.LookupXen(dctx, "web"); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "DomainLookupByName") {
		t.Errorf("expired deadline: %v", err)
	}
}
