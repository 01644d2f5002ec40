package nfqueue

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// ruleCopies counts the buffer rules of queue in bin's FORWARD chain of the
// topology's host namespace.
func ruleCopies(t *testing.T, tp *topo, bin string, queue uint16) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", tp.host, bin, "-S", "FORWARD").CombinedOutput()
	if err != nil {
		t.Fatalf("%s -S: %v: %s", bin, err, out)
	}
	return strings.Count(string(out), "NFQUEUE --queue-num "+strconv.Itoa(int(queue)))
}

func assertOneRuleEach(t *testing.T, tp *topo, queue uint16, when string) {
	t.Helper()
	for _, bin := range []string{"iptables", "ip6tables"} {
		if n := ruleCopies(t, tp, bin, queue); n != 1 {
			t.Fatalf("%s: %d %s rules for queue %d, want exactly 1", when, n, bin, queue)
		}
	}
}

func (tp *topo) openBuffer(t *testing.T, queue uint16) (*Buffer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return New(ctx, Config{QueueNum: queue, Interface: tp.port, Bridged: tp.bridged, NetnsPath: nsPath(tp.host), CallTimeout: 5 * time.Second}, zaptest.NewLogger(t))
}

// TestDetachAndReopen is a daemon restart: the buffer holds, detaches (the
// guest keeps sending: the kernel drops it all, nothing reaches the client
// while no buffer is bound), a new Buffer on the same queue and port takes
// the rules over (exactly one copy each, also when a stray duplicate was
// added meanwhile), holds and releases by epoch again, and its Close
// removes every rule so that traffic flows unbuffered.
func TestDetachAndReopen(t *testing.T) {
	for _, routed := range []bool{false, true} {
		t.Run(map[bool]string{false: "bridged", true: "routed"}[routed], func(t *testing.T) {
			var tp *topo
			const queue = 15
			if routed {
				tp = newRoutedTopo(t)
			} else {
				tp = newTopo(t)
			}
			v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")
			if routed { // neighbour caches, unbuffered (see TestRoutedPort)
				v4.warm(t)
				v6.warm(t)
			}
			b, err := tp.openBuffer(t, queue)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = b.Close() })
			assertOneRuleEach(t, tp, queue, "after New")
			v4.sendSeq(t, "a", 0, 10)
			v6.sendSeq(t, "a", 0, 10)
			waitHeld(t, b, 20)
			must(t, b.Checkpoint(1))
			v4.sendSeq(t, "a", 10, 15)
			waitHeld(t, b, 25)

			must(t, b.Detach())
			// Held output is dropped, later output too: no listener, no
			// bypass, the rules stay.
			v4.sendSeq(t, "b", 0, 20)
			v6.sendSeq(t, "b", 0, 20)
			v4.expectNone(t, quiet)
			v6.expectNone(t, 0)
			assertOneRuleEach(t, tp, queue, "after Detach")
			// A stray duplicate (an older remusd inserted one per New).
			run(t, append([]string{"ip", "netns", "exec", tp.host, "ip6tables", "-I", "FORWARD", "1"}, newRuleSet(b.cfg).spec()...)...)
			if n := ruleCopies(t, tp, "ip6tables", queue); n != 2 {
				t.Fatalf("%d ip6tables rules after adding a duplicate", n)
			}
			v4.sendSeq(t, "b", 20, 30)
			v4.expectNone(t, quiet)

			// The restarted daemon's buffer.
			b2, err := tp.openBuffer(t, queue)
			if err != nil {
				t.Fatalf("New over a detached buffer's rules: %v", err)
			}
			t.Cleanup(func() { _ = b2.Close() })
			assertOneRuleEach(t, tp, queue, "after the second New")
			if b2.rules.adopted != 2 {
				t.Errorf("adopted %d rules, want 2", b2.rules.adopted)
			}
			v4.sendSeq(t, "c", 0, 10)
			v6.sendSeq(t, "c", 0, 10)
			waitHeld(t, b2, 20)
			v4.expectNone(t, quiet)
			v6.expectNone(t, 0)
			must(t, b2.Checkpoint(1))
			v4.sendSeq(t, "c", 10, 15)
			waitHeld(t, b2, 25)
			must(t, b2.Release(1))
			// Exactly the new epoch: nothing from before or during the
			// detach, nothing of the open epoch.
			v4.expect(t, seq("c", 0, 10), 0)
			v6.expect(t, seq("c", 0, 10), quiet)
			must(t, b2.Checkpoint(2))
			must(t, b2.Release(2))
			v4.expect(t, seq("c", 10, 15), quiet)

			must(t, b2.Close())
			assertRulesGone(t, tp)
			v4.sendSeq(t, "d", 0, 3)
			v6.sendSeq(t, "d", 0, 3)
			v4.expect(t, seq("d", 0, 3), 0)
			v6.expect(t, seq("d", 0, 3), quiet)
		})
	}
}

// TestReopenFailureKeepsAdoptedRules: a New that fails after adopting the
// rules of a detached buffer leaves them in place (the guest's output stays
// dropped), and removes only a rule it added itself.
func TestReopenFailureKeepsAdoptedRules(t *testing.T) {
	tp := newTopo(t)
	const queue = 16
	b, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	must(t, b.Detach())
	// Only the IPv4 rule is left (say the old daemon died half-way).
	run(t, append([]string{"ip", "netns", "exec", tp.host, "ip6tables", "-D", "FORWARD"}, newRuleSet(b.cfg).spec()...)...)
	cfg := b.cfg
	cfg.IP6Tables = "/bin/false" // the second install step fails
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := New(ctx, cfg, zaptest.NewLogger(t)); err == nil {
		t.Fatal("New with a failing ip6tables succeeded")
	}
	if n := ruleCopies(t, tp, "iptables", queue); n != 1 {
		t.Fatalf("%d iptables rules after a failed New, want the adopted one", n)
	}
	v4 := tp.udp(t, "udp4")
	v4.sendSeq(t, "a", 0, 5)
	v4.expectNone(t, quiet)
	// A working New adopts it and Close cleans up.
	b2, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	assertOneRuleEach(t, tp, queue, "after New")
	must(t, b2.Close())
	assertRulesGone(t, tp)
}

// TestRemoveRulesOfADeadBuffer: the rules a buffer left when its process
// died (Detach, with a stray duplicate) drop the port's traffic until
// RemoveRules deletes every copy; then traffic flows unbuffered.
func TestRemoveRulesOfADeadBuffer(t *testing.T) {
	tp := newTopo(t)
	const queue = 16
	v4 := tp.udp(t, "udp4")
	b, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	must(t, b.Detach())
	run(t, append([]string{"ip", "netns", "exec", tp.host, "iptables", "-I", "FORWARD", "1"}, newRuleSet(b.cfg).spec()...)...)
	v4.sendSeq(t, "a", 0, 5)
	v4.expectNone(t, quiet)
	if err := RemoveRules(context.Background(), b.cfg); err != nil {
		t.Fatalf("RemoveRules: %v", err)
	}
	assertRulesGone(t, tp)
	v4.sendSeq(t, "b", 0, 5)
	v4.expect(t, seq("b", 0, 5), quiet)
	if err := RemoveRules(context.Background(), Config{Interface: "bad/name"}); err == nil {
		t.Fatal("RemoveRules accepted an invalid interface name")
	}
}
