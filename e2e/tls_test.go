package e2e

import (
	"crypto/tls"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/internal/pki"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// TestStrangers (issue 8, holes 1, 3 and 4): a backup replicating a VM
// for its owner is approached by everyone else who can reach its port.
// None of them may create, replace, reset or end a replica, allocate
// beyond the budget, or reach a file path; the owner's protection
// carries on untouched.
func TestStrangers(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)

	bcfg := baseConfig(t, dir, "backup")
	bcfg.Listen = "127.0.0.1:0"
	bcfg.ReplicaBudgetMiB = 64
	pcfg := baseConfig(t, dir, "primary")
	pcfg.SimVMs = []daemon.SimVM{{Name: "vm", MemoryBytes: 4 << 20, Rate: 20000}}
	trust(&bcfg, &pcfg)
	// A second configured peer, allowed to protect some VMs here (the
	// owner's "vm" among them: only ownership keeps it out of that one).
	bcfg.Peers = append(bcfg.Peers, daemon.Peer{Name: "neighbour", VMs: []string{"vm", "other", "big"}})
	backup := startDaemon(t, dir, "backup", bcfg)
	addr := backup.listenAddr(t)
	startDaemon(t, dir, "primary", pcfg)
	if r := runCLI(t, "protect", "vm", "--peer", addr, "--control", pcfg.Control); r.code != 0 {
		t.Fatalf("protect: %v", r)
	}
	waitFor(t, 30*time.Second, "epochs acked over mutual TLS", func() (bool, string) {
		s, _ := vmStatus(t, pcfg.Control, "vm")
		return s.AckedEpoch > 5, s.Link + " " + s.LastError
	})
	before, _ := vmStatus(t, pcfg.Control, "vm")
	bbefore, _ := vmStatus(t, bcfg.Control, "vm")
	if bbefore.PeerName != "primary" {
		t.Fatalf("backup status does not name the replica's owner: %+v", bbefore)
	}

	// 1. A daemon with a certificate of another CA never gets a frame in.
	rogueCA, err := pki.NewCA("rogue-ca")
	if err != nil {
		t.Fatal(err)
	}
	rf, err := rogueCA.IssueFiles(filepath.Join(dir, "rogue-tls"), "rogue", pki.HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rf.CA = bcfg.TLS.CA // it trusts the backup, but its own certificate is foreign
	if !refusedInHandshake(t, addr, rf) {
		t.Fatal("a certificate of a foreign CA got past the handshake")
	}
	// 2. The same CA but an identity the backup does not list: refused in
	// the handshake too.
	if !refusedInHandshake(t, addr, hostTLS(t, dir, "stranger")) {
		t.Fatal("an unlisted identity got past the handshake")
	}
	// 3. Plaintext to a TLS listener.
	if c, err := net.DialTimeout("tcp", addr, 5*time.Second); err == nil {
		w := transport.NewWriter(c)
		_ = w.WriteFrame(transport.KindHello, strangerHello("vm", "primary", 4<<20), nil)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if f, err := transport.NewReader(c, transport.DefaultLimits()).ReadFrame(); err == nil && f.Kind == transport.KindWelcome {
			if w, _ := f.Header.(*remuspb.Welcome); w.Error == "" {
				t.Fatal("a plaintext Hello was welcomed by a TLS listener")
			}
		}
		c.Close()
	}

	// A configured peer that does not own the replica.
	nb := hostTLS(t, dir, "neighbour")
	refused := func(what string, h *remuspb.Hello, wantInError string) {
		t.Helper()
		c, err := tryTLS(addr, nb)
		if err != nil {
			t.Fatalf("%s: neighbour handshake: %v", what, err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := transport.NewWriter(c).WriteFrame(transport.KindHello, h, nil); err != nil {
			t.Fatalf("%s: send hello: %v", what, err)
		}
		w := transport.NewWriter(c)
		// Frames it would send if welcomed: a full epoch, then Goodbye.
		_ = w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: 1, Full: true, PageCount: uint32(h.MemoryBytes / hypervisor.PageSize)}, nil)
		_ = w.WriteFrame(transport.KindGoodbye, &remuspb.Goodbye{Reason: "stranger says goodbye"}, nil)
		f, err := transport.NewReader(c, transport.DefaultLimits()).ReadFrame()
		if err != nil {
			t.Fatalf("%s: no answer: %v", what, err)
		}
		wel, ok := f.Header.(*remuspb.Welcome)
		if !ok || wel.Error == "" || !strings.Contains(wel.Error, wantInError) {
			t.Fatalf("%s: answer %v %+v, want a refusal mentioning %q", what, f.Kind, f.Header, wantInError)
		}
		t.Logf("%s: refused: %s", what, wel.Error)
	}
	// 4. A new protection of the owner's VM (hole 1).
	refused("new protection of another's replica", strangerHello("vm", "neighbour", 4<<20), "belongs to")
	// 5. A Hello claiming to be the owner over the neighbour's certificate.
	refused("hello claiming another host", strangerHello("vm", "primary", 4<<20), "certificate")
	// 6. A VM the neighbour may not protect here.
	refused("VM not accepted from this peer", strangerHello("elsewhere", "neighbour", 4<<20), "does not back up")
	// 7. Names with path characters (hole 3).
	for _, name := range []string{"../../escape", "a/b", ".hidden", "x\x00y"} {
		refused("name "+name, strangerHello(name, "neighbour", 4<<20), "not valid")
	}
	// 8. Beyond the replica budget (hole 4): 64 MiB, the 4 MiB replica charged
	// with its staging and link buffers in use.
	refused("replica beyond the budget", strangerHello("big", "neighbour", 64<<20), "budget")
	// 9. A memory size no replica can have.
	refused("absurd memory size", strangerHello("other", "neighbour", 1<<50), "memory size")

	// Nothing changed for the owner: same link, committed epoch still
	// growing from where it was, no Goodbye taken, no replica created.
	waitFor(t, 30*time.Second, "owner still replicating", func() (bool, string) {
		s, _ := vmStatus(t, pcfg.Control, "vm")
		return s.AckedEpoch > before.AckedEpoch+5, s.Link + " " + s.LastError
	})
	after, _ := vmStatus(t, pcfg.Control, "vm")
	if after.Reconnects != before.Reconnects {
		t.Errorf("the owner's link was cut: reconnects %d → %d", before.Reconnects, after.Reconnects)
	}
	bafter, _ := vmStatus(t, bcfg.Control, "vm")
	if bafter.Role != daemon.RoleBackup || bafter.Epoch < bbefore.Epoch || bafter.Link != daemon.LinkUp || bafter.PeerName != "primary" {
		t.Errorf("backup's replica after the strangers: %+v (before %+v)", bafter, bbefore)
	}
	if bafter.LinksRefused == 0 {
		t.Errorf("backup status counts no refused links: %+v", bafter)
	}
	all, err := (daemon.ControlClient{Path: bcfg.Control}).Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 {
		t.Errorf("strangers created replicas: %+v", all)
	}
	if _, err := os.Stat(filepath.Join(dir, "escape.backup.log")); err == nil {
		t.Error("a VM name from the wire escaped the state directory")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), "escape") || strings.Contains(e.Name(), "hidden") {
			t.Errorf("a file named after a stranger's VM appeared: %s", e.Name())
		}
	}
}

// refusedInHandshake reports whether the backup at addr refuses a
// connection with certificate f before any frame: a TLS 1.3 client
// learns of the server's refusal of its certificate on its first read.
func refusedInHandshake(t *testing.T, addr string, f transport.TLSFiles) bool {
	t.Helper()
	c, err := tryTLS(addr, f)
	if err != nil {
		return true
	}
	defer c.Close()
	_ = transport.NewWriter(c).WriteFrame(transport.KindHello, strangerHello("vm", "primary", 4<<20), nil)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if err == nil {
		return false
	}
	t.Logf("refused in the handshake: %v", err)
	return true
}

// tryTLS opens a mutual-TLS connection with certificate f.
func tryTLS(addr string, f transport.TLSFiles) (*tls.Conn, error) {
	cfg, err := f.ClientConfig(func(string) error { return nil })
	if err != nil {
		return nil, err
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	return tls.DialWithDialer(d, "tcp", addr, cfg)
}

// strangerHello is a well-formed sim Hello for vm from host.
func strangerHello(vm, host string, memory uint64) *remuspb.Hello {
	spec, _ := json.Marshal(struct {
		Sim sim.Config `json:"sim"`
	}{sim.Config{MemoryBytes: int64(memory)}.WithDefaults()})
	return &remuspb.Hello{ProtocolVersion: checkpoint.ProtocolVersion, VmName: vm, Host: host, ProtectionId: "stranger-" + vm,
		MemoryBytes: memory, PageSize: hypervisor.PageSize, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, BackendConfig: spec}
}
