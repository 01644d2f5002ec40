package daemon

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/hypervisor/qemu"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// backupOfQemuVM starts a backup daemon (hostB) that backs up qemu VM g
// (cold standby: no QEMU process, the replica RAM file is mapped), and a
// hostA daemon (not running) whose dialPeer speaks mTLS as hostA.
func backupOfQemuVM(t *testing.T) (backup, a *Daemon, hello *remuspb.Hello) {
	t.Helper()
	ver, err := localQEMUVersion(context.Background(), "")
	if err != nil {
		t.Skip(err)
	}
	tmp := t.TempDir()
	bcfg := DefaultConfig()
	bcfg.Name, bcfg.Listen, bcfg.Control, bcfg.StateDir = "hostB", freePort(t), filepath.Join(tmp, "b.sock"), filepath.Join(tmp, "b")
	bcfg.Standby = StandbyConfig{RunDir: filepath.Join(tmp, "standby"), Cold: true}
	q := QemuVM{Name: "g", MemoryMiB: 16, Autostart: boolp(false)}
	bcfg.QemuVMs = []QemuVM{q}
	pcfg := DefaultConfig()
	pcfg.Name, pcfg.Control, pcfg.StateDir = "hostA", filepath.Join(tmp, "a.sock"), filepath.Join(tmp, "a")
	securePeers(t, &bcfg, &pcfg)
	backup = startDaemon(t, bcfg)
	a, err = New(pcfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec := backup.standbySpec(q, nil)
	hello = &remuspb.Hello{ProtocolVersion: checkpoint.ProtocolVersion, VmName: "g", ProtectionId: "p1", Host: "hostA",
		MemoryBytes: uint64(spec.MemoryBytes()), PageSize: 4096, Backend: qemu.BackendName, BackendVersion: ver, BackendConfig: spec.Config()}
	return backup, a, hello
}

func dialAsHostA(t *testing.T, a, backup *Daemon, hello *remuspb.Hello) (net.Conn, *transport.Reader, *transport.Writer) {
	t.Helper()
	conn, err := a.dialPeer(context.Background(), &net.Dialer{Timeout: 5 * time.Second}, backup.cfg.Listen, "hostB")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r, w := transport.NewReader(conn, transport.DefaultLimits()), transport.NewWriter(conn)
	if err := w.WriteFrame(transport.KindHello, hello, nil); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	f, err := r.ReadFrame()
	if err != nil {
		t.Fatal(err)
	}
	wel, ok := f.Header.(*remuspb.Welcome)
	if !ok || wel.Error != "" {
		t.Fatalf("welcome: %+v", f.Header)
	}
	return conn, r, w
}

// TestForgetUnderLiveLink: the owner is inside an epoch when the operator
// runs `remusd forget g` (here with the link marked as gone, as after a
// heartbeat timeout): the replica's memory must not be unmapped under the
// link's receive loop (it crashed the daemon with SIGSEGV on the next
// PAGE_SAME page); the link is ended first.
func TestForgetUnderLiveLink(t *testing.T) {
	backup, a, hello := backupOfQemuVM(t)
	_, _, w := dialAsHostA(t, a, backup, hello)
	if err := w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: 1, BaseEpoch: 0, PageCount: 16 << 20 / 4096, Full: true}, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := backup.Forget(context.Background(), "g"); err == nil {
		t.Fatal("forget beside a connected owner succeeded")
	}
	// As if the link had gone silent: forget closes it before freeing.
	backup.mu.Lock()
	v := backup.vms["g"]
	release := backup.dropReplica(v)
	backup.mu.Unlock()
	release()
	// PAGE_SAME: the backup copies its committed copy of pfn 0.
	b := &remuspb.PageBatch{Epoch: 1, FirstIndex: 0, Pfns: []uint64{0},
		Encodings: []byte{byte(remuspb.PageEncoding_PAGE_SAME)}, Lengths: []uint32{0}}
	if err := w.WriteFrame(transport.KindPageBatch, b, nil); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	// Still alive (a SIGSEGV would have ended the test binary), and the
	// VM is back to "stopped" on this host.
	if s := vmStatus(t, backup, "g"); s.Role != RoleStopped {
		t.Fatalf("after dropping the replica: %+v", s)
	}
}
