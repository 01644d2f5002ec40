package daemon

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/failover/witness/etcdtest"
)

// cutProxy forwards TCP to a backend until cut: then it closes every
// connection and refuses new ones (a replication link partition), until
// mended.
type cutProxy struct {
	ln      net.Listener
	backend string
	mu      sync.Mutex
	cut     bool
	conns   []net.Conn
}

func newCutProxy(t *testing.T, backend string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, backend: backend}
	t.Cleanup(func() { ln.Close(); p.setCut(true) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			if p.cut {
				p.mu.Unlock()
				c.Close()
				continue
			}
			b, err := net.DialTimeout("tcp", backend, 2*time.Second)
			if err != nil {
				p.mu.Unlock()
				c.Close()
				continue
			}
			p.conns = append(p.conns, c, b)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(b, c); b.Close(); c.Close() }()
			go func() { _, _ = io.Copy(c, b); b.Close(); c.Close() }()
		}
	}()
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for _, c := range p.conns {
			c.Close()
		}
		p.conns = nil
	}
}

// witnessPair is a sim primary (hostA) and backup (hostB) with a witness,
// the primary reaching the backup through a proxy the test can cut.
type witnessPair struct {
	etcd               *etcdtest.Server
	proxy              *cutProxy
	acfg, bcfg         Config
	primary, backup    *Daemon
	stopA, stopB       func()
	stoppedA, stoppedB bool
}

func newWitnessPair(t *testing.T, tweak func(a, b *Config)) *witnessPair {
	t.Helper()
	wp := &witnessPair{etcd: etcdtest.Start(t)}
	tmp := t.TempDir()
	wc := &WitnessConfig{Endpoints: wp.etcd.ClientURLs(), OpTimeout: Duration(500 * time.Millisecond)}
	b := DefaultConfig()
	b.Name, b.Listen, b.Control, b.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	a := DefaultConfig()
	a.Name, a.Control, a.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	a.SimVMs = []SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000, OutputEvery: 16}}
	for _, c := range []*Config{&a, &b} {
		c.Witness = wc
		c.HeartbeatInterval, c.HeartbeatTimeout = Duration(50*time.Millisecond), Duration(500*time.Millisecond)
		c.AckTimeout, c.FenceAfter = Duration(time.Second), Duration(1500*time.Millisecond)
	}
	securePeers(t, &a, &b)
	wp.proxy = newCutProxy(t, b.Listen)
	a.Peers[0].Address = wp.proxy.addr()
	if tweak != nil {
		tweak(&a, &b)
	}
	wp.acfg, wp.bcfg = a, b
	wp.backup, wp.stopB = runDaemon(t, b)
	wp.primary, wp.stopA = runDaemon(t, a)
	t.Cleanup(func() {
		if !wp.stoppedA {
			wp.stopA()
		}
		if !wp.stoppedB {
			wp.stopB()
		}
	})
	if err := wp.primary.Protect(context.Background(), ProtectRequest{VM: "vm", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return s.AckedEpoch >= 5 })
	return wp
}

func (wp *witnessPair) record(t *testing.T) witness.Record {
	t.Helper()
	w, err := witness.Dial(context.Background(), wp.etcd.WitnessConfig(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rec, _, err := w.Get(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// TestWitnessTakeoverOnDeadPrimary: the primary's daemon dies (its sim
// guest with it); the backup sees the link closed, waits the grace, wins
// the record and activates on its own.
func TestWitnessTakeoverOnDeadPrimary(t *testing.T) {
	wp := newWitnessPair(t, nil)
	if s := vmStatus(t, wp.primary, "vm"); s.WitnessHolder != "hostA" || s.WitnessGeneration != 1 || s.WitnessView != WitnessHolder {
		t.Fatalf("primary's witness status: %+v", s)
	}
	if s := vmStatus(t, wp.backup, "vm"); s.WitnessHolder != "hostA" || s.WitnessGeneration != 1 || s.WitnessView != WitnessStandby {
		t.Fatalf("backup's witness status: %+v", s)
	}
	killed := time.Now()
	wp.stopA() // a sim primary's daemon stopping is its guest dying (no goodbye)
	wp.stoppedA = true
	s := waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
	t.Logf("backup active %v after the primary died", time.Since(killed).Round(time.Millisecond))
	if s.WitnessHolder != "hostB" || s.WitnessGeneration != 2 {
		t.Fatalf("backup after the takeover: %+v", s)
	}
	if rec := wp.record(t); rec.Holder != "hostB" || rec.Generation != 2 {
		t.Fatalf("witness record after the takeover: %v", rec)
	}
}

// TestWitnessPartitionKeepsOneCopy: the replication link is cut while both
// hosts live. The primary claims first (its priority), the backup finds
// the record moved on and stays a standby; at the ack timeout the primary
// claims again and runs unprotected. One copy, never two. When the link
// comes back, protection resumes under the new generation.
func TestWitnessPartitionKeepsOneCopy(t *testing.T) {
	wp := newWitnessPair(t, nil)
	wp.proxy.setCut(true)
	s := waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return strings.Contains(s.OutBuf, "unprotected") })
	t.Logf("primary after the cut: %s, witness %s gen %d (%s)", s.OutBuf, s.WitnessHolder, s.WitnessGeneration, s.WitnessView)
	if s.WitnessHolder != "hostA" || s.WitnessGeneration < 3 {
		t.Fatalf("primary ran unprotected without winning the record: %+v", s)
	}
	// Well past the backup's grace: it must still be a standby.
	time.Sleep(wp.bcfg.HeartbeatTimeout.D() + 2*wp.bcfg.TakeoverGrace.D())
	b := vmStatus(t, wp.backup, "vm")
	if b.Role != RoleBackup {
		t.Fatalf("the backup took over while the primary lived: %+v", b)
	}
	t.Logf("backup during the cut: link %s, witness view %s (%s)", b.Link, b.WitnessView, b.WitnessError)
	// The link comes back: full resync under the new generation.
	wp.proxy.setCut(false)
	before := vmStatus(t, wp.primary, "vm").AckedEpoch
	s = waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return s.AckedEpoch > before+5 && !strings.Contains(s.OutBuf, "unprotected") })
	if b := vmStatus(t, wp.backup, "vm"); b.Role != RoleBackup || b.WitnessGeneration != s.WitnessGeneration {
		t.Fatalf("after the link came back: backup %+v, primary %+v", b, s)
	}
}

// TestWitnessDownChangesNothing: a witness that is down while both peers
// are healthy changes nothing.
func TestWitnessDownChangesNothing(t *testing.T) {
	wp := newWitnessPair(t, nil)
	wp.etcd.Stop()
	before := vmStatus(t, wp.primary, "vm").AckedEpoch
	s := waitStatus(t, wp.primary, "vm", func(s VMStatus) bool { return s.AckedEpoch > before+20 })
	if strings.Contains(s.OutBuf, "unprotected") || s.WitnessView != WitnessHolder {
		t.Fatalf("primary with the witness down: %+v", s)
	}
	if b := vmStatus(t, wp.backup, "vm"); b.Role != RoleBackup {
		t.Fatalf("backup with the witness down: %+v", b)
	}
}

// TestWitnessIsolatedPrimaryFences: the primary loses both its backup and
// the witness. Nobody can win while the witness is down: the primary
// holds its output and, after fence_after, pauses its guest; the backup
// stays a standby. When the witness is back both race: exactly one wins.
// If the backup wins it activates and the primary, whose retried claim
// loses, fences itself for good; if the primary wins (it retries first)
// its guest runs again and the backup stays a standby.
func TestWitnessIsolatedPrimaryFences(t *testing.T) {
	wp := newWitnessPair(t, nil)
	wp.etcd.Stop()
	wp.proxy.setCut(true)
	time.Sleep(wp.acfg.FenceAfter.D() + time.Second)
	a := vmStatus(t, wp.primary, "vm")
	if a.WitnessView != WitnessUnreachable || strings.Contains(a.OutBuf, "unprotected") {
		t.Fatalf("isolated primary: %+v", a)
	}
	wp.primary.mu.Lock()
	paused := wp.primary.vms["vm"].w.paused
	wp.primary.mu.Unlock()
	if !paused {
		t.Fatal("the isolated primary did not pause its guest after fence_after")
	}
	if b := vmStatus(t, wp.backup, "vm"); b.Role != RoleBackup {
		t.Fatalf("the backup took over without the witness: %+v", b)
	}
	if err := wp.etcd.Restart(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		a, b := vmStatus(t, wp.primary, "vm"), vmStatus(t, wp.backup, "vm")
		rec := wp.record(t)
		switch {
		case rec.Holder == "hostB" && b.Role == RoleActive && a.WitnessView == WitnessFenced:
			t.Logf("the backup won generation %d and runs the VM; the old primary is fenced: %s", rec.Generation, a.LastError)
			return
		case rec.Holder == "hostA" && a.WitnessView == WitnessHolder && strings.Contains(a.OutBuf, "unprotected"):
			if b.Role != RoleBackup {
				t.Fatalf("the primary won generation %d but the backup is %s", rec.Generation, b.Role)
			}
			wp.primary.mu.Lock()
			paused := wp.primary.vms["vm"].w.paused
			wp.primary.mu.Unlock()
			if paused {
				t.Fatal("the primary won the record but its guest stays paused")
			}
			t.Logf("the primary won generation %d and runs on unprotected; the backup stays a standby", rec.Generation)
			return
		case b.Role == RoleActive && a.WitnessView != WitnessFenced && rec.Holder == "hostA":
			t.Fatalf("two copies: backup active while the primary holds the record: %+v / %+v", a, b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no outcome: record %v, primary %+v, backup %+v", rec, a, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWitnessFencingHook: the winner runs the fencing command before it
// activates; a failing or hanging command stops the takeover (policy
// abort), a succeeding one lets it go on.
func TestWitnessFencingHook(t *testing.T) {
	dir := t.TempDir()
	script := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	log := filepath.Join(dir, "fenced")
	for _, tc := range []struct {
		name     string
		cmd      []string
		activate bool
	}{
		{"fails", []string{script("fail.sh", "echo no ipmi >&2; exit 3")}, false},
		{"hangs", []string{script("hang.sh", "sleep 60")}, false},
		{"succeeds", []string{script("ok.sh", `echo "$1 $2" >> `+log), "%vm", "%host"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wp := newWitnessPair(t, func(a, b *Config) {
				b.Fence = FenceConfig{Command: tc.cmd, Timeout: Duration(time.Second)}
			})
			wp.stopA()
			wp.stoppedA = true
			if tc.activate {
				waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
				b, err := os.ReadFile(log)
				if err != nil || strings.TrimSpace(string(b)) != "vm hostA" {
					t.Fatalf("fencing command's arguments: %q, %v", b, err)
				}
				return
			}
			s := waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return strings.Contains(s.WitnessError, "fencing failed") })
			if s.Role != RoleBackup {
				t.Fatalf("activated although fencing failed: %+v", s)
			}
			t.Logf("%s: %s", tc.name, s.WitnessError)
		})
	}
}
