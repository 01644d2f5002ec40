package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
)

// QEMUSwitchover is one planned switchover of the protected guest while
// the client runs back to back on its one TCP connection.
type QEMUSwitchover struct {
	From string `json:"from"`
	To   string `json:"to"`
	// The daemon's own figures (remusd switchover): how long the guest did
	// not run, and its parts.
	PausedMs   float64 `json:"paused_ms"`
	DrainMs    float64 `json:"drain_ms"`
	WitnessMs  float64 `json:"witness_ms"`
	HandoverMs float64 `json:"handover_ms"`
	// ClientGapMs is the client's longest wait between two replies from
	// the last reply before the switchover to 1 s after the first reply
	// after it; the epoch
	// interval sets the gap between replies outside a switchover, so
	// BaselineGapMs is the longest gap in the same client's second
	// before it, for comparison.
	ClientGapMs   float64 `json:"client_gap_ms"`
	BaselineGapMs float64 `json:"baseline_gap_ms"`
	// RepliesDuring: replies received in that window, each checked.
	RepliesDuring int `json:"replies_during"`
}

// qemuSwitchovers switches the guest over n times (hostA → hostB and
// back, alternately), each under the running client, and waits after
// each until the new primary has protected it back.
func qemuSwitchovers(ctx context.Context, lab *demo.QEMULab, cl *qClient, n int) ([]QEMUSwitchover, error) {
	var out []QEMUSwitchover
	ctl := []daemon.ControlClient{lab.Primary, lab.Backup}
	names := []string{"hostA", "hostB"}
	for i := range n {
		from, to := i%2, (i+1)%2
		if _, _, err := cl.window(ctx, time.Second, 0); err != nil {
			return out, err
		}
		i0 := cl.count()
		base := cl.maxGap(max(0, i0-200), time.Now().Add(-time.Second))
		at := time.Now()
		res, err := ctl[from].Switchover(ctx, lab.VM)
		if err != nil {
			return out, fmt.Errorf("switchover %d (%s → %s): %w", i+1, names[from], names[to], err)
		}
		// The first reply after it, however long it takes (the new
		// primary holds output until its first epoch towards the old one
		// is acknowledged), then a second of service.
		if _, err := cl.firstReplyAfter(ctx, at.Add(msDur(res.PausedMs)), time.Minute); err != nil {
			return out, fmt.Errorf("client after switchover %d: %w", i+1, err)
		}
		if _, _, err := cl.window(ctx, time.Second, 0); err != nil {
			return out, fmt.Errorf("client after switchover %d: %w", i+1, err)
		}
		sw := QEMUSwitchover{From: names[from], To: names[to], PausedMs: res.PausedMs, DrainMs: res.DrainMs, WitnessMs: res.WitnessMs, HandoverMs: res.HandoverMs,
			ClientGapMs: msf(cl.maxGap(max(0, i0-1), time.Time{})), BaselineGapMs: msf(base), RepliesDuring: cl.count() - i0}
		out = append(out, sw)
		// The new primary protects the VM back towards the old one.
		deadline := time.Now().Add(2 * time.Minute)
		for {
			st, err := ctl[to].VMStatus(ctx, lab.VM)
			if err == nil && st.Role == daemon.RolePrimary && st.AckedEpoch >= 5 {
				break
			}
			if time.Now().After(deadline) {
				return out, fmt.Errorf("after switchover %d, %s did not protect the VM back (status %+v, %v)", i+1, names[to], st, err)
			}
			if err := sleep(ctx, 50*time.Millisecond); err != nil {
				return out, err
			}
		}
	}
	return out, nil
}

// maxGap is the longest time between consecutive replies from reply i0
// on, only those received after since (zero: all).
func (c *qClient) maxGap(i0 int, since time.Time) time.Duration {
	gap, _ := c.MaxGap(i0, since)
	return gap
}

func msDur(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }
