package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
)

// FailoverConfig configures MeasureFailover.
type FailoverConfig struct {
	// Exe is the remusd binary that runs the two daemons (required).
	Exe string
	// Trials (default 5).
	Trials int
	// HeartbeatInterval and HeartbeatTimeout of both daemons (default
	// 50 ms and 300 ms).
	HeartbeatInterval, HeartbeatTimeout time.Duration
	// EpochInterval (default 25 ms).
	EpochInterval time.Duration
	// Run is how long the protected guest runs before the kill (default 1 s).
	Run time.Duration
	// Guest: sim, MemoryBytes (default 16 MiB), hotset at Rate (default
	// 20000) writes/s, one output message every OutputEvery (default 16)
	// ops: the "replies" a client waits for.
	MemoryBytes int64
	Rate        int
	OutputEvery int
	Progress    func(string, ...any)
}

func (c FailoverConfig) withDefaults() FailoverConfig {
	if c.Trials <= 0 {
		c.Trials = 5
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 50 * time.Millisecond
	}
	if c.HeartbeatTimeout <= 0 {
		c.HeartbeatTimeout = 300 * time.Millisecond
	}
	if c.EpochInterval <= 0 {
		c.EpochInterval = 25 * time.Millisecond
	}
	if c.Run <= 0 {
		c.Run = time.Second
	}
	if c.MemoryBytes == 0 {
		c.MemoryBytes = 16 << 20
	}
	if c.Rate == 0 {
		c.Rate = 20000
	}
	if c.OutputEvery == 0 {
		c.OutputEvery = 16
	}
	if c.Progress == nil {
		c.Progress = func(string, ...any) {}
	}
	return c
}

// FailoverTrial is one kill of the primary.
type FailoverTrial struct {
	// DetectionMs: SIGKILL → the backup decided the primary is lost
	// (activation start = activated-at − activation time).
	DetectionMs float64 `json:"detection_ms"`
	// ActivationMs: the replica's activation itself (backup's figure).
	ActivationMs float64 `json:"activation_ms"`
	// ActiveMs: SIGKILL → VM active on the backup.
	ActiveMs float64 `json:"active_ms"`
	// NextReplyMs: SIGKILL → the client receives the next output message,
	// now from the backup.
	NextReplyMs float64 `json:"next_reply_ms"`
	// LastSeqBefore/FirstSeqAfter: output sequence numbers the client saw
	// from the primary last and from the backup first.
	LastSeqBefore uint64 `json:"last_seq_before"`
	FirstSeqAfter uint64 `json:"first_seq_after"`
	// UnreleasedMsgs = FirstSeqAfter − LastSeqBefore − 1: output of the
	// epoch(s) the backup committed but whose ack the primary never saw
	// before it died, so never released. Remus semantics: the restored
	// guest believes it sent them; a real TCP stack retransmits them, the
	// sim's datagram-like output does not.
	UnreleasedMsgs uint64 `json:"unreleased_msgs"`
	AckedEpoch     uint64 `json:"acked_epoch_at_kill"`
	// ClaimMs: the backup's winning claim on the witness record, one
	// round trip to the witness (part of DetectionMs).
	ClaimMs float64 `json:"claim_ms,omitempty"`
}

// FailoverResult is the distribution over trials.
type FailoverResult struct {
	Trials              []FailoverTrial `json:"trials"`
	HeartbeatIntervalMs float64         `json:"heartbeat_interval_ms"`
	HeartbeatTimeoutMs  float64         `json:"heartbeat_timeout_ms"`
	EpochIntervalMs     float64         `json:"epoch_interval_ms"`
	Takeover            string          `json:"takeover"`
	NextReplyMsP50      float64         `json:"next_reply_ms_p50"`
	NextReplyMsMax      float64         `json:"next_reply_ms_max"`
	DetectionMsP50      float64         `json:"detection_ms_p50"`
	ActivationMsP50     float64         `json:"activation_ms_p50"`
	ActiveMsP50         float64         `json:"active_ms_p50"`
	ClaimMsP50          float64         `json:"claim_ms_p50,omitempty"`
	Model               string          `json:"model"`
}

// FailoverModel says what is measured.
const FailoverModel = "two remusd serve processes on loopback (sim backend, takeover auto: the backup wins the VM's record on a `remusd witness serve` etcd on loopback before it activates); the client is a TCP listener receiving the guest's released output; " +
	"SIGKILL of the primary; the backup's guest reconnects to the client with a new TCP connection (an existing TCP session surviving is a QEMU-backend measurement)"

// MeasureFailover runs Trials failovers with real daemon processes.
func MeasureFailover(ctx context.Context, cfg FailoverConfig) (FailoverResult, error) {
	cfg = cfg.withDefaults()
	res := FailoverResult{
		HeartbeatIntervalMs: msf(cfg.HeartbeatInterval), HeartbeatTimeoutMs: msf(cfg.HeartbeatTimeout),
		EpochIntervalMs: msf(cfg.EpochInterval), Takeover: daemon.TakeoverAuto, Model: FailoverModel,
	}
	if cfg.Exe == "" {
		return res, errors.New("bench: failover needs the remusd binary")
	}
	// One witness serves every trial; each trial has its own key prefix,
	// so no trial sees another's record.
	wdir, err := os.MkdirTemp("", "remusd-bench-witness-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(wdir)
	wport, err := demo.FreePort()
	if err != nil {
		return res, err
	}
	wit, err := demo.StartWitness(ctx, cfg.Exe, "", "127.0.0.1", wport, wdir)
	if err != nil {
		return res, err
	}
	defer wit.Stop()
	var next, det, act, active, claim []float64
	for i := range cfg.Trials {
		w := wit.Config()
		w.Prefix = fmt.Sprintf("/remusd-bench/%d", i+1)
		tr, err := failoverTrial(ctx, cfg, w)
		if err != nil {
			return res, fmt.Errorf("trial %d: %w", i+1, err)
		}
		res.Trials = append(res.Trials, tr)
		next = append(next, tr.NextReplyMs)
		det = append(det, tr.DetectionMs)
		act = append(act, tr.ActivationMs)
		active = append(active, tr.ActiveMs)
		claim = append(claim, tr.ClaimMs)
		cfg.Progress("failover %d/%d: next reply %.0f ms after SIGKILL (detection %.0f ms incl. witness claim %.1f ms, activation %.2f ms, active at %.0f ms; seq %d → %d)",
			i+1, cfg.Trials, tr.NextReplyMs, tr.DetectionMs, tr.ClaimMs, tr.ActivationMs, tr.ActiveMs, tr.LastSeqBefore, tr.FirstSeqAfter)
	}
	res.NextReplyMsP50, res.DetectionMsP50, res.ClaimMsP50 = medianFloat(next), medianFloat(det), medianFloat(claim)
	res.ActivationMsP50, res.ActiveMsP50 = medianFloat(act), medianFloat(active)
	for _, v := range next {
		res.NextReplyMsMax = max(res.NextReplyMsMax, v)
	}
	return res, nil
}

func failoverTrial(ctx context.Context, cfg FailoverConfig, wit *daemon.WitnessConfig) (FailoverTrial, error) {
	var tr FailoverTrial
	dir, err := os.MkdirTemp("", "remusd-bench-failover-")
	if err != nil {
		return tr, err
	}
	defer os.RemoveAll(dir)
	cl, err := newOutputClient()
	if err != nil {
		return tr, err
	}
	defer cl.close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return tr, err
	}
	backupAddr := ln.Addr().String()
	ln.Close()
	common := func(name string) daemon.Config {
		c := daemon.DefaultConfig()
		c.Name = name
		c.Control = filepath.Join(dir, name+".sock")
		c.StateDir = filepath.Join(dir, name)
		c.EpochInterval = daemon.Duration(cfg.EpochInterval)
		c.HeartbeatInterval = daemon.Duration(cfg.HeartbeatInterval)
		c.HeartbeatTimeout = daemon.Duration(cfg.HeartbeatTimeout)
		c.Witness = wit
		return c
	}
	bcfg := common("backup")
	bcfg.Listen = backupAddr
	pcfg := common("primary")
	pcfg.SimVMs = []daemon.SimVM{{Name: "bench", MemoryBytes: cfg.MemoryBytes, Workload: "hotset", Rate: cfg.Rate, Seed: 1, OutputEvery: cfg.OutputEvery, Output: cl.addr()}}
	if err := daemon.MeshConfigs(filepath.Join(dir, "tls"), &pcfg, &bcfg); err != nil {
		return tr, err
	}
	backup, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: cfg.Exe, Dir: dir}, bcfg)
	if err != nil {
		return tr, err
	}
	defer backup.Stop()
	primary, err := demo.StartDaemon(ctx, demo.StartOptions{Exe: cfg.Exe, Dir: dir}, pcfg)
	if err != nil {
		return tr, err
	}
	defer primary.Stop()
	pc := daemon.ControlClient{Path: primary.Control, Timeout: 5 * time.Second}
	bc := daemon.ControlClient{Path: backup.Control, Timeout: 5 * time.Second}
	// `remusd serve` starts its control socket and the daemon's Run
	// concurrently: a Protect right after the socket answers can find the
	// daemon "not running" yet. Retry that case briefly.
	for deadline := time.Now().Add(3 * time.Second); ; {
		err := pc.Protect(ctx, daemon.ProtectRequest{VM: "bench", Peer: backupAddr})
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "not running") || time.Now().After(deadline) {
			return tr, fmt.Errorf("protect: %w", err)
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return tr, err
		}
	}
	if err := sleep(ctx, cfg.Run); err != nil {
		return tr, err
	}
	st, err := pc.VMStatus(ctx, "bench")
	if err != nil {
		return tr, err
	}
	if st.AckedEpoch == 0 {
		return tr, fmt.Errorf("no epoch acknowledged in %v (link %s, last error %q)", cfg.Run, st.Link, st.LastError)
	}
	tr.AckedEpoch = st.AckedEpoch
	killAt := time.Now()
	if err := primary.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return tr, fmt.Errorf("kill primary: %w", err)
	}
	<-primary.Done()
	first, err := cl.waitBackup(10 * time.Second)
	if err != nil {
		return tr, err
	}
	tr.NextReplyMs = msf(first.at.Sub(killAt))
	tr.FirstSeqAfter = first.seq
	tr.LastSeqBefore = cl.lastPrimarySeq()
	if tr.FirstSeqAfter > tr.LastSeqBefore {
		tr.UnreleasedMsgs = tr.FirstSeqAfter - tr.LastSeqBefore - 1
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := bc.VMStatus(ctx, "bench")
		if err == nil && st.Role == daemon.RoleActive && st.ActivatedAtUnixMs != 0 {
			tr.ActivationMs = st.ActivationMs
			tr.ActiveMs = float64(st.ActivatedAtUnixMs - killAt.UnixMilli())
			tr.DetectionMs = tr.ActiveMs - tr.ActivationMs
			tr.ClaimMs = st.WitnessClaimMs
			if st.WitnessHolder != "backup" {
				return tr, fmt.Errorf("backup active but the witness record names %q (generation %d)", st.WitnessHolder, st.WitnessGeneration)
			}
			break
		}
		if time.Now().After(deadline) {
			return tr, fmt.Errorf("backup not active 10 s after the kill (status %+v, err %v)", st, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return tr, nil
}

// outputClient stands in for a client of the guest: it receives the
// guest's released output messages from whichever host runs it.
type outputClient struct {
	ln       net.Listener
	mu       sync.Mutex
	lastPrim uint64
	backup   *outputMsg
	gotBack  chan struct{}
	wg       sync.WaitGroup
}

type outputMsg struct {
	at  time.Time
	seq uint64
}

func newOutputClient() (*outputClient, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	c := &outputClient{ln: ln, gotBack: make(chan struct{})}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				defer conn.Close()
				c.read(conn)
			}()
		}
	}()
	return c, nil
}

func (c *outputClient) addr() string { return c.ln.Addr().String() }

func (c *outputClient) read(conn net.Conn) {
	_ = daemon.ReadOutputStream(conn, func(host string, _ uint64, msg []byte) {
		if len(msg) < 8 {
			return
		}
		m := outputMsg{at: time.Now(), seq: binary.LittleEndian.Uint64(msg)}
		c.mu.Lock()
		if host == "primary" {
			c.lastPrim = max(c.lastPrim, m.seq)
		} else if c.backup == nil {
			c.backup = &m
			close(c.gotBack)
		}
		c.mu.Unlock()
	})
}

func (c *outputClient) waitBackup(d time.Duration) (outputMsg, error) {
	select {
	case <-c.gotBack:
	case <-time.After(d):
		return outputMsg{}, fmt.Errorf("no output from the backup within %v of the kill", d)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return *c.backup, nil
}

func (c *outputClient) lastPrimarySeq() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastPrim
}

func (c *outputClient) close() {
	c.ln.Close()
}
