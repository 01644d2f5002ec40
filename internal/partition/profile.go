package partition

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"
)

// Profile is a series of trials: PerClass trials of each class, on one
// lab, with seeds Seed, Seed+1, ... in order.
type Profile struct {
	Classes  []Class
	PerClass int
	Seed     uint64
	Options  Options
	// Progress, if set, is told of every trial as it ends.
	Progress func(Result)
}

// ClassStats counts one class's trials.
type ClassStats struct {
	Class    Class           `json:"class"`
	Trials   int             `json:"trials"`
	Passed   int             `json:"passed"`
	Failed   int             `json:"failed"`
	Errors   int             `json:"errors"` // could not be run to a verdict
	Outcomes map[Outcome]int `json:"outcomes"`
	// LateDeliveries: trials where output the old primary released
	// before its path to the client was cut reached the client after the
	// new primary's (not a violation: it precedes the new primary's).
	LateDeliveries int      `json:"late_deliveries"`
	Failures       []Result `json:"failures,omitempty"`
}

// Report is a profile's result.
type Report struct {
	Seed    uint64        `json:"seed"`
	Classes []*ClassStats `json:"classes"`
	Took    time.Duration `json:"took_ns"`
	Results []Result      `json:"-"`
	byClass map[Class]*ClassStats
}

// Total counts every class's trials.
func (rp *Report) Total() (trials, passed, failed, errs int) {
	for _, c := range rp.Classes {
		trials += c.Trials
		passed += c.Passed
		failed += c.Failed
		errs += c.Errors
	}
	return
}

func (rp *Report) add(res Result) {
	cs := rp.byClass[res.Class]
	if cs == nil {
		cs = &ClassStats{Class: res.Class, Outcomes: map[Outcome]int{}}
		rp.byClass[res.Class] = cs
		rp.Classes = append(rp.Classes, cs)
	}
	cs.Trials++
	switch {
	case res.Err != "":
		cs.Errors++
		cs.Failures = append(cs.Failures, res)
	case len(res.Violations) > 0:
		cs.Failed++
		cs.Failures = append(cs.Failures, res)
	default:
		cs.Passed++
	}
	if res.Outcome != "" {
		cs.Outcomes[res.Outcome]++
	}
	if res.LateDeliveries > 0 {
		cs.LateDeliveries++
	}
	rp.Results = append(rp.Results, res)
}

// Run runs the profile on lab: the classes interleaved (one trial of each
// in turn), so that a long run that is stopped early still covers every
// class.
func (p Profile) Run(ctx context.Context, lab *Lab) *Report {
	classes := p.Classes
	if len(classes) == 0 {
		classes = Classes
	}
	rp := &Report{Seed: p.Seed, byClass: map[Class]*ClassStats{}}
	start := time.Now()
	log := p.Options.Log
	if log == nil {
		log = zap.NewNop()
	}
	n := 0
	for i := 0; i < p.PerClass && ctx.Err() == nil; i++ {
		for _, c := range classes {
			if ctx.Err() != nil {
				break
			}
			n++
			seed := p.Seed + uint64(n)
			res := RunTrial(ctx, lab, c, seed, n, p.Options)
			if ctx.Err() != nil {
				break // cut short: neither passed nor failed
			}
			rp.add(res)
			if p.Progress != nil {
				p.Progress(res)
			}
		}
	}
	rp.Took = time.Since(start)
	return rp
}

// Summary is one line about a trial.
func (r Result) Summary() string {
	verdict := "PASS"
	switch {
	case r.Err != "":
		verdict = "ERROR " + r.Err
	case len(r.Violations) > 0:
		var v []string
		for _, x := range r.Violations {
			v = append(v, x.Kind+": "+x.Detail)
		}
		verdict = "FAIL " + strings.Join(v, " | ")
	}
	s := fmt.Sprintf("#%d %s seed=%d [%s] → %s (holder %s gen %d; msgs A %d B %d, A last %d, B first %d, unreleased %d",
		r.N, r.Class, r.Seed, r.Variant, r.Outcome, r.Holder, r.Generation, r.MsgsA, r.MsgsB, r.LastSeqA, r.FirstSeqB, r.Unreleased)
	if r.LateDeliveries > 0 {
		s += fmt.Sprintf(", %d late deliveries", r.LateDeliveries)
	}
	s += fmt.Sprintf("; %.1f s) %s", r.Took.Seconds(), verdict)
	if len(r.Notes) > 0 {
		s += " [notes: " + strings.Join(r.Notes, "; ") + "]"
	}
	if r.Dir != "" && !r.Passed() {
		s += " (logs in " + r.Dir + ")"
	}
	return s
}

// Timeline renders a trial's events relative to its first.
func (r Result) TimelineString() string {
	if len(r.Timeline) == 0 {
		return ""
	}
	var b strings.Builder
	t0 := r.Timeline[0].At
	for _, e := range r.Timeline {
		fmt.Fprintf(&b, "  +%6.0f ms  %s\n", float64(e.At.Sub(t0).Microseconds())/1000, e.What)
	}
	return b.String()
}

// WriteTable prints the per-class table and every failure with its seed.
func (rp *Report) WriteTable(w io.Writer) {
	outcomes := []Outcome{PrimaryKept, PrimaryUnprotected, BackupTookOver, VMLost}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "class\ttrials\tpassed\tfailed\terrors\t")
	for _, o := range outcomes {
		fmt.Fprintf(tw, "%s\t", o)
	}
	fmt.Fprintf(tw, "late deliveries\t\n")
	classes := append([]*ClassStats(nil), rp.Classes...)
	order := map[Class]int{}
	for i, c := range Classes {
		order[c] = i
	}
	sort.SliceStable(classes, func(i, j int) bool { return order[classes[i].Class] < order[classes[j].Class] })
	for _, c := range classes {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t", c.Class, c.Trials, c.Passed, c.Failed, c.Errors)
		for _, o := range outcomes {
			fmt.Fprintf(tw, "%d\t", c.Outcomes[o])
		}
		fmt.Fprintf(tw, "%d\t\n", c.LateDeliveries)
	}
	t, p, f, e := rp.Total()
	fmt.Fprintf(tw, "total\t%d\t%d\t%d\t%d\t\t\t\t\t\t\n", t, p, f, e)
	tw.Flush()
	fmt.Fprintf(w, "seed %d, %v\n", rp.Seed, rp.Took.Round(time.Second))
	for _, c := range classes {
		for _, f := range c.Failures {
			fmt.Fprintln(w, f.Summary())
		}
	}
}
