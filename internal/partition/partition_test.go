package partition

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// exe is the remusd binary TestMain builds.
var exe string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if Prereqs() != nil {
		return m.Run() // the tests skip, saying why
	}
	dir, err := os.MkdirTemp("", "remusd-partition-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	exe = filepath.Join(dir, "remusd")
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.Command(goTool, "build", "-o", exe, "github.com/remusd/remusd/cmd/remusd")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build ./cmd/remusd: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

func needLab(t *testing.T) {
	t.Helper()
	if err := Prereqs(); err != nil {
		t.Skip(err)
	}
}

// envInt reads a positive integer from the environment.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// profileTest is one of the two trial tests: the sim profile and the
// QEMU one.
type profileTest struct {
	label       string  // "" for sim, "qemu" (log prefix)
	prefix      string  // the lab's namespace prefix
	trialsEnv   string  // trials per class
	classesEnv  string  // comma-separated classes
	classes     []Class // default classes
	valid       []Class // the classes the env may name
	qemu        bool
	writeReport bool // PARTITION_REPORT
}

// TestPartitionTrials runs the sim profile: PARTITION_TRIALS trials of
// each class (default 1: the quick profile CI runs). PARTITION_SEED fixes
// the first seed (default: the time; it is logged), PARTITION_CLASSES
// picks classes (comma-separated), PARTITION_REPLAY=CLASS:SEED replays
// one trial, PARTITION_REPORT=FILE writes the report as JSON.
func TestPartitionTrials(t *testing.T) {
	needLab(t)
	runProfileTest(t, profileTest{prefix: "pt", trialsEnv: "PARTITION_TRIALS", classesEnv: "PARTITION_CLASSES",
		classes: Classes, valid: Classes, writeReport: true})
}

// TestPartitionQEMU runs trials on the QEMU guest (a Linux guest under
// QEMU TCG serving guestsvc, NFQUEUE output buffering, a client on one
// TCP connection): PARTITION_QEMU_TRIALS trials (default 1) of each of
// PARTITION_QEMU_CLASSES (default: cut-replication, isolate-primary,
// sigstop-primary). PARTITION_SEED and PARTITION_REPLAY (CLASS:SEED) as
// for the sim trials.
func TestPartitionQEMU(t *testing.T) {
	needLab(t)
	if testing.Short() {
		t.Skip("boots QEMU guests (-short)")
	}
	if err := QEMUPrereqs(context.Background()); err != nil {
		t.Skip(err)
	}
	if err := BuildGuest(context.Background()); err != nil {
		t.Fatal(err)
	}
	runProfileTest(t, profileTest{label: "qemu", prefix: "pq", trialsEnv: "PARTITION_QEMU_TRIALS", classesEnv: "PARTITION_QEMU_CLASSES",
		classes: []Class{CutReplication, IsolatePrimary, StopPrimary}, valid: QEMUClasses, qemu: true})
}

func runProfileTest(t *testing.T, pt profileTest) {
	t.Helper()
	per := envInt(t, pt.trialsEnv, 1)
	seed := uint64(time.Now().UnixNano() % 1e9)
	if v := os.Getenv("PARTITION_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("PARTITION_SEED=%q: %v", v, err)
		}
		seed = s
	}
	known := func(c Class) bool {
		_, ok := classes_(c)
		return ok && slices.Contains(pt.valid, c)
	}
	classes := pt.classes
	if v := os.Getenv(pt.classesEnv); v != "" {
		classes = nil
		for _, c := range strings.Split(v, ",") {
			if !known(Class(c)) {
				t.Fatalf("%s: unknown class %q (want one of %v)", pt.classesEnv, c, pt.valid)
			}
			classes = append(classes, Class(c))
		}
	}
	// Ctrl-C (or SIGTERM) ends the run cleanly: the trial in progress is
	// abandoned (not counted), the lab's processes killed and its
	// namespaces removed.
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	log := zap.NewNop()
	if testing.Verbose() && os.Getenv("PARTITION_DEBUG") != "" {
		log = zaptest.NewLogger(t)
	}
	lab, err := NewLab(ctx, exe, pt.prefix, log)
	if err != nil {
		t.Fatal(err)
	}
	defer lab.Close()
	opts := Options{Log: log, Keep: os.Getenv("PARTITION_KEEP") != "", QEMU: pt.qemu}
	if v := os.Getenv("PARTITION_REPLAY"); v != "" {
		c, s, ok := strings.Cut(v, ":")
		sd, err := strconv.ParseUint(s, 10, 64)
		if !ok || err != nil || !known(Class(c)) {
			t.Fatalf("PARTITION_REPLAY=%q: want CLASS:SEED with a class of %v", v, pt.valid)
		}
		res := RunTrial(ctx, lab, Class(c), sd, 1, opts)
		t.Log(res.Summary())
		t.Log("\n" + res.TimelineString())
		if !res.Passed() {
			t.Fail()
		}
		return
	}
	lp := "" // log prefix
	if pt.label != "" {
		lp = pt.label + " "
	}
	t.Logf("%sseed %d, %d trial(s) per class, classes %v (replay one trial: PARTITION_REPLAY=CLASS:SEED)", lp, seed, per, classes)
	p := Profile{Classes: classes, PerClass: per, Seed: seed, Options: opts, Progress: func(r Result) {
		t.Log(lp + r.Summary())
		if !r.Passed() {
			t.Log("\n" + r.TimelineString())
		}
	}}
	rp := p.Run(ctx, lab)
	var b strings.Builder
	rp.WriteTable(&b)
	t.Log(lp + "\n" + b.String())
	if path := os.Getenv("PARTITION_REPORT"); path != "" && pt.writeReport {
		js, err := json.MarshalIndent(rp, "", "  ")
		if err == nil {
			err = os.WriteFile(path, js, 0o644)
		}
		if err != nil {
			t.Errorf("report: %v", err)
		}
	}
	trials, passed, failed, errs := rp.Total()
	if ctx.Err() != nil {
		t.Errorf("interrupted after %d trials", trials)
	}
	if trials != per*len(classes) {
		t.Errorf("%d trials run, want %d", trials, per*len(classes))
	}
	if failed > 0 || errs > 0 || passed != trials {
		t.Errorf("%d of %d %strials failed, %d could not be run", failed, trials, lp, errs)
	}
}

func classes_(c Class) (classSpec, bool) {
	s, ok := classes[c]
	return s, ok
}

// TestCheckerCatchesViolations feeds the output checks made-up client
// traces: each must be caught (the checks can fail).
func TestCheckerCatchesViolations(t *testing.T) {
	at := time.Now()
	msg := func(host string, seq uint64, conn int) Msg {
		at = at.Add(time.Millisecond)
		return Msg{At: at, Host: host, Seq: seq, Conn: conn}
	}
	for _, tc := range []struct {
		name   string
		msgs   []Msg
		holder string
		cutA   bool
		want   string // violation kind ("" = none)
		late   int
	}{
		{"clean takeover", []Msg{msg(HostA, 1, 1), msg(HostA, 2, 1), msg(HostB, 5, 2), msg(HostB, 6, 2)}, HostB, false, "", 0},
		{"primary kept", []Msg{msg(HostA, 1, 1), msg(HostA, 2, 1), msg(HostA, 3, 1)}, HostA, false, "", 0},
		{"duplicate seq", []Msg{msg(HostA, 1, 1), msg(HostA, 2, 1), msg(HostB, 2, 2), msg(HostB, 3, 2)}, HostB, false, "lost-acked", 0},
		{"old primary goes on", []Msg{msg(HostA, 1, 1), msg(HostB, 3, 2), msg(HostA, 3, 1), msg(HostB, 4, 2)}, HostB, false, "two-copies", 0},
		{"stale interleave", []Msg{msg(HostA, 1, 1), msg(HostB, 3, 2), msg(HostA, 2, 1), msg(HostB, 4, 2)}, HostB, false, "interleaved", 0},
		{"late delivery after a cut", []Msg{msg(HostA, 1, 1), msg(HostB, 3, 2), msg(HostA, 2, 1), msg(HostB, 4, 2)}, HostB, true, "", 1},
		{"backup released, primary holds", []Msg{msg(HostA, 1, 1), msg(HostB, 3, 2)}, HostA, false, "two-copies", 0},
		{"reordered", []Msg{msg(HostA, 2, 1), msg(HostA, 1, 1)}, HostA, false, "reordered", 0},
		{"holder mismatch", []Msg{msg(HostA, 1, 1), msg(HostA, 2, 1)}, HostB, false, "holder-mismatch", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := Result{Holder: tc.holder}
			r := &run{res: &res, clientCut: map[string]bool{HostA: tc.cutA}, liveExpected: true, dead: map[string]bool{}}
			j := r.judge("client", tc.msgs, true)
			var kinds []string
			for _, v := range res.Violations {
				kinds = append(kinds, v.Kind)
			}
			if tc.want == "" && len(kinds) > 0 {
				t.Fatalf("violations %v in a clean trace: %+v", kinds, res.Violations)
			}
			if tc.want != "" && !contains(kinds, tc.want) {
				t.Fatalf("want a %s violation, got %v", tc.want, kinds)
			}
			if j.late != tc.late {
				t.Fatalf("late deliveries %d, want %d", j.late, tc.late)
			}
		})
	}
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

// TestUplinkCheckCatchesBothHosts feeds the QEMU uplink check made-up
// counter samples: host A's uplink carrying the guest's packets after host
// B's did must be caught; a clean takeover must not.
func TestUplinkCheckCatchesBothHosts(t *testing.T) {
	t0 := time.Now()
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	s := func(host string, ms int, pkts uint64) ctrSample {
		return ctrSample{Start: at(ms), End: at(ms + 5), Host: host, Pkts: pkts}
	}
	for _, tc := range []struct {
		name string
		ctr  []ctrSample
		want string
	}{
		{"clean takeover", []ctrSample{s(HostA, 0, 10), s(HostB, 10, 0), s(HostA, 100, 12), s(HostB, 110, 3), s(HostA, 200, 12), s(HostB, 210, 9)}, ""},
		{"old primary carries on", []ctrSample{s(HostA, 0, 10), s(HostB, 10, 0), s(HostA, 100, 12), s(HostB, 110, 3), s(HostA, 200, 12), s(HostB, 210, 9), s(HostA, 300, 15)}, "interleaved"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := Result{Holder: HostB}
			r := &run{res: &res, qemu: true, q: &qemuObs{ctr: tc.ctr}, liveExpected: true, dead: map[string]bool{}}
			r.qemuCheck()
			var kinds []string
			for _, v := range res.Violations {
				kinds = append(kinds, v.Kind)
			}
			if tc.want == "" && len(kinds) > 0 {
				t.Fatalf("violations %v in a clean trace: %+v", kinds, res.Violations)
			}
			if tc.want != "" && !contains(kinds, tc.want) {
				t.Fatalf("want a %s violation, got %v", tc.want, kinds)
			}
		})
	}
}
