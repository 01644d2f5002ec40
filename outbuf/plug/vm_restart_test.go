package plug

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestVMPlugDetachReopen is a daemon restart over the plug: Detach keeps
// holding (nothing leaks while no Buffer exists), a new Buffer on the same
// interface takes the topology over (the old plug's content, which had a
// closed epoch pending, is dropped; the new one holds and releases by
// epoch exactly), also after a Detach in pass-through and from a
// half-built topology (IFB without ingress), and Close restores the
// interface.
func TestVMPlugDetachReopen(t *testing.T) {
	needVM(t)
	tp := setupTopo(t)
	flows := []*flow{
		newFlow(t, tp, "udp4", client4, 7011),
		newFlow(t, tp, "udp6", client6, 7012),
	}
	ifb := IFBName(tp.vh)
	before := tcState(t, tp.vh, ifb)
	const quiet = 300 * time.Millisecond
	open := func(what string) *Buffer {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		b, err := New(ctx, Config{Interface: tp.vh, LimitBytes: 1 << 20}, nil)
		if err != nil {
			t.Fatalf("New (%s): %v", what, err)
		}
		return b
	}
	send := func(n int) (r [2][2]uint32) {
		for i, f := range flows {
			r[i][0], r[i][1] = f.sendN(t, n)
		}
		return r
	}
	nothing := func(what string) {
		t.Helper()
		for _, f := range flows {
			f.expectNothing(t, what, quiet)
		}
	}
	exactly := func(what string, r [2][2]uint32) {
		t.Helper()
		for i, f := range flows {
			f.expect(t, what, r[i][0], r[i][1], 3*time.Second, quiet)
		}
	}

	buf := open("first")
	send(20)
	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	send(10) // epoch 2, open
	nothing("before Detach")
	during := tcState(t, tp.vh, ifb)
	if err := buf.Detach(); err != nil {
		t.Fatal(err)
	}
	send(10) // while no Buffer exists
	nothing("while detached")
	if now := tcState(t, tp.vh, ifb); now != during {
		t.Fatalf("Detach changed the topology: %s -> %s", during, now)
	}

	// The restarted daemon's Buffer.
	buf2 := open("over a detached buffer")
	defer buf2.Close()
	if now := tcState(t, tp.vh, ifb); !strings.Contains(now, "ingress-filters=1") || !strings.Contains(now, "ifb="+ifb) {
		t.Fatalf("takeover left %s", now)
	}
	nothing("after takeover: the old plug's packets are dropped, not released")
	e1 := send(12)
	nothing("new epoch 1 open")
	if err := buf2.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	e2 := send(7)
	nothing("new epoch 1 checkpointed")
	if err := buf2.Release(1); err != nil {
		t.Fatal(err)
	}
	exactly("after Release(1) of the new buffer", e1)
	if err := buf2.Checkpoint(2); err != nil {
		t.Fatal(err)
	}
	if err := buf2.Release(2); err != nil {
		t.Fatal(err)
	}
	exactly("after Release(2) of the new buffer", e2)
	// 38 test packets plus the guest's own IPv6 chatter, not the 80 the
	// old plug held: the counters are the fresh plug's.
	if st := buf2.Stats(); st.ReleasedPackets < 38 || st.ReleasedPackets >= 38+40 || st.HeldPackets != 0 {
		t.Errorf("stats of the new plug: %+v (want 38 released and a few more, 0 held)", st)
	}

	// Detached while passing through (unprotected): the next Buffer holds
	// again.
	if err := buf2.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	exactly("pass-through", send(3))
	if err := buf2.Detach(); err != nil {
		t.Fatal(err)
	}
	buf3 := open("over a pass-through plug")
	defer buf3.Close()
	e := send(5)
	nothing("after takeover of a pass-through plug")
	if err := buf3.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	if err := buf3.Release(1); err != nil {
		t.Fatal(err)
	}
	exactly("released by the third buffer", e)

	// A half-built topology (the IFB and its plug, no ingress: a process
	// died in the middle of setup or teardown) is completed.
	if err := buf3.Detach(); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(tp.vh)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.QdiscDel(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}}); err != nil {
		t.Fatal(err)
	}
	exactly("unbuffered without ingress", send(2))
	buf4 := open("over an IFB without ingress")
	e = send(6)
	nothing("after completing a half-built topology")
	if err := buf4.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	if err := buf4.Release(1); err != nil {
		t.Fatal(err)
	}
	exactly("released by the fourth buffer", e)
	send(4)
	if err := buf4.Close(); err != nil {
		t.Fatal(err)
	}
	nothing("after Close with output held")
	if after := tcState(t, tp.vh, ifb); after != before {
		t.Fatalf("Close did not restore the interface:\nbefore %s\nafter  %s", before, after)
	}
	exactly("unbuffered after Close", send(3))
}

// TestVMPlugTakeOverRefusesForeign: an ingress qdisc with a filter this
// package did not add, or a device with the IFB's name that is no IFB, is
// someone else's: New refuses (ErrBusy) and changes nothing.
func TestVMPlugTakeOverRefusesForeign(t *testing.T) {
	needVM(t)
	tp := setupTopo(t)
	ifb := IFBName(tp.vh)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A veth named like the IFB.
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: ifb}, PeerName: "notifb0"}); err != nil {
		t.Fatal(err)
	}
	st := tcState(t, tp.vh, ifb)
	if _, err := New(ctx, Config{Interface: tp.vh}, nil); err == nil || !strings.Contains(err.Error(), "not an ifb") {
		t.Fatalf("New with a veth named %s: %v", ifb, err)
	}
	if now := tcState(t, tp.vh, ifb); now != st {
		t.Fatalf("refused New changed state: %s -> %s", st, now)
	}
	d, err := h.LinkByName(ifb)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkDel(d); err != nil {
		t.Fatal(err)
	}

	// Someone else's ingress filter.
	buf, err := New(ctx, Config{Interface: tp.vh}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := buf.Detach(); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName(tp.vh)
	if err != nil {
		t.Fatal(err)
	}
	other, err := h.LinkByName("vcc0")
	if err != nil {
		t.Fatal(err)
	}
	foreign := &netlink.U32{ // a mirror to another device, at another priority
		FilterAttrs: netlink.FilterAttrs{LinkIndex: l.Attrs().Index, Parent: ingressHandle, Priority: 100, Protocol: unix.ETH_P_IP},
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_PIPE},
			MirredAction: netlink.TCA_EGRESS_MIRROR,
			Ifindex:      other.Attrs().Index,
		}},
	}
	if err := h.FilterAdd(foreign); err != nil {
		t.Fatal(err)
	}
	st = tcState(t, tp.vh, ifb)
	if _, err := New(ctx, Config{Interface: tp.vh}, nil); err == nil || !strings.Contains(err.Error(), "not a redirect") {
		t.Fatalf("New with a foreign ingress filter: %v", err)
	}
	if now := tcState(t, tp.vh, ifb); now != st {
		t.Fatalf("refused New changed state: %s -> %s", st, now)
	}
	// Clean up by hand: our topology and the foreign filter.
	if err := h.QdiscDel(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: l.Attrs().Index, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}}); err != nil {
		t.Fatal(err)
	}
	if i, err := h.LinkByName(ifb); err == nil {
		_ = h.LinkDel(i)
	}
}
