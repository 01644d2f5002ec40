package demo

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/netlab"
	"github.com/remusd/remusd/vmtest"
)

// QEMUResult is the summary of `remusd demo --backend qemu`. It holds only
// what the demo measures, each under a name that says what: the daemons'
// status and audit logs (epochs, pauses, bytes, torn epochs the backup
// discarded) and the client's view of its TCP session. The sim demo's
// output_released_before_ack and torn_epochs_applied have no counterpart
// here: the client's replies cannot be mapped to the epochs that produced
// them, and the backup records no digest of each applied epoch, so the
// output-commit and atomic-apply invariants show only through their
// consequence, a reply that diverges from the service's model.
type QEMUResult struct {
	Backend  string `json:"backend"`
	Takeover string `json:"takeover"`
	QEMU     string `json:"qemu"`
	Kernel   string `json:"guest_kernel"`
	OutBuf   string `json:"output_buffer"`

	Workload        string  `json:"workload"`
	MemoryBytes     int64   `json:"memory_bytes"`
	EpochIntervalMs float64 `json:"epoch_interval_ms"`
	RunSeconds      float64 `json:"run_seconds"`

	// From the audit logs: the backup's commit and activate records, the
	// primary's capture and ack records (the initial full sync excluded
	// from the dirty-page figures).
	EpochsCommitted uint64  `json:"epochs_committed"`
	LastAckedEpoch  uint64  `json:"last_acked_epoch"`
	ReplicaEpoch    uint64  `json:"replica_epoch"`
	DirtyPagesP50   float64 `json:"dirty_pages_per_epoch_p50"`
	DirtyPagesP99   float64 `json:"dirty_pages_per_epoch_p99"`
	DirtyPagesMax   float64 `json:"dirty_pages_per_epoch_max"`
	// From the primary's status at its last poll before the kill.
	PauseMsP50     float64 `json:"pause_ms_p50"`
	PauseMsP99     float64 `json:"pause_ms_p99"`
	AckMsP50       float64 `json:"ack_ms_p50"`
	WireBytesSent  uint64  `json:"wire_bytes_sent"`
	EpochWireBytes uint64  `json:"epoch_wire_bytes"`
	RawBytes       uint64  `json:"raw_bytes"`
	// CompressionRatio is RawBytes ÷ EpochWireBytes (headers included).
	CompressionRatio float64 `json:"compression_ratio"`
	// From the backup's status.
	ActivationMs        float64 `json:"activation_ms"`
	TornEpochsDiscarded uint64  `json:"torn_epochs_discarded"`
	// With takeover auto: the witness record after the takeover and the
	// backup's winning claim's round trip.
	WitnessHolder     string  `json:"witness_holder,omitempty"`
	WitnessGeneration uint64  `json:"witness_generation,omitempty"`
	WitnessClaimMs    float64 `json:"witness_claim_ms,omitempty"`

	// KillToVMActiveMs: SIGKILL → the guest running on the backup.
	// KillToClientReplyMs: SIGKILL → the client's next reply on its
	// connection (0: none came).
	KillToVMActiveMs    float64 `json:"kill_to_vm_active_ms"`
	KillToClientReplyMs float64 `json:"kill_to_client_reply_ms"`

	// ReplicaAtOrAfterLastAck: the backup activated an epoch no older than
	// the last one the primary saw acknowledged, and no reply diverged.
	ReplicaAtOrAfterLastAck bool   `json:"replica_at_or_after_last_ack"`
	ReplicaDetail           string `json:"replica_detail"`

	TCPSessionSurvived   bool    `json:"tcp_session_survived"`
	ClientRequestsOK     int     `json:"client_requests_ok"`
	ClientRequestsFailed int     `json:"client_requests_failed"`
	ClientRequestsPerSec float64 `json:"client_requests_per_sec"`
	ClientError          string  `json:"client_error,omitempty"`
	// Divergences counts replies inconsistent with the client's model of
	// the service (state the replica lost, or a request replayed).
	Divergences int `json:"divergences"`
	// The client's replies (numbered from 1 by request id) split at the
	// kill.
	ClientRepliesBeforeKill int     `json:"client_replies_before_kill"`
	ClientRepliesAfterKill  int     `json:"client_replies_after_kill"`
	LastRequestBeforeKill   uint64  `json:"last_request_id_before_kill"`
	FirstRequestAfterKill   uint64  `json:"first_request_id_after_kill"`
	LongestGapMs            float64 `json:"client_longest_gap_ms"`
	// With a disk (--disk-mib): records the second client logged (each
	// appended and fsynced in the guest before its reply), whether the
	// backup's disk holds exactly them after the failover (and e2fsck
	// finds it clean), and why not.
	DiskMiB     int64  `json:"disk_mib,omitempty"`
	DiskRecords int    `json:"disk_records,omitempty"`
	DiskIntact  bool   `json:"disk_intact,omitempty"`
	DiskDetail  string `json:"disk_detail,omitempty"`
	Passed      bool   `json:"passed"`
}

type qemuOptions struct {
	json     bool
	duration time.Duration
	after    time.Duration
	interval time.Duration
	memMiB   int
	takeover string
	hbTO     time.Duration
	keep     bool
	dir      string
	diskMiB  int64
}

// splitBackend removes --backend/-backend (with "=" or a separate value)
// from args and returns its value ("sim" if absent).
func splitBackend(args []string) (string, []string, error) {
	backend := "sim"
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			rest = append(rest, args[i:]...)
			break
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "backend" {
			rest = append(rest, a)
			continue
		}
		if !hasVal {
			if i+1 >= len(args) {
				return "", nil, errors.New("demo: --backend needs a value (qemu|sim)")
			}
			i++
			val = args[i]
		}
		backend = val
	}
	switch backend {
	case "sim", "qemu":
		return backend, rest, nil
	}
	return "", nil, fmt.Errorf("demo: unknown backend %q (want qemu|sim)", backend)
}

// RunQEMUDemo runs the QEMU failover demo (`remusd demo --backend qemu`).
func RunQEMUDemo(ctx context.Context, args []string, stdout io.Writer, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	var o qemuOptions
	fs := flag.NewFlagSet("remusd demo --backend qemu", flag.ContinueOnError)
	fs.SetOutput(stdout)
	fs.BoolVar(&o.json, "json", false, "print one JSON object instead of the running commentary and summary")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long the client runs under protection before the primary is killed")
	fs.DurationVar(&o.after, "after", 5*time.Second, "how long the client keeps going after its first reply from the backup")
	fs.DurationVar(&o.interval, "epoch-interval", 50*time.Millisecond, "checkpoint epoch interval")
	fs.IntVar(&o.memMiB, "memory-mib", 128, "guest memory in MiB")
	fs.StringVar(&o.takeover, "takeover", daemon.TakeoverAuto, "backup takeover: auto (a witness on a third host decides; the default), auto-unsafe (activates when heartbeats stop; unsafe under partition) or manual (the demo runs `remusd failover`)")
	fs.DurationVar(&o.hbTO, "heartbeat-timeout", time.Second, "backup's heartbeat timeout (auto-unsafe takeover fires after it)")
	fs.Int64Var(&o.diskMiB, "disk-mib", 64, "size of the guest's protected ext4 disk, which a second client fills with fsynced records (0: no disk)")
	fs.BoolVar(&o.keep, "keep", false, "keep the working directory (daemon logs, audit logs, console)")
	fs.StringVar(&o.dir, "dir", "", "working directory (default: a new temporary directory)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `usage: remusd demo --backend qemu [flags]

Boots a small Linux guest under QEMU (TCG) on a primary host, protects it
to a backup host (network namespaces client/hostA/hostB/switch, two remusd
processes), keeps one TCP session from a client to the guest's service
issuing requests continuously, SIGKILLs the primary's QEMU and remusd,
lets the backup take over, and checks that the same TCP session carries on
with every reply consistent with the service's state (nothing lost or
replayed). Needs root, QEMU and the guest image's inputs (vmtest/setup.sh).
Exit status 0 only if the session survived with no divergence.

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
	if o.diskMiB < 0 || o.diskMiB > 4096 {
		return fmt.Errorf("demo: --disk-mib %d out of range [0, 4096]", o.diskMiB)
	}
	switch o.takeover {
	case daemon.TakeoverAuto, daemon.TakeoverAutoUnsafe, daemon.TakeoverManual:
	default:
		return fmt.Errorf("demo: --takeover %q unknown (want auto|auto-unsafe|manual)", o.takeover)
	}
	if os.Geteuid() != 0 {
		return errors.New("demo: --backend qemu needs root (network namespaces, tap devices, NFQUEUE output buffering); run it as root, or use --backend sim")
	}
	if err := netlab.Check(); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	q := &qrun{o: o, log: log, out: stdout}
	res, err := q.run(ctx)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("demo: interrupted (%v); daemons, QEMUs, namespaces and files removed", ctx.Err())
	}
	if res != nil {
		if o.json {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(res)
		} else {
			printQEMUSummary(stdout, res)
		}
	}
	if err != nil {
		return err
	}
	if !res.Passed {
		return errors.New("demo: the TCP session did not survive intact (see summary)")
	}
	return nil
}

type qrun struct {
	o   qemuOptions
	log *zap.Logger
	out io.Writer
	dir string
	t0  time.Time

	// With a disk: the images, the client that logs records to it, and
	// the client namespace to check the guest from.
	diskA, diskB string
	logc         *guestsvc.Client
	logDone      chan struct{}
	clientNS     string
}

func (q *qrun) say(format string, a ...any) {
	if !q.o.json {
		fmt.Fprintf(q.out, "[%5.1fs] "+format+"\n", append([]any{time.Since(q.t0).Seconds()}, a...)...)
	}
}

const (
	qemuVM    = "g"
	qemuPort  = "7000"
	replPort  = "7800"
	qemuTapA  = "tapA"
	qemuTapB  = "tapB"
	qemuShmPf = "remusd-demo-"
)

func (q *qrun) run(ctx context.Context) (*QEMUResult, error) {
	q.t0 = time.Now()
	qemuBin, err := vmtest.FindQEMU()
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	for _, tool := range []string{"iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("demo: %s not installed (output buffering uses NFQUEUE)", tool)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("demo: find own binary: %w", err)
	}
	qver := qemuVersion(ctx, qemuBin)

	dir := q.o.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "remusd-demo-"); err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
		if !q.o.keep {
			defer os.RemoveAll(dir)
		}
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	q.dir = dir
	// RAM files and QMP sockets on tmpfs; always removed (they hold guest
	// RAM), unlike the logs in dir with --keep.
	shm, err := os.MkdirTemp("/dev/shm", qemuShmPf)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	defer os.RemoveAll(shm)

	q.say("remusd demo, qemu backend: %s, Linux guest of %d MiB under TCG, epochs of %v", qver, q.o.memMiB, q.o.interval)
	q.say("working directory %s", dir)
	q.say("building the guest image (Debian kernel + initramfs with busybox and remus-guestsvc; cached)")
	bctx, bcancel := context.WithTimeout(ctx, 10*time.Minute)
	img, err := guestimage.Build(bctx, guestimage.Config{})
	bcancel()
	if err != nil {
		return nil, fmt.Errorf("demo: guest image: %w (sh vmtest/setup.sh installs its inputs)", err)
	}
	q.say("guest image: kernel %s, initramfs %s", img.KernelVersion, filepath.Base(img.Initrd))

	n, err := netlab.NewRemus(ctx, "rd")
	if err != nil {
		return nil, fmt.Errorf("demo: topology: %w", err)
	}
	defer func() {
		if err := n.Close(); err != nil {
			q.log.Warn("netlab cleanup", zap.Error(err))
		}
	}()
	q.say("network namespaces: client %s (%s), primary host %s (%s), backup host %s (%s), switch %s",
		n.Client, netlab.ClientIP, n.A, netlab.HostAIP, n.B, netlab.HostBIP, n.S)

	var wit *WitnessProc
	if q.o.takeover == daemon.TakeoverAuto {
		if wit, err = StartWitness(ctx, exe, n.W, netlab.WitnessIP, witnessPort, filepath.Join(q.dir, "witness")); err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
		defer wit.Stop()
		q.say("witness: a one-member etcd (`remusd witness serve`) on the witness host %s at %s", n.W, wit.URL)
	}
	acfg, bcfg, err := qemuPairConfigs(q.dir, shm, q.o.memMiB, q.o.interval, q.o.hbTO, q.o.takeover, wit)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	if q.o.diskMiB > 0 {
		if q.diskA, q.diskB, err = addGuestDisk(ctx, q.dir, q.o.diskMiB, &acfg, &bcfg); err != nil {
			return nil, fmt.Errorf("demo: %w", err)
		}
		q.say("guest disk: %d MiB of ext4 (%s), served to QEMU by remusd over NBD; its writes travel with the epoch they happened in, and the backup's copy (%s) commits with that epoch's memory",
			q.o.diskMiB, q.diskA, q.diskB)
	}

	backup, err := StartDaemon(ctx, StartOptions{Exe: exe, Dir: q.dir, Netns: n.B, Wait: 3 * time.Minute}, bcfg)
	if err != nil {
		return nil, err
	}
	defer backup.Stop()
	switch q.o.takeover {
	case daemon.TakeoverAuto:
		q.say("backup remusd up in %s (pid %d), replication on %s, takeover=auto: when the primary is lost (its link closed, or silent for %v) it waits %v and races for the witness record; only the winner starts the guest",
			n.B, backup.Cmd.Process.Pid, bcfg.Listen, q.o.hbTO, bcfg.TakeoverGrace.D())
	case daemon.TakeoverAutoUnsafe:
		q.say("backup remusd up in %s (pid %d), replication on %s, takeover=auto-unsafe: it activates the guest when the primary's heartbeats stop for %v (no witness: UNSAFE under a network partition, fine for this demo)",
			n.B, backup.Cmd.Process.Pid, bcfg.Listen, q.o.hbTO)
	default:
		q.say("backup remusd up in %s (pid %d), replication on %s, takeover=manual: the demo runs `remusd failover` after the kill", n.B, backup.Cmd.Process.Pid, bcfg.Listen)
	}
	primary, err := StartDaemon(ctx, StartOptions{Exe: exe, Dir: q.dir, Netns: n.A, Wait: 3 * time.Minute}, acfg)
	if err != nil {
		return nil, err
	}
	defer primary.Stop()
	q.say("primary remusd up in %s (pid %d), launched QEMU for VM %q (tap %s on %s, MAC %s)", n.A, primary.Cmd.Process.Pid, qemuVM, qemuTapA, netlab.BridgeA, netlab.GuestMAC)

	serial := filepath.Join(shm, "a", qemuVM+".serial")
	q.say("booting the guest (TCG; console %s)", serial)
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	line, err := guestimage.WaitReady(wctx, serial)
	wcancel()
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	q.say("guest up: %s", strings.TrimSpace(line))

	pc := daemon.ControlClient{Path: acfg.Control, Timeout: 5 * time.Second}
	bc := daemon.ControlClient{Path: bcfg.Control, Timeout: 5 * time.Second}
	if err := pc.Protect(ctx, daemon.ProtectRequest{VM: qemuVM, Peer: bcfg.Listen}); err != nil {
		return nil, fmt.Errorf("demo: protect: %w", err)
	}
	q.say("remusd protect %s --peer %s: the backup starts a hot standby QEMU (-incoming defer) and receives epochs", qemuVM, bcfg.Listen)
	var ps daemon.VMStatus
	if err := waitUntil(ctx, 2*time.Minute, func() (bool, error) {
		st, err := pc.VMStatus(ctx, qemuVM)
		ps = st
		return err == nil && st.AckedEpoch >= 5, nil
	}); err != nil {
		return nil, fmt.Errorf("demo: no epochs acknowledged (primary status %+v): %w", ps, err)
	}
	q.say("protected: epoch %d acknowledged, output buffer %s (guest output leaves only after its epoch is on the backup)", ps.AckedEpoch, ps.OutBuf)

	cctx, ccancel := context.WithTimeout(ctx, 5*time.Minute)
	defer ccancel()
	conn, err := netlab.Dial(cctx, n.Client, netlab.GuestIP+":"+qemuPort)
	if err != nil {
		return nil, fmt.Errorf("demo: client: %w", err)
	}
	cl := guestsvc.NewClient(conn, guestsvc.ClientOptions{})
	cdone := make(chan struct{})
	go func() { defer close(cdone); cl.Run(cctx) }()
	stopClient := func() {
		ccancel()
		conn.Close()
		<-cdone
	}
	defer stopClient()
	q.say("client in %s: one TCP connection %s → %s:%s, ADD requests back to back, each reply checked against the model of the service",
		n.Client, conn.LocalAddr(), netlab.GuestIP, qemuPort)
	q.clientNS = n.Client
	if q.diskA != "" {
		lconn, err := netlab.Dial(cctx, n.Client, netlab.GuestIP+":"+qemuPort)
		if err != nil {
			return nil, fmt.Errorf("demo: disk client: %w", err)
		}
		defer lconn.Close()
		q.logc, q.logDone = guestsvc.NewClient(lconn, guestsvc.ClientOptions{Log: true}), make(chan struct{})
		go func() { defer close(q.logDone); q.logc.Run(cctx) }()
		q.say("second connection %s: LOG records, each appended to /data/log on the guest's disk and fsynced before its reply", lconn.LocalAddr())
	}

	// Under protection.
	start := time.Now()
	prevOK, prevAt := 0, time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for time.Since(start) < q.o.duration {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
		st, err := pc.VMStatus(ctx, qemuVM)
		if err != nil {
			return nil, fmt.Errorf("demo: primary status: %w", err)
		}
		ps = st
		ok, _, _, cerr := cl.State()
		if cerr != nil {
			return nil, fmt.Errorf("demo: client failed under protection: %w", cerr)
		}
		now := time.Now()
		q.say("epoch %5d acked %5d  pause last %5.1f ms p50 %5.1f p99 %5.1f  dirty %5d pages  ack p50 %5.1f ms  held %d  client %4d req/s (%d ok)%s",
			st.Epoch, st.AckedEpoch, st.PauseMsLast, st.PauseMsP50, st.PauseMsP99, st.DirtyPagesLast, st.AckMsP50, st.OutputHeld,
			int(float64(ok-prevOK)/now.Sub(prevAt).Seconds()), ok, q.diskProgress(st))
		prevOK, prevAt = ok, now
	}
	before, _, lastIDBefore, _ := cl.State()
	rate := float64(before) / time.Since(start).Seconds()

	// The primary host dies: everything in its namespace (remusd and its
	// QEMU), SIGKILL.
	pids := netlab.Pids(n.A)
	killAt := time.Now()
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	netlab.KillAll(n.A)
	<-primary.Done()
	q.say("SIGKILL primary host: remusd and QEMU (pids %v) after %d replies; last acked epoch %d", pids, before, ps.AckedEpoch)

	if q.o.takeover == daemon.TakeoverManual {
		fctx, fcancel := context.WithTimeout(ctx, time.Minute)
		err := bc.Failover(fctx, daemon.FailoverRequest{VM: qemuVM})
		fcancel()
		if err != nil {
			return nil, fmt.Errorf("demo: remusd failover: %w", err)
		}
		q.say("remusd failover %s (on the backup) returned %v after the kill", qemuVM, time.Since(killAt).Round(time.Millisecond))
	} else {
		q.say("waiting for the backup's %s takeover", q.o.takeover)
	}
	var active daemon.VMStatus
	if err := waitUntil(ctx, time.Minute, func() (bool, error) {
		st, err := bc.VMStatus(ctx, qemuVM)
		active = st
		return err == nil && st.Role == daemon.RoleActive, nil
	}); err != nil {
		return nil, fmt.Errorf("demo: the backup did not take over (status %+v): %w", active, err)
	}
	vmActive := time.UnixMilli(active.ActivatedAtUnixMs).Sub(killAt)
	q.say("backup took over: guest running on %s %v after the kill (activation %.1f ms: standby loads epoch %d, announce-self moves the MAC to %s)",
		n.B, vmActive.Round(time.Millisecond), active.ActivationMs, active.Epoch, qemuTapB)

	// The client's first reply from the backup on the same connection
	// (one the primary released just before it died may land after the
	// kill: it is not the backup's).
	var firstAfter time.Time
	if err := waitUntil(ctx, 2*time.Minute, func() (bool, error) {
		_, _, _, cerr := cl.State()
		if cerr != nil {
			return false, cerr
		}
		r, found := cl.FirstAfter(active.ActivationStartedAt())
		firstAfter = r.At
		return found, nil
	}); err != nil {
		return q.finish(cl, active, ps, qver, img, rate, killAt, time.Time{}, vmActive, before, lastIDBefore, stopClient,
			fmt.Errorf("demo: no reply after the failover on the same connection: %w", err))
	}
	q.say("client's next reply on the same TCP connection %v after the kill", firstAfter.Sub(killAt).Round(time.Millisecond))
	after := time.Now()
	prevOK, prevAt = before, firstAfter
	for time.Since(after) < q.o.after {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
		ok, _, _, cerr := cl.State()
		if cerr != nil {
			break
		}
		now := time.Now()
		q.say("client carries on: %4d req/s (%d ok), served by the guest on the backup (now unprotected: no backup left, so no output buffering)", int(float64(ok-prevOK)/now.Sub(prevAt).Seconds()), ok)
		prevOK, prevAt = ok, now
	}
	if st, err := bc.VMStatus(ctx, qemuVM); err == nil {
		active = st
	}
	return q.finish(cl, active, ps, qver, img, rate, killAt, firstAfter, vmActive, before, lastIDBefore, stopClient, nil)
}

// finish stops the client and assembles the result.
func (q *qrun) finish(cl *guestsvc.Client, active, ps daemon.VMStatus, qver string,
	img *guestimage.Image, rate float64, killAt, firstAfter time.Time, vmActive time.Duration, before int, lastIDBefore uint64,
	stopClient func(), ferr error) (*QEMUResult, error) {
	stopClient()
	ok, _, _, cerr := cl.State()
	failed, diverged := 0, 0
	if cerr != nil && cl.Diverged() {
		diverged = 1
	} else if cerr != nil {
		failed = 1
	}
	var firstID uint64
	if r, found := cl.FirstAfter(killAt); found {
		// Replies are numbered from 1 in order: split them at the kill
		// (one may land between the last status poll and the kill).
		firstID = r.ID
		before, lastIDBefore = int(firstID-1), firstID-1
	}
	gap, _ := cl.MaxGap(0, time.Time{})
	if cerr != nil && (errors.Is(cerr, context.Canceled) || errors.Is(cerr, net.ErrClosed)) {
		cerr = nil
	}
	res := &QEMUResult{
		Backend: "qemu", Takeover: q.o.takeover, QEMU: qver, Kernel: img.KernelVersion, OutBuf: ps.OutBuf,
		Workload: "guestsvc (ADD requests on one TCP connection)", MemoryBytes: int64(q.o.memMiB) << 20,
		EpochIntervalMs: msOf(q.o.interval), RunSeconds: q.o.duration.Seconds(),
		PauseMsP50: ps.PauseMsP50, PauseMsP99: ps.PauseMsP99, AckMsP50: ps.AckMsP50,
		WireBytesSent: ps.WireBytesSent, EpochWireBytes: ps.EpochWireBytes, RawBytes: ps.RawBytes, CompressionRatio: ps.CompressionRatio,
		ActivationMs: active.ActivationMs, TornEpochsDiscarded: active.TornEpochsDiscarded,
		WitnessHolder: active.WitnessHolder, WitnessGeneration: active.WitnessGeneration, WitnessClaimMs: active.WitnessClaimMs,
		ClientRequestsOK: ok, ClientRequestsFailed: failed, ClientRequestsPerSec: rate, Divergences: diverged,
		ClientRepliesBeforeKill: before, ClientRepliesAfterKill: ok - before,
		LastRequestBeforeKill: lastIDBefore, FirstRequestAfterKill: firstID,
		KillToVMActiveMs: msOf(vmActive), LongestGapMs: msOf(gap),
	}
	if !firstAfter.IsZero() {
		res.KillToClientReplyMs = msOf(firstAfter.Sub(killAt))
	}
	if cerr != nil {
		res.ClientError = cerr.Error()
	}
	q.fromAudit(res)
	res.TCPSessionSurvived = ferr == nil && cerr == nil && failed == 0 && ok > before && !firstAfter.IsZero()
	res.ReplicaAtOrAfterLastAck = res.ReplicaEpoch >= res.LastAckedEpoch && res.ReplicaEpoch > 0 && diverged == 0
	switch {
	case res.ReplicaEpoch == 0:
		res.ReplicaDetail = "no activation record on the backup"
	case res.ReplicaEpoch < res.LastAckedEpoch:
		res.ReplicaDetail = fmt.Sprintf("replica epoch %d is older than the last acknowledged epoch %d", res.ReplicaEpoch, res.LastAckedEpoch)
	case diverged > 0:
		res.ReplicaDetail = fmt.Sprintf("replica at epoch %d, but %d replies diverged from the service model", res.ReplicaEpoch, diverged)
	default:
		rel := "the last acknowledged epoch"
		if res.ReplicaEpoch > res.LastAckedEpoch {
			rel = "past the last ack the primary saw (an ack was in flight at the kill)"
		}
		res.ReplicaDetail = fmt.Sprintf("replica activated at epoch %d (%s); every one of the %d replies, before and after the kill, matches the service model",
			res.ReplicaEpoch, rel, ok)
	}
	if ferr == nil {
		q.checkDisk(context.Background(), res)
	}
	res.Passed = res.TCPSessionSurvived && res.ReplicaAtOrAfterLastAck && diverged == 0 && (q.logc == nil || res.DiskIntact)
	if q.o.takeover == daemon.TakeoverAuto && res.WitnessHolder != "hostB" {
		// The backup may run the guest only while it holds the record.
		res.Passed = false
		res.ReplicaDetail += fmt.Sprintf("; but the witness record names %q, not the active backup", res.WitnessHolder)
	}
	return res, ferr
}

// fromAudit fills epochs and dirty-page figures from the audit logs.
func (q *qrun) fromAudit(res *QEMUResult) {
	plog, _ := readAudit(daemon.AuditPath(filepath.Join(q.dir, "hostA-state"), qemuVM, "primary"))
	blog, _ := readAudit(daemon.AuditPath(filepath.Join(q.dir, "hostB-state"), qemuVM, "backup"))
	var dirty []float64
	first := true
	for _, l := range plog {
		switch l.Event {
		case "capture":
			if first { // the initial full sync
				first = false
				continue
			}
			dirty = append(dirty, float64(l.Pages))
		case "ack":
			res.LastAckedEpoch = max(res.LastAckedEpoch, l.Epoch)
		}
	}
	for _, l := range blog {
		switch l.Event {
		case "commit":
			res.EpochsCommitted++
		case "activate":
			res.ReplicaEpoch = l.Epoch
		}
	}
	if len(dirty) > 0 {
		s := slices.Clone(dirty)
		slices.Sort(s)
		res.DirtyPagesP50 = s[len(s)/2]
		res.DirtyPagesP99 = s[min(len(s)-1, len(s)*99/100)]
		res.DirtyPagesMax = s[len(s)-1]
	}
}

func printQEMUSummary(w io.Writer, r *QEMUResult) {
	verdict := "PASS"
	if !r.Passed {
		verdict = "FAIL"
	}
	survived := "yes, the same connection carried on"
	if !r.TCPSessionSurvived {
		survived = "NO"
		if r.ClientError != "" {
			survived += " (" + r.ClientError + ")"
		}
	}
	fmt.Fprintf(w, `
summary (%s) — qemu backend, %s, guest %s, %d MiB, takeover %s
  tcp session survived      %s
  client requests           %d ok, %d failed, %d diverged (%.0f req/s under protection)
                            %d before the kill (last id %d), %d after (first id %d)
  failover                  %.0f ms from SIGKILL to the client's next reply (guest running on the backup after %.0f ms; activation %.1f ms; longest client gap %.0f ms)
  epochs committed          %d (last acked by primary %d, replica activated at %d)
  pause per epoch           p50 %.1f ms, p99 %.1f ms
  dirty pages per epoch     p50 %.0f, p99 %.0f, max %.0f (4 KiB pages)
  ack latency               p50 %.1f ms
  bytes on the wire         %d, headers included (epochs %d; their raw pages and device state %d: compression %.1fx)
  torn epochs discarded     %d (by the backup)
  output buffer             %s
  replica check             %s
`, verdict, r.QEMU, r.Kernel, r.MemoryBytes>>20, r.Takeover, survived,
		r.ClientRequestsOK, r.ClientRequestsFailed, r.Divergences, r.ClientRequestsPerSec,
		r.ClientRepliesBeforeKill, r.LastRequestBeforeKill, r.ClientRepliesAfterKill, r.FirstRequestAfterKill,
		r.KillToClientReplyMs, r.KillToVMActiveMs, r.ActivationMs, r.LongestGapMs,
		r.EpochsCommitted, r.LastAckedEpoch, r.ReplicaEpoch, r.PauseMsP50, r.PauseMsP99,
		r.DirtyPagesP50, r.DirtyPagesP99, r.DirtyPagesMax, r.AckMsP50,
		r.WireBytesSent, r.EpochWireBytes, r.RawBytes, r.CompressionRatio, r.TornEpochsDiscarded, r.OutBuf, r.ReplicaDetail)
	if r.WitnessHolder != "" {
		fmt.Fprintf(w, "  witness                   record held by %s at generation %d (its winning claim took %.1f ms)\n", r.WitnessHolder, r.WitnessGeneration, r.WitnessClaimMs)
	}
	if r.DiskMiB > 0 {
		fmt.Fprintf(w, "  disk                      %d MiB ext4; %d records fsynced on a second connection; %s\n", r.DiskMiB, r.DiskRecords, r.DiskDetail)
	}
}

func qemuVersion(ctx context.Context, bin string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "qemu (version unknown)"
	}
	f := strings.Fields(strings.SplitN(string(out), "\n", 2)[0])
	for i, s := range f {
		if s == "version" && i+1 < len(f) {
			return "QEMU " + f[i+1]
		}
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func waitUntil(ctx context.Context, limit time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %v", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}
