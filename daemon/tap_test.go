package daemon

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/remusd/remusd/netlab"
)

// TestSetupTapKeepsBridgeAddress: a tap joining and leaving a bridge must
// not move the host's own address on that bridge. A bridge takes the
// lowest address of its ports unless its own was set; a standby's tap
// with a lower random address used to take the host's address with it
// when the standby went, and peers could not reach the host until their
// ARP entries expired (34-56 s of failed reconnects after an unprotect).
func TestSetupTapKeepsBridgeAddress(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, taps)")
	}
	if err := netlab.Check(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	lab, err := netlab.New("dt")
	if err != nil {
		t.Fatal(err)
	}
	defer lab.Close()
	ns, err := lab.AddNetns(ctx, "h")
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		// The bridge's own address is not set: it follows its ports, like
		// most hosts' bridges. Its uplink (a veth) gives it aa:…
		{"link", "add", "br0", "type", "bridge"},
		{"link", "add", "up0", "address", "aa:00:00:00:00:01", "type", "veth", "peer", "name", "up1"},
		{"link", "set", "up0", "master", "br0"},
		{"link", "set", "up0", "up"},
		{"link", "set", "br0", "up"},
		{"tuntap", "add", "tap0", "mode", "tap"},
		// Lower than the bridge's: without care the bridge would take it.
		{"link", "set", "tap0", "address", "02:00:00:00:00:07"},
	} {
		if err := netlab.IP(ctx, ns, args...); err != nil {
			t.Fatal(err)
		}
	}
	addr := func(name string) string {
		var mac net.HardwareAddr
		if err := netlab.Do(ns, func() error {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			mac = l.Attrs().HardwareAddr
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return mac.String()
	}
	brBefore := addr("br0")
	if brBefore != "aa:00:00:00:00:01" {
		t.Fatalf("the bridge did not take its port's address (%s): the test cannot tell a moved address", brBefore)
	}
	if err := netlab.Do(ns, func() error { return setupTap(ctx, "tap0", "br0") }); err != nil {
		t.Fatal(err)
	}
	if got := addr("tap0"); !strings.HasPrefix(got, "fe:") {
		t.Fatalf("tap address %s: not FE-prefixed", got)
	}
	if got := addr("br0"); got != brBefore {
		t.Fatalf("bridge address moved from %s to %s when the tap joined", brBefore, got)
	}
	if err := netlab.IP(ctx, ns, "link", "del", "tap0"); err != nil {
		t.Fatal(err)
	}
	if got := addr("br0"); got != brBefore {
		t.Fatalf("bridge address moved from %s to %s when the tap left", brBefore, got)
	}
}
