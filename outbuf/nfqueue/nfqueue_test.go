package nfqueue

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/outbuf"
)

const quiet = 300 * time.Millisecond

func TestSizeFor(t *testing.T) {
	q, rb := SizeFor(50000, 25*time.Millisecond, 25*time.Millisecond)
	if q != 5000 || rb != 5000*metaMsgBytes {
		t.Fatalf("SizeFor(50k, 25ms, 25ms) = %d, %d", q, rb)
	}
	if q, rb := SizeFor(10, time.Millisecond, 0); q != 1024 || rb != 1<<20 {
		t.Fatalf("minimums: %d, %d", q, rb)
	}
	if q, _ := SizeFor(1e12, time.Second, time.Second); q != 1<<24 {
		t.Fatalf("maximum: %d", q)
	}
}

func TestParseProc(t *testing.T) {
	data := []byte("    0 123456     3 1     0     7     2       42  1\n    5  99     0 1     0     0     0        9  1\n")
	st, err := parseProc(data, 0)
	if err != nil || !st.present || st.total != 3 || st.dropped != 7 || st.userDropped != 2 || st.idSeq != 42 || st.portID != 123456 {
		t.Fatalf("queue 0: %+v %v", st, err)
	}
	if st, _ := parseProc(data, 1); st.present {
		t.Fatal("queue 1 should be absent")
	}
}

func TestAfter(t *testing.T) {
	if !after(1, 0) || after(0, 1) || after(5, 5) || !after(2, 0xffffffff) {
		t.Fatal("serial order")
	}
}

func TestConfigValidation(t *testing.T) {
	for _, name := range []string{"", "a b", "x/y", "0123456789abcdef"} {
		if _, err := New(context.Background(), Config{Interface: name}, nil); err == nil {
			t.Errorf("New accepted interface %q", name)
		}
	}
}

// TestHoldAndRelease: nothing reaches the client before Release; Release(N)
// lets out exactly the epochs <= N, in order, for IPv4 and IPv6; later
// epochs stay held; several epochs may be outstanding.
func TestHoldAndRelease(t *testing.T) {
	tp := newTopo(t)
	b := tp.newBuffer(t, 7, 0)
	if b.Kind() != "nfqueue" {
		t.Fatal(b.Kind())
	}
	v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")

	// Epoch 1: 0..9 on both families.
	v4.sendSeq(t, "a", 0, 10)
	v6.sendSeq(t, "a", 0, 10)
	waitHeld(t, b, 20)
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	must(t, b.Checkpoint(1))
	// Epoch 2: 10..19.
	v4.sendSeq(t, "a", 10, 20)
	v6.sendSeq(t, "a", 10, 20)
	waitHeld(t, b, 40)
	must(t, b.Checkpoint(2))
	// Epoch 3: 20..29.
	v4.sendSeq(t, "a", 20, 30)
	v6.sendSeq(t, "a", 20, 30)
	waitHeld(t, b, 60)
	must(t, b.Checkpoint(3))
	// Open epoch 4: 30..34.
	v4.sendSeq(t, "a", 30, 35)
	v6.sendSeq(t, "a", 30, 35)
	waitHeld(t, b, 70)
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	if err := b.Checkpoint(3); err == nil {
		t.Fatal("repeated checkpoint accepted")
	}

	must(t, b.Release(1))
	v4.expect(t, seq("a", 0, 10), 0)
	v6.expect(t, seq("a", 0, 10), quiet)
	if s := b.Stats(); s.HeldPackets != 50 || s.ReleasedPackets != 20 || s.LastReleased != 1 || s.DroppedPackets != 0 {
		t.Fatalf("stats after Release(1): %+v", s)
	}
	must(t, b.Release(1)) // idempotent
	v4.expectNone(t, quiet)

	must(t, b.Release(3)) // two epochs at once
	v4.expect(t, seq("a", 10, 30), 0)
	v6.expect(t, seq("a", 10, 30), quiet)
	v4.expectNone(t, 0)
	v6.expectNone(t, 0)
	if s := b.Stats(); s.HeldPackets != 10 || s.ReleasedPackets != 60 || s.LastReleased != 3 {
		t.Fatalf("stats after Release(3): %+v", s)
	}

	must(t, b.Release(9)) // epoch 4 not checkpointed: untouched
	v4.expectNone(t, quiet)
	must(t, b.Checkpoint(4))
	must(t, b.Release(4))
	v4.expect(t, seq("a", 30, 35), 0)
	v6.expect(t, seq("a", 30, 35), quiet)

	// ReleaseAll: the open epoch goes out, later output passes through.
	v4.sendSeq(t, "b", 0, 5)
	waitHeld(t, b, 5)
	v4.expectNone(t, quiet)
	must(t, b.ReleaseAll())
	v4.expect(t, seq("b", 0, 5), 0)
	v4.sendSeq(t, "c", 0, 5)
	v6.sendSeq(t, "c", 0, 5)
	v4.expect(t, seq("c", 0, 5), 0)
	v6.expect(t, seq("c", 0, 5), quiet)
	if s := b.Stats(); s.HeldPackets != 0 || s.ReleasedPackets != 85 || s.DroppedPackets != 0 {
		t.Fatalf("stats after ReleaseAll: %+v", s)
	}
	must(t, b.Close())
	if err := b.Checkpoint(9); !errors.Is(err, outbuf.ErrClosed) {
		t.Fatalf("Checkpoint after Close: %v", err)
	}
	assertRulesGone(t, tp)
}

// TestRoutedPort: the same holding with a routed port ("-i IF"). Neighbour
// discovery and ARP towards the host are not forwarded and not held; the
// first packets wait for them in the host's neighbour queue, hence the warm-up.
func TestRoutedPort(t *testing.T) {
	tp := newRoutedTopo(t)
	v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")
	// Warm up neighbour caches unbuffered.
	v4.warm(t)
	v6.warm(t)

	b := tp.newBuffer(t, 13, 0)
	v4.sendSeq(t, "a", 0, 10)
	v6.sendSeq(t, "a", 0, 10)
	waitHeld(t, b, 20)
	must(t, b.Checkpoint(1))
	v4.sendSeq(t, "a", 10, 20)
	v6.sendSeq(t, "a", 10, 20)
	waitHeld(t, b, 40)
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	must(t, b.Release(1))
	v4.expect(t, seq("a", 0, 10), 0)
	v6.expect(t, seq("a", 0, 10), quiet)
	v4.expectNone(t, 0)
	must(t, b.Checkpoint(2))
	must(t, b.Release(2))
	v4.expect(t, seq("a", 10, 20), 0)
	v6.expect(t, seq("a", 10, 20), quiet)
	must(t, b.Close())
	assertRulesGone(t, tp)
}

// TestHostLocalHeld: what the guest sends to the host itself (a client in
// the host namespace: dom0 on the vif's bridge, or the routed port's own
// address) is held like forwarded output, IPv4 and IPv6: nothing arrives
// before a Release, Release(1) lets out exactly epoch 1, ReleaseAll the
// open epoch.
func TestHostLocalHeld(t *testing.T) {
	bothPortKinds(t, func(t *testing.T, tp *topo) {
		hv4, hv6 := tp.hostLocal(t)
		h4, h6 := tp.udpTo(t, "udp4", tp.host, hv4, hv6), tp.udpTo(t, "udp6", tp.host, hv4, hv6)
		// The path works unbuffered (and a routed guest has resolved its
		// gateway: its neighbour discovery to the host is held from now on).
		h4.warm(t)
		h6.warm(t)

		b := tp.newBuffer(t, 17, 0)
		h4.sendSeq(t, "a", 0, 5)
		h6.sendSeq(t, "a", 0, 5)
		waitHeld(t, b, 10)
		// The quiet wait also lets every datagram reach the queue before
		// the checkpoint, so that epoch 1 is exactly a-0..4.
		h4.expectNone(t, quiet)
		h6.expectNone(t, 0)
		must(t, b.Checkpoint(1))
		h4.sendSeq(t, "a", 5, 8)
		h6.sendSeq(t, "a", 5, 8)
		waitHeld(t, b, 16)
		h4.expectNone(t, quiet)
		h6.expectNone(t, 0)

		must(t, b.Release(1))
		h4.expect(t, seq("a", 0, 5), 0)
		h6.expect(t, seq("a", 0, 5), quiet)
		h4.expectNone(t, 0)
		must(t, b.ReleaseAll())
		h4.expect(t, seq("a", 5, 8), 0)
		h6.expect(t, seq("a", 5, 8), quiet)
		must(t, b.Close())
		assertRulesGone(t, tp)
	})
}

// TestHostLocalTCPHeld is the shape of the failover that found the INPUT
// hole: a TCP client in the host namespace connects to a service in the
// guest. The guest's SYN-ACK is held, so the connection is not established
// before a Release; then the guest's reply is held until its epoch is
// released.
func TestHostLocalTCPHeld(t *testing.T) {
	bothPortKinds(t, func(t *testing.T, tp *topo) {
		tp.hostLocal(t)
		addr := net.JoinHostPort(tp.guestIPv4, "9101")
		var ln net.Listener
		inNS(t, tp.guest, func() (err error) {
			ln, err = net.Listen("tcp4", addr)
			return err
		})
		t.Cleanup(func() { ln.Close() })
		go func() { // the guest's service: a reply, then reads until EOF
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					if _, err := c.Write([]byte("reply")); err == nil {
						_, _ = io.Copy(io.Discard, c)
					}
				}()
			}
		}()

		b := tp.newBuffer(t, 18, 0)
		type dialResult struct {
			c   net.Conn
			err error
		}
		dialed := make(chan dialResult, 1)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		go func() {
			var r dialResult
			// The socket is made in the host namespace: this goroutine's
			// thread is in it while it dials.
			err := inNetns(nsPath(tp.host), func() error {
				var d net.Dialer
				r.c, r.err = d.DialContext(ctx, "tcp4", addr)
				return nil
			})
			if err != nil {
				r.err = err
			}
			dialed <- r
		}()
		select {
		case r := <-dialed:
			if r.c != nil {
				r.c.Close()
			}
			t.Fatalf("the host's connection to the guest finished before any Release (err %v): the guest's SYN-ACK was not held", r.err)
		case <-time.After(quiet):
		}
		waitHeld(t, b, 1)
		must(t, b.Checkpoint(1))
		must(t, b.Release(1))
		var c net.Conn
		select {
		case r := <-dialed:
			if r.err != nil {
				t.Fatalf("dial after Release(1): %v", r.err)
			}
			c = r.c
		case <-ctx.Done():
			t.Fatal("the host's connection to the guest was not established after Release(1)")
		}
		defer c.Close()

		buf := make([]byte, 16)
		_ = c.SetReadDeadline(time.Now().Add(quiet))
		if n, err := c.Read(buf); err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read before the reply's epoch was released: %q, %v; want a timeout", buf[:n], err)
		}
		// The reply is queued before epoch 2's barrier is taken (the
		// guest's accept may run late).
		waitHeld(t, b, 1)
		must(t, b.Checkpoint(2))
		must(t, b.Release(2))
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := io.ReadFull(c, buf[:len("reply")])
		if err != nil || string(buf[:n]) != "reply" {
			t.Fatalf("read after Release(2): %q, %v; want \"reply\"", buf[:n], err)
		}
		must(t, b.Close())
		assertRulesGone(t, tp)
	})
}

// TestBridgeNFOffRefused: a bridged port whose bridged packets would not
// traverse iptables is refused rather than left unbuffered.
func TestBridgeNFOffRefused(t *testing.T) {
	tp := newTopo(t)
	run(t, "ip", "netns", "exec", tp.host, "sh", "-c", "echo 0 > /proc/sys/net/bridge/bridge-nf-call-ip6tables")
	_, err := New(context.Background(), Config{QueueNum: 14, Interface: tp.port, Bridged: true, NetnsPath: nsPath(tp.host)}, nil)
	if err == nil || !strings.Contains(err.Error(), "bridge-nf-call-ip6tables") {
		t.Fatalf("New with bridge-nf-call-ip6tables=0: %v", err)
	}
	assertRulesGone(t, tp)
}

// TestCloseDropsHeld: Close drops held output; nothing arrives later, and the
// host is left without our rules (later output flows unbuffered again,
// which is the host as it was before New).
func TestCloseDropsHeld(t *testing.T) {
	tp := newTopo(t)
	b := tp.newBuffer(t, 8, 0)
	v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")
	v4.sendSeq(t, "a", 0, 10)
	v6.sendSeq(t, "a", 0, 10)
	waitHeld(t, b, 20)
	must(t, b.Checkpoint(1))
	v4.sendSeq(t, "a", 10, 15)
	waitHeld(t, b, 25)
	must(t, b.Close())
	must(t, b.Close())
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	if s := b.Stats(); s.DroppedPackets != 25 || s.HeldPackets != 0 {
		t.Fatalf("stats after Close: %+v", s)
	}
	if err := b.Release(1); !errors.Is(err, outbuf.ErrClosed) {
		t.Fatalf("Release after Close: %v", err)
	}
	assertRulesGone(t, tp)
	v4.sendSeq(t, "z", 0, 1)
	v4.expect(t, []string{"z-0"}, 0)
}

// TestQueueFullDrops: a tiny queue drops what does not fit, counted in Stats,
// and leaks nothing.
func TestQueueFullDrops(t *testing.T) {
	tp := newTopo(t)
	b := tp.newBuffer(t, 9, 8)
	v4 := tp.udp(t, "udp4")
	v4.sendSeq(t, "a", 0, 50)
	for i := 0; i < 300 && b.Stats().DroppedPackets < 42; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	v4.expectNone(t, quiet)
	s := b.Stats()
	if s.DroppedPackets != 42 || s.HeldPackets != 8 {
		t.Fatalf("stats with full queue: %+v", s)
	}
	must(t, b.Checkpoint(1))
	must(t, b.Release(1))
	v4.expect(t, seq("a", 0, 8), quiet)
}

// TestAgentExitLeaksNothing: the agent's queue socket closes without any
// verdict (as when the process dies): held packets are dropped by the
// kernel and later ones too, because the rules stay without a listener.
func TestAgentExitLeaksNothing(t *testing.T) {
	tp := newTopo(t)
	b := tp.newBuffer(t, 10, 0)
	v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")
	v4.sendSeq(t, "a", 0, 10)
	v6.sendSeq(t, "a", 0, 10)
	waitHeld(t, b, 20)
	must(t, b.Checkpoint(1))
	// Simulated crash: the socket goes away, no verdict, no rule removal.
	b.stop()
	_ = b.nfq.Con.Close()
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	v4.sendSeq(t, "b", 0, 10)
	v6.sendSeq(t, "b", 0, 10)
	v4.expectNone(t, quiet)
	v6.expectNone(t, 0)
	// The rules are still installed (they fail closed); Close removes them.
	_ = b.Close()
	assertRulesGone(t, tp)
}

// TestTCPThroughBuffer: a TCP flow from guest to client while epochs are
// checkpointed every 25 ms and released one epoch later (two outstanding):
// every byte arrives, in order.
func TestTCPThroughBuffer(t *testing.T) {
	tp := newTopo(t)
	b := tp.newBuffer(t, 11, 0)
	var ln net.Listener
	inNS(t, tp.client, func() (err error) {
		ln, err = net.Listen("tcp4", clientV4+":9100")
		return err
	})
	defer ln.Close()

	const size = 16 << 20
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i*7 + i>>11)
	}
	recvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recvErr <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(90 * time.Second))
		got, err := io.ReadAll(c)
		switch {
		case err != nil:
			recvErr <- err
		case len(got) != size:
			recvErr <- errors.New("short: " + strconv.Itoa(len(got)))
		case !bytes.Equal(got, payload):
			recvErr <- errors.New("bytes differ")
		default:
			recvErr <- nil
		}
	}()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // a concurrent reader of the counters
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				_ = b.Stats()
			}
		}
	}()
	var epochs uint64
	go func() {
		defer wg.Done()
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for e := uint64(1); ; e++ {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if err := b.Checkpoint(e); err != nil {
				t.Error(err)
				return
			}
			if e > 1 {
				if err := b.Release(e - 1); err != nil {
					t.Error(err)
					return
				}
			}
			epochs = e
		}
	}()

	var c net.Conn
	inNS(t, tp.guest, func() (err error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err = d.Dial("tcp4", clientV4+":9100")
		return err
	})
	start := time.Now()
	_ = c.SetDeadline(time.Now().Add(90 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case err := <-recvErr:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(100 * time.Second):
		t.Fatal("client did not finish")
	}
	close(stop)
	wg.Wait()
	el := time.Since(start)
	s := b.Stats()
	t.Logf("%d MiB in %v (%.0f Mbit/s) over %d epochs; stats %+v", size>>20, el.Round(time.Millisecond), float64(size)*8/el.Seconds()/1e6, epochs, s)
	if s.DroppedPackets != 0 {
		t.Errorf("dropped %d", s.DroppedPackets)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// assertRulesGone checks that no NFQUEUE rule is left in any chain a
// Buffer uses.
func assertRulesGone(t *testing.T, tp *topo) {
	t.Helper()
	for _, ref := range allRules() {
		out, err := exec.Command("ip", "netns", "exec", tp.host, ref.bin, "-S", ref.chain).CombinedOutput()
		if err != nil {
			t.Fatalf("%s -S %s: %v: %s", ref.bin, ref.chain, err, out)
		}
		if strings.Contains(string(out), "NFQUEUE") {
			t.Fatalf("%s rules left:\n%s", ref, out)
		}
	}
}
