//go:build xen

package xen

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

// domUNetRD is the network guest's initramfs in dom0.
const domUNetRD = xentest.DomUNetRamdisk

// netEcho is the guest's counting echo service.
var netEcho = xentest.NetGuestIP + ":7"

// TestXenRoundTrip boots Xen under QEMU and runs TestDom0NetRoundTrip in
// dom0: the round trip of a guest with a vif, output held on the
// primary's vif, a TCP connection across the failover. XEN_RT_PLAIN=1 adds
// TestDom0RoundTrip (no vif, more epochs) and XEN_RT_BARE=1
// TestDom0BareActivation (bare-pause checkpoints: what activation does).
func TestXenRoundTrip(t *testing.T) {
	if xentest.InDom0() || testing.Short() {
		t.Skip("host-side driver that boots Xen")
	}
	// The kernel comes with runInDom0's files.
	_, rf, err := xentest.NetDomUFiles(context.Background(), "", t.TempDir())
	if errors.Is(err, vmtest.ErrUnavailable) {
		t.Skipf("needs the Debian cloud kernel for the domU: %v (run xentest/setup.sh)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	tests := []string{"NetRoundTrip"}
	if os.Getenv("XEN_RT_PLAIN") != "" {
		tests = append(tests, "RoundTrip")
	}
	if os.Getenv("XEN_RT_BARE") != "" {
		tests = append(tests, "BareActivation")
	}
	runInDom0(t, "^TestDom0("+strings.Join(tests, "|")+")$", xentest.Config{
		Timeout: time.Duration(240*len(tests)) * time.Second,
		Files:   []vmtest.File{rf},
		Env:     map[string]string{"XEN_RT_EPOCHS": os.Getenv("XEN_RT_EPOCHS")},
	})
}

// TestDom0NetRoundTrip is TestDom0RoundTrip for a guest with a vif on a
// dom0 bridge serving TCP echo: the primary's output is held on its vif
// (plug) until acked; after the failover the activated guest's netfront
// has reconnected to the standby's backend (ping, a new connection), and
// the connection a client opened before the failover carries on.
func TestDom0NetRoundTrip(t *testing.T) {
	inDom0(t)
	// 12 epochs: the TCG triple fault (README) strikes about one cooperative
	// attempt in two at 20; XEN_RT_EPOCHS asks for more.
	roundTripWith(t, rtOptions{name: "net", coop: true, epochs: 12, net: true})
}

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// attachVif finishes what the vif hotplug script does: once the backend
// vif of domid exists (the script put it on the bridge), netback is told
// hotplug is done.
func attachVif(t *testing.T, domid uint32) {
	t.Helper()
	vif := fmt.Sprintf("vif%d.0", domid)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat("/sys/class/net/" + vif); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", vif)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := xsWrite(fmt.Sprintf("/local/domain/0/backend/vif/%d/0/hotplug-status", domid), "connected"); err != nil {
		t.Fatal(err)
	}
}

// checkNetAfterFailover checks the activated guest's network: its netfront
// reconnected to the standby's backend (ping, a new TCP connection), and
// reports what became of the connection opened before the failover (no
// output commit on the vif yet: it may hang).
func checkNetAfterFailover(t *testing.T, echo *xentest.EchoClient, activated time.Time, standbyName string) {
	t.Helper()
	d, ok := xentest.WaitPing(xentest.NetGuestIP, 60*time.Second)
	out, _ := exec.Command(filepath.Join(xentest.BinDir, "xl"), "network-list", standbyName).CombinedOutput()
	if !ok {
		b, _ := readConsole(standbyName)
		t.Fatalf("the activated guest does not answer ping within 60 s; xl network-list:\n%s\nconsole:\n%s", out, tail(b, 30))
	}
	t.Logf("activated guest answers ping %s after activation (waited %s); xl network-list:\n%s", time.Since(activated).Round(time.Millisecond), d.Round(time.Millisecond), out)
	var err error
	for i := 0; i < 5; i++ {
		if err = xentest.EchoOnce(netEcho); err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		t.Fatalf("a new TCP connection to the activated guest fails: %v", err)
	}
	t.Logf("a new TCP connection to the activated guest echoes")
	// The connection opened before the failover carries on: its output
	// was held on the primary's vif until acked, so the standby's state
	// includes everything the client saw.
	before, _, _ := echo.State()
	deadline := time.Now().Add(120 * time.Second)
	for {
		n, last, eerr := echo.State()
		if eerr != nil {
			t.Fatalf("the connection opened before the failover broke: %v (%d exchanges, %d before activation)", eerr, n, before)
		}
		if n >= before+5 {
			t.Logf("the connection opened before the failover carries on: %d exchanges, %d of them after activation; first one %s after activation",
				n, n-before, echo.FirstAfter(activated))
			_ = last
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the connection opened before the failover did not carry on within 120 s: %d exchanges, %d before activation", n, before)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
