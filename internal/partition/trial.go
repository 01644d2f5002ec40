package partition

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/netlab"
)

// The daemons' names (their certificate identities) and the VM's.
const (
	HostA = "hostA"
	HostB = "hostB"
	VM    = "vm"
)

// Timing is the daemons' failure-detection configuration in the trials:
// short, so that a trial takes seconds, in the same proportions as the
// defaults.
type Timing struct {
	Epoch               time.Duration
	HeartbeatInterval   time.Duration
	HeartbeatTimeout    time.Duration
	AckTimeout          time.Duration
	FenceAfter          time.Duration
	TakeoverGrace       time.Duration
	TakeoverGraceClosed time.Duration
	WitnessOpTimeout    time.Duration
}

// DefaultTiming is the trials' configuration.
func DefaultTiming() Timing {
	return Timing{
		Epoch:               25 * time.Millisecond,
		HeartbeatInterval:   50 * time.Millisecond,
		HeartbeatTimeout:    400 * time.Millisecond,
		AckTimeout:          time.Second,
		FenceAfter:          1500 * time.Millisecond,
		TakeoverGrace:       150 * time.Millisecond,
		TakeoverGraceClosed: 30 * time.Millisecond,
		WitnessOpTimeout:    500 * time.Millisecond,
	}
}

// Outcome is where the VM ended up after a trial.
type Outcome string

// Outcomes.
const (
	// PrimaryKept: the primary kept the VM and stayed protected.
	PrimaryKept Outcome = "primary-kept"
	// PrimaryUnprotected: the primary kept the VM and ran unprotected for
	// a while (it won the record at the ack timeout).
	PrimaryUnprotected Outcome = "primary-unprotected"
	// BackupTookOver: the backup won the record and runs the VM.
	BackupTookOver Outcome = "backup-took-over"
	// VMLost: both copies died (a double fault: the primary killed, then
	// the backup before or after it took over); nothing may run.
	VMLost Outcome = "vm-lost"
)

// Violation is one broken invariant.
type Violation struct {
	Kind   string `json:"kind"`
	Detail string `json:"detail"`
}

// Event is one step of a trial's timeline.
type Event struct {
	At   time.Time `json:"at"`
	What string    `json:"what"`
}

// Result is one trial.
type Result struct {
	N       int     `json:"n"`
	Class   Class   `json:"class"`
	Seed    uint64  `json:"seed"`
	Variant string  `json:"variant"`
	Outcome Outcome `json:"outcome,omitempty"`
	// Err: the trial could not be run to a verdict (a harness failure,
	// not a verdict on the daemons): it is neither passed nor failed.
	Err        string      `json:"err,omitempty"`
	Violations []Violation `json:"violations,omitempty"`
	// Released messages per host, the old side's last and the new side's
	// first sequence number (after a takeover), messages of committed
	// epochs the old primary never released (Remus semantics), late
	// deliveries (old output delayed by a cut of the old side's path to
	// the client, all older than the new side's first).
	MsgsA          int           `json:"msgs_a"`
	MsgsB          int           `json:"msgs_b"`
	LastSeqA       uint64        `json:"last_seq_a"`
	FirstSeqB      uint64        `json:"first_seq_b,omitempty"`
	Unreleased     uint64        `json:"unreleased,omitempty"`
	LateDeliveries int           `json:"late_deliveries,omitempty"`
	Holder         string        `json:"holder"`
	Generation     uint64        `json:"generation"`
	Notes          []string      `json:"notes,omitempty"`
	Timeline       []Event       `json:"timeline,omitempty"`
	Took           time.Duration `json:"took_ns"`
	// Dir holds the daemons' configs and logs; kept when the trial failed.
	Dir string `json:"dir,omitempty"`
}

// Passed reports whether the trial reached a verdict with no violation.
func (r Result) Passed() bool { return r.Err == "" && len(r.Violations) == 0 }

// Options configures trials.
type Options struct {
	Timing Timing
	// Keep keeps every trial's directory (default: only failed ones').
	Keep bool
	// QEMU runs the trial on the QEMU guest (default: the sim guest).
	QEMU bool
	Log  *zap.Logger
}

// sample is one status poll of one daemon.
type sample struct {
	At   time.Time // when the request was sent
	Host string
	OK   bool
	St   daemon.VMStatus
}

// run is one trial in progress.
type run struct {
	lab   *Lab
	o     Options
	class Class
	rng   *rand.Rand
	log   *zap.Logger
	res   *Result

	dir, prefix string
	acfg, bcfg  daemon.Config
	obs         *Observer

	mu      sync.Mutex
	procs   map[string]*demo.DaemonProc
	dead    map[string]bool // daemons killed and not restarted
	samples []sample
	// clientCut: hosts whose path to the client was cut at some point
	// (output they released before can arrive late).
	clientCut map[string]bool
	// liveExpected: once healed, the VM must run somewhere.
	liveExpected bool
	restarts     int
	verdictAt    time.Time
	staleView    string

	// QEMU trials.
	qemu     bool
	q        *qemuObs
	shm      string
	okAtHeal int
}

func (r *run) event(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Timeline = append(r.res.Timeline, Event{At: time.Now(), What: fmt.Sprintf(format, args...)})
}

func (r *run) note(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Notes = append(r.res.Notes, fmt.Sprintf(format, args...))
}

func (r *run) violate(kind, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Violations = append(r.res.Violations, Violation{Kind: kind, Detail: fmt.Sprintf(format, args...)})
}

func (r *run) proc(host string) *demo.DaemonProc {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.procs[host]
}

func (r *run) control(host string) daemon.ControlClient {
	path := r.acfg.Control
	if host == HostB {
		path = r.bcfg.Control
	}
	return daemon.ControlClient{Path: path, Timeout: 400 * time.Millisecond}
}

func (r *run) status(ctx context.Context, host string) (daemon.VMStatus, error) {
	return r.control(host).VMStatus(ctx, VM)
}

// RunTrial runs one trial of class with seed on lab (trial number n
// names its witness key prefix). A trial that could not be run to a
// verdict (a harness failure, or ctx ended) says so in Result.Err: it is
// neither passed nor failed. Every process it started is killed by PID
// before it returns.
func RunTrial(ctx context.Context, lab *Lab, class Class, seed uint64, n int, o Options) Result {
	if o.Timing == (Timing{}) {
		o.Timing = DefaultTiming()
		if o.QEMU {
			o.Timing = QEMUTiming()
		}
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	res := Result{N: n, Class: class, Seed: seed}
	start := time.Now()
	r := &run{lab: lab, o: o, class: class, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), res: &res,
		log:   o.Log.With(zap.String("class", string(class)), zap.Uint64("seed", seed), zap.Int("trial", n)),
		procs: map[string]*demo.DaemonProc{}, dead: map[string]bool{}, clientCut: map[string]bool{}, liveExpected: true, qemu: o.QEMU}
	err := r.do(ctx)
	if err != nil {
		res.Err = err.Error()
	}
	res.Took = time.Since(start)
	if res.Passed() && !o.Keep && r.dir != "" {
		os.RemoveAll(r.dir)
	} else {
		res.Dir = r.dir
	}
	return res
}

func (r *run) do(ctx context.Context) error {
	spec, ok := classes[r.class]
	if !ok {
		return fmt.Errorf("unknown class %q", r.class)
	}
	var err error
	if r.dir, err = os.MkdirTemp("", "pt-"); err != nil {
		return err
	}
	r.prefix = fmt.Sprintf("/pt/%d-%x", r.res.N, r.res.Seed)
	if !r.qemu {
		if r.obs, err = NewObserver(r.lab.Net.Client, r.lab.Net.A, r.lab.Net.B); err != nil {
			return err
		}
		defer r.obs.Close()
	}
	r.configs()
	if r.qemu {
		if err := r.qemuConfigs(); err != nil {
			return err
		}
		defer r.stopQEMUs()
	}
	defer r.killAll()
	wait := time.Duration(0)
	if r.qemu {
		wait = 3 * time.Minute // it may build the guest image and boot the guest first
	}
	for _, h := range []struct {
		host, ns string
		cfg      daemon.Config
	}{{HostB, r.lab.Net.B, r.bcfg}, {HostA, r.lab.Net.A, r.acfg}} {
		p, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: r.lab.Exe, Dir: r.dir, Netns: h.ns, Wait: wait}, h.cfg)
		if err != nil {
			return err
		}
		r.mu.Lock()
		r.procs[h.host] = p
		r.mu.Unlock()
	}
	if r.qemu {
		if err := r.qemuStart(ctx); err != nil {
			return err
		}
		cctx, stopClient := context.WithCancel(ctx)
		var cwg sync.WaitGroup
		cwg.Add(2)
		go func() { defer cwg.Done(); r.q.runClient(cctx) }()
		go func() { defer cwg.Done(); r.pollCounters(cctx) }()
		defer func() { stopClient(); r.q.conn.Close(); cwg.Wait() }()
		deadline := time.Now().Add(time.Minute)
		for {
			ok, _, err := r.q.state()
			if err != nil {
				return fmt.Errorf("client before the fault: %w", err)
			}
			if ok >= 20 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("client: %d replies in a minute under protection", ok)
			}
			if err := sleep(ctx, 50*time.Millisecond); err != nil {
				return err
			}
		}
		r.event("protected, client running")
	} else {
		if err := r.protect(ctx); err != nil {
			return err
		}
		r.event("protected")
	}
	if err := sleep(ctx, time.Duration(100+r.rng.IntN(400))*time.Millisecond); err != nil {
		return err
	}
	pctx, stopPoll := context.WithCancel(ctx)
	pollDone := make(chan struct{})
	go func() { defer close(pollDone); r.poll(pctx) }()
	defer func() { stopPoll(); <-pollDone }()

	r.event("fault starts")
	ferr := spec.fault(ctx, r)
	// Whatever the fault did, the network heals and every process runs.
	herr := r.healEverything(ctx)
	r.event("healed")
	if ferr != nil || herr != nil {
		return errors.Join(ferr, herr)
	}
	healed := time.Now()
	if r.qemu {
		r.okAtHeal, _, _ = r.q.state()
	}
	holder := r.settle(ctx, healed)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.verdict(ctx, holder, healed)
	stopPoll()
	<-pollDone
	if r.qemu {
		r.qemuCheck()
	} else {
		r.checkOutput()
	}
	return ctx.Err()
}

func (r *run) configs() {
	t := r.o.Timing
	common := func(name string) daemon.Config {
		c := daemon.DefaultConfig()
		c.Name = name
		c.Control = filepath.Join(r.dir, name+".sock")
		c.StateDir = filepath.Join(r.dir, name)
		c.EpochInterval = daemon.Duration(t.Epoch)
		c.HeartbeatInterval = daemon.Duration(t.HeartbeatInterval)
		c.HeartbeatTimeout = daemon.Duration(t.HeartbeatTimeout)
		c.AckTimeout = daemon.Duration(t.AckTimeout)
		c.FenceAfter = daemon.Duration(t.FenceAfter)
		c.TakeoverGrace = daemon.Duration(t.TakeoverGrace)
		c.TakeoverGraceClosed = daemon.Duration(t.TakeoverGraceClosed)
		c.DialTimeout = daemon.Duration(500 * time.Millisecond)
		c.ReconnectBackoff = daemon.Duration(100 * time.Millisecond)
		c.Witness = &daemon.WitnessConfig{Endpoints: []string{r.lab.WitnessEndpoint()}, Prefix: r.prefix,
			OpTimeout: daemon.Duration(t.WitnessOpTimeout), DialTimeout: daemon.Duration(t.WitnessOpTimeout)}
		return c
	}
	r.bcfg = common(HostB)
	r.bcfg.Listen = netlab.HostBIP + ":7800"
	r.acfg = common(HostA)
	if !r.qemu {
		r.acfg.SimVMs = []daemon.SimVM{{Name: VM, MemoryBytes: 4 << 20, Workload: "hotset", Rate: 20000,
			Seed: r.res.Seed, OutputEvery: 16, Output: r.obs.Addr()}}
	}
	if err := daemon.MeshConfigs(filepath.Join(r.dir, "tls"), &r.acfg, &r.bcfg); err != nil {
		panic(err) // only fails on I/O in a fresh temp dir
	}
	// Half the trials run the second heartbeat path over the second
	// network (a replication cut then is not the loss of a peer).
	if r.rng.IntN(2) == 1 {
		r.variant("second path")
		r.acfg.SecondPath.Listen = SecondIPA + ":" + SecondPort
		r.bcfg.SecondPath.Listen = SecondIPB + ":" + SecondPort
		r.acfg.Peers[0].SecondPath = r.bcfg.SecondPath.Listen
		r.bcfg.Peers[0].SecondPath = r.acfg.SecondPath.Listen
	}
}

func (r *run) protect(ctx context.Context) error {
	pc := daemon.ControlClient{Path: r.acfg.Control, Timeout: 5 * time.Second}
	for deadline := time.Now().Add(5 * time.Second); ; {
		err := pc.Protect(ctx, daemon.ProtectRequest{VM: VM, Peer: HostB})
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "not running") || time.Now().After(deadline) {
			return fmt.Errorf("protect: %w", err)
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := pc.VMStatus(ctx, VM)
		n := r.countSince(HostA, time.Time{})
		if err == nil && st.AckedEpoch >= 3 && n > 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("protection did not get going: status %+v (%v), %d messages at the client", st, err, n)
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

// poll samples both daemons' status every 50 ms.
func (r *run) poll(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		for _, h := range []string{HostA, HostB} {
			at := time.Now()
			st, err := r.status(ctx, h)
			r.mu.Lock()
			r.samples = append(r.samples, sample{At: at, Host: h, OK: err == nil, St: st})
			r.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// healEverything removes every drop, resumes stopped daemons and
// restarts a killed witness.
func (r *run) healEverything(ctx context.Context) error {
	var errs []error
	errs = append(errs, r.lab.HealAll(ctx))
	for _, h := range []string{HostA, HostB} {
		if p := r.proc(h); p != nil {
			errs = append(errs, sendSignal(p.Cmd.Process.Pid, syscall.SIGCONT))
		}
	}
	if w := r.lab.Witness(); w != nil {
		errs = append(errs, sendSignal(w.Pid(), syscall.SIGCONT))
	} else {
		errs = append(errs, r.lab.StartWitness(ctx))
		r.event("witness restarted")
	}
	return errors.Join(errs...)
}

// killDaemon SIGKILLs a daemon (its sim guest dies with it).
func (r *run) killDaemon(host string) {
	p := r.proc(host)
	if p == nil {
		return
	}
	_ = sendSignal(p.Cmd.Process.Pid, syscall.SIGKILL)
	<-p.Done()
	r.mu.Lock()
	r.dead[host] = true
	r.mu.Unlock()
	r.event("%s daemon killed", host)
}

// restartDaemon starts a killed daemon again with its configuration (its
// log goes to a new directory).
func (r *run) restartDaemon(ctx context.Context, host string) error {
	cfg, ns := r.acfg, r.lab.Net.A
	if host == HostB {
		cfg, ns = r.bcfg, r.lab.Net.B
	}
	r.mu.Lock()
	r.restarts++
	dir := filepath.Join(r.dir, fmt.Sprintf("restart%d", r.restarts))
	r.mu.Unlock()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	p, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: r.lab.Exe, Dir: dir, Netns: ns, Wait: time.Minute}, cfg)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.procs[host] = p
	r.dead[host] = false
	r.mu.Unlock()
	r.event("%s daemon restarted", host)
	return nil
}

func (r *run) killAll() {
	r.mu.Lock()
	procs := make([]*demo.DaemonProc, 0, len(r.procs))
	for _, p := range r.procs {
		procs = append(procs, p)
	}
	r.mu.Unlock()
	for _, p := range procs {
		_ = sendSignal(p.Cmd.Process.Pid, syscall.SIGKILL)
		<-p.Done()
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// between returns a random duration in [lo, hi).
func (r *run) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(r.rng.Int64N(int64(hi-lo)))
}
