package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/guestsvc"
)

// QEMUConfig configures MeasureQEMU: the demo's topology (client, hostA,
// hostB, switch namespaces; two `remusd serve`; a Linux guest under QEMU
// TCG running guestsvc; NFQUEUE output buffering).
type QEMUConfig struct {
	// Exe is the remusd binary (required).
	Exe string
	// Intervals are the protected epoch intervals (default 25, 50, 100 ms).
	Intervals []time.Duration
	// Duration of the closed-loop client at each point (default 6 s), or
	// Requests per point if > 0 (then Duration is only a bound of 2 min).
	Duration time.Duration
	Requests int
	// MemoryMiB of the guest (default 128).
	MemoryMiB int
	// FailoverTrials: kill → next reply trials (default 3; < 0 skips).
	// The first reuses the latency run's guest, each further one boots a
	// new one.
	FailoverTrials int
	// Switchovers: planned switchovers, there and back, under the
	// client before the failover trials (default 2; < 0 skips).
	Switchovers int
	// HeartbeatTimeout defaults to 1 s (heartbeats every 100 ms): under TCG
	// on a busy 2-core machine a shorter one (400 ms was tried) can lapse
	// during the latency run; with the witness the living primary keeps its
	// record, but the link would resync and disturb the measurement.
	HeartbeatTimeout time.Duration
	Log              *zap.Logger
	Progress         func(format string, args ...any)
}

func (c QEMUConfig) withDefaults() QEMUConfig {
	if len(c.Intervals) == 0 {
		c.Intervals = []time.Duration{25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond}
	}
	if c.Duration <= 0 {
		c.Duration = 6 * time.Second
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 128
	}
	if c.FailoverTrials == 0 {
		c.FailoverTrials = 3
	}
	if c.Switchovers == 0 {
		c.Switchovers = 2
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = time.Second
	}
	if c.Log == nil {
		c.Log = zap.NewNop()
	}
	if c.Progress == nil {
		c.Progress = func(string, ...any) {}
	}
	return c
}

// QEMULatencyPoint is the guest protected at one epoch interval.
type QEMULatencyPoint struct {
	IntervalMs float64 `json:"interval_ms"`
	// Protected: think time uniform in [0, epoch) before each request,
	// so requests arrive at a uniform phase of the epoch (the floor's
	// model). BackToBack: no think time; the client re-synchronises with
	// the release and each request waits about one whole epoch (its
	// requests/s is the protected service's closed-loop throughput).
	Protected  LatencyStats `json:"protected"`
	BackToBack LatencyStats `json:"back_to_back"`
	// EpochMsMean is the achieved epoch length over the client's window
	// (window ÷ epochs captured in it).
	EpochMsMean float64 `json:"epoch_ms_mean"`
	PauseMsP50  float64 `json:"pause_ms_p50"`
	PauseMsP99  float64 `json:"pause_ms_p99"`
	AckMsP50    float64 `json:"ack_ms_p50"`
	AckMsP99    float64 `json:"ack_ms_p99"`
	DirtyPages  float64 `json:"dirty_pages_per_epoch"`
	// FloorMs = achieved epoch/2 + ack p50 (the output-commit floor).
	FloorMs float64 `json:"floor_ms"`
	// FloorWithPauseMs adds the pause p50: under TCG the capture pauses
	// the guest for a large part of a short epoch, and a request that
	// arrives in the pause is served only after it, and its reply leaves
	// with the next epoch.
	FloorWithPauseMs float64 `json:"floor_with_pause_ms"`
	AddedP50Ms       float64 `json:"added_p50_ms"`
	AddedP99Ms       float64 `json:"added_p99_ms"`
	AddedOverFloor   float64 `json:"added_over_floor"`
	GoalP50Ms        float64 `json:"goal_added_p50_ms"`
	GoalP99Ms        float64 `json:"goal_added_p99_ms"`
}

// QEMUFailoverTrial is one kill of the primary host.
type QEMUFailoverTrial struct {
	// DetectionMs: kill → the backup starts activating (VM active −
	// activation); ActivationMs: the backup's activation; ActiveMs: kill →
	// VM running on the backup; NextReplyMs: kill → the client's first
	// reply from the backup on its existing connection (the first to arrive
	// after the backup began activating).
	DetectionMs  float64 `json:"detection_ms"`
	ActivationMs float64 `json:"activation_ms"`
	ActiveMs     float64 `json:"vm_active_ms"`
	NextReplyMs  float64 `json:"next_reply_ms"`
	// ClaimMs: the backup's winning claim on the witness (part of
	// DetectionMs).
	ClaimMs float64 `json:"claim_ms,omitempty"`
	// RepliesBefore: replies the connection carried before the kill (the
	// first trial's connection also carried the latency run).
	RepliesBefore  int     `json:"replies_before"`
	SessionIntact  bool    `json:"session_intact"`
	EpochIntervalM float64 `json:"epoch_interval_ms"`
}

// QEMUResult is the QEMU section of the report.
type QEMUResult struct {
	// Skipped says why the section did not run (not an error).
	Skipped   string  `json:"skipped,omitempty"`
	QEMU      string  `json:"qemu,omitempty"`
	Kernel    string  `json:"guest_kernel,omitempty"`
	MemoryMiB int     `json:"memory_mib"`
	BootSec   float64 `json:"boot_s"`
	Model     string  `json:"model"`
	// Unprotected is the same client on the same connection before the
	// guest is protected.
	// Unprotected is measured with think time uniform in [0, 25 ms)
	// (the protected points' arrival model; added latency is against it),
	// UnprotectedBackToBack without (its requests/s is the service's).
	Unprotected           LatencyStats       `json:"unprotected"`
	UnprotectedBackToBack LatencyStats       `json:"unprotected_back_to_back"`
	Points                []QEMULatencyPoint `json:"points"`
	// SessionIntact: the one TCP connection carried every request of the
	// latency run (and each failover trial's) with every reply matching
	// the service model.
	SessionIntact bool   `json:"session_intact"`
	ClientError   string `json:"client_error,omitempty"`

	HeartbeatIntervalMs float64             `json:"heartbeat_interval_ms"`
	HeartbeatTimeoutMs  float64             `json:"heartbeat_timeout_ms"`
	Takeover            string              `json:"takeover"`
	Trials              []QEMUFailoverTrial `json:"failover_trials"`
	DetectionMsP50      float64             `json:"detection_ms_p50"`
	ActivationMsP50     float64             `json:"activation_ms_p50"`
	NextReplyMsP50      float64             `json:"next_reply_ms_p50"`
	NextReplyMsMax      float64             `json:"next_reply_ms_max"`
	FailoverErrors      []string            `json:"failover_errors,omitempty"`
	Switchovers         []QEMUSwitchover    `json:"switchovers,omitempty"`
	SwitchoverError     string              `json:"switchover_error,omitempty"`
	Seconds             float64             `json:"seconds"`
}

// At returns the point measured at interval.
func (r *QEMUResult) At(interval time.Duration) (QEMULatencyPoint, bool) {
	for _, p := range r.Points {
		if p.IntervalMs == msf(interval) {
			return p, true
		}
	}
	return QEMULatencyPoint{}, false
}

// QEMUSkipReason is why the QEMU section cannot run here ("" = it can).
func QEMUSkipReason(exe string) string {
	if exe == "" {
		return "no remusd binary to start as `remusd serve`"
	}
	if err := demo.QEMUPrereqs(); err != nil {
		return err.Error()
	}
	return ""
}

// unprotectedThink is the think-time bound of the unprotected baseline.
const unprotectedThink = 25 * time.Millisecond

const qemuModel = "guestsvc in a Linux guest under QEMU TCG on hostA; a closed-loop client in the client namespace sends ADD requests on one TCP connection, with think time uniform in [0, epoch) (unprotected: [0, 25 ms)) so requests arrive at a uniform phase of the epoch, and back to back for requests/s; through the switch and hostA's bridge, NFQUEUE output buffering while protected; every reply checked against the service model; unprotected = the same connection before `protect`; floor = achieved epoch/2 + ack p50 from the primary's status"

// MeasureQEMU runs the QEMU section. Missing prerequisites give a result
// with Skipped set and no error.
func MeasureQEMU(ctx context.Context, cfg QEMUConfig) (res QEMUResult, err error) {
	cfg = cfg.withDefaults()
	start := time.Now()
	res = QEMUResult{MemoryMiB: cfg.MemoryMiB, Model: qemuModel, Takeover: daemon.TakeoverAuto,
		HeartbeatIntervalMs: msf(cfg.HeartbeatTimeout / 10), HeartbeatTimeoutMs: msf(cfg.HeartbeatTimeout)}
	defer func() { res.Seconds = time.Since(start).Seconds() }()
	if why := QEMUSkipReason(cfg.Exe); why != "" {
		res.Skipped = why
		return res, nil
	}
	lab, err := demo.StartQEMULab(ctx, demo.QEMULabConfig{Exe: cfg.Exe, MemoryMiB: cfg.MemoryMiB, HeartbeatTimeout: cfg.HeartbeatTimeout, Takeover: daemon.TakeoverAuto, Log: cfg.Log})
	if err != nil {
		return res, fmt.Errorf("qemu lab: %w", err)
	}
	defer lab.Close()
	res.QEMU, res.Kernel, res.BootSec = lab.QEMU, lab.Kernel, lab.BootTime.Seconds()
	cfg.Progress("qemu: %s, guest %s %d MiB booted in %.1fs", lab.QEMU, lab.Kernel, cfg.MemoryMiB, res.BootSec)

	cl, err := startQClient(ctx, lab)
	if err != nil {
		return res, err
	}
	defer cl.stop()
	// A short warm-up (ARP, TCP, guest caches), then unprotected.
	if _, _, err := cl.window(ctx, 500*time.Millisecond, 0); err != nil {
		return res, cl.fail(&res, err)
	}
	lat, el, err := cl.window(ctx, cfg.Duration, cfg.Requests)
	if err != nil {
		return res, cl.fail(&res, err)
	}
	res.UnprotectedBackToBack = latencyStats(lat, el)
	cl.SetThink(unprotectedThink)
	lat, el, err = cl.window(ctx, cfg.Duration, cfg.Requests)
	cl.SetThink(0)
	if err != nil {
		return res, cl.fail(&res, err)
	}
	res.Unprotected = latencyStats(lat, el)
	u, ub := res.Unprotected, res.UnprotectedBackToBack
	cfg.Progress("qemu unprotected: p50 %.2f ms p99 %.2f ms (back to back: p50 %.2f ms, %.0f req/s)", u.P50Ms, u.P99Ms, ub.P50Ms, ub.ReqPerSec)

	for i, iv := range cfg.Intervals {
		if i > 0 {
			if err := lab.Unprotect(ctx); err != nil {
				return res, fmt.Errorf("qemu: unprotect before %v: %w", iv, err)
			}
		}
		pt, err := qemuPoint(ctx, cfg, lab, cl, iv, u)
		if err != nil {
			return res, cl.fail(&res, fmt.Errorf("qemu at %v: %w", iv, err))
		}
		res.Points = append(res.Points, pt)
		cfg.Progress("qemu %v epochs (achieved %.1f ms): p50 %.2f ms p99 %.2f ms, added p50 %.2f ms p99 %.2f ms (floor %.2f ms, ack p50 %.2f ms); back to back %.0f req/s",
			iv, pt.EpochMsMean, pt.Protected.P50Ms, pt.Protected.P99Ms, pt.AddedP50Ms, pt.AddedP99Ms, pt.FloorMs, pt.AckMsP50, pt.BackToBack.ReqPerSec)
	}
	var errs []error
	if cfg.Switchovers > 0 {
		n := cfg.Switchovers &^ 1 // an even number: the guest ends on hostA, where the failover trial kills it
		sws, err := qemuSwitchovers(ctx, lab, cl, max(n, 2))
		res.Switchovers = sws
		for _, sw := range sws {
			cfg.Progress("qemu switchover %s → %s: guest paused %.1f ms (drain %.1f, witness %.1f, handover %.1f); client's longest gap %.0f ms (%.0f ms in the second before), %d replies",
				sw.From, sw.To, sw.PausedMs, sw.DrainMs, sw.WitnessMs, sw.HandoverMs, sw.ClientGapMs, sw.BaselineGapMs, sw.RepliesDuring)
		}
		if err != nil {
			res.SwitchoverError = err.Error()
			cfg.Progress("qemu switchover FAILED: %v", err)
			return res, cl.fail(&res, err)
		}
	}
	res.SessionIntact = cl.err() == nil
	if cfg.FailoverTrials < 0 {
		return res, nil
	}
	// Failover trial 1 on this guest (still protected at the last interval).
	tr, err := qemuFailover(ctx, cfg, lab, cl)
	tr.EpochIntervalM = msf(cfg.Intervals[len(cfg.Intervals)-1])
	cl.stop()
	lab.Close()
	res.addTrial(tr, err, &errs, cfg)
	for t := 1; t < cfg.FailoverTrials && ctx.Err() == nil; t++ {
		tr, err := qemuFailoverFresh(ctx, cfg)
		res.addTrial(tr, err, &errs, cfg)
	}
	var det, act, nr []time.Duration
	for _, t := range res.Trials {
		det = append(det, fromMs(t.DetectionMs))
		act = append(act, fromMs(t.ActivationMs))
		nr = append(nr, fromMs(t.NextReplyMs))
	}
	if len(nr) > 0 {
		res.DetectionMsP50, res.ActivationMsP50 = msf(quantile(det, 0.5)), msf(quantile(act, 0.5))
		res.NextReplyMsP50, res.NextReplyMsMax = msf(quantile(nr, 0.5)), msf(quantile(nr, 1))
	}
	return res, errors.Join(errs...)
}

func fromMs(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

func (r *QEMUResult) addTrial(tr QEMUFailoverTrial, err error, errs *[]error, cfg QEMUConfig) {
	if err != nil {
		r.FailoverErrors = append(r.FailoverErrors, err.Error())
		*errs = append(*errs, fmt.Errorf("qemu failover trial %d: %w", len(r.Trials)+len(r.FailoverErrors), err))
		cfg.Progress("qemu failover trial FAILED: %v", err)
		return
	}
	r.Trials = append(r.Trials, tr)
	cfg.Progress("qemu failover trial %d: detection %.0f ms, activation %.1f ms, VM active %.0f ms, next reply %.0f ms on the same connection",
		len(r.Trials), tr.DetectionMs, tr.ActivationMs, tr.ActiveMs, tr.NextReplyMs)
}

// qemuPoint protects the guest at iv and measures the client.
func qemuPoint(ctx context.Context, cfg QEMUConfig, lab *demo.QEMULab, cl *qClient, iv time.Duration, u LatencyStats) (QEMULatencyPoint, error) {
	pt := QEMULatencyPoint{IntervalMs: msf(iv)}
	if err := lab.Protect(ctx, iv, 5); err != nil {
		return pt, err
	}
	// Settle: a few epochs with the client running.
	if _, _, err := cl.window(ctx, max(4*iv, 300*time.Millisecond), 0); err != nil {
		return pt, err
	}
	s0, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return pt, err
	}
	t0 := time.Now()
	cl.SetThink(iv)
	lat, el, err := cl.window(ctx, cfg.Duration, cfg.Requests)
	cl.SetThink(0)
	if err != nil {
		return pt, err
	}
	pt.Protected = latencyStats(lat, el)
	s1, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return pt, err
	}
	if s1.Role != daemon.RolePrimary || s1.LastError != "" {
		return pt, fmt.Errorf("protection not healthy: role %s, error %q", s1.Role, s1.LastError)
	}
	if n := s1.Epoch - s0.Epoch; n > 0 {
		pt.EpochMsMean = msf(time.Since(t0)) / float64(n)
	} else {
		pt.EpochMsMean = msf(time.Since(t0))
	}
	pt.PauseMsP50, pt.PauseMsP99, pt.AckMsP50, pt.AckMsP99 = s1.PauseMsP50, s1.PauseMsP99, s1.AckMsP50, s1.AckMsP99
	if n := s1.Epoch - s0.Epoch; n > 0 && s1.PagesSent >= s0.PagesSent {
		pt.DirtyPages = float64(s1.PagesSent-s0.PagesSent) / float64(n)
	}
	pt.FloorMs = pt.EpochMsMean/2 + pt.AckMsP50
	pt.FloorWithPauseMs = pt.FloorMs + pt.PauseMsP50
	pt.AddedP50Ms = pt.Protected.P50Ms - u.P50Ms
	pt.AddedP99Ms = pt.Protected.P99Ms - u.P99Ms
	if pt.FloorMs > 0 {
		pt.AddedOverFloor = pt.AddedP50Ms / pt.FloorMs
	}
	pt.GoalP50Ms, pt.GoalP99Ms = 0.6*pt.IntervalMs+1, 1.1*pt.IntervalMs+3
	// Back to back, for the throughput.
	n := cfg.Requests
	if n > 0 {
		n = max(1, n/2)
	}
	if lat, el, err = cl.window(ctx, cfg.Duration/2, n); err != nil {
		return pt, err
	}
	pt.BackToBack = latencyStats(lat, el)
	return pt, nil
}

// qemuFailover kills the primary host of a protected lab with cl running
// and measures the takeover and the client's next reply.
func qemuFailover(ctx context.Context, cfg QEMUConfig, lab *demo.QEMULab, cl *qClient) (QEMUFailoverTrial, error) {
	var tr QEMUFailoverTrial
	st, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return tr, err
	}
	if st.Role != daemon.RolePrimary {
		return tr, fmt.Errorf("guest not protected (role %s)", st.Role)
	}
	// Let the client run under protection for a moment.
	if _, _, err := cl.window(ctx, time.Second, 0); err != nil {
		return tr, err
	}
	before := cl.count()
	killAt := lab.KillPrimary()
	active, err := lab.WaitActive(ctx, time.Minute)
	if err != nil {
		return tr, fmt.Errorf("the backup did not take over (status %+v): %w", active, err)
	}
	tr.ActiveMs = msf(time.UnixMilli(active.ActivatedAtUnixMs).Sub(killAt))
	tr.ActivationMs = active.ActivationMs
	tr.DetectionMs = max(0, tr.ActiveMs-tr.ActivationMs)
	tr.ClaimMs = active.WitnessClaimMs
	if active.WitnessHolder != "hostB" {
		return tr, fmt.Errorf("the backup is active but the witness record names %q", active.WitnessHolder)
	}
	// The backup's first reply: one the primary released just before it
	// died may still land after the kill.
	next, err := cl.firstReplyAfter(ctx, active.ActivationStartedAt(), 2*time.Minute)
	if err != nil {
		return tr, fmt.Errorf("no reply from the backup on the same connection after the kill: %w", err)
	}
	tr.NextReplyMs = msf(next.Sub(killAt))
	// The session carries on from the backup.
	if _, _, err := cl.window(ctx, 500*time.Millisecond, 0); err != nil {
		return tr, err
	}
	tr.RepliesBefore = before
	tr.SessionIntact = cl.err() == nil
	return tr, nil
}

// qemuFailoverFresh boots a new guest, protects it at 50 ms and runs one
// failover trial.
func qemuFailoverFresh(ctx context.Context, cfg QEMUConfig) (QEMUFailoverTrial, error) {
	lab, err := demo.StartQEMULab(ctx, demo.QEMULabConfig{Exe: cfg.Exe, MemoryMiB: cfg.MemoryMiB, HeartbeatTimeout: cfg.HeartbeatTimeout, Takeover: daemon.TakeoverAuto, Log: cfg.Log})
	if err != nil {
		return QEMUFailoverTrial{}, fmt.Errorf("qemu lab: %w", err)
	}
	defer lab.Close()
	iv := cfg.Intervals[len(cfg.Intervals)-1]
	if err := lab.Protect(ctx, iv, 5); err != nil {
		return QEMUFailoverTrial{}, err
	}
	cl, err := startQClient(ctx, lab)
	if err != nil {
		return QEMUFailoverTrial{}, err
	}
	defer cl.stop()
	tr, err := qemuFailover(ctx, cfg, lab, cl)
	tr.EpochIntervalM = msf(iv)
	return tr, err
}

// qClient is a closed-loop guestsvc client on one TCP connection: it
// sends ADDs back to back and records each reply's latency and time.
type qClient struct {
	*guestsvc.Client
	conn   net.Conn
	cancel context.CancelFunc
	done   chan struct{}
}

func startQClient(ctx context.Context, lab *demo.QEMULab) (*qClient, error) {
	return startQClientWith(ctx, lab, guestsvc.ClientOptions{})
}

func startQClientWith(ctx context.Context, lab *demo.QEMULab, o guestsvc.ClientOptions) (*qClient, error) {
	dctx, dcancel := context.WithTimeout(ctx, 30*time.Second)
	conn, err := lab.Dial(dctx)
	dcancel()
	if err != nil {
		return nil, fmt.Errorf("qemu client: %w", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	c := &qClient{Client: guestsvc.NewClient(conn, o), conn: conn, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(c.done); c.Run(cctx) }()
	return c, nil
}

func (c *qClient) err() error { return c.Err() }

func (c *qClient) count() int { return c.Count() }

// window waits for d (or, if n > 0, for n more replies, at most 2 min) and
// returns the latencies of the replies in it and its length.
func (c *qClient) window(ctx context.Context, d time.Duration, n int) ([]time.Duration, time.Duration, error) {
	i0 := c.Count()
	t0 := time.Now()
	limit := d
	if n > 0 {
		limit = 2 * time.Minute
	}
	deadline := t0.Add(limit)
	for {
		e, got := c.Err(), c.Count()-i0
		if e != nil {
			return nil, 0, e
		}
		if n > 0 && got >= n {
			break
		}
		if time.Now().After(deadline) {
			if n > 0 {
				return nil, 0, fmt.Errorf("only %d of %d requests within %v", got, n, limit)
			}
			break
		}
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	rs := c.Replies(i0)
	if n > 0 && len(rs) > n {
		rs = rs[:n]
	}
	lat := make([]time.Duration, len(rs))
	for i, r := range rs {
		lat[i] = r.Lat
	}
	el := time.Since(t0)
	if n > 0 && len(rs) > 0 {
		el = rs[len(rs)-1].At.Sub(t0)
	}
	if len(lat) == 0 {
		return nil, el, errors.New("no reply in the window")
	}
	return lat, el, nil
}

// firstReplyAfter waits for the first reply received after t.
func (c *qClient) firstReplyAfter(ctx context.Context, t time.Time, limit time.Duration) (time.Time, error) {
	deadline := time.Now().Add(limit)
	for {
		e := c.Err()
		if r, found := c.FirstAfter(t); found {
			return r.At, nil
		}
		if e != nil {
			return time.Time{}, e
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("not within %v", limit)
		}
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// fail records the client's error in res and returns err.
func (c *qClient) fail(res *QEMUResult, err error) error {
	if ce := c.err(); ce != nil {
		res.ClientError = ce.Error()
	}
	res.SessionIntact = false
	return err
}

func (c *qClient) stop() {
	c.cancel()
	c.conn.Close()
	<-c.done
}

// backends names the backends measured in r, for the report's title.
func (r *Report) backends() string {
	sim := r.Pause.MemoryBytes > 0 || len(r.Encode) > 0 || r.Pipeline.Workload != "" || r.Latency != nil || r.Failover != nil || len(r.Sweep) > 0 || len(r.DirtyScale) > 0 || len(r.MultiVM) > 0
	var names []string
	if sim {
		names = append(names, "sim")
	}
	if r.QEMU != nil || r.Disk != nil || r.Soak != nil {
		names = append(names, "qemu")
	}
	if r.Xen != nil {
		names = append(names, "xen")
	}
	switch len(names) {
	case 0:
		return "sim backend"
	case 1:
		return names[0] + " backend"
	}
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1] + " backends"
}

func (r *Report) writeQEMU(ew *errWriter) {
	q := r.QEMU
	if q == nil {
		return
	}
	if q.Skipped != "" {
		ew.printf("\n## 9. QEMU backend\n\nSkipped: %s.\n", q.Skipped)
		return
	}
	ew.printf("\n## 9. QEMU backend: client-observed latency (%s, guest %s, %d MiB, TCG; booted in %.1f s)\n\n%s. Same TCP session throughout: %v.\n\n",
		q.QEMU, q.Kernel, q.MemoryMiB, q.BootSec, q.Model, q.SessionIntact)
	if q.ClientError != "" {
		ew.printf("Client error: %s\n\n", q.ClientError)
	}
	u := q.Unprotected
	b := q.UnprotectedBackToBack
	ew.printf("| epoch | requests | p50 ms | p90 ms | p99 ms | max ms | added p50 | added p99 | floor (epoch/2+ack) | added÷floor | floor + pause p50 | goal p50 / p99 | back-to-back p50 ms / req/s | achieved epoch ms | ack p50 / p99 ms | pause p50 / p99 ms | pages/epoch |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|---:|\n")
	ew.printf("| unprotected | %d | %.3f | %.3f | %.3f | %.3f | | | | | | | %.3f / %.0f | | | | |\n", u.Requests, u.P50Ms, u.P90Ms, u.P99Ms, u.MaxMs, b.P50Ms, b.ReqPerSec)
	for _, p := range q.Points {
		s := p.Protected
		ew.printf("| %.0f ms | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f / %.1f | %.2f / %.0f | %.1f | %.2f / %.2f | %.2f / %.2f | %.0f |\n",
			p.IntervalMs, s.Requests, s.P50Ms, s.P90Ms, s.P99Ms, s.MaxMs, p.AddedP50Ms, p.AddedP99Ms, p.FloorMs, p.AddedOverFloor, p.FloorWithPauseMs,
			p.GoalP50Ms, p.GoalP99Ms, p.BackToBack.P50Ms, p.BackToBack.ReqPerSec, p.EpochMsMean, p.AckMsP50, p.AckMsP99, p.PauseMsP50, p.PauseMsP99, p.DirtyPages)
	}
	if len(q.Switchovers) > 0 || q.SwitchoverError != "" {
		ew.printf("\n### Planned switchover (remusd switchover, under the back-to-back client)\n\nPaused: the daemon's figure, the guest's pause from the last epoch's capture to the new primary's confirmation. Client gap: the longest wait between two replies from the switchover to a second after it, beside the longest in the second before.\n\n")
		ew.printf("| from → to | paused ms | drain ms | witness ms | handover ms | client gap ms | gap before ms | replies |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
		for _, sw := range q.Switchovers {
			ew.printf("| %s → %s | %.1f | %.1f | %.1f | %.1f | %.0f | %.0f | %d |\n", sw.From, sw.To, sw.PausedMs, sw.DrainMs, sw.WitnessMs, sw.HandoverMs, sw.ClientGapMs, sw.BaselineGapMs, sw.RepliesDuring)
		}
		if q.SwitchoverError != "" {
			ew.printf("\nSwitchover failed: %s\n", q.SwitchoverError)
		}
	}
	if len(q.Trials) == 0 && len(q.FailoverErrors) == 0 {
		return
	}
	ew.printf("\n## 10. QEMU backend: failover (%d trials; heartbeat every %.0f ms, timeout %.0f ms; takeover %s)\n\nSIGKILL of everything in the primary host's namespace (remusd and QEMU); detection = VM active − activation; next reply = kill → the client's first reply from the backup on its existing TCP connection (replies the primary released just before it died are not counted).\n\n",
		len(q.Trials), q.HeartbeatIntervalMs, q.HeartbeatTimeoutMs, q.Takeover)
	ew.printf("| trial | epoch ms | detection ms | of which witness claim ms | activation ms | VM active ms | next reply ms | replies before | session intact |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for i, t := range q.Trials {
		ew.printf("| %d | %.0f | %.0f | %.1f | %.1f | %.0f | %.0f | %d | %v |\n", i+1, t.EpochIntervalM, t.DetectionMs, t.ClaimMs, t.ActivationMs, t.ActiveMs, t.NextReplyMs, t.RepliesBefore, t.SessionIntact)
	}
	if len(q.Trials) > 0 {
		ew.printf("| p50 | | %.0f | | %.1f | | %.0f (max %.0f) | | |\n", q.DetectionMsP50, q.ActivationMsP50, q.NextReplyMsP50, q.NextReplyMsMax)
	}
	for _, e := range q.FailoverErrors {
		ew.printf("\nFailed trial: %s\n", e)
	}
}

func (r *Report) qemuTables() []table {
	q := r.QEMU
	if q == nil || q.Skipped != "" {
		return nil
	}
	t := table{name: "qemu_latency.csv", header: []string{"mode", "interval_ms", "requests", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "added_p50_ms", "added_p99_ms", "floor_ms", "added_over_floor", "floor_with_pause_ms", "epoch_ms_mean", "ack_ms_p50", "ack_ms_p99", "pause_ms_p50", "pause_ms_p99", "back_to_back_p50_ms", "back_to_back_requests_per_s"}}
	u := q.Unprotected
	t.rows = append(t.rows, []string{"unprotected", "0", fi(int64(u.Requests)), ff(u.ReqPerSec), ff(u.P50Ms), ff(u.P90Ms), ff(u.P99Ms), ff(u.MaxMs), "", "", "", "", "", "", "", "", "", "", ff(q.UnprotectedBackToBack.P50Ms), ff(q.UnprotectedBackToBack.ReqPerSec)})
	for _, p := range q.Points {
		s := p.Protected
		t.rows = append(t.rows, []string{"protected", ff(p.IntervalMs), fi(int64(s.Requests)), ff(s.ReqPerSec), ff(s.P50Ms), ff(s.P90Ms), ff(s.P99Ms), ff(s.MaxMs),
			ff(p.AddedP50Ms), ff(p.AddedP99Ms), ff(p.FloorMs), ff(p.AddedOverFloor), ff(p.FloorWithPauseMs), ff(p.EpochMsMean), ff(p.AckMsP50), ff(p.AckMsP99), ff(p.PauseMsP50), ff(p.PauseMsP99), ff(p.BackToBack.P50Ms), ff(p.BackToBack.ReqPerSec)})
	}
	ts := []table{t}
	t = table{name: "qemu_failover.csv", header: []string{"trial", "epoch_interval_ms", "detection_ms", "witness_claim_ms", "activation_ms", "vm_active_ms", "next_reply_ms", "replies_before", "session_intact", "heartbeat_interval_ms", "heartbeat_timeout_ms"}}
	for i, x := range q.Trials {
		t.rows = append(t.rows, []string{fi(int64(i + 1)), ff(x.EpochIntervalM), ff(x.DetectionMs), ff(x.ClaimMs), ff(x.ActivationMs), ff(x.ActiveMs), ff(x.NextReplyMs), fi(int64(x.RepliesBefore)), fb(x.SessionIntact), ff(q.HeartbeatIntervalMs), ff(q.HeartbeatTimeoutMs)})
	}
	return append(ts, t)
}
