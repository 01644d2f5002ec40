// Package e2e runs the remusd binary as real processes over real TCP on
// 127.0.0.1 and checks the invariants of ARCHITECTURE.md section 1 from
// the outside: through the CLI, the control socket, the replication
// protocol spoken by hand, and the daemons' audit logs.
package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// ---- 2. demo ----

func TestDemoJSON(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	r := runCLI(t, "demo", "--json", "--duration", "2s", "--memory", "16777216", "--dir", dir)
	if r.code != 0 {
		t.Fatalf("remusd demo: %v", r)
	}
	var res struct {
		ReplicaMatchesLastAck   *bool    `json:"replica_matches_last_ack"`
		ReplicaDetail           string   `json:"replica_detail"`
		OutputReleasedBeforeAck *int     `json:"output_released_before_ack"`
		TornEpochsApplied       *int     `json:"torn_epochs_applied"`
		OutputLost              *int     `json:"output_lost"`
		EpochsCommitted         uint64   `json:"epochs_committed"`
		LastAckedEpoch          uint64   `json:"last_acked_epoch"`
		WireBytesSent           uint64   `json:"wire_bytes_sent"`
		EpochWireBytes          uint64   `json:"epoch_wire_bytes"`
		CompressionRatio        float64  `json:"compression_ratio"`
		FailoverMs              float64  `json:"failover_ms"`
		OutputSeenFromBackup    int      `json:"output_seen_from_backup"`
		LastSeqBeforeFailover   uint64   `json:"last_seq_before_failover"`
		FirstSeqAfterFailover   uint64   `json:"first_seq_after_failover"`
		Passed                  *bool    `json:"passed"`
		MemoryBytes             int64    `json:"memory_bytes"`
		RunSeconds              *float64 `json:"run_seconds"`
	}
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	if err := dec.Decode(&res); err != nil {
		t.Fatalf("demo --json output is not JSON: %v\n%s", err, r.stdout)
	}
	if dec.More() {
		t.Errorf("demo --json printed more than one JSON value:\n%s", r.stdout)
	}
	check := func(ok bool, format string, a ...any) {
		t.Helper()
		if !ok {
			t.Errorf(format, a...)
		}
	}
	check(res.ReplicaMatchesLastAck != nil && *res.ReplicaMatchesLastAck, "replica_matches_last_ack not true (%s)", res.ReplicaDetail)
	check(res.OutputReleasedBeforeAck != nil && *res.OutputReleasedBeforeAck == 0, "output_released_before_ack = %v, want 0", deref(res.OutputReleasedBeforeAck))
	check(res.TornEpochsApplied != nil && *res.TornEpochsApplied == 0, "torn_epochs_applied = %v, want 0", deref(res.TornEpochsApplied))
	check(res.OutputLost != nil && *res.OutputLost == 0, "output_lost = %v, want 0", deref(res.OutputLost))
	check(res.EpochsCommitted > 0, "epochs_committed = %d, want > 0", res.EpochsCommitted)
	check(res.LastAckedEpoch > 0, "last_acked_epoch = %d, want > 0", res.LastAckedEpoch)
	check(res.EpochWireBytes > 0 && res.WireBytesSent > res.EpochWireBytes,
		"wire_bytes_sent = %d, epoch_wire_bytes = %d: want both > 0, the first larger (handshake, heartbeats)", res.WireBytesSent, res.EpochWireBytes)
	check(res.CompressionRatio > 1, "compression_ratio = %v, want > 1", res.CompressionRatio)
	check(res.FailoverMs > 0, "failover_ms = %v, want > 0", res.FailoverMs)
	check(res.MemoryBytes == 16777216, "memory_bytes = %d, want the 16777216 asked for", res.MemoryBytes)
	if res.OutputSeenFromBackup > 0 {
		check(res.FirstSeqAfterFailover > res.LastSeqBeforeFailover,
			"first_seq_after_failover %d not after last_seq_before_failover %d", res.FirstSeqAfterFailover, res.LastSeqBeforeFailover)
	}
	check(res.Passed != nil && *res.Passed, "passed not true")
	if t.Failed() {
		t.Logf("demo output:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	}
}

func deref[T any](p *T) any {
	if p == nil {
		return "<missing>"
	}
	return *p
}

// ---- 3. manual failover ----

const (
	hbInterval = 50 * time.Millisecond
	hbTimeout  = 500 * time.Millisecond
)

func TestManualFailover(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)

	bcfg := baseConfig(t, dir, "backup")
	bcfg.Listen = "127.0.0.1:0"
	bcfg.Takeover = daemon.TakeoverManual
	bcfg.HeartbeatInterval = daemon.Duration(hbInterval)
	bcfg.HeartbeatTimeout = daemon.Duration(hbTimeout)
	pcfg := baseConfig(t, dir, "primary")
	pcfg.HeartbeatInterval = daemon.Duration(hbInterval)
	pcfg.HeartbeatTimeout = daemon.Duration(hbTimeout)
	pcfg.SimVMs = []daemon.SimVM{{Name: "demo", MemoryBytes: 4 << 20, Rate: 20000}}
	trust(&bcfg, &pcfg)
	backup := startDaemon(t, dir, "backup", bcfg)
	addr := backup.listenAddr(t)
	primary := startDaemon(t, dir, "primary", pcfg)

	if s, ok := vmStatus(t, pcfg.Control, "demo"); !ok || s.Role != daemon.RoleLocal {
		t.Fatalf("before protect: primary's demo = %+v (found %v), want role local", s, ok)
	}
	r := runCLI(t, "protect", "demo", "--peer", addr, "--control", pcfg.Control)
	if r.code != 0 {
		t.Fatalf("remusd protect: %v", r)
	}
	if !strings.Contains(r.stdout, "demo") {
		t.Errorf("protect printed no confirmation naming the VM: %v", r)
	}

	var acked uint64
	waitFor(t, 30*time.Second, "primary acked_epoch > 10", func() (bool, string) {
		s, ok := vmStatus(t, pcfg.Control, "demo")
		if !ok {
			return false, "demo missing from primary status"
		}
		if s.Role != daemon.RolePrimary {
			t.Fatalf("primary's demo role = %q after protect, want %q", s.Role, daemon.RolePrimary)
		}
		acked = s.AckedEpoch
		return s.AckedEpoch > 10, s.Link + " " + s.LastError
	})
	bs, ok := vmStatus(t, bcfg.Control, "demo")
	if !ok || bs.Role != daemon.RoleBackup {
		t.Fatalf("backup's demo = %+v (found %v), want role backup", bs, ok)
	}
	if bs.Epoch == 0 || bs.EpochsCommitted == 0 {
		t.Errorf("backup status shows no committed epoch while the primary has acks: %+v", bs)
	}

	// While the primary is connected and healthy, failover is refused
	// (it would run two copies: issue 8, hole 9).
	r = runCLI(t, "failover", "demo", "--control", bcfg.Control)
	if r.code == 0 || !strings.Contains(r.stderr, "--force") || !strings.Contains(r.stderr, "connected") {
		t.Fatalf("failover beside a healthy primary: want a refusal pointing at --force: %v", r)
	}
	if s, _ := vmStatus(t, bcfg.Control, "demo"); s.Role != daemon.RoleBackup {
		t.Fatalf("a refused failover changed the backup's role to %q", s.Role)
	}

	// The primary host dies. The last ack the backup could have sent is at
	// least what the primary reported before dying.
	ps, _ := vmStatus(t, pcfg.Control, "demo")
	acked = max(acked, ps.AckedEpoch)
	primary.kill(t)

	waitFor(t, 20*time.Second, "backup reports link lost", func() (bool, string) {
		s, ok := vmStatus(t, bcfg.Control, "demo")
		if !ok {
			t.Fatal("demo vanished from the backup's status")
		}
		if s.Role != daemon.RoleBackup {
			t.Fatalf("manual takeover mode: backup became %q on its own before reporting the link lost", s.Role)
		}
		return s.Link == daemon.LinkLost, "link " + s.Link
	})
	// Manual mode must not take over by itself: keep watching for at
	// least two more heartbeat timeouts.
	watchUntil := time.Now().Add(2*hbTimeout + 100*time.Millisecond)
	var last daemon.VMStatus
	for time.Now().Before(watchUntil) {
		s, ok := vmStatus(t, bcfg.Control, "demo")
		if !ok {
			t.Fatal("demo vanished from the backup's status")
		}
		if s.Role != daemon.RoleBackup {
			t.Fatalf("manual takeover mode: backup took over by itself (role %q) after the link was lost", s.Role)
		}
		last = s
		time.Sleep(50 * time.Millisecond)
	}
	if last.Link != daemon.LinkLost {
		t.Errorf("backup link = %q while the primary is dead, want %q", last.Link, daemon.LinkLost)
	}
	// Invariant 4: the replica holds every epoch the primary saw acked.
	if last.Epoch < acked {
		t.Errorf("backup committed epoch %d < epoch %d the primary saw acknowledged", last.Epoch, acked)
	}

	r = runCLI(t, "failover", "demo", "--control", bcfg.Control)
	if r.code != 0 {
		t.Fatalf("remusd failover on the backup: %v", r)
	}
	s, ok := vmStatus(t, bcfg.Control, "demo")
	if !ok || s.Role != daemon.RoleActive {
		t.Fatalf("after failover: backup's demo = %+v (found %v), want role active", s, ok)
	}
	if s.Epoch < acked {
		t.Errorf("activated at epoch %d, but the primary saw epoch %d acknowledged", s.Epoch, acked)
	}
	// The activated guest runs: its op counter moves.
	ops0 := s.GuestOps
	waitFor(t, 20*time.Second, "activated guest executes ops", func() (bool, string) {
		s, _ := vmStatus(t, bcfg.Control, "demo")
		return s.GuestOps > ops0, "ops stuck"
	})
	// The audit log says what was activated.
	if rec, ok := lastAudit(t, daemon.AuditPath(bcfg.StateDir, "demo", "backup"), "activate"); !ok {
		t.Errorf("backup audit log has no activate record")
	} else if rec.Epoch != s.Epoch {
		t.Errorf("audit activate epoch %d, status epoch %d", rec.Epoch, s.Epoch)
	}

	r = runCLI(t, "failover", "demo", "--control", bcfg.Control)
	if r.code == 0 {
		t.Fatalf("second failover succeeded: %v", r)
	}
	if !strings.Contains(r.stderr, "demo") || len(strings.TrimSpace(r.stderr)) < 20 {
		t.Errorf("second failover: want a message naming the VM on stderr: %v", r)
	}
	if s, _ := vmStatus(t, bcfg.Control, "demo"); s.Role != daemon.RoleActive {
		t.Errorf("after a refused second failover: role %q, want still active", s.Role)
	}
}

type auditRec struct {
	Event     string `json:"event"`
	Epoch     uint64 `json:"epoch"`
	MemoryXXH uint64 `json:"memory_xxh"`
	DeviceXXH uint64 `json:"device_xxh"`
}

// lastAudit returns the last record of event in an audit log.
func lastAudit(t *testing.T, path, event string) (auditRec, bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("audit log: %v", err)
		return auditRec{}, false
	}
	defer f.Close()
	var last auditRec
	found := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r auditRec
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Errorf("audit log %s: bad line %q: %v", path, sc.Text(), err)
			continue
		}
		if r.Event == event {
			last, found = r, true
		}
	}
	return last, found
}

// ---- 4. operator errors ----

func TestOperatorErrors(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	cfg := baseConfig(t, dir, "host")
	cfg.SimVMs = []daemon.SimVM{{Name: "demo", MemoryBytes: 1 << 20, Rate: 1000}}
	cfg.Peers = []daemon.Peer{{Name: "nobody"}}
	startDaemon(t, dir, "host", cfg)

	t.Run("protect unknown VM", func(t *testing.T) {
		r := runCLI(t, "protect", "nosuchvm", "--peer", "127.0.0.1:1", "--control", cfg.Control)
		if r.code == 0 {
			t.Fatalf("protect of an unknown VM succeeded: %v", r)
		}
		if !strings.Contains(r.stderr, "nosuchvm") || !strings.Contains(strings.ToLower(r.stderr), "unknown") {
			t.Errorf("want stderr naming nosuchvm and saying unknown: %v", r)
		}
	})
	t.Run("protect without peer", func(t *testing.T) {
		r := runCLI(t, "protect", "demo", "--control", cfg.Control)
		if r.code != 2 {
			t.Fatalf("protect without --peer: want exit 2: %v", r)
		}
		if !strings.Contains(r.stderr, "--peer") {
			t.Errorf("want stderr mentioning --peer: %v", r)
		}
	})
	t.Run("failover on a host that runs the VM", func(t *testing.T) {
		r := runCLI(t, "failover", "demo", "--control", cfg.Control)
		if r.code == 0 {
			t.Fatalf("failover of a locally running VM succeeded: %v", r)
		}
		if !strings.Contains(r.stderr, "demo") || !strings.Contains(r.stderr, "backup") {
			t.Errorf("want a message naming the VM and pointing at the backup host: %v", r)
		}
		// Also while it is protected (primary role, backup unreachable).
		r = runCLI(t, "protect", "demo", "--peer", closedPort(t), "--control", cfg.Control)
		if r.code != 0 {
			t.Fatalf("protect towards an unreachable peer: %v", r)
		}
		r = runCLI(t, "failover", "demo", "--control", cfg.Control)
		if r.code == 0 {
			t.Fatalf("failover on the primary succeeded: %v", r)
		}
		if !strings.Contains(r.stderr, "demo") || !strings.Contains(r.stderr, "primary") {
			t.Errorf("want a message naming the VM and its primary role: %v", r)
		}
		if s, _ := vmStatus(t, cfg.Control, "demo"); s.Role != daemon.RolePrimary {
			t.Errorf("after a refused failover: role %q, want primary", s.Role)
		}
	})
	t.Run("status without daemon", func(t *testing.T) {
		r := runCLI(t, "status", "--control", dir+"/nobody-here.sock")
		if r.code == 0 {
			t.Fatalf("status with no daemon succeeded: %v", r)
		}
		if !strings.Contains(r.stderr, "cannot reach") || !strings.Contains(r.stderr, "nobody-here.sock") {
			t.Errorf("want a message saying it cannot reach the socket, naming it: %v", r)
		}
	})
	t.Run("serve with invalid config", func(t *testing.T) {
		bad := baseConfig(t, dir, "bad")
		bad.HeartbeatInterval = daemon.Duration(100 * time.Millisecond)
		bad.HeartbeatTimeout = daemon.Duration(250 * time.Millisecond)
		path := writeConfig(t, dir, "bad", bad)
		r := runCLI(t, "serve", "--config", path)
		if r.code != 3 {
			t.Fatalf("serve with heartbeat_timeout < 3 intervals: want exit 3: %v", r)
		}
		if !strings.Contains(r.stderr, "heartbeat_timeout") {
			t.Errorf("want stderr naming heartbeat_timeout: %v", r)
		}
		if _, err := os.Stat(bad.Control); err == nil {
			t.Errorf("invalid serve left a control socket at %s", bad.Control)
		}
	})
	// The daemon survived all of it.
	if _, ok := vmStatus(t, cfg.Control, "demo"); !ok {
		t.Errorf("daemon lost VM demo")
	}
}

// ---- 5. a lying primary ----

const liarProtection = "e2e-liar-protection"

// liarSpec is the sim guest the hand-written primary claims to protect.
func liarSpec() sim.Config {
	return sim.Config{MemoryBytes: 4 << 20, Workload: "uniform", Rate: 1000, Seed: 7, OutputEvery: 64}.WithDefaults()
}

func liarHello(cfg sim.Config) *remuspb.Hello {
	spec, err := json.Marshal(struct {
		Sim    sim.Config `json:"sim"`
		Output string     `json:"output"`
	}{cfg, ""})
	if err != nil {
		panic(err)
	}
	return &remuspb.Hello{
		ProtocolVersion: checkpoint.ProtocolVersion,
		Host:            liarHost,
		VmName:          "demo",
		ProtectionId:    liarProtection,
		MemoryBytes:     uint64(cfg.MemoryBytes),
		PageSize:        hypervisor.PageSize,
		Backend:         sim.BackendName,
		BackendVersion:  sim.BackendVersion,
		BackendConfig:   spec,
	}
}

// liar is one hand-driven replication connection.
type liar struct {
	t    *testing.T
	conn net.Conn
	w    *transport.Writer
	r    *transport.Reader
}

// liarHost is the hand-driven primary's identity.
const liarHost = "liar"

// dialLiar opens a mutual-TLS connection to the backup at addr with the
// certificate in f.
func dialLiar(t *testing.T, addr string, f transport.TLSFiles) *liar {
	t.Helper()
	conn := dialTLS(t, addr, f)
	t.Cleanup(func() { conn.Close() })
	return &liar{t: t, conn: conn, w: transport.NewWriter(conn), r: transport.NewReader(conn, transport.DefaultLimits())}
}

// dialTLS connects to a backup with certificate f, accepting whatever
// identity the backup's (CA-signed) certificate has.
func dialTLS(t *testing.T, addr string, f transport.TLSFiles) net.Conn {
	t.Helper()
	cfg, err := f.ClientConfig(func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	d := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		t.Fatalf("dial backup: %v", err)
	}
	return conn
}

// hello sends Hello and returns the Welcome.
func (l *liar) hello(h *remuspb.Hello) *remuspb.Welcome {
	l.t.Helper()
	if err := l.w.WriteFrame(transport.KindHello, h, nil); err != nil {
		l.t.Fatalf("send hello: %v", err)
	}
	f := l.next(10 * time.Second)
	wel, ok := f.Header.(*remuspb.Welcome)
	if !ok {
		l.t.Fatalf("expected Welcome, got %v", f.Kind)
	}
	if wel.Error != "" {
		l.t.Fatalf("backup refused the hello: %s", wel.Error)
	}
	return wel
}

// next reads the next non-heartbeat frame.
func (l *liar) next(d time.Duration) transport.Frame {
	l.t.Helper()
	_ = l.conn.SetReadDeadline(time.Now().Add(d))
	for {
		f, err := l.r.ReadFrame()
		if err != nil {
			l.t.Fatalf("read from backup: %v", err)
		}
		if f.Kind != transport.KindHeartbeat {
			return f
		}
	}
}

// expectClosed reads until the backup closes the connection; an Ack (or
// anything but heartbeats) is a failure.
func (l *liar) expectClosed(what string) {
	l.t.Helper()
	_ = l.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	for {
		f, err := l.r.ReadFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				l.t.Fatalf("%s: backup kept the connection open", what)
			}
			return // EOF or reset: closed
		}
		switch h := f.Header.(type) {
		case *remuspb.Heartbeat:
		case *remuspb.Ack:
			l.t.Fatalf("%s: backup acknowledged epoch %d", what, h.Epoch)
		default:
			l.t.Fatalf("%s: unexpected %v from backup", what, f.Kind)
		}
	}
}

// epoch is one epoch as a primary would send it.
type epoch struct {
	num, base uint64
	full      bool
	pfns      []uint64
	pages     []byte
	dev       []byte
	badDigest bool
	pageCount int // announced page count; -1 = len(pfns)
}

// send writes the epoch's frames; write errors are returned (the backup
// may close the link mid-epoch).
func (l *liar) send(e epoch) error {
	enc, err := transport.NewEncoder(transport.EncoderConfig{PageSize: hypervisor.PageSize, CachePages: 0, Workers: 1})
	if err != nil {
		l.t.Fatal(err)
	}
	n := len(e.pfns)
	if e.pageCount >= 0 {
		n = e.pageCount
	}
	if err := l.w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: e.num, BaseEpoch: e.base, PageCount: uint32(n), Full: e.full}, nil); err != nil {
		return err
	}
	sum, err := enc.EncodeEpoch(context.Background(), e.num, e.pfns, e.pages, func(h *remuspb.PageBatch, p []byte) error {
		return l.w.WriteFrame(transport.KindPageBatch, h, p)
	})
	if err != nil {
		return err
	}
	ds := &remuspb.DeviceState{Epoch: e.num, PayloadCrc32C: crc32.Checksum(e.dev, crc32.MakeTable(crc32.Castagnoli))}
	if err := l.w.WriteFrame(transport.KindDeviceState, ds, e.dev); err != nil {
		return err
	}
	digest := transport.EpochDigest(e.pfns, sum.PageHashes, e.dev)
	if e.badDigest {
		digest ^= 0x5a5a
	}
	return l.w.WriteFrame(transport.KindEpochEnd, &remuspb.EpochEnd{Epoch: e.num, PageCount: uint32(n), Digest: digest}, nil)
}

func allPfns(n int) []uint64 {
	p := make([]uint64, n)
	for i := range p {
		p[i] = uint64(i)
	}
	return p
}

func pagesOf(mem []byte, pfns []uint64) []byte {
	out := make([]byte, 0, len(pfns)*hypervisor.PageSize)
	for _, p := range pfns {
		o := int(p) * hypervisor.PageSize
		out = append(out, mem[o:o+hypervisor.PageSize]...)
	}
	return out
}

// liarSetup starts a backup daemon and has a hand-driven primary
// replicate a valid full epoch 1 to it.
type liarSetup struct {
	addr       string
	tls        transport.TLSFiles // the liar's certificate
	bcfg       daemon.Config
	cfg        sim.Config
	numPages   int
	all        []uint64
	mem1, dev1 []byte
	mem2, dev2 []byte
	changed    []uint64 // pages that differ between mem1 and mem2
}

func newLiarSetup(t *testing.T) *liarSetup {
	t.Helper()
	dir := shortTempDir(t)
	bcfg := baseConfig(t, dir, "backup")
	bcfg.Listen = "127.0.0.1:0"
	bcfg.Takeover = daemon.TakeoverManual
	// Generous: the test writes frames by hand on a loaded machine.
	bcfg.HeartbeatInterval = daemon.Duration(200 * time.Millisecond)
	bcfg.HeartbeatTimeout = daemon.Duration(5 * time.Second)
	// The liar is a configured, authenticated peer: what it sends is all
	// that is checked here (strangers are TestStrangers').
	bcfg.Peers = []daemon.Peer{{Name: liarHost, VMs: []string{"demo"}}}
	backup := startDaemon(t, dir, "backup", bcfg)
	s := &liarSetup{addr: backup.listenAddr(t), bcfg: bcfg, cfg: liarSpec(), tls: hostTLS(t, dir, liarHost)}
	s.numPages = int(s.cfg.MemoryBytes / hypervisor.PageSize)
	s.all = allPfns(s.numPages)
	var err error
	if s.mem1, s.dev1, err = sim.Replay(s.cfg, 5000); err != nil {
		t.Fatal(err)
	}
	if s.mem2, s.dev2, err = sim.Replay(s.cfg, 9000); err != nil {
		t.Fatal(err)
	}
	for p := range s.numPages {
		o := p * hypervisor.PageSize
		if string(s.mem1[o:o+hypervisor.PageSize]) != string(s.mem2[o:o+hypervisor.PageSize]) {
			s.changed = append(s.changed, uint64(p))
		}
	}
	if len(s.changed) == 0 {
		t.Fatal("replay produced no changed pages between the two epochs")
	}

	// A valid full epoch 1 is acknowledged.
	l := dialLiar(t, s.addr, s.tls)
	if wel := l.hello(liarHello(s.cfg)); wel.CommittedEpoch != 0 {
		t.Fatalf("fresh replica welcomes with committed epoch %d, want 0", wel.CommittedEpoch)
	}
	if err := l.send(epoch{num: 1, base: 0, full: true, pfns: s.all, pages: pagesOf(s.mem1, s.all), dev: s.dev1, pageCount: -1}); err != nil {
		t.Fatalf("send epoch 1: %v", err)
	}
	f := l.next(20 * time.Second)
	if a, ok := f.Header.(*remuspb.Ack); !ok || a.Epoch != 1 {
		t.Fatalf("after epoch 1: got %v %v, want Ack(1)", f.Kind, f.Header)
	}
	l.conn.Close()
	checkAtEpoch1(t, s, "after epoch 1")
	return s
}

// failoverAtEpoch1 runs `remusd failover` on the backup and checks, with
// the audit log, that exactly epoch 1 (memory and device state) started.
func (s *liarSetup) failoverAtEpoch1(t *testing.T) {
	t.Helper()
	r := runCLI(t, "failover", "demo", "--control", s.bcfg.Control)
	if r.code != 0 {
		t.Fatalf("failover on the backup: %v", r)
	}
	st, ok := vmStatus(t, s.bcfg.Control, "demo")
	if !ok || st.Role != daemon.RoleActive || st.Epoch != 1 {
		t.Fatalf("after failover: %+v (found %v), want role active at epoch 1", st, ok)
	}
	rec, ok := lastAudit(t, daemon.AuditPath(s.bcfg.StateDir, "demo", "backup"), "activate")
	switch {
	case !ok:
		t.Errorf("no activate record in the backup's audit log")
	case rec.Epoch != 1:
		t.Errorf("activated epoch %d, want 1", rec.Epoch)
	case rec.MemoryXXH != transport.PageHash(s.mem1):
		t.Errorf("activated memory xxh %#x differs from epoch 1's %#x (a rejected epoch leaked into the replica)", rec.MemoryXXH, transport.PageHash(s.mem1))
	case rec.DeviceXXH != transport.PageHash(s.dev1):
		t.Errorf("activated device state xxh %#x differs from epoch 1's %#x", rec.DeviceXXH, transport.PageHash(s.dev1))
	}
}

func TestLyingPrimary(t *testing.T) {
	t.Parallel()
	s := newLiarSetup(t)
	addr, bcfg, cfg, numPages, all := s.addr, s.bcfg, s.cfg, s.numPages, s.all
	mem2, dev2, changed := s.mem2, s.dev2, s.changed

	cases := []struct {
		name string
		lie  func(l *liar)
	}{
		{"wrong digest", func(l *liar) {
			l.hello(liarHello(cfg))
			_ = l.send(epoch{num: 2, base: 1, pfns: changed, pages: pagesOf(mem2, changed), dev: dev2, pageCount: -1, badDigest: true})
		}},
		{"wrong base epoch", func(l *liar) {
			l.hello(liarHello(cfg))
			_ = l.send(epoch{num: 2, base: 7, pfns: changed, pages: pagesOf(mem2, changed), dev: dev2, pageCount: -1})
		}},
		{"wrong base epoch zero", func(l *liar) {
			l.hello(liarHello(cfg))
			_ = l.send(epoch{num: 2, base: 0, pfns: changed, pages: pagesOf(mem2, changed), dev: dev2, pageCount: -1})
		}},
		{"replayed committed epoch", func(l *liar) {
			l.hello(liarHello(cfg))
			_ = l.send(epoch{num: 1, base: 0, full: true, pfns: all, pages: pagesOf(mem2, all), dev: dev2, pageCount: -1})
		}},
		{"pfn beyond memory", func(l *liar) {
			l.hello(liarHello(cfg))
			page := make([]byte, hypervisor.PageSize)
			for i := range page {
				page[i] = byte(i * 7)
			}
			_ = l.send(epoch{num: 2, base: 1, pfns: []uint64{uint64(numPages)}, pages: page, dev: dev2, pageCount: -1})
		}},
		{"more pages than announced", func(l *liar) {
			l.hello(liarHello(cfg))
			_ = l.send(epoch{num: 2, base: 1, pfns: changed, pages: pagesOf(mem2, changed), dev: dev2, pageCount: len(changed) - 1})
		}},
		{"garbage after hello", func(l *liar) {
			l.hello(liarHello(cfg))
			garbage := []byte{0, 0, 0, 16, 0xee}
			for i := range 15 {
				garbage = append(garbage, byte(0xa5^i))
			}
			_, _ = l.conn.Write(garbage)
		}},
		{"garbage instead of hello", func(l *liar) {
			_, _ = l.conn.Write([]byte("GET / HTTP/1.1\r\nHost: remusd\r\n\r\n"))
		}},
		{"frame length 2^31", func(l *liar) {
			l.hello(liarHello(cfg))
			var b [9]byte
			binary.BigEndian.PutUint32(b[0:4], 1<<31)
			b[4] = byte(transport.KindPageBatch)
			_, _ = l.conn.Write(b[:])
		}},
		{"frame length 2^31 instead of hello", func(l *liar) {
			var b [9]byte
			binary.BigEndian.PutUint32(b[0:4], 1<<31)
			b[4] = byte(transport.KindHello)
			_, _ = l.conn.Write(b[:])
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := dialLiar(t, addr, s.tls)
			c.lie(l)
			l.expectClosed(c.name)
			l.conn.Close()
			checkAtEpoch1(t, s, "after "+c.name)
		})
		if t.Failed() {
			return
		}
	}
	if s, _ := vmStatus(t, bcfg.Control, "demo"); s.TornEpochsDiscarded == 0 {
		t.Errorf("backup counted no torn epochs after half a dozen rejected ones: %+v", s)
	}

	// The replica at epoch 1 is usable: failover activates exactly it.
	s.failoverAtEpoch1(t)

	// Once active, the replica refuses further replication.
	l := dialLiar(t, addr, s.tls)
	if err := l.w.WriteFrame(transport.KindHello, liarHello(cfg), nil); err != nil {
		t.Fatal(err)
	}
	f := l.next(10 * time.Second)
	if wel, ok := f.Header.(*remuspb.Welcome); !ok || wel.Error == "" {
		t.Errorf("hello to an activated replica: got %v %v, want a Welcome with an error", f.Kind, f.Header)
	}
}

// TestLyingPrimaryDeviceState: an epoch whose pages and digest are
// consistent but whose device state the replica cannot accept (a corrupt
// sim blob, correctly framed and checksummed on the wire) must be
// rejected like any other bad epoch: the replica stays at epoch 1, memory
// included (invariant 2, atomic apply).
func TestLyingPrimaryDeviceState(t *testing.T) {
	t.Parallel()
	s := newLiarSetup(t)
	l := dialLiar(t, s.addr, s.tls)
	l.hello(liarHello(s.cfg))
	dev := append([]byte(nil), s.dev2...)
	dev[20] ^= 0xff // breaks the sim blob's own checksum; frame crc and digest cover it
	_ = l.send(epoch{num: 2, base: 1, pfns: s.changed, pages: pagesOf(s.mem2, s.changed), dev: dev, pageCount: -1})
	l.expectClosed("corrupt device state")
	l.conn.Close()
	checkAtEpoch1(t, s, "after a corrupt device state")
	s.failoverAtEpoch1(t)
}

// checkAtEpoch1 checks, through a fresh Hello and through `remusd status`,
// that the replica is still at epoch 1 and the daemon healthy.
func checkAtEpoch1(t *testing.T, ls *liarSetup, when string) {
	t.Helper()
	control := ls.bcfg.Control
	l := dialLiar(t, ls.addr, ls.tls)
	wel := l.hello(liarHello(liarSpec()))
	if wel.CommittedEpoch != 1 || wel.ProtectionId != liarProtection {
		t.Errorf("%s: Welcome committed_epoch %d protection %q, want 1 %q", when, wel.CommittedEpoch, wel.ProtectionId, liarProtection)
	}
	l.conn.Close()
	s, ok := vmStatus(t, control, "demo")
	if !ok {
		t.Fatalf("%s: backup status has no VM demo", when)
	}
	if s.Role != daemon.RoleBackup || s.Epoch != 1 || s.AckedEpoch != 1 {
		t.Errorf("%s: backup status role %q epoch %d acked %d, want backup at 1", when, s.Role, s.Epoch, s.AckedEpoch)
	}
}
