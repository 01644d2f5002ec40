package bench

import (
	"fmt"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// Plot file names written by WritePlots.
const (
	PlotLatency   = "latency_vs_epoch.png"
	PlotPause     = "pause_vs_dirty_pages.png"
	PlotBandwidth = "bandwidth_vs_dirty_rate.png"
)

// WritePlots writes the PNG plots the report has data for into dir and
// returns their paths.
func (r *Report) WritePlots(dir string) ([]string, error) {
	var out []string
	save := func(p *plot.Plot, name string) error {
		path := filepath.Join(dir, name)
		if err := p.Save(8*vg.Inch, 5*vg.Inch, path); err != nil {
			return fmt.Errorf("bench: plot %s: %w", name, err)
		}
		out = append(out, path)
		return nil
	}
	if r.Latency != nil && len(r.Latency.Points) > 0 {
		p, err := latencyPlot(r.Latency)
		if err != nil {
			return out, err
		}
		if err := save(p, PlotLatency); err != nil {
			return out, err
		}
	}
	if len(r.DirtyScale) > 0 {
		p, err := pausePlot(r.DirtyScale)
		if err != nil {
			return out, err
		}
		if err := save(p, PlotPause); err != nil {
			return out, err
		}
	}
	if len(r.Sweep) > 0 {
		p, err := bandwidthPlot(r.Sweep)
		if err != nil {
			return out, err
		}
		if err := save(p, PlotBandwidth); err != nil {
			return out, err
		}
	}
	return out, nil
}

func latencyPlot(l *LatencyResult) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Client latency vs epoch interval (sim, %s guest %d MiB)", l.Workload, l.MemoryBytes>>20)
	p.X.Label.Text = "configured epoch interval (ms)"
	p.Y.Label.Text = "request → reply latency (ms)"
	p.Legend.Top, p.Legend.Left = true, true
	n := len(l.Points)
	p50, p99, floor, unp, goal := make(plotter.XYs, n), make(plotter.XYs, n), make(plotter.XYs, n), make(plotter.XYs, n), make(plotter.XYs, n)
	for i, pt := range l.Points {
		x := pt.IntervalMs
		p50[i] = plotter.XY{X: x, Y: pt.Protected.P50Ms}
		p99[i] = plotter.XY{X: x, Y: pt.Protected.P99Ms}
		floor[i] = plotter.XY{X: x, Y: l.Unprotected.P50Ms + pt.FloorMs}
		unp[i] = plotter.XY{X: x, Y: l.Unprotected.P50Ms}
		goal[i] = plotter.XY{X: x, Y: l.Unprotected.P50Ms + pt.GoalP50Ms}
	}
	if err := plotutil.AddLinePoints(p,
		"protected p50", p50,
		"protected p99", p99,
		"output-commit floor (epoch/2 + ack p50)", floor,
		"goal p50 (0.6·epoch + 1 ms)", goal,
		"unprotected p50", unp); err != nil {
		return nil, err
	}
	return p, nil
}

func pausePlot(pts []DirtyScalePoint) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Checkpoint pause vs dirty pages (sim), with the memcpy bound"
	p.X.Label.Text = "dirty pages per epoch"
	p.Y.Label.Text = "ms"
	p.Legend.Top, p.Legend.Left = true, true
	bySize := map[int64][]DirtyScalePoint{}
	var sizes []int64
	for _, pt := range pts {
		if _, ok := bySize[pt.MemoryBytes]; !ok {
			sizes = append(sizes, pt.MemoryBytes)
		}
		bySize[pt.MemoryBytes] = append(bySize[pt.MemoryBytes], pt)
	}
	sort.Slice(sizes, func(i, j int) bool { return sizes[i] < sizes[j] })
	var vs []any
	for _, m := range sizes {
		s := bySize[m]
		sort.Slice(s, func(i, j int) bool { return s[i].DirtyPages < s[j].DirtyPages })
		pause, cp, goal := make(plotter.XYs, len(s)), make(plotter.XYs, len(s)), make(plotter.XYs, len(s))
		for i, pt := range s {
			pause[i] = plotter.XY{X: float64(pt.DirtyPages), Y: pt.PauseMsP50}
			cp[i] = plotter.XY{X: float64(pt.DirtyPages), Y: pt.MemcpyMsP50}
			goal[i] = plotter.XY{X: float64(pt.DirtyPages), Y: 1.5 * pt.MemcpyMsP50}
		}
		vs = append(vs,
			fmt.Sprintf("pause p50, guest %d MiB", m>>20), pause,
			fmt.Sprintf("memcpy bound, guest %d MiB", m>>20), cp,
			fmt.Sprintf("goal 1.5×memcpy, guest %d MiB", m>>20), goal)
	}
	if err := plotutil.AddLinePoints(p, vs...); err != nil {
		return nil, err
	}
	return p, nil
}

func bandwidthPlot(rs []SweepResult) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = "Replication bandwidth vs dirty rate (sim, loopback TCP)"
	p.X.Label.Text = "dirty pages replicated per second"
	p.Y.Label.Text = "MB/s (log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top, p.Legend.Left = true, true
	byWL := map[string][]SweepResult{}
	var wls []string
	for _, r := range rs {
		if _, ok := byWL[r.Workload]; !ok {
			wls = append(wls, r.Workload)
		}
		byWL[r.Workload] = append(byWL[r.Workload], r)
	}
	sort.Strings(wls)
	var vs []any
	for _, wl := range wls {
		s := byWL[wl]
		sort.Slice(s, func(i, j int) bool { return s[i].PagesPerSec < s[j].PagesPerSec })
		var wire plotter.XYs
		for _, r := range s {
			if r.WireMBPerSec > 0 {
				wire = append(wire, plotter.XY{X: r.PagesPerSec, Y: r.WireMBPerSec})
			}
		}
		if len(wire) == 0 {
			continue
		}
		vs = append(vs, "wire, "+wl, wire)
	}
	// Raw bytes of the same pages (what an uncompressed stream would cost).
	all := append([]SweepResult(nil), rs...)
	sort.Slice(all, func(i, j int) bool { return all[i].PagesPerSec < all[j].PagesPerSec })
	var raw plotter.XYs
	for _, r := range all {
		if r.MBPerSec > 0 {
			raw = append(raw, plotter.XY{X: r.PagesPerSec, Y: r.MBPerSec})
		}
	}
	if len(raw) > 0 {
		vs = append(vs, "raw page bytes (all points)", raw)
	}
	if err := plotutil.AddLinePoints(p, vs...); err != nil {
		return nil, err
	}
	return p, nil
}
