package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/qemu"
	remuspb "github.com/remusd/remusd/proto"
)

// simPair starts a backup and a primary daemon (in-process, mutual TLS)
// with a sim VM "vm" on the primary, protected to the backup.
func simPair(t *testing.T) (primary, backup *Daemon, bcfg Config) {
	t.Helper()
	tmp := t.TempDir()
	bcfg = DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.HeartbeatInterval, bcfg.HeartbeatTimeout = Duration(50*time.Millisecond), Duration(500*time.Millisecond)
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	pcfg.HeartbeatInterval, pcfg.HeartbeatTimeout = bcfg.HeartbeatInterval, bcfg.HeartbeatTimeout
	pcfg.SimVMs = []SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}}
	securePeers(t, &bcfg, &pcfg)
	backup = startDaemon(t, bcfg)
	primary = startDaemon(t, pcfg)
	if err := primary.Protect(context.Background(), ProtectRequest{VM: "vm", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, primary, "vm", func(s VMStatus) bool { return s.AckedEpoch >= 5 })
	return primary, backup, bcfg
}

func waitStatus(t *testing.T, d *Daemon, vm string, cond func(VMStatus) bool) VMStatus {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := vmStatus(t, d, vm)
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s: condition not met: %+v", vm, d.cfg.Name, s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFailoverRefusedWhilePrimaryConnected is issue 8's hole 9: one
// operator mistake must not start a second copy.
func TestFailoverRefusedWhilePrimaryConnected(t *testing.T) {
	primary, backup, _ := simPair(t)
	err := backup.Failover(context.Background(), FailoverRequest{VM: "vm"})
	if err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("failover beside a connected primary: %v", err)
	}
	if s := vmStatus(t, backup, "vm"); s.Role != RoleBackup {
		t.Fatalf("refused failover changed the role: %+v", s)
	}
	// --force does it (logged loudly), at the operator's risk.
	if err := backup.Failover(context.Background(), FailoverRequest{VM: "vm", Force: true}); err != nil {
		t.Fatalf("forced failover: %v", err)
	}
	if s := vmStatus(t, backup, "vm"); s.Role != RoleActive {
		t.Fatalf("after a forced failover: %+v", s)
	}
	_ = primary
}

// TestUnprotectFreesReplica: a replica whose owner ended protection is
// freed (issue 8, item 4), and its budget with it.
func TestUnprotectFreesReplica(t *testing.T) {
	primary, backup, _ := simPair(t)
	backup.mu.Lock()
	used := backup.replicaBytes()
	backup.mu.Unlock()
	if want := replicaCost(4<<20, "sim", false); used != want {
		t.Fatalf("replica budget in use %d, want %d (memory, staging, link buffers)", used, want)
	}
	if err := primary.Unprotect(context.Background(), "vm"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		backup.mu.Lock()
		_, still := backup.vms["vm"]
		used = backup.replicaBytes()
		backup.mu.Unlock()
		if !still && used == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica not freed after unprotect (still %v, %d bytes charged)", still, used)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestForget releases a replica on the operator's word, so that another
// peer may protect the VM here.
func TestForget(t *testing.T) {
	primary, backup, _ := simPair(t)
	// Not while the owner replicates: it would only copy everything again.
	if err := backup.Forget(context.Background(), "vm"); err == nil || !strings.Contains(err.Error(), "unprotect") {
		t.Fatalf("forget beside a connected owner: %v", err)
	}
	// The owner goes away (no goodbye): now the operator may release it.
	primary.mu.Lock()
	pv := primary.vms["vm"]
	primary.mu.Unlock()
	pv.stop()
	<-pv.done
	waitStatus(t, backup, "vm", func(s VMStatus) bool { return s.Link != LinkUp })
	if err := backup.Forget(context.Background(), "vm"); err != nil {
		t.Fatal(err)
	}
	backup.mu.Lock()
	_, still := backup.vms["vm"]
	backup.mu.Unlock()
	if still {
		t.Fatal("forgotten replica still listed")
	}
	if err := backup.Forget(context.Background(), "vm"); !errors.Is(err, ErrUnknownVM) {
		t.Fatalf("forget twice: %v", err)
	}
	if err := backup.Forget(context.Background(), "../x"); err == nil || !strings.Contains(err.Error(), "not valid") {
		t.Fatalf("forget with a path: %v", err)
	}
}

// TestStandbyStartDoesNotBlockStatus is issue 8's hole 10: starting a
// standby QEMU (up to 30 s) held the daemon-wide lock, so status and
// failover blocked behind it.
func TestStandbyStartDoesNotBlockStatus(t *testing.T) {
	tmp := t.TempDir()
	cfg := DefaultConfig()
	cfg.Name, cfg.StateDir, cfg.Insecure = "hostB", filepath.Join(tmp, "state"), true
	cfg.Standby = StandbyConfig{RunDir: filepath.Join(tmp, "run")}
	cfg.QemuVMs = []QemuVM{{Name: "g", MemoryMiB: 16, Autostart: boolp(false)}}
	d, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.ctx = context.Background()
	release := make(chan struct{})
	entered := make(chan struct{})
	d.newStandby = func(ctx context.Context, spec qemu.Spec, log *zap.Logger, opts ...qemu.ReplicaOption) (*qemu.Replica, error) {
		close(entered)
		<-release
		return nil, errors.New("test: no standby")
	}
	ver, err := localQEMUVersion(context.Background(), "")
	if err != nil {
		t.Skip(err) // no QEMU binary: the version check comes first
	}
	spec := qemu.Spec{Name: "g", MemoryMiB: 16}
	hello := &remuspb.Hello{VmName: "g", Backend: qemu.BackendName, BackendVersion: ver, BackendConfig: spec.Config(), MemoryBytes: uint64(spec.MemoryBytes())}
	done := make(chan error, 1)
	go func() {
		_, err := d.backupFor(context.Background(), hello, "hostA")
		done <- err
	}()
	<-entered
	// The standby is "starting" (blocked): status answers, and shows it.
	st, err := d.Status(context.Background())
	if err != nil || len(st) != 1 || st[0].Role != RoleStarting || st[0].Busy == "" {
		t.Fatalf("status while a standby starts: %+v, %v", st, err)
	}
	if err := d.Failover(context.Background(), FailoverRequest{VM: "g"}); !errors.Is(err, ErrBusy) {
		t.Fatalf("failover while the replica is being built: %v", err)
	}
	close(release)
	if err := <-done; err == nil {
		t.Fatal("a failed standby start was reported as success")
	}
	if s := vmStatus(t, d, "g"); s.Role != RoleStopped || s.Busy != "" {
		t.Fatalf("after the failed start: %+v", s)
	}
}

// TestInsecurePairing: plaintext on loopback when both daemons say
// insecure; a peer is then who its Hello says, and still only configured
// peers get a replica.
func TestInsecurePairing(t *testing.T) {
	tmp := t.TempDir()
	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir, bcfg.Insecure = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b"), true
	bcfg.Peers = []Peer{{Name: "hostA", VMs: []string{"vm"}}}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir, pcfg.Insecure = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a"), true
	pcfg.Peers = []Peer{{Name: "hostB", Address: bcfg.Listen}}
	pcfg.SimVMs = []SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}, {Name: "other", MemoryBytes: 4 << 20, Rate: 1000}}
	backup := startDaemon(t, bcfg)
	primary := startDaemon(t, pcfg)
	if err := primary.Protect(context.Background(), ProtectRequest{VM: "vm", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	s := waitStatus(t, primary, "vm", func(s VMStatus) bool { return s.AckedEpoch >= 3 })
	if !s.Insecure || s.PeerName != "hostB" {
		t.Fatalf("primary status over an insecure link: %+v", s)
	}
	if b := vmStatus(t, backup, "vm"); !b.Insecure || b.PeerName != "hostA" {
		t.Fatalf("backup status: %+v", b)
	}
	// A VM the backup does not accept from hostA is refused.
	if err := primary.Protect(context.Background(), ProtectRequest{VM: "other", Peer: "hostB"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, primary, "other", func(s VMStatus) bool { return strings.Contains(s.LastError, "does not back up VM other") })
	backup.mu.Lock()
	_, created := backup.vms["other"]
	backup.mu.Unlock()
	if created {
		t.Fatal("a VM not accepted from the peer got a replica")
	}
}

// TestHandshakeSlots: idle connections from one stranger cannot use up
// the pre-Hello slots, and never the ones of a configured peer's address.
func TestHandshakeSlots(t *testing.T) {
	h := newHandshakeSlots([]Peer{{Name: "hostA", Address: "10.0.0.1:7788"}}, zap.NewNop())
	addr := func(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000} }
	var rel []func()
	for i := 0; i < maxHandshakesPerIP; i++ {
		r, ok := h.take(addr("192.0.2.7"))
		if !ok {
			t.Fatalf("slot %d refused", i)
		}
		rel = append(rel, r)
	}
	if _, ok := h.take(addr("192.0.2.7")); ok {
		t.Fatal("one address got more than its share of pre-Hello slots")
	}
	// Strangers from many addresses fill the shared slots ...
	for i := 0; h.total < maxHandshakes; i++ {
		if _, ok := h.take(addr(fmt.Sprintf("198.51.100.%d", i))); !ok {
			t.Fatalf("shared slot refused at %d", h.total)
		}
	}
	if _, ok := h.take(addr("198.51.100.250")); ok {
		t.Fatal("more pre-Hello connections than the total")
	}
	// ... but the peer's address still gets its own.
	for i := 0; i < maxHandshakesPerPeer; i++ {
		if _, ok := h.take(addr("10.0.0.1")); !ok {
			t.Fatalf("the configured peer was locked out (slot %d)", i)
		}
	}
	rel[0]()
	if _, ok := h.take(addr("192.0.2.7")); !ok {
		t.Fatal("a released slot was not reusable")
	}
}
