// Package demo runs remusd's main job on the embedded sim backend: two
// real daemon processes on loopback, a protected guest, a SIGKILL of the
// primary, the backup taking over, and a check of the invariants.
package demo

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/transport"
)

// Result is the demo's summary (printed as JSON with --json).
type Result struct {
	Workload        string  `json:"workload"`
	MemoryBytes     int64   `json:"memory_bytes"`
	EpochIntervalMs float64 `json:"epoch_interval_ms"`
	RunSeconds      float64 `json:"run_seconds"`

	EpochsCommitted uint64  `json:"epochs_committed"`
	LastAckedEpoch  uint64  `json:"last_acked_epoch"`
	ReplicaEpoch    uint64  `json:"replica_epoch"`
	PauseMsP50      float64 `json:"pause_ms_p50"`
	PauseMsP99      float64 `json:"pause_ms_p99"`
	AckMsP50        float64 `json:"ack_ms_p50"`
	DirtyPagesP50   float64 `json:"dirty_pages_per_epoch_p50"`
	// WireBytesSent is every byte the primary wrote on the replication
	// link (frame prefixes, protobuf headers, payloads; epochs, heartbeats,
	// handshake); EpochWireBytes the part that carried epochs; RawBytes the
	// page and device-state bytes of those epochs, uncompressed.
	WireBytesSent  uint64 `json:"wire_bytes_sent"`
	EpochWireBytes uint64 `json:"epoch_wire_bytes"`
	RawBytes       uint64 `json:"raw_bytes"`
	// CompressionRatio is RawBytes ÷ EpochWireBytes (headers included).
	CompressionRatio float64 `json:"compression_ratio"`
	FailoverMs       float64 `json:"failover_ms"`
	ActivationMs     float64 `json:"activation_ms"`

	// ReplicaMatchesLastAck: the activated replica's memory and device
	// state equal, byte for byte (xxhash64), the primary's state at that
	// epoch recomputed by replay, and that epoch is no older than the last
	// ack the primary recorded.
	ReplicaMatchesLastAck bool   `json:"replica_matches_last_ack"`
	ReplicaDetail         string `json:"replica_detail"`
	// OutputReleasedBeforeAck counts output messages of a protected epoch
	// N that reached the client from the primary before the primary's
	// audit log recorded an ack of N or later (or that were never acked),
	// by the sink's receive time against the ack record's time.
	OutputReleasedBeforeAck int `json:"output_released_before_ack"`
	// TornEpochsApplied is 1 if the activated replica matches no state the
	// primary had at its epoch (a torn or corrupt apply), else 0; the
	// demo sees the replica only at activation, not after every commit.
	TornEpochsApplied   int    `json:"torn_epochs_applied"`
	TornEpochsDiscarded uint64 `json:"torn_epochs_discarded"`

	OutputSeenFromPrimary int    `json:"output_seen_from_primary"`
	OutputSeenFromBackup  int    `json:"output_seen_from_backup"`
	LastSeqBeforeFailover uint64 `json:"last_seq_before_failover"`
	FirstSeqAfterFailover uint64 `json:"first_seq_after_failover"`
	// OutputLost counts messages a client saw that the activated replica
	// does not account for (invariant 4); must be 0.
	OutputLost int  `json:"output_lost"`
	Passed     bool `json:"passed"`
}

type options struct {
	json     bool
	duration time.Duration
	interval time.Duration
	workload string
	rate     int
	memory   int64
	seed     uint64
	keep     bool
	dir      string
}

// RunDemo runs the demo; args are its flags. It returns flag.ErrHelp for
// --help and an error if an invariant does not hold.
func RunDemo(ctx context.Context, args []string, stdout io.Writer, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	backend, args, err := splitBackend(args)
	if err != nil {
		return err
	}
	if backend == "qemu" {
		return RunQEMUDemo(ctx, args, stdout, log)
	}
	var o options
	fs := flag.NewFlagSet("remusd demo", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.BoolVar(&o.json, "json", false, "print one JSON object instead of the human summary")
	fs.DurationVar(&o.duration, "duration", 4*time.Second, "how long the protected guest runs before the primary is killed")
	fs.DurationVar(&o.interval, "epoch-interval", 25*time.Millisecond, "checkpoint epoch interval")
	fs.StringVar(&o.workload, "workload", "uniform", "sim workload: uniform|hotset|sequential|sparse")
	fs.IntVar(&o.rate, "rate", 20000, "guest page writes per second")
	fs.Int64Var(&o.memory, "memory", 64<<20, "guest memory in bytes")
	fs.Uint64Var(&o.seed, "seed", 1, "guest seed")
	fs.BoolVar(&o.keep, "keep", false, "keep the working directory (logs, audit logs, replica dump)")
	fs.StringVar(&o.dir, "dir", "", "working directory (default: a new temporary directory)")
	fs.String("backend", "sim", "sim (this demo) or qemu (a Linux guest under QEMU and a real TCP client; see remusd demo --backend qemu --help)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: remusd demo [--backend sim|qemu] [flags]

Starts a primary and a backup remusd as two processes on loopback, protects
a simulated guest, kills the primary with SIGKILL, lets the backup take
over, and checks the invariants: the replica is byte-identical to the
primary's state at the last acknowledged epoch, and no output left before
its epoch was acknowledged. Exit status 0 only if they hold.

flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("demo: unexpected argument %q", fs.Arg(0))
	}
	cfg := sim.Config{MemoryBytes: o.memory, Workload: o.workload, Rate: o.rate, Seed: o.seed}.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	d := &run{o: o, cfg: cfg, log: log, out: stdout}
	res, err := d.run(ctx)
	if res != nil {
		if o.json {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(res)
		} else {
			printSummary(stdout, res)
		}
	}
	if err != nil {
		return err
	}
	if !res.Passed {
		return errors.New("demo: invariants violated (see summary)")
	}
	return nil
}

type run struct {
	o   options
	cfg sim.Config
	log *zap.Logger
	out io.Writer
	dir string

	sink *sink
}

func (d *run) say(format string, a ...any) {
	if !d.o.json {
		fmt.Fprintf(d.out, format+"\n", a...)
	}
}

func (d *run) run(ctx context.Context) (*Result, error) {
	dir := d.o.dir
	if dir == "" {
		var err error
		dir, err = os.MkdirTemp("", "remusd-demo-")
		if err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
		if !d.o.keep {
			defer os.RemoveAll(dir)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	d.dir = dir
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("demo: find own binary: %w", err)
	}
	sk, err := newSink()
	if err != nil {
		return nil, err
	}
	defer sk.close()
	d.sink = sk
	backupAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}

	hb := 50 * time.Millisecond
	common := func(name string) daemon.Config {
		c := daemon.DefaultConfig()
		c.Name = name
		c.Control = filepath.Join(dir, name+".sock")
		c.StateDir = filepath.Join(dir, name)
		c.EpochInterval = daemon.Duration(d.o.interval)
		c.HeartbeatInterval = daemon.Duration(hb)
		c.HeartbeatTimeout = daemon.Duration(10 * hb)
		return c
	}
	// The witness: a one-member etcd on loopback (`remusd witness serve`).
	wport, err := FreePort()
	if err != nil {
		return nil, err
	}
	wit, err := StartWitness(ctx, exe, "", "127.0.0.1", wport, filepath.Join(dir, "witness"))
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	defer wit.Stop()
	bcfg := common("backup")
	bcfg.Listen = backupAddr
	bcfg.Witness = wit.Config()
	pcfg := common("primary")
	pcfg.Witness = wit.Config()
	pcfg.SimVMs = []daemon.SimVM{{Name: "demo", MemoryBytes: d.cfg.MemoryBytes, Workload: d.cfg.Workload, Rate: d.cfg.Rate, Seed: d.cfg.Seed, Output: sk.addr()}}
	if err := daemon.MeshConfigs(filepath.Join(dir, "tls"), &pcfg, &bcfg); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}

	d.say("remusd demo: %s guest of %d MiB, %s workload at %d writes/s, epochs of %v", "sim", d.cfg.MemoryBytes>>20, d.cfg.Workload, d.cfg.Rate, d.o.interval)
	d.say("  working directory %s", dir)
	backup, err := StartDaemon(ctx, StartOptions{Exe: exe, Dir: dir}, bcfg)
	if err != nil {
		return nil, err
	}
	defer backup.Stop()
	primary, err := StartDaemon(ctx, StartOptions{Exe: exe, Dir: dir}, pcfg)
	if err != nil {
		return nil, err
	}
	defer primary.Stop()
	d.say("  started backup (pid %d, replication on %s, takeover=auto: it races for the witness record at %s when the primary is lost)", backup.Cmd.Process.Pid, backupAddr, wit.URL)
	d.say("  started primary (pid %d) running sim VM \"demo\"", primary.Cmd.Process.Pid)

	pc := daemon.ControlClient{Path: primary.Control, Timeout: 5 * time.Second}
	bc := daemon.ControlClient{Path: backup.Control, Timeout: 5 * time.Second}
	if err := pc.Protect(ctx, daemon.ProtectRequest{VM: "demo", Peer: backupAddr}); err != nil {
		return nil, fmt.Errorf("demo: protect: %w", err)
	}
	d.say("  protect demo --peer %s", backupAddr)

	start := time.Now()
	var last daemon.VMStatus
	for time.Since(start) < d.o.duration {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
		st, err := pc.VMStatus(ctx, "demo")
		if err != nil {
			return nil, fmt.Errorf("demo: primary status: %w", err)
		}
		last = st
		d.say("  t=%4.1fs epoch %5d acked %5d  pause p50 %.2f ms p99 %.2f ms  dirty %5d  wire %s  ratio %.1f  link %s",
			time.Since(start).Seconds(), st.Epoch, st.AckedEpoch, st.PauseMsP50, st.PauseMsP99, st.DirtyPagesLast,
			daemon.HumanBytes(st.WireBytesSent), st.CompressionRatio, st.Link)
	}
	if last.AckedEpoch == 0 {
		return nil, fmt.Errorf("demo: no epoch was acknowledged in %v (primary link %s, last error %q)", d.o.duration, last.Link, last.LastError)
	}

	// The crash.
	d.say("  SIGKILL primary (pid %d)", primary.Cmd.Process.Pid)
	killAt := time.Now()
	if err := primary.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return nil, fmt.Errorf("demo: kill primary: %w", err)
	}
	<-primary.Done()
	sk.markFailover()

	var active daemon.VMStatus
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := bc.VMStatus(ctx, "demo")
		if err == nil && st.Role == daemon.RoleActive {
			active = st
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("demo: backup did not take over within 20 s (status %+v, err %v)", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	failover := time.UnixMilli(active.ActivatedAtUnixMs).Sub(killAt)
	d.say("  backup took over: VM active on backup %.0f ms after the kill (activation itself %.2f ms)", msOf(failover), active.ActivationMs)
	// Let the activated guest talk, so a client would see it carry on.
	sk.waitBackupOutput(3 * time.Second)

	res := &Result{
		Workload: d.cfg.Workload, MemoryBytes: d.cfg.MemoryBytes, EpochIntervalMs: msOf(d.o.interval),
		RunSeconds: d.o.duration.Seconds(),
		PauseMsP50: last.PauseMsP50, PauseMsP99: last.PauseMsP99, AckMsP50: last.AckMsP50,
		FailoverMs: msOf(failover), ActivationMs: active.ActivationMs,
		TornEpochsDiscarded: active.TornEpochsDiscarded,
		WireBytesSent:       last.WireBytesSent, EpochWireBytes: last.EpochWireBytes, RawBytes: last.RawBytes,
		CompressionRatio: last.CompressionRatio,
	}
	if err := d.verify(res, primary, backup); err != nil {
		return res, err
	}
	return res, nil
}

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// FreePort returns a free TCP port on 127.0.0.1 (best effort).
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("demo: pick a port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("demo: pick a port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

type auditLine struct {
	Event     string `json:"event"`
	Epoch     uint64 `json:"epoch"`
	Pages     int    `json:"pages"`
	MemoryXXH uint64 `json:"memory_xxh"`
	DeviceXXH uint64 `json:"device_xxh"`
	UnixNs    int64  `json:"unix_ns"`
	Sim       *struct {
		Ops       uint64 `json:"ops"`
		OutputSeq uint64 `json:"output_seq"`
	} `json:"sim"`
}

func readAudit(path string) ([]auditLine, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	defer f.Close()
	var out []auditLine
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var l auditLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			// A SIGKILL can cut the very last line short.
			continue
		}
		out = append(out, l)
	}
	return out, sc.Err()
}

// verify checks the invariants from the audit logs, the replica dump and
// the output the sink received.
func (d *run) verify(res *Result, primary, backup *DaemonProc) error {
	plog, err := readAudit(daemon.AuditPath(primary.StateDir, "demo", "primary"))
	if err != nil {
		return err
	}
	blog, err := readAudit(daemon.AuditPath(backup.StateDir, "demo", "backup"))
	if err != nil {
		return err
	}
	captured := map[uint64]uint64{}
	var dirty []float64
	var acks []auditLine
	for _, l := range plog {
		switch l.Event {
		case "capture":
			if l.Sim != nil {
				captured[l.Epoch] = l.Sim.Ops
			}
			dirty = append(dirty, float64(l.Pages))
		case "ack":
			res.LastAckedEpoch = max(res.LastAckedEpoch, l.Epoch)
			acks = append(acks, l)
		}
	}
	res.DirtyPagesP50 = median(dirty)
	for _, l := range blog {
		if l.Event == "commit" {
			res.EpochsCommitted++
		}
	}
	var activated *auditLine
	for i := range blog {
		if blog[i].Event == "activate" {
			activated = &blog[i]
		}
	}
	if activated == nil {
		return errors.New("demo: backup audit log has no activation")
	}
	if activated.Sim == nil {
		return errors.New("demo: activation record carries no sim state")
	}
	res.ReplicaEpoch = activated.Epoch
	ops := activated.Sim.Ops
	wantOps, ok := captured[activated.Epoch]
	// The sim guest's state is a pure function of its config and the ops
	// it executed: recompute the primary's state at that point and compare
	// it with what the backup activated.
	replayMem, replayDev, err := sim.Replay(d.cfg, ops)
	if err != nil {
		return fmt.Errorf("demo: replay: %w", err)
	}
	identical := transport.PageHash(replayMem) == activated.MemoryXXH && transport.PageHash(replayDev) == activated.DeviceXXH
	switch {
	case !ok:
		res.ReplicaDetail = fmt.Sprintf("replica epoch %d was never captured by the primary", activated.Epoch)
	case activated.Epoch < res.LastAckedEpoch:
		res.ReplicaDetail = fmt.Sprintf("replica epoch %d is older than the last acknowledged epoch %d", activated.Epoch, res.LastAckedEpoch)
	case ops != wantOps:
		res.ReplicaDetail = fmt.Sprintf("replica device state has %d guest ops, the primary captured %d at epoch %d", ops, wantOps, activated.Epoch)
	case !identical:
		res.ReplicaDetail = fmt.Sprintf("replica memory/device state differ from the primary's state at epoch %d", activated.Epoch)
	default:
		res.ReplicaMatchesLastAck = true
		rel := "the last acknowledged epoch"
		if activated.Epoch > res.LastAckedEpoch {
			rel = "one epoch past the last ack the primary saw (its ack was in flight at the kill)"
		}
		res.ReplicaDetail = fmt.Sprintf("replica at epoch %d (%s) is identical (xxhash64 of all %d MiB and the device state) to the primary's state there, recomputed from %d guest ops",
			activated.Epoch, rel, len(replayMem)>>20, ops)
	}
	if !identical {
		// A replica that matches no state the primary ever had means an
		// epoch was applied torn.
		res.TornEpochsApplied = 1
	}

	acks = firstAcks(acks)
	recs := d.sink.records()
	for _, r := range recs {
		if r.host == "primary" {
			res.OutputSeenFromPrimary++
			if r.epoch > 0 && !ackedBefore(acks, r.epoch, r.atUnixNs) {
				res.OutputReleasedBeforeAck++
			}
			if r.seq > activated.Sim.OutputSeq {
				res.OutputLost++
			}
			res.LastSeqBeforeFailover = max(res.LastSeqBeforeFailover, r.seq)
		} else {
			if res.OutputSeenFromBackup == 0 {
				res.FirstSeqAfterFailover = r.seq
			}
			res.OutputSeenFromBackup++
		}
	}
	res.Passed = res.ReplicaMatchesLastAck && res.OutputReleasedBeforeAck == 0 && res.TornEpochsApplied == 0 && res.OutputLost == 0
	return nil
}

// firstAcks sorts the primary's ack records by epoch and sets each one's
// time to the earliest ack of that epoch or a later one (acks are
// cumulative: an ack of N covers every epoch up to N).
func firstAcks(acks []auditLine) []auditLine {
	slices.SortStableFunc(acks, func(a, b auditLine) int { return cmp.Compare(a.Epoch, b.Epoch) })
	for i := len(acks) - 2; i >= 0; i-- {
		acks[i].UnixNs = min(acks[i].UnixNs, acks[i+1].UnixNs)
	}
	return acks
}

// ackedBefore reports whether acks (from firstAcks) hold an ack covering
// epoch at or before unixNs. Output of epoch 0 left before protection
// began and is not checked.
func ackedBefore(acks []auditLine, epoch uint64, unixNs int64) bool {
	i, _ := slices.BinarySearchFunc(acks, epoch, func(l auditLine, e uint64) int { return cmp.Compare(l.Epoch, e) })
	return i < len(acks) && acks[i].UnixNs <= unixNs
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func printSummary(w io.Writer, r *Result) {
	verdict := "PASS"
	if !r.Passed {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, `
summary (%s)
  epochs committed          %d (last acked by primary %d, replica at %d)
  pause per epoch           p50 %.2f ms, p99 %.2f ms (dirty pages p50 %.0f)
  ack latency               p50 %.2f ms
  bytes on the wire         %d, headers included (epochs %d; their raw pages and device state %d: compression %.1fx)
  failover                  %.0f ms from SIGKILL to VM active on backup
  replica check             %s
  output before its ack     %d
  torn epochs applied       %d (torn epochs discarded: %d)
  client output             %d messages from primary (last seq %d), %d from backup after failover (first seq %d), %d lost
`, verdict, r.EpochsCommitted, r.LastAckedEpoch, r.ReplicaEpoch, r.PauseMsP50, r.PauseMsP99, r.DirtyPagesP50, r.AckMsP50,
		r.WireBytesSent, r.EpochWireBytes, r.RawBytes, r.CompressionRatio, r.FailoverMs, r.ReplicaDetail, r.OutputReleasedBeforeAck,
		r.TornEpochsApplied, r.TornEpochsDiscarded, r.OutputSeenFromPrimary, r.LastSeqBeforeFailover,
		r.OutputSeenFromBackup, r.FirstSeqAfterFailover, r.OutputLost)
}

// record is one output message received by the sink.
type record struct {
	host     string
	epoch    uint64
	seq      uint64
	atUnixNs int64 // when the sink received it
}

// sink stands in for the clients on the network: it receives the sim
// guest's released output from whichever host runs it.
type sink struct {
	ln       net.Listener
	mu       sync.Mutex
	recs     []record
	failover bool
	wg       sync.WaitGroup
	backupCh chan struct{}
	once     sync.Once
}

func newSink() (*sink, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo: output sink: %w", err)
	}
	s := &sink{ln: ln, backupCh: make(chan struct{})}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

func (s *sink) addr() string { return s.ln.Addr().String() }

func (s *sink) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			s.read(c)
		}()
	}
}

func (s *sink) read(c net.Conn) {
	_ = daemon.ReadOutputStream(c, func(host string, epoch uint64, msg []byte) {
		if len(msg) < 8 {
			return
		}
		rec := record{host: host, epoch: epoch, seq: binary.LittleEndian.Uint64(msg), atUnixNs: time.Now().UnixNano()}
		s.mu.Lock()
		s.recs = append(s.recs, rec)
		s.mu.Unlock()
		if host != "primary" {
			s.once.Do(func() { close(s.backupCh) })
		}
	})
}

func (s *sink) markFailover() {
	s.mu.Lock()
	s.failover = true
	s.mu.Unlock()
}

func (s *sink) waitBackupOutput(d time.Duration) {
	select {
	case <-s.backupCh:
		time.Sleep(100 * time.Millisecond)
	case <-time.After(d):
	}
}

func (s *sink) records() []record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]record(nil), s.recs...)
}

func (s *sink) close() {
	s.ln.Close()
}
