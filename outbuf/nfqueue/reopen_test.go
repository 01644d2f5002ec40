package nfqueue

import (
	"context"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// allRules is every (binary, chain) a Buffer puts a rule into, as the
// tests expect it (written out, not taken from the ruleSet under test).
func allRules() []ruleRef {
	return []ruleRef{{"iptables", "FORWARD"}, {"iptables", "INPUT"}, {"ip6tables", "FORWARD"}, {"ip6tables", "INPUT"}}
}

// ruleCopies counts the buffer rules of queue in ref's chain of the
// topology's host namespace.
func ruleCopies(t *testing.T, tp *topo, ref ruleRef, queue uint16) int {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", tp.host, ref.bin, "-S", ref.chain).CombinedOutput()
	if err != nil {
		t.Fatalf("%s -S %s: %v: %s", ref.bin, ref.chain, err, out)
	}
	return strings.Count(string(out), "NFQUEUE --queue-num "+strconv.Itoa(int(queue)))
}

// assertRuleCopies checks that each of refs has want copies of queue's rule.
func assertRuleCopies(t *testing.T, tp *topo, queue uint16, want int, when string, refs ...ruleRef) {
	t.Helper()
	for _, ref := range refs {
		if n := ruleCopies(t, tp, ref, queue); n != want {
			t.Fatalf("%s: %d %s rules for queue %d, want %d", when, n, ref, queue, want)
		}
	}
}

func assertOneRuleEach(t *testing.T, tp *topo, queue uint16, when string) {
	t.Helper()
	assertRuleCopies(t, tp, queue, 1, when, allRules()...)
}

// editRule runs iptables op ("-I": at position 1, "-D") with the rule of a
// Buffer with cfg on ref, as an operator or another remusd would.
func (tp *topo) editRule(t *testing.T, cfg Config, op string, ref ruleRef) {
	t.Helper()
	run(t, append([]string{"ip", "netns", "exec", tp.host, ref.bin}, newRuleSet(cfg).args(op, ref)...)...)
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
	bothPortKinds(t, func(t *testing.T, tp *topo) {
		const queue = 15
		v4, v6 := tp.udp(t, "udp4"), tp.udp(t, "udp6")
		if !tp.bridged { // neighbour caches, unbuffered (see TestRoutedPort)
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
		// Stray duplicates (an older remusd inserted one per New).
		strays := []ruleRef{{"ip6tables", "FORWARD"}, {"iptables", "INPUT"}}
		for _, ref := range strays {
			tp.editRule(t, b.cfg, "-I", ref)
		}
		assertRuleCopies(t, tp, queue, 2, "after adding duplicates", strays...)
		v4.sendSeq(t, "b", 20, 30)
		v4.expectNone(t, quiet)

		// The restarted daemon's buffer.
		b2, err := tp.openBuffer(t, queue)
		if err != nil {
			t.Fatalf("New over a detached buffer's rules: %v", err)
		}
		t.Cleanup(func() { _ = b2.Close() })
		assertOneRuleEach(t, tp, queue, "after the second New")
		if b2.rules.adopted != 4 {
			t.Errorf("adopted %d rules, want 4", b2.rules.adopted)
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

// TestReopenAdoptsEveryRule: after Detach, a new Buffer on the same queue
// and port adopts all four rules (IPv4 and IPv6, FORWARD and INPUT) and
// adds no copy; the adopted INPUT rules hold what the guest sends to the
// host itself for the new queue (dropped while no Buffer is bound). A
// Buffer over the rules of an older remusd (FORWARD only) adopts those two
// and adds the INPUT ones.
func TestReopenAdoptsEveryRule(t *testing.T) {
	tp := newTopo(t)
	const queue = 19
	hv4, hv6 := tp.hostLocal(t)
	h4, h6 := tp.udpTo(t, "udp4", tp.host, hv4, hv6), tp.udpTo(t, "udp6", tp.host, hv4, hv6)
	b, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	assertOneRuleEach(t, tp, queue, "after New")
	if b.rules.adopted != 0 || len(b.rules.inserted) != 4 {
		t.Fatalf("first New: adopted %d, inserted %v; want 0 and all 4", b.rules.adopted, b.rules.inserted)
	}
	must(t, b.Detach())
	h4.sendSeq(t, "a", 0, 5)
	h6.sendSeq(t, "a", 0, 5)
	h4.expectNone(t, quiet)
	h6.expectNone(t, 0)

	b2, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b2.Close() })
	assertOneRuleEach(t, tp, queue, "after the second New")
	if b2.rules.adopted != 4 || len(b2.rules.inserted) != 0 {
		t.Fatalf("second New: adopted %d, inserted %v; want 4 and none", b2.rules.adopted, b2.rules.inserted)
	}
	h4.sendSeq(t, "b", 0, 5)
	h6.sendSeq(t, "b", 0, 5)
	waitHeld(t, b2, 10)
	h4.expectNone(t, quiet)
	h6.expectNone(t, 0)
	must(t, b2.Checkpoint(1))
	must(t, b2.Release(1))
	h4.expect(t, seq("b", 0, 5), 0)
	h6.expect(t, seq("b", 0, 5), quiet)

	must(t, b2.Detach())
	inputs := []ruleRef{{"iptables", "INPUT"}, {"ip6tables", "INPUT"}}
	for _, ref := range inputs {
		tp.editRule(t, b2.cfg, "-D", ref)
	}
	b3, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b3.Close() })
	assertOneRuleEach(t, tp, queue, "after New over FORWARD rules only")
	if b3.rules.adopted != 2 || !slices.Equal(b3.rules.inserted, inputs) {
		t.Fatalf("New over FORWARD rules only: adopted %d, inserted %v; want 2 and %v", b3.rules.adopted, b3.rules.inserted, inputs)
	}
	must(t, b3.Close())
	assertRulesGone(t, tp)
}

// TestReopenFailureKeepsAdoptedRules: a New that fails after adopting the
// rules of a detached buffer leaves them in place, and the rules it added
// beside them too (the guest's output stays dropped, to the host as well).
func TestReopenFailureKeepsAdoptedRules(t *testing.T) {
	tp := newTopo(t)
	const queue = 16
	b, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	must(t, b.Detach())
	// Only the IPv4 FORWARD rule is left (say an older remusd, FORWARD
	// only, died half-way).
	gone := []ruleRef{{"iptables", "INPUT"}, {"ip6tables", "FORWARD"}, {"ip6tables", "INPUT"}}
	for _, ref := range gone {
		tp.editRule(t, b.cfg, "-D", ref)
	}
	cfg := b.cfg
	cfg.IP6Tables = "/bin/false" // adopts iptables FORWARD, inserts iptables INPUT, then fails
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := New(ctx, cfg, zaptest.NewLogger(t)); err == nil {
		t.Fatal("New with a failing ip6tables succeeded")
	}
	// The adopted rule stays, and so does the one New inserted beside it:
	// a guest whose output was being dropped stays dropped everywhere.
	assertRuleCopies(t, tp, queue, 1, "after a failed New (the adopted rule and the one inserted beside it)", ruleRef{"iptables", "FORWARD"}, ruleRef{"iptables", "INPUT"})
	assertRuleCopies(t, tp, queue, 0, "after a failed New (never inserted)", gone[1:]...)
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
// died (Detach, with stray duplicates in FORWARD and INPUT) drop the port's
// traffic, to the client and to the host itself, until RemoveRules deletes
// every copy; then traffic flows unbuffered.
func TestRemoveRulesOfADeadBuffer(t *testing.T) {
	tp := newTopo(t)
	const queue = 16
	v4 := tp.udp(t, "udp4")
	_, hostV6 := tp.hostLocal(t)
	h6 := tp.udpTo(t, "udp6", tp.host, "", hostV6)
	b, err := tp.openBuffer(t, queue)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	must(t, b.Detach())
	tp.editRule(t, b.cfg, "-I", ruleRef{"iptables", "FORWARD"})
	tp.editRule(t, b.cfg, "-I", ruleRef{"ip6tables", "INPUT"})
	v4.sendSeq(t, "a", 0, 5)
	h6.sendSeq(t, "a", 0, 5)
	v4.expectNone(t, quiet)
	h6.expectNone(t, 0)
	if err := RemoveRules(context.Background(), b.cfg); err != nil {
		t.Fatalf("RemoveRules: %v", err)
	}
	assertRulesGone(t, tp)
	v4.sendSeq(t, "b", 0, 5)
	h6.sendSeq(t, "b", 0, 5)
	v4.expect(t, seq("b", 0, 5), 0)
	h6.expect(t, seq("b", 0, 5), quiet)
	if err := RemoveRules(context.Background(), Config{Interface: "bad/name"}); err == nil {
		t.Fatal("RemoveRules accepted an invalid interface name")
	}
}

// TestRemoveKeepsWhatItCouldNotDelete: remove forgets the rules it deleted
// (here: found absent) and keeps listing, in order, those whose deletion
// failed, whatever their place in the list.
func TestRemoveKeepsWhatItCouldNotDelete(t *testing.T) {
	const broken = "/nonexistent/iptables" // every call fails
	r := newRuleSet(Config{QueueNum: 1, Interface: "gp0", CallTimeout: 5 * time.Second})
	r.installed = []ruleRef{{"false", "FORWARD"}, {broken, "FORWARD"}, {"false", "INPUT"}, {broken, "INPUT"}, {"false", "INPUT"}}
	if err := r.remove(context.Background()); err == nil {
		t.Fatal("remove with a failing binary reported no error")
	}
	if want := []ruleRef{{broken, "FORWARD"}, {broken, "INPUT"}}; !slices.Equal(r.installed, want) {
		t.Fatalf("installed after remove: %v, want %v", r.installed, want)
	}
}
