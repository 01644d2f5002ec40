package plug

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/vmtest"
)

// inVMTests are the tests TestPlugInVM runs in the VM; each must pass there.
var inVMTests = []string{"TestVMPlugEpochs", "TestVMPlugCloseRestores", "TestVMPlugTCPFlow", "TestVMPlugLimitDrops", "TestVMPlugDetachReopen", "TestVMPlugTakeOverRefusesForeign"}

// TestPlugInVM (host side) builds this package's tests statically, boots
// the Debian cloud kernel under QEMU/TCG with sch_plug and friends, runs
// the TestVM* tests there and asserts they passed.
func TestPlugInVM(t *testing.T) {
	if vmtest.InVM() {
		t.Skip("already inside the VM")
	}
	if testing.Short() {
		t.Skip("boots a VM")
	}
	ctx := context.Background()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	res, err := vmtest.RunGoTest(ctx, wd, "^("+strings.Join(inVMTests, "|")+")$", vmtest.Config{
		Modules:      vmtest.NetModules,
		ModuleParams: map[string]string{"ifb": "numifbs=0"},
		Timeout:      150 * time.Second,
	})
	if errors.Is(err, vmtest.ErrUnavailable) {
		t.Skipf("needs sch_plug: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VM verdict %q in %s", res.Verdict, res.Elapsed)
	if testing.Verbose() {
		t.Logf("console:\n%s", res.Console)
	}
	if !res.Passed {
		t.Fatalf("in-VM tests failed (%s); console:\n%s", res.Verdict, res.Console)
	}
	// Guard against a vacuous PASS (no test ran, or all skipped).
	for _, name := range append(inVMTests, "TestVMPlugTCPFlow/direct", "TestVMPlugTCPFlow/routed") {
		if !strings.Contains(res.Console, "--- PASS: "+name) {
			t.Fatalf("%s did not pass in the VM; console:\n%s", name, res.Console)
		}
	}
}

func needVM(t *testing.T) {
	t.Helper()
	if !vmtest.InVM() {
		t.Skip("needs sch_plug: run through vmtest (TestPlugInVM)")
	}
}

// topo is: guest netns --veth (vg|vh)--> root ns (router) --veth (vc|vcc)--> client netns.
// vh is the "guest interface" the plug is put on.
type topo struct {
	guest, client netns.NsHandle
	vh            string
}

const (
	guest4, host4, client4, hostc4 = "192.0.2.2", "192.0.2.1", "198.51.100.2", "198.51.100.1"
	guest6, host6, client6, hostc6 = "2001:db8:1::2", "2001:db8:1::1", "2001:db8:2::2", "2001:db8:2::1"
)

// inNS runs f on a thread switched into ns.
func inNS(ns netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is not unlocked: it dies with the goroutine, so it never
		// returns to the pool in the wrong namespace.
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// newNS creates a network namespace on a throw-away thread.
func newNS() (netns.NsHandle, error) {
	type res struct {
		h   netns.NsHandle
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies in the new ns
		h, err := netns.New()
		c <- res{h, err}
	}()
	r := <-c
	return r.h, r.err
}

func addr(h *netlink.Handle, l netlink.Link, cidr string) error {
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	a.Flags = unix.IFA_F_NODAD
	return h.AddrAdd(l, a)
}

func setupTopo(t *testing.T) *topo {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		must(os.WriteFile(p, []byte("1"), 0o644))
	}
	g, err := newNS()
	must(err)
	c, err := newNS()
	must(err)
	tp := &topo{guest: g, client: c, vh: "vh0"}
	root, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	must(err)
	defer root.Close()
	must(root.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vh0"}, PeerName: "vg0"}))
	must(root.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vcc0"}, PeerName: "vc0"}))
	vg, err := root.LinkByName("vg0")
	must(err)
	vc, err := root.LinkByName("vc0")
	must(err)
	must(root.LinkSetNsFd(vg, int(g)))
	must(root.LinkSetNsFd(vc, int(c)))
	vh, err := root.LinkByName("vh0")
	must(err)
	vcc, err := root.LinkByName("vcc0")
	must(err)
	must(addr(root, vh, host4+"/24"))
	must(addr(root, vh, host6+"/64"))
	must(addr(root, vcc, hostc4+"/24"))
	must(addr(root, vcc, hostc6+"/64"))
	must(root.LinkSetUp(vh))
	must(root.LinkSetUp(vcc))

	// One side's view: address, up, default route, and static neighbours so
	// that no ARP/ND resolution (which the plug would hold) delays packets.
	side := func(ns netns.NsHandle, ifname, a4, a6, gw4, gw6 string, gwMAC net.HardwareAddr) {
		h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		must(err)
		defer h.Close()
		l, err := h.LinkByName(ifname)
		must(err)
		must(addr(h, l, a4))
		must(addr(h, l, a6))
		must(h.LinkSetUp(l))
		lo, err := h.LinkByName("lo")
		must(err)
		must(h.LinkSetUp(lo))
		for _, gw := range []string{gw4, gw6} {
			ip := net.ParseIP(gw)
			must(h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: ip}))
			fam := netlink.FAMILY_V4
			if ip.To4() == nil {
				fam = netlink.FAMILY_V6
			}
			must(h.NeighSet(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: fam, State: netlink.NUD_PERMANENT, IP: ip, HardwareAddr: gwMAC}))
		}
	}
	side(g, "vg0", guest4+"/24", guest6+"/64", host4, host6, vh.Attrs().HardwareAddr)
	side(c, "vc0", client4+"/24", client6+"/64", hostc4, hostc6, vcc.Attrs().HardwareAddr)
	// The router's neighbour entry for the client, for the same reason.
	var vcMAC net.HardwareAddr
	must(inNS(c, func() error {
		l, err := net.InterfaceByName("vc0")
		if err == nil {
			vcMAC = l.HardwareAddr
		}
		return err
	}))
	for _, ip := range []string{client4, client6} {
		p := net.ParseIP(ip)
		fam := netlink.FAMILY_V4
		if p.To4() == nil {
			fam = netlink.FAMILY_V6
		}
		must(root.NeighSet(&netlink.Neigh{LinkIndex: vcc.Attrs().Index, Family: fam, State: netlink.NUD_PERMANENT, IP: p, HardwareAddr: vcMAC}))
	}
	t.Cleanup(func() {
		if h, err := netlink.NewHandle(unix.NETLINK_ROUTE); err == nil {
			for _, n := range []string{"vh0", "vcc0"} {
				if l, err := h.LinkByName(n); err == nil {
					_ = h.LinkDel(l)
				}
			}
			h.Close()
		}
		g.Close()
		c.Close()
	})
	return tp
}

// flow is one UDP flow guest -> client for one address family.
type flow struct {
	name string
	send *net.UDPConn // in the guest ns
	recv *net.UDPConn // in the client ns
	seq  uint32
}

func newFlow(t *testing.T, tp *topo, network, clientIP string, port int) *flow {
	t.Helper()
	f := &flow{name: network}
	if err := inNS(tp.client, func() error {
		var err error
		f.recv, err = net.ListenUDP(network, &net.UDPAddr{IP: net.ParseIP(clientIP), Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := inNS(tp.guest, func() error {
		var err error
		f.send, err = net.DialUDP(network, nil, &net.UDPAddr{IP: net.ParseIP(clientIP), Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.send.Close(); f.recv.Close() })
	return f
}

// sendN sends n datagrams carrying the next sequence numbers; it returns
// the first and last numbers sent.
func (f *flow) sendN(t *testing.T, n int) (first, last uint32) {
	t.Helper()
	first = f.seq + 1
	for i := 0; i < n; i++ {
		f.seq++
		b := make([]byte, 64)
		binary.BigEndian.PutUint32(b, f.seq)
		if _, err := f.send.Write(b); err != nil {
			t.Fatalf("%s send %d: %v", f.name, f.seq, err)
		}
	}
	return first, f.seq
}

// recvFor collects sequence numbers arriving within d.
func (f *flow) recvFor(d time.Duration) []uint32 {
	var got []uint32
	deadline := time.Now().Add(d)
	b := make([]byte, 128)
	for {
		_ = f.recv.SetReadDeadline(deadline)
		n, err := f.recv.Read(b)
		if err != nil {
			return got
		}
		if n >= 4 {
			got = append(got, binary.BigEndian.Uint32(b))
		}
	}
}

// expect waits up to d for exactly first..last, in order, and then checks
// that nothing else arrives for quiet.
func (f *flow) expect(t *testing.T, what string, first, last uint32, d, quiet time.Duration) {
	t.Helper()
	var got []uint32
	want := int(last - first + 1)
	deadline := time.Now().Add(d)
	for len(got) < want && time.Now().Before(deadline) {
		got = append(got, f.recvFor(50*time.Millisecond)...)
	}
	got = append(got, f.recvFor(quiet)...)
	ok := len(got) == want
	for i := 0; ok && i < want; i++ {
		ok = got[i] == first+uint32(i)
	}
	if !ok {
		t.Fatalf("%s (%s): got %v, want %d..%d in order", what, f.name, got, first, last)
	}
}

func (f *flow) expectNothing(t *testing.T, what string, d time.Duration) {
	t.Helper()
	if got := f.recvFor(d); len(got) > 0 {
		t.Fatalf("%s (%s): leaked %v before release", what, f.name, got)
	}
}

// TestVMPlugEpochs checks the plug's epoch semantics on real traffic.
func TestVMPlugEpochs(t *testing.T) {
	needVM(t)
	tp := setupTopo(t)
	flows := []*flow{
		newFlow(t, tp, "udp4", client4, 7001),
		newFlow(t, tp, "udp6", client6, 7002),
	}
	// Unbuffered path works before the plug exists.
	for _, f := range flows {
		a, b := f.sendN(t, 3)
		f.expect(t, "without plug", a, b, 2*time.Second, 0)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	buf, err := New(ctx, Config{Interface: tp.vh, LimitBytes: 1 << 20}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	if buf.Kind() != "plug" {
		t.Fatalf("Kind = %q", buf.Kind())
	}

	const quiet = 300 * time.Millisecond
	// Epoch 1: held until released.
	var e1 [2][2]uint32
	for i, f := range flows {
		e1[i][0], e1[i][1] = f.sendN(t, 20)
	}
	for _, f := range flows {
		f.expectNothing(t, "epoch 1 open", quiet)
	}
	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	// Epoch 2 output while epoch 1 awaits its ack.
	var e2 [2][2]uint32
	for i, f := range flows {
		e2[i][0], e2[i][1] = f.sendN(t, 15)
	}
	for _, f := range flows {
		f.expectNothing(t, "epoch 1 checkpointed, not released", quiet)
	}
	if st := buf.Stats(); st.HeldPackets < 70 {
		t.Errorf("stats while holding: %+v (want >= 70 held)", st)
	}
	// A second checkpoint before the release places no boundary: epoch 2
	// joins the open part of the queue (a second BUFFER would let part of
	// it out with epoch 1).
	if err := buf.Checkpoint(2); err != nil {
		t.Fatalf("Checkpoint(2) with epoch 1 pending: %v", err)
	}
	var e2b [2][2]uint32 // output after the merged checkpoint 2: epoch 3
	for i, f := range flows {
		e2b[i][0], e2b[i][1] = f.sendN(t, 5)
	}
	// Release(0) touches nothing.
	if err := buf.Release(0); err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		f.expectNothing(t, "after Release(0)", quiet)
	}
	// Release(1): exactly epoch 1, in order; epoch 2 stays held.
	if err := buf.Release(1); err != nil {
		t.Fatal(err)
	}
	for i, f := range flows {
		f.expect(t, "after Release(1)", e1[i][0], e1[i][1], 3*time.Second, quiet)
	}
	// Release(2): epoch 2 has no boundary of its own, so it stays held
	// (late, never early) until a later boundary is released.
	if err := buf.Release(2); err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		f.expectNothing(t, "merged epoch 2 after Release(2)", quiet)
	}
	if err := buf.Checkpoint(2); err == nil {
		t.Fatal("re-checkpointing epoch 2 succeeded")
	}
	if err := buf.Checkpoint(3); err != nil {
		t.Fatal(err)
	}
	var e4 [2][2]uint32
	for i, f := range flows {
		e4[i][0], e4[i][1] = f.sendN(t, 10)
	}
	if err := buf.Release(3); err != nil {
		t.Fatal(err)
	}
	for i, f := range flows {
		f.expect(t, "after Release(3)", e2[i][0], e2b[i][1], 3*time.Second, quiet)
	}
	// Epoch 4 is open (not checkpointed): Release(4) must not touch it.
	if err := buf.Release(4); err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		f.expectNothing(t, "open epoch 4 after Release(4)", quiet)
	}
	if st := buf.Stats(); st.LastReleased != 3 || st.ReleasedPackets < 70 {
		t.Errorf("stats after two releases: %+v", st)
	}
	// ReleaseAll: the open epoch goes out, and later output passes.
	if err := buf.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	for i, f := range flows {
		f.expect(t, "after ReleaseAll", e4[i][0], e4[i][1], 3*time.Second, 0)
	}
	for _, f := range flows {
		a, b := f.sendN(t, 5)
		f.expect(t, "pass-through after ReleaseAll", a, b, 3*time.Second, 0)
	}
	// Hold: output is held again until an epoch after it is released.
	if err := buf.Hold(); err != nil {
		t.Fatal(err)
	}
	var e5 [2][2]uint32
	for i, f := range flows {
		e5[i][0], e5[i][1] = f.sendN(t, 7)
	}
	for _, f := range flows {
		f.expectNothing(t, "after Hold", quiet)
	}
	if err := buf.Checkpoint(5); err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		f.expectNothing(t, "after Hold, epoch 5 checkpointed", quiet)
	}
	if err := buf.Release(5); err != nil {
		t.Fatal(err)
	}
	for i, f := range flows {
		f.expect(t, "after Hold and Release(5)", e5[i][0], e5[i][1], 3*time.Second, quiet)
	}
	if err := buf.Close(); err != nil {
		t.Fatal(err)
	}
	if err := buf.Checkpoint(10); !errors.Is(err, outbuf.ErrClosed) {
		t.Fatalf("Checkpoint after Close: %v", err)
	}
}

// tcState describes the qdiscs of a link and whether an IFB exists.
func tcState(t *testing.T, iface, ifb string) string {
	t.Helper()
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(iface)
	if err != nil {
		t.Fatal(err)
	}
	qs, err := h.QdiscList(l)
	if err != nil {
		t.Fatal(err)
	}
	var parts []string
	for _, q := range qs {
		parts = append(parts, fmt.Sprintf("%s@%x/%x", q.Type(), q.Attrs().Handle, q.Attrs().Parent))
	}
	fs, err := h.FilterList(l, netlink.HANDLE_INGRESS)
	if err == nil {
		parts = append(parts, fmt.Sprintf("ingress-filters=%d", len(fs)))
	}
	if _, err := h.LinkByName(ifb); err == nil {
		parts = append(parts, "ifb="+ifb)
	}
	parts = append(parts, fmt.Sprintf("flags=%v", l.Attrs().Flags))
	return strings.Join(parts, " ")
}

// TestVMPlugCloseRestores checks Close drops held output and leaves the
// interface as it found it, and that New refuses an interface in use.
func TestVMPlugCloseRestores(t *testing.T) {
	needVM(t)
	tp := setupTopo(t)
	f := newFlow(t, tp, "udp4", client4, 7003)
	ifb := IFBName(tp.vh)
	before := tcState(t, tp.vh, ifb)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	buf, err := New(ctx, Config{Interface: tp.vh}, nil)
	if err != nil {
		t.Fatal(err)
	}
	during := tcState(t, tp.vh, ifb)
	if !strings.Contains(during, "ingress") || !strings.Contains(during, "ifb="+ifb) || !strings.Contains(during, "ingress-filters=1") {
		t.Fatalf("topology not built: %s", during)
	}
	// A second buffer on the same interface is refused, and leaves it be.
	if _, err := New(ctx, Config{Interface: tp.vh, IFB: "ifb-other"}, nil); !errors.Is(err, ErrBusy) {
		t.Fatalf("second New: err = %v, want ErrBusy", err)
	}
	if now := tcState(t, tp.vh, ifb); now != during {
		t.Fatalf("refused New changed state: %s -> %s", during, now)
	}
	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	f.sendN(t, 10)
	if err := buf.Close(); err != nil {
		t.Fatal(err)
	}
	// Held output was dropped, not released.
	f.expectNothing(t, "after Close with output held", 500*time.Millisecond)
	if after := tcState(t, tp.vh, ifb); after != before {
		t.Fatalf("Close did not restore the interface:\nbefore %s\nafter  %s", before, after)
	}
	// Unbuffered again.
	a, b := f.sendN(t, 3)
	f.expect(t, "after Close", a, b, 2*time.Second, 0)
	if err := buf.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
