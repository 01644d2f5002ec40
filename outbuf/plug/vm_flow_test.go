package plug

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// noGuestIPv6Chatter disables IPv6 on the guest's veth end, so that nothing
// but the test's own packets (no DAD, router solicitations or MLD reports,
// which the kernel sends on its own timers) enters the plug. The
// topology's static neighbours already keep ARP out of it.
func noGuestIPv6Chatter(t *testing.T, tp *topo) {
	t.Helper()
	if err := inNS(tp.guest, func() error {
		// /proc/sys/net is resolved in the opening thread's namespace.
		return os.WriteFile("/proc/sys/net/ipv6/conf/vg0/disable_ipv6", []byte("1"), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
}

// TestVMPlugTCPFlow sends a TCP stream guest -> client through the plug
// while a goroutine checkpoints every 25 ms and releases each epoch after a
// short "ack" delay (sch_plug keeps one closed epoch, so each epoch is
// released before the next checkpoint). The client must receive every
// byte, in order (length and SHA-256 of the stream), the plug must have
// carried it (released bytes) and dropped nothing.
//
// "direct": the sender's socket is in the guest namespace itself. Its
// skbs stay charged to it while the plug holds them (mirred redirects the
// original skb; ip_rcv orphans it only after release), so TCP small
// queues caps it at ~2 skbs below the socket, i.e. a few packets per
// epoch: the throughput is the TSQ limit, not the plug's.
// "routed": the sender sits one hop behind the guest namespace, which
// forwards (and so orphans) its packets, as a VM's NIC takes them off its
// TCP stack; this is closer to a real guest.
func TestVMPlugTCPFlow(t *testing.T) {
	needVM(t)
	for _, routed := range []bool{false, true} {
		name := map[bool]string{false: "direct", true: "routed"}[routed]
		t.Run(name, func(t *testing.T) {
			tp := setupTopo(t)
			// Sizes keep each under ~5 s on TCG.
			src, size := tp.guest, 1<<20
			if routed {
				src, size = routeBehindGuest(t, tp), 8<<20
			}
			tcpFlow(t, tp, src, size)
		})
	}
}

const app4, guestApp4 = "203.0.113.2", "203.0.113.1"

// routeBehindGuest adds an "app" namespace behind the guest namespace
// (app va0 --veth--> vga0 guest, which forwards) and returns it; addresses
// 203.0.113.0/24, static neighbours as in setupTopo.
func routeBehindGuest(t *testing.T, tp *topo) netns.NsHandle {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	app, err := newNS()
	must(err)
	t.Cleanup(func() { app.Close() })
	must(inNS(tp.guest, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	}))
	gh, err := netlink.NewHandleAt(tp.guest, unix.NETLINK_ROUTE)
	must(err)
	defer gh.Close()
	ah, err := netlink.NewHandleAt(app, unix.NETLINK_ROUTE)
	must(err)
	defer ah.Close()
	root, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	must(err)
	defer root.Close()

	must(gh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vga0"}, PeerName: "va0"}))
	va, err := gh.LinkByName("va0")
	must(err)
	must(gh.LinkSetNsFd(va, int(app)))
	vga, err := gh.LinkByName("vga0")
	must(err)
	must(addr(gh, vga, guestApp4+"/24"))
	must(gh.LinkSetUp(vga))
	va, err = ah.LinkByName("va0")
	must(err)
	must(addr(ah, va, app4+"/24"))
	must(ah.LinkSetUp(va))
	lo, err := ah.LinkByName("lo")
	must(err)
	must(ah.LinkSetUp(lo))
	must(ah.RouteAdd(&netlink.Route{LinkIndex: va.Attrs().Index, Gw: net.ParseIP(guestApp4)}))
	must(ah.NeighSet(&netlink.Neigh{LinkIndex: va.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP(guestApp4), HardwareAddr: vga.Attrs().HardwareAddr}))
	must(gh.NeighSet(&netlink.Neigh{LinkIndex: vga.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP(app4), HardwareAddr: va.Attrs().HardwareAddr}))
	// The router: 203.0.113.0/24 via the guest, whose MAC it knows
	// statically (an ARP reply would wait in the plug).
	vg, err := gh.LinkByName("vg0")
	must(err)
	vh, err := root.LinkByName(tp.vh)
	must(err)
	must(root.NeighSet(&netlink.Neigh{LinkIndex: vh.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP(guest4), HardwareAddr: vg.Attrs().HardwareAddr}))
	_, dst, _ := net.ParseCIDR("203.0.113.0/24")
	must(root.RouteAdd(&netlink.Route{LinkIndex: vh.Attrs().Index, Dst: dst, Gw: net.ParseIP(guest4)}))
	return app
}

// tcpFlow sends size bytes over TCP from a socket in src to the client
// through a plug on tp.vh driven by a 25 ms epoch loop, and checks them.
func tcpFlow(t *testing.T, tp *topo, src netns.NsHandle, size int) {
	t.Helper()
	const (
		interval = 25 * time.Millisecond
		ackDelay = 2 * time.Millisecond // the backup acknowledging the epoch
		flowTime = 30 * time.Second     // bound on the whole transfer
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	buf, err := New(ctx, Config{Interface: tp.vh}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()

	var ln *net.TCPListener
	if err := inNS(tp.client, func() error {
		l, err := net.Listen("tcp4", net.JoinHostPort(client4, "7010"))
		if err == nil {
			ln = l.(*net.TCPListener)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	deadline := time.Now().Add(flowTime)
	_ = ln.SetDeadline(deadline)

	payload := make([]byte, size)
	_, _ = rand.NewChaCha8([32]byte{'r', 'e', 'm', 'u', 's'}).Read(payload)
	want := sha256.Sum256(payload)

	type result struct {
		n   int64
		sum []byte
		err error
	}
	recv := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recv <- result{err: fmt.Errorf("accept: %w", err)}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(deadline)
		h := sha256.New()
		n, err := io.Copy(h, c)
		recv <- result{n: n, sum: h.Sum(nil), err: err}
	}()

	// The epoch loop: Checkpoint(e), the ack's delay, Release(e); every
	// 25 ms. It runs before the dial: the SYN itself is held by the plug.
	stop := make(chan struct{})
	var (
		wg      sync.WaitGroup
		epochs  uint64 // written by the loop, read after wg.Wait
		loopErr error
	)
	wg.Add(2)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for e := uint64(1); ; e++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if err := buf.Checkpoint(e); err != nil {
				loopErr = fmt.Errorf("checkpoint %d: %w", e, err)
				return
			}
			time.Sleep(ackDelay)
			if err := buf.Release(e); err != nil {
				loopErr = fmt.Errorf("release %d: %w", e, err)
				return
			}
			epochs = e
		}
	}()
	go func() { // a concurrent reader of the counters
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				_ = buf.Stats()
			}
		}
	}()
	stopLoop := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoop()

	start := time.Now()
	var c *net.TCPConn
	if err := inNS(src, func() error {
		d := net.Dialer{Deadline: deadline}
		conn, err := d.Dial("tcp4", net.JoinHostPort(client4, "7010"))
		if err == nil {
			c = conn.(*net.TCPConn)
		}
		return err
	}); err != nil {
		t.Fatalf("dial through the plug: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-recv:
	case <-time.After(time.Until(deadline) + 5*time.Second):
		t.Fatal("client did not finish")
	}
	el := time.Since(start)
	stopLoop()
	if loopErr != nil {
		t.Fatalf("epoch loop: %v", loopErr)
	}
	if r.err != nil {
		t.Fatalf("client after %d bytes: %v", r.n, r.err)
	}
	if r.n != int64(size) || !bytes.Equal(r.sum, want[:]) {
		t.Fatalf("client got %d bytes sha256 %x, want %d bytes %x", r.n, r.sum, size, want)
	}
	var cwnd uint32
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				cwnd = ti.Snd_cwnd
			}
		})
	}
	st := buf.Stats()
	t.Logf("TCP through plug: %d MiB in %v = %.1f Mbit/s over %d epochs (%v, ack %v), %.1f packets/epoch, sender cwnd %d; stats %+v",
		size>>20, el.Round(time.Millisecond), float64(size)*8/el.Seconds()/1e6, epochs, interval, ackDelay,
		float64(st.ReleasedPackets)/float64(max(epochs, 1)), cwnd, st)
	if st.DroppedPackets != 0 {
		t.Errorf("plug dropped %d packets", st.DroppedPackets)
	}
	if st.ReleasedBytes < uint64(size) {
		t.Errorf("plug released %d bytes < %d sent: the flow bypassed it", st.ReleasedBytes, size)
	}
	if st.LastReleased != epochs || epochs == 0 {
		t.Errorf("LastReleased %d, loop released up to %d", st.LastReleased, epochs)
	}
}

// TestVMPlugLimitDrops fills a plug with a small byte limit while it holds:
// what does not fit is dropped (counted in Stats) and never released, and
// Release lets out exactly the prefix that fit, in order.
func TestVMPlugLimitDrops(t *testing.T) {
	needVM(t)
	tp := setupTopo(t)
	noGuestIPv6Chatter(t, tp)
	f := newFlow(t, tp, "udp4", client4, 7011)
	const (
		limit = 4096 // bytes: ~38 datagrams of 64 bytes (106-byte frames)
		n     = 200
		quiet = 300 * time.Millisecond
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	buf, err := New(ctx, Config{Interface: tp.vh, LimitBytes: limit}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	if st := buf.Stats(); st.HeldPackets != 0 || st.DroppedPackets != 0 {
		t.Fatalf("fresh plug not empty: %+v", st)
	}

	first, last := f.sendN(t, n)
	f.expectNothing(t, "over the limit, plug closed", quiet)
	held := buf.Stats()
	t.Logf("sent %d datagrams into a %d-byte plug: %+v", n, limit, held)
	k := held.HeldPackets
	switch {
	case k == 0 || k >= n:
		t.Fatalf("plug holds %d of %d packets; want some, not all: %+v", k, n, held)
	case held.HeldPackets+held.DroppedPackets != n:
		t.Fatalf("held %d + dropped %d != %d sent: %+v", held.HeldPackets, held.DroppedPackets, n, held)
	case held.HeldBytes > limit:
		t.Fatalf("plug holds %d bytes > limit %d", held.HeldBytes, limit)
	case held.HeldBytes+held.HeldBytes/k <= limit:
		// Equal-sized packets: one more would have fitted, so the drops
		// were not the limit's doing.
		t.Fatalf("plug holds %d bytes in %d packets and dropped the next; limit %d", held.HeldBytes, k, limit)
	}

	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	if err := buf.Release(1); err != nil {
		t.Fatal(err)
	}
	// Exactly the prefix that fitted, in order, and nothing after it.
	f.expect(t, "after Release(1)", first, first+uint32(k)-1, 3*time.Second, quiet)
	after := buf.Stats()
	if after.HeldPackets != 0 || after.DroppedPackets != held.DroppedPackets || after.ReleasedPackets != k {
		t.Fatalf("stats after release %+v, before %+v", after, held)
	}

	// The dropped packets are gone for good: another epoch releases only
	// its own output, numbered after the last one sent.
	a, b := f.sendN(t, 5)
	if a != last+1 {
		t.Fatalf("sequence %d after %d", a, last)
	}
	if err := buf.Checkpoint(2); err != nil {
		t.Fatal(err)
	}
	if err := buf.Release(2); err != nil {
		t.Fatal(err)
	}
	f.expect(t, "after Release(2)", a, b, 3*time.Second, quiet)
	if st := buf.Stats(); st.DroppedPackets != held.DroppedPackets || st.ReleasedPackets != k+5 {
		t.Fatalf("stats after second epoch %+v", st)
	}
	if err := buf.Close(); err != nil {
		t.Fatal(err)
	}
}
