package bench

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
)

// SoakConfig configures MeasureSoak: a protected QEMU guest under a
// loaded client for a long time with the default timeouts and the
// witness, watched for false takeovers of its healthy primary.
type SoakConfig struct {
	Exe      string
	Duration time.Duration
	// Poll is how often both daemons' status is read (default 250 ms).
	Poll      time.Duration
	MemoryMiB int
	Log       *zap.Logger
	Progress  func(format string, args ...any)
}

// SoakResult is what the soak saw. A healthy primary must keep its VM:
// every counter below but Requests, Epochs and Polls should stay 0.
type SoakResult struct {
	Skipped string  `json:"skipped,omitempty"`
	Seconds float64 `json:"seconds"`
	// The settings under test (the daemons' defaults).
	EpochIntervalMs     float64 `json:"epoch_interval_ms"`
	HeartbeatIntervalMs float64 `json:"heartbeat_interval_ms"`
	HeartbeatTimeoutMs  float64 `json:"heartbeat_timeout_ms"`
	Takeover            string  `json:"takeover"`
	// Requests: replies on the client's one TCP connection, each checked
	// against the service model; ClientError is the first failure.
	Requests    int    `json:"requests"`
	ClientError string `json:"client_error,omitempty"`
	Epochs      uint64 `json:"epochs"`
	Polls       int    `json:"polls"`
	// FalseTakeovers: polls after which the backup had activated.
	FalseTakeovers int `json:"false_takeovers"`
	// BackupClaims: the backup raced for the witness record at least once.
	BackupClaims int `json:"backup_claims"`
	// GenerationChanges: the witness record's generation moved (each
	// change of the VM's active role, or a primary's claim after a link
	// loss, moves it).
	GenerationChanges int `json:"generation_changes"`
	// LinkNotUp: polls that found the backup's link not up.
	LinkNotUp int `json:"link_not_up"`
	// Reconnects of the replication link; Unprotected: the primary went
	// on without its backup at some poll.
	Reconnects  uint64 `json:"reconnects"`
	Unprotected bool   `json:"unprotected"`
}

// Healthy reports whether the soak saw nothing but a healthy pair.
func (r SoakResult) Healthy() bool {
	return r.Skipped == "" && r.ClientError == "" && r.Requests > 0 && r.FalseTakeovers == 0 && r.BackupClaims == 0 &&
		r.GenerationChanges == 0 && r.Reconnects == 0 && !r.Unprotected
}

// MeasureSoak runs the soak. Missing prerequisites give a result with
// Skipped set and no error.
func MeasureSoak(ctx context.Context, cfg SoakConfig) (res SoakResult, err error) {
	if cfg.Poll <= 0 {
		cfg.Poll = 250 * time.Millisecond
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 128
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Progress == nil {
		cfg.Progress = func(string, ...any) {}
	}
	if cfg.Duration <= 0 {
		return res, errors.New("bench: soak needs a duration")
	}
	start := time.Now()
	defer func() { res.Seconds = time.Since(start).Seconds() }()
	if why := QEMUSkipReason(cfg.Exe); why != "" {
		res.Skipped = why
		return res, nil
	}
	def := daemon.DefaultConfig()
	res.HeartbeatIntervalMs, res.HeartbeatTimeoutMs = msf(def.HeartbeatInterval.D()), msf(def.HeartbeatTimeout.D())
	res.Takeover = daemon.TakeoverAuto
	lab, err := demo.StartQEMULab(ctx, demo.QEMULabConfig{Exe: cfg.Exe, MemoryMiB: cfg.MemoryMiB, HeartbeatTimeout: def.HeartbeatTimeout.D(),
		Takeover: daemon.TakeoverAuto, Log: cfg.Log})
	if err != nil {
		return res, fmt.Errorf("qemu lab: %w", err)
	}
	defer lab.Close()
	res.EpochIntervalMs = msf(lab.Cfg.EpochInterval)
	cl, err := startQClient(ctx, lab)
	if err != nil {
		return res, err
	}
	defer cl.stop()
	if err := lab.Protect(ctx, 0, 5); err != nil {
		return res, err
	}
	first, err := lab.PrimaryStatus(ctx)
	if err != nil {
		return res, err
	}
	gen := first.WitnessGeneration
	before := cl.count()
	cfg.Progress("soak: guest protected (epochs %.0f ms, heartbeat %v/%v, takeover auto with a witness); client back to back for %v",
		res.EpochIntervalMs, def.HeartbeatInterval.D(), def.HeartbeatTimeout.D(), cfg.Duration)
	t := time.NewTicker(cfg.Poll)
	defer t.Stop()
	end := time.Now().Add(cfg.Duration)
	nextReport := time.Now().Add(time.Minute)
	for time.Now().Before(end) {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-t.C:
		}
		p, perr := lab.PrimaryStatus(ctx)
		b, berr := lab.BackupStatus(ctx)
		if perr != nil || berr != nil {
			return res, fmt.Errorf("soak: status: %w", errors.Join(perr, berr))
		}
		res.Polls++
		if b.Role == daemon.RoleActive {
			res.FalseTakeovers++
		}
		if b.WitnessClaimMs != 0 {
			res.BackupClaims = 1
		}
		if p.WitnessGeneration != gen || b.WitnessGeneration != gen {
			res.GenerationChanges++
			gen = max(p.WitnessGeneration, b.WitnessGeneration)
		}
		if b.Link != daemon.LinkUp {
			res.LinkNotUp++
		}
		if p.Unprotected {
			res.Unprotected = true
		}
		res.Reconnects, res.Epochs = p.Reconnects, p.AckedEpoch-first.AckedEpoch
		if err := cl.err(); err != nil {
			res.ClientError = err.Error()
			break
		}
		if time.Now().After(nextReport) {
			nextReport = time.Now().Add(time.Minute)
			cfg.Progress("soak: %v: %d replies, %d epochs, false takeovers %d, backup claims %d, generation changes %d, link not up %d polls, reconnects %d",
				time.Since(start).Round(time.Second), cl.count()-before, res.Epochs, res.FalseTakeovers, res.BackupClaims, res.GenerationChanges, res.LinkNotUp, res.Reconnects)
		}
	}
	res.Requests = cl.count() - before
	if err := cl.err(); err != nil && res.ClientError == "" {
		res.ClientError = err.Error()
	}
	cfg.Progress("soak done: %d replies checked, %d epochs, false takeovers %d, backup claims %d, generation changes %d, link not up %d of %d polls, reconnects %d",
		res.Requests, res.Epochs, res.FalseTakeovers, res.BackupClaims, res.GenerationChanges, res.LinkNotUp, res.Polls, res.Reconnects)
	return res, nil
}
