package xentest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

// TripleFault is what Xen prints on its console when an HVM/PVH guest
// triple-faults (hvm_triple_fault), before the domain reboots.
const TripleFault = "Triple fault - invoking HVM shutdown action"

// MaxTripleFaultRetries is how often RunInDom0 retries a run in which a
// domU triple-faulted.
const MaxTripleFaultRetries = 3

// RunInDom0 is the host-side driver of in-dom0 tests: it builds the tests
// of the package in pkgDir (cgo, tags), boots Xen under QEMU with cfg
// (files for the guests included), runs the tests matching run in dom0,
// and logs their lines. A domU triple fault under TCG (see the README's
// Xen section: common while dom0 and the guests shared Xen's pCPUs, not
// seen since the lab pins them apart, LabCPUs) is retried with a fresh
// Xen, loudly, up to MaxTripleFaultRetries times (Config.NoRetry: not);
// one more, and any failure that is not one, fails t. Missing facilities
// (QEMU, the packages) skip t, saying what to run.
func RunInDom0(t testing.TB, pkgDir, run string, tags []string, cfg Config) {
	t.Helper()
	if InDom0() {
		t.Skip("host-side driver; in dom0 the in-dom0 tests run")
	}
	if testing.Short() {
		t.Skip("boots Xen under QEMU")
	}
	for attempt := 1; ; attempt++ {
		var console bytes.Buffer
		cfg.Console = &console
		res, err := RunGoTest(context.Background(), pkgDir, run, tags, cfg)
		if errors.Is(err, ErrUnavailable) {
			t.Skipf("needs QEMU, busybox-static and Debian's Xen packages: %v (run xentest/setup.sh)", err)
		}
		if err != nil && res != nil && res.Console != "" {
			// No verdict (a timeout): a guest that triple-faulted can hang
			// a test until the run's deadline.
			keepConsole(t, attempt, res.Console)
			if !cfg.NoRetry && attempt <= MaxTripleFaultRetries && strings.Contains(res.Console, TripleFault) {
				t.Logf("RETRYING (attempt %d failed: %v): the domU crashed (triple fault under TCG, an open problem)", attempt, err)
				continue
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		// The in-dom0 tests' own output (measurements, failures).
		for _, l := range strings.Split(res.Console, "\n") {
			if strings.Contains(l, "_test.go") || strings.Contains(l, "--- ") || strings.Contains(l, "dom0:") {
				t.Log(strings.TrimRight(l, "\r"))
			}
		}
		t.Logf("attempt %d: verdict %q in %s", attempt, res.Verdict, res.Elapsed)
		if res.Passed {
			return
		}
		keepConsole(t, attempt, res.Console)
		if !cfg.NoRetry && attempt <= MaxTripleFaultRetries && strings.Contains(res.Console, TripleFault) {
			t.Logf("RETRYING (attempt %d failed): the domU crashed (triple fault under TCG, an open problem); console tail:\n%s", attempt, Tail(res.Console, 40))
			continue
		}
		t.Fatalf("in-dom0 tests failed; console tail:\n%s", Tail(res.Console, 80))
	}
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	ls := strings.Split(s, "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// keepConsole writes a failed attempt's whole console (dom0's and Xen's)
// to a file, for what the log filter leaves out (a daemon's log, module
// loading), and says where.
func keepConsole(t testing.TB, attempt int, console string) {
	if f, err := os.CreateTemp("", "xentest-console-*.log"); err == nil {
		_, _ = f.WriteString(console)
		f.Close()
		t.Logf("attempt %d's whole console: %s", attempt, f.Name())
	}
}
