package nfqueue

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// waitUntil polls cond every 20 ms for up to d.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("%s did not happen within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRulesGuarded: another tool deleting a rule (a firewall reload) or
// putting an accepting rule ahead of it would let the guest's output out
// unheld; the buffer finds it within RuleCheckEvery, repairs it (the rule
// back at the head, one copy), counts it, and holds again.
func TestRulesGuarded(t *testing.T) {
	tp := newTopo(t)
	const queue = 19
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := New(ctx, Config{QueueNum: queue, Interface: tp.port, Bridged: tp.bridged, NetnsPath: nsPath(tp.host),
		CallTimeout: 5 * time.Second, RuleCheckEvery: 100 * time.Millisecond}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	v4 := tp.udp(t, "udp4")
	fwd := ruleRef{"iptables", "FORWARD"}

	// Deleted by another tool: put back.
	tp.editRule(t, b.cfg, "-D", fwd)
	waitUntil(t, 5*time.Second, "the deleted rule's repair", func() bool {
		return b.Stats().HoldRepairs >= 1 && ruleCopies(t, tp, fwd, queue) == 1
	})
	v4.sendSeq(t, "a", 0, 5)
	v4.expectNone(t, quiet)
	must(t, b.Checkpoint(1))
	must(t, b.Release(1))
	v4.expect(t, seq("a", 0, 5), quiet)

	// Another tool's ACCEPT ahead of it: ours goes back to the head.
	run(t, "ip", "netns", "exec", tp.host, "iptables", "-w", "5", "-I", "FORWARD", "1", "-j", "ACCEPT")
	t.Cleanup(func() { run(t, "ip", "netns", "exec", tp.host, "iptables", "-w", "5", "-D", "FORWARD", "-j", "ACCEPT") })
	waitUntil(t, 5*time.Second, "the displaced rule's repair", func() bool {
		if b.Stats().HoldRepairs < 2 {
			return false
		}
		lines, err := b.rules.rules(context.Background(), fwd)
		return err == nil && len(lines) > 0 && strings.Contains(lines[0], remusdComment) && ruleCopies(t, tp, fwd, queue) == 1
	})
	v4.sendSeq(t, "b", 0, 5)
	v4.expectNone(t, quiet)
	must(t, b.Checkpoint(2))
	must(t, b.Release(2))
	v4.expect(t, seq("b", 0, 5), quiet)

	// Close stops the guard before it removes the rules: none stays.
	must(t, b.Close())
	time.Sleep(300 * time.Millisecond)
	assertRuleCopies(t, tp, queue, 0, "after Close", allRules()...)
}
