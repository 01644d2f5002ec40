package daemon

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func freeUDP(t *testing.T) string {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

// withSecondPath gives both daemons of a pair a second heartbeat path on
// loopback, beside the (cuttable) replication proxy.
func withSecondPath(t *testing.T) func(a, b *Config) {
	la, lb := freeUDP(t), freeUDP(t)
	return func(a, b *Config) {
		a.SecondPath = SecondPathConfig{Listen: la, Interval: Duration(50 * time.Millisecond), Timeout: Duration(500 * time.Millisecond)}
		b.SecondPath = SecondPathConfig{Listen: lb, Interval: Duration(50 * time.Millisecond), Timeout: Duration(500 * time.Millisecond)}
		a.Peers[0].SecondPath, b.Peers[0].SecondPath = lb, la
	}
}

// TestSecondPathHoldsOffUnsafeTakeover: without a witness, in auto-unsafe
// mode, a cut replication link used to start a second copy after the
// heartbeat timeout. With the second path alive the backup knows its
// primary lives: no takeover, and `remusd failover` is refused. When the
// primary dies, both paths fall silent and the takeover happens.
func TestSecondPathHoldsOffUnsafeTakeover(t *testing.T) {
	sp := withSecondPath(t)
	wp := newWitnessPair(t, func(a, b *Config) {
		a.Witness, b.Witness = nil, nil
		a.Takeover, b.Takeover = TakeoverAutoUnsafe, TakeoverAutoUnsafe
		a.AckTimeoutPolicy, b.AckTimeoutPolicy = AckTimeoutHold, AckTimeoutHold
		sp(a, b)
	})
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.SecondPathLastHeardUnixMs != 0 && s.LinkLastHeardUnixMs != 0 })
	waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return s.SecondPathLastHeardUnixMs != 0 })

	wp.proxy.setCut(true)
	// Well past the replication link's heartbeat timeout.
	time.Sleep(3 * wp.bcfg.HeartbeatTimeout.D())
	s := vmStatus(t, wp.backup, "vm")
	if s.Role != RoleBackup || s.Link != "second-path" {
		t.Fatalf("backup with its replication link cut, second path alive: %+v", s)
	}
	if age := time.Since(time.UnixMilli(s.LinkLastHeardUnixMs)); age < wp.bcfg.HeartbeatTimeout.D() {
		t.Fatalf("replication link heard %v ago although cut", age)
	}
	err := wp.backup.Failover(context.Background(), FailoverRequest{VM: "vm"})
	if err == nil || !strings.Contains(err.Error(), "second heartbeat path") {
		t.Fatalf("failover while the primary lives on the second path: %v", err)
	}

	// The primary dies: both paths fall silent; auto-unsafe takes over.
	killed := time.Now()
	wp.stopA()
	wp.stoppedA = true
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
	t.Logf("backup active %v after the primary died (second path timeout %v)", time.Since(killed).Round(time.Millisecond), wp.bcfg.SecondPath.Timeout.D())
}

// TestSecondPathNoRaceOnCutLink: with a witness, a cut replication link
// makes the primary claim its record (its priority) but the backup, which
// still hears the primary on the second path, does not even race. The
// link mends; when the primary then dies, the backup takes over.
func TestSecondPathNoRaceOnCutLink(t *testing.T) {
	wp := newWitnessPair(t, func(a, b *Config) {
		withSecondPath(t)(a, b)
		// The cut stays shorter than the ack timeout: the primary holds
		// (it does not go on unprotected, which would leave the replica
		// behind for good).
		a.AckTimeout, a.FenceAfter = Duration(5*time.Second), Duration(6*time.Second)
	})
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.SecondPathLastHeardUnixMs != 0 })
	wp.proxy.setCut(true)
	time.Sleep(3 * wp.bcfg.HeartbeatTimeout.D())
	s := vmStatus(t, wp.backup, "vm")
	if s.Role != RoleBackup || s.Link != "second-path" || s.WitnessClaimMs != 0 {
		t.Fatalf("backup raced (or left standby) while its primary lives on the second path: %+v", s)
	}
	p := vmStatus(t, wp.primary, "vm")
	if p.Role != RolePrimary || p.WitnessHolder != "hostA" || p.WitnessGeneration != 2 {
		t.Fatalf("primary after the cut: %+v", p)
	}
	wp.proxy.setCut(false)
	acked := p.AckedEpoch
	waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return s.AckedEpoch > acked+5 })
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Link == LinkUp })

	killed := time.Now()
	wp.stopA()
	wp.stoppedA = true
	s = waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
	t.Logf("backup active %v after the primary died", time.Since(killed).Round(time.Millisecond))
	if s.WitnessHolder != "hostB" || s.WitnessGeneration != 3 {
		t.Fatalf("backup active without the record: %+v", s)
	}
}

// TestSecondPathKeepsFastTakeover: with a second path configured, a
// primary whose daemon dies with its link up is still taken over after
// the closed-link grace, not after the second path's timeout: nothing
// arrives on the second path after the close.
func TestSecondPathKeepsFastTakeover(t *testing.T) {
	wp := newWitnessPair(t, func(a, b *Config) {
		withSecondPath(t)(a, b)
		// Longer timeouts make a slow path stand out.
		a.SecondPath.Timeout, b.SecondPath.Timeout = Duration(5*time.Second), Duration(5*time.Second)
		a.HeartbeatTimeout, b.HeartbeatTimeout = Duration(5*time.Second), Duration(5*time.Second)
		a.FenceAfter, b.FenceAfter = Duration(6*time.Second), Duration(6*time.Second)
	})
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.SecondPathLastHeardUnixMs != 0 })
	killed := time.Now()
	wp.stopA()
	wp.stoppedA = true
	s := waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
	took := time.Since(killed)
	t.Logf("backup active %v after the primary died", took.Round(time.Millisecond))
	if took >= wp.bcfg.SecondPath.Timeout.D() {
		t.Fatalf("takeover waited out the second path's timeout (%v): %+v", took, s)
	}
}
