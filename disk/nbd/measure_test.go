package nbd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
)

// TestMeasureWriteThroughput measures QEMU's writes through the server
// against the same writes to the raw file directly, in the same run:
// qemu-img bench (sequential writes, queue depth 16) and one large
// qemu-io write. It only runs with REMUSD_NBD_MEASURE=1 and reports; it
// asserts nothing about speed.
//
//	REMUSD_NBD_MEASURE=1 go test -run TestMeasureWriteThroughput -v ./disk/nbd/
func TestMeasureWriteThroughput(t *testing.T) {
	if !measure() {
		t.Skip("set REMUSD_NBD_MEASURE=1 to measure")
	}
	qimg := needTool(t, "qemu-img", "qemu-utils")
	qio := needTool(t, "qemu-io", "qemu-utils")
	const size = 256 << 20
	const rounds = 3

	type target struct {
		name  string
		setup func(t *testing.T) string // returns what qemu opens
	}
	capture := make([]byte, 32<<20) // a preallocated staging copy
	targets := []target{
		{"raw file", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "direct.raw")
			os.WriteFile(p, nil, 0o600)
			os.Truncate(p, size)
			return p
		}},
		{"nbd", func(t *testing.T) string { u, _, _ := fileExport(t, size, nil); return u }},
		{"nbd+copy", func(t *testing.T) string {
			u, _, _ := fileExport(t, size, disk.ObserverFunc(func(_ context.Context, c disk.Change) error {
				copy(capture, c.Data)
				return nil
			}))
			return u
		}},
	}
	benches := []struct {
		name  string
		args  func(img string) []string
		tool  string
		rate  func(out string, elapsed time.Duration) (float64, error)
		opKiB float64 // request size, for the time per request (0: not reported)
	}{
		{"qemu-img bench 64k seq write qd16 (256 MiB)", func(img string) []string {
			return []string{"bench", "-f", "raw", "-t", "writeback", "-w", "-d", "16", "-s", "65536", "-c", "4096", "--pattern=0x5a", img}
		}, qimg, func(out string, _ time.Duration) (float64, error) { return benchRate(out, 256) }, 64},
		{"qemu-img bench 4k seq write qd16 (64 MiB)", func(img string) []string {
			return []string{"bench", "-f", "raw", "-t", "writeback", "-w", "-d", "16", "-s", "4096", "-c", "16384", "--pattern=0x5a", img}
		}, qimg, func(out string, _ time.Duration) (float64, error) { return benchRate(out, 64) }, 4},
		{"qemu-img bench 4k seq write qd1 (32 MiB)", func(img string) []string {
			return []string{"bench", "-f", "raw", "-t", "writeback", "-w", "-d", "1", "-s", "4096", "-c", "8192", "--pattern=0x5a", img}
		}, qimg, func(out string, _ time.Duration) (float64, error) { return benchRate(out, 32) }, 4},
		{"qemu-io write 256 MiB + flush", func(img string) []string {
			return []string{"-f", "raw", "-t", "writeback", "-c", "write -P 0x5a 0 256M", "-c", "flush", img}
		}, qio, func(_ string, elapsed time.Duration) (float64, error) { return 256 / elapsed.Seconds(), nil }, 0},
	}
	for _, b := range benches {
		rates := map[string][]float64{}
		for r := range rounds {
			for i := range targets {
				tg := targets[(i+r)%len(targets)] // rotate the order
				img := tg.setup(t)
				start := time.Now()
				out := run(t, b.tool, b.args(img)...)
				el := time.Since(start)
				v, err := b.rate(out, el)
				if err != nil {
					t.Fatalf("%s on %s: %v\n%s", b.name, tg.name, err, out)
				}
				rates[tg.name] = append(rates[tg.name], v)
			}
		}
		var line []string
		base := median(rates["raw file"])
		for _, tg := range targets {
			m := median(rates[tg.name])
			l := fmt.Sprintf("%s %.0f MiB/s (%.2f×", tg.name, m, m/base)
			if b.opKiB > 0 {
				l += fmt.Sprintf(", %.1f µs per request", 1e6/(m*1024/b.opKiB))
			}
			line = append(line, l+")")
		}
		t.Logf("%s, median of %d: %s", b.name, rounds, strings.Join(line, "; "))
	}
}

func measure() bool { return os.Getenv("REMUSD_NBD_MEASURE") == "1" }

var benchDone = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

func benchRate(out string, mib float64) (float64, error) {
	m := benchDone.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no 'Run completed' line")
	}
	s, err := strconv.ParseFloat(m[1], 64)
	if err != nil || s <= 0 {
		return 0, fmt.Errorf("bad time %q", m[1])
	}
	return mib / s, nil
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}
