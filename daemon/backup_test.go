package daemon

import (
	"context"
	"errors"
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
	if used != 4<<20 {
		t.Fatalf("replica budget in use %d, want 4 MiB", used)
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
	_, backup, _ := simPair(t)
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
