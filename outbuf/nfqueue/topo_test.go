package nfqueue

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// topo is the test topology, three network namespaces:
//
//	guest ns                 host ns                          client ns
//	eth0 10.77.0.1 ──veth── gp ─┐                 ┌─ cp ──veth── eth0 10.77.0.2
//	     fd77::1                └── br0 (bridge) ─┘                    fd77::2
//
// The guest's port gp is a bridge port, like a QEMU tap or a Xen vif; the
// buffer matches "-m physdev --physdev-in gp" in the host's FORWARD and
// INPUT chains (br_netfilter, bridge-nf-call-ip{,6}tables=1). Neighbours are static on
// both ends and the guest's ICMPv6 and IGMP are dropped in the guest, so
// the only packets queued are the test's.
//
// newRoutedTopo builds the routed variant: the host routes between the
// guest's veth gp (10.78.1.0/24, fd78:1::/64) and the client's
// (10.78.2.0/24, fd78:2::/64); the buffer matches "-i gp".
//
// hostLocal adds a client that is the host namespace itself (bridged:
// 10.77.0.254, fd77::fe on br0; routed: the port's own 10.78.1.254,
// fd78:1::fe): packets the guest sends to it cross the host's INPUT chain
// instead of FORWARD.
type topo struct {
	guest, host, client string // netns names
	port                string // guest's port in the host ns
	bridged             bool
	guestIPv4           string
	clientV4, clientV6  string
	hostV4, hostV6      string // the host's own addresses the guest reaches directly ("" until hostLocal for a bridged topo)
}

const (
	guestV4  = "10.77.0.1"
	clientV4 = "10.77.0.2"
	guestV6  = "fd77::1"
	clientV6 = "fd77::2"
	guestMAC = "02:77:00:00:00:01"
	clntMAC  = "02:77:00:00:00:02"
	// br0's own addresses (hostLocal).
	bridgeV4  = "10.77.0.254"
	bridgeV6  = "fd77::fe"
	bridgeMAC = "02:77:00:00:00:fe"
)

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: creates network namespaces and iptables rules")
	}
	for _, bin := range []string{"ip", "iptables", "ip6tables"} {
		if _, err := exec.LookPath(bin); err != nil {
			tb.Skipf("needs %s (Debian packages iproute2, iptables): %v", bin, err)
		}
	}
}

func run(tb testing.TB, args ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func newTopo(tb testing.TB) *topo {
	tb.Helper()
	requireRoot(tb)
	var rb [3]byte
	_, _ = rand.Read(rb[:])
	id := hex.EncodeToString(rb[:])
	t := &topo{guest: "rqg-" + id, host: "rqh-" + id, client: "rqc-" + id, port: "gp" + id,
		bridged: true, guestIPv4: guestV4, clientV4: clientV4, clientV6: clientV6}
	t.addNamespaces(tb)
	h := []string{"ip", "-n", t.host}
	run(tb, append(h, "link", "add", t.port, "type", "veth", "peer", "name", "eth0", "netns", t.guest)...)
	run(tb, append(h, "link", "add", "cp", "type", "veth", "peer", "name", "eth0", "netns", t.client)...)
	run(tb, append(h, "link", "add", "br0", "type", "bridge")...)
	run(tb, append(h, "link", "set", t.port, "master", "br0", "up")...)
	run(tb, append(h, "link", "set", "cp", "master", "br0", "up")...)
	run(tb, append(h, "link", "set", "br0", "up")...)
	run(tb, "ip", "netns", "exec", t.host, "sh", "-c",
		"echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables && echo 1 > /proc/sys/net/bridge/bridge-nf-call-ip6tables")
	for _, e := range []struct{ ns, mac, v4, v6, pv4, pv6, pmac string }{
		{t.guest, guestMAC, guestV4, guestV6, clientV4, clientV6, clntMAC},
		{t.client, clntMAC, clientV4, clientV6, guestV4, guestV6, guestMAC},
	} {
		n := []string{"ip", "-n", e.ns}
		run(tb, append(n, "link", "set", "eth0", "address", e.mac)...)
		run(tb, append(n, "addr", "add", e.v4+"/24", "dev", "eth0")...)
		run(tb, append(n, "addr", "add", e.v6+"/64", "dev", "eth0", "nodad")...)
		run(tb, append(n, "link", "set", "eth0", "up")...)
		run(tb, append(n, "link", "set", "lo", "up")...)
		run(tb, append(n, "neigh", "replace", e.pv4, "lladdr", e.pmac, "dev", "eth0", "nud", "permanent")...)
		run(tb, append(n, "neigh", "replace", e.pv6, "lladdr", e.pmac, "dev", "eth0", "nud", "permanent")...)
	}
	// The test's UDP and TCP only: no ICMPv6 (DAD, RS, MLD) or IGMP chatter.
	run(tb, "ip", "netns", "exec", t.guest, "ip6tables", "-A", "OUTPUT", "-p", "ipv6-icmp", "-j", "DROP")
	run(tb, "ip", "netns", "exec", t.guest, "iptables", "-A", "OUTPUT", "-p", "igmp", "-j", "DROP")
	return t
}

func (t *topo) addNamespaces(tb testing.TB) {
	for _, ns := range []string{t.guest, t.host, t.client} {
		run(tb, "ip", "netns", "add", ns)
		ns := ns
		tb.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
}

func newRoutedTopo(tb testing.TB) *topo {
	tb.Helper()
	requireRoot(tb)
	var rb [3]byte
	_, _ = rand.Read(rb[:])
	id := hex.EncodeToString(rb[:])
	t := &topo{guest: "rqg-" + id, host: "rqh-" + id, client: "rqc-" + id, port: "gp" + id,
		guestIPv4: "10.78.1.1", clientV4: "10.78.2.1", clientV6: "fd78:2::1", hostV4: "10.78.1.254", hostV6: "fd78:1::fe"}
	t.addNamespaces(tb)
	h := []string{"ip", "-n", t.host}
	run(tb, append(h, "link", "add", t.port, "type", "veth", "peer", "name", "eth0", "netns", t.guest)...)
	run(tb, append(h, "link", "add", "cp", "type", "veth", "peer", "name", "eth0", "netns", t.client)...)
	run(tb, "ip", "netns", "exec", t.host, "sh", "-c",
		"echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
	// The guest's router solicitations, MLD reports and IGMP go to the host
	// (INPUT): dropped in the guest, so that what is queued is the test's
	// packets and the guest's neighbour discovery only.
	for _, icmp6 := range []string{"133", "131", "132", "143"} {
		run(tb, "ip", "netns", "exec", t.guest, "ip6tables", "-A", "OUTPUT", "-p", "ipv6-icmp", "--icmpv6-type", icmp6, "-j", "DROP")
	}
	run(tb, "ip", "netns", "exec", t.guest, "iptables", "-A", "OUTPUT", "-p", "igmp", "-j", "DROP")
	for _, e := range []struct{ ns, dev, addr4, addr6 string }{
		{t.host, t.port, t.hostV4 + "/24", t.hostV6 + "/64"},
		{t.host, "cp", "10.78.2.254/24", "fd78:2::fe/64"},
		{t.guest, "eth0", t.guestIPv4 + "/24", "fd78:1::1/64"},
		{t.client, "eth0", "10.78.2.1/24", "fd78:2::1/64"},
	} {
		n := []string{"ip", "-n", e.ns}
		run(tb, append(n, "addr", "add", e.addr4, "dev", e.dev)...)
		run(tb, append(n, "addr", "add", e.addr6, "dev", e.dev, "nodad")...)
		run(tb, append(n, "link", "set", e.dev, "up")...)
		run(tb, append(n, "link", "set", "lo", "up")...)
	}
	run(tb, "ip", "-n", t.guest, "route", "add", "default", "via", "10.78.1.254")
	run(tb, "ip", "-n", t.guest, "-6", "route", "add", "default", "via", "fd78:1::fe")
	run(tb, "ip", "-n", t.client, "route", "add", "default", "via", "10.78.2.254")
	run(tb, "ip", "-n", t.client, "-6", "route", "add", "default", "via", "fd78:2::fe")
	return t
}

// bothPortKinds runs fn on a bridged and on a routed topology.
func bothPortKinds(t *testing.T, fn func(t *testing.T, tp *topo)) {
	t.Run("bridged", func(t *testing.T) { fn(t, newTopo(t)) })
	t.Run("routed", func(t *testing.T) { fn(t, newRoutedTopo(t)) })
}

// hostLocal makes the host namespace itself a client of the guest, like
// dom0 talking to a guest across the dom0 bridge, and returns the host's
// addresses the guest reaches directly: what the guest sends to them is
// delivered to the host (INPUT), not forwarded. Bridged: br0 gets
// bridgeV4, bridgeV6 and bridgeMAC, with static neighbours both ways (the
// guest sends no neighbour discovery). Routed: the port's own addresses,
// the guest's gateway.
func (t *topo) hostLocal(tb testing.TB) (v4, v6 string) {
	tb.Helper()
	if !t.bridged || t.hostV4 != "" {
		return t.hostV4, t.hostV6
	}
	h := []string{"ip", "-n", t.host}
	run(tb, append(h, "link", "set", "br0", "address", bridgeMAC)...)
	run(tb, append(h, "addr", "add", bridgeV4+"/24", "dev", "br0")...)
	run(tb, append(h, "addr", "add", bridgeV6+"/64", "dev", "br0", "nodad")...)
	for _, e := range []struct{ ns, dev, v4, v6, mac string }{
		{t.host, "br0", guestV4, guestV6, guestMAC},
		{t.guest, "eth0", bridgeV4, bridgeV6, bridgeMAC},
	} {
		n := []string{"ip", "-n", e.ns}
		run(tb, append(n, "neigh", "replace", e.v4, "lladdr", e.mac, "dev", e.dev, "nud", "permanent")...)
		run(tb, append(n, "neigh", "replace", e.v6, "lladdr", e.mac, "dev", e.dev, "nud", "permanent")...)
	}
	t.hostV4, t.hostV6 = bridgeV4, bridgeV6
	return t.hostV4, t.hostV6
}

func nsPath(name string) string { return "/var/run/netns/" + name }

// inNS runs fn inside netns name (sockets created there stay there).
func inNS(tb testing.TB, name string, fn func() error) {
	tb.Helper()
	if err := inNetns(nsPath(name), fn); err != nil {
		tb.Fatal(err)
	}
}

func (t *topo) newBuffer(tb testing.TB, queue uint16, maxLen uint32) *Buffer {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := New(ctx, Config{
		QueueNum:    queue,
		Interface:   t.port,
		Bridged:     t.bridged,
		MaxQueueLen: maxLen,
		NetnsPath:   nsPath(t.host),
		CallTimeout: 5 * time.Second,
	}, zaptest.NewLogger(tb))
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	tb.Cleanup(func() { _ = b.Close() })
	return b
}

// udpPair is a guest sender and a receiver (the client, or the host) for
// one family.
type udpPair struct {
	send *net.UDPConn // in the guest
	recv *net.UDPConn // in the receiver's namespace
	got  chan string
}

// udp is a guest sender and a receiver in the client namespace.
func (t *topo) udp(tb testing.TB, family string) *udpPair {
	tb.Helper()
	return t.udpTo(tb, family, t.client, t.clientV4, t.clientV6)
}

// udpTo is a guest sender and a receiver in namespace ns, bound to v4 or
// v6 (by family).
func (t *topo) udpTo(tb testing.TB, family, ns, v4, v6 string) *udpPair {
	tb.Helper()
	addr := v4
	if family == "udp6" {
		addr = v6
	}
	p := &udpPair{got: make(chan string, 1<<16)}
	inNS(tb, ns, func() error {
		var err error
		p.recv, err = net.ListenUDP(family, &net.UDPAddr{IP: net.ParseIP(addr), Port: 9000})
		return err
	})
	inNS(tb, t.guest, func() error {
		var err error
		p.send, err = net.DialUDP(family, nil, &net.UDPAddr{IP: net.ParseIP(addr), Port: 9000})
		return err
	})
	_ = p.recv.SetReadBuffer(8 << 20)
	tb.Cleanup(func() { p.send.Close(); p.recv.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, err := p.recv.Read(buf)
			if err != nil {
				close(p.got)
				return
			}
			p.got <- string(buf[:n])
		}
	}()
	return p
}

func (p *udpPair) sendSeq(tb testing.TB, tag string, from, to int) {
	tb.Helper()
	for i := from; i < to; i++ {
		if _, err := p.send.Write([]byte(fmt.Sprintf("%s-%d", tag, i))); err != nil {
			tb.Fatalf("send %s-%d: %v", tag, i, err)
		}
	}
}

// warm sends unbuffered "w-0" until one reaches the client (a routed
// path's neighbour entries resolve meanwhile; a first datagram can be lost
// while they do), then drains the copies still on their way.
func (p *udpPair) warm(tb testing.TB) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.sendSeq(tb, "w", 0, 1)
		select {
		case g := <-p.got:
			if g != "w-0" {
				tb.Fatalf("warm-up: got %q, want \"w-0\"", g)
			}
			for {
				select {
				case g := <-p.got:
					if g != "w-0" {
						tb.Fatalf("warm-up: got %q, want \"w-0\"", g)
					}
				case <-time.After(300 * time.Millisecond):
					return
				}
			}
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatal("warm-up: no datagram reached the client in 10 s")
		}
	}
}

// expect reads exactly the messages want, in order, then checks that
// nothing more arrives within quiet.
func (p *udpPair) expect(tb testing.TB, want []string, quiet time.Duration) {
	tb.Helper()
	deadline := time.After(10 * time.Second)
	for i, w := range want {
		select {
		case g := <-p.got:
			if g != w {
				tb.Fatalf("message %d: got %q, want %q", i, g, w)
			}
		case <-deadline:
			tb.Fatalf("timed out after %d of %d messages; next wanted %q", i, len(want), w)
		}
	}
	p.expectNone(tb, quiet)
}

func (p *udpPair) expectNone(tb testing.TB, quiet time.Duration) {
	tb.Helper()
	select {
	case g := <-p.got:
		tb.Fatalf("unexpected message %q reached the client", g)
	case <-time.After(quiet):
	}
}

func seq(tag string, from, to int) []string {
	var s []string
	for i := from; i < to; i++ {
		s = append(s, fmt.Sprintf("%s-%d", tag, i))
	}
	return s
}

// waitHeld waits until the buffer has seen at least n packets held.
func waitHeld(tb testing.TB, b *Buffer, n uint64) {
	tb.Helper()
	for i := 0; i < 500; i++ {
		if b.Stats().HeldPackets >= n {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("buffer holds %d packets, want >= %d", b.Stats().HeldPackets, n)
}
