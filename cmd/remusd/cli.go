package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/remusd/remusd/bench"
	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/internal/sdnotify"
)

// version is set at link time: -ldflags "-X main.version=1.2.3".
var version = "dev"

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // runtime failure
	exitUsage   = 2 // bad flag, missing argument, unknown command
	exitConfig  = 3 // configuration invalid
)

// envControl overrides the default control socket path.
const envControl = "REMUSD_CONTROL"

// envLogLevel sets the log level of commands without a --log-level flag
// (demo).
const envLogLevel = "REMUSD_LOG_LEVEL"

type command struct {
	name    string
	args    string // usage line after "remusd NAME"
	summary string
	desc    string
	run     func(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int
}

var commands []*command

func init() {
	commands = []*command{
		{
			name: "serve", args: "[flags]",
			summary: "run the daemon (replication listener, control socket, metrics)",
			desc: `Runs the remusd daemon until SIGINT or SIGTERM: the replication listener
peers connect to, the local control socket the other commands talk to
(mode 0600, root-only), and, if --metrics is set, a Prometheus /metrics
endpoint.

Settings are applied in this order, later winning: built-in defaults,
the JSON file given by --config, $REMUSD_CONTROL (control path only),
then the flags given on the command line.

--sim-vm SPEC runs a simulated guest; repeat it for several. SPEC is
comma-separated key=value pairs; keys: name (required), memory (bytes,
with an optional KiB/MiB/GiB/TiB suffix), workload
(uniform|hotset|sequential|sparse|idle), rate (ops/s), seed,
output_every, output (HOST:PORT the guest's released output goes to).
Flags replace the config file's sim_vms. Example:
  --sim-vm name=web,memory=64MiB,workload=uniform,rate=20000,seed=1,output_every=64,output=127.0.0.1:9000`,
			run: runServe,
		},
		{
			name: "protect", args: "VM --peer PEER|HOST:PORT [flags]",
			summary: "protect a running VM, replicating it to a peer",
			desc: `Puts VM under Remus protection: it is checkpointed every epoch interval
and replicated to the backup remusd (a configured peer's name, or
HOST:PORT whose certificate must name a configured peer); its network
output is held until the backup acknowledges the epoch it belongs to.
Unset flags take the daemon's configured defaults.`,
			run: runProtect,
		},
		{
			name: "unprotect", args: "VM [flags]",
			summary: "stop protecting a VM",
			desc: `Stops protecting VM: held output is released and the link to the backup
is closed cleanly. The VM keeps running here, unprotected.`,
			run: runUnprotect,
		},
		{
			name: "failover", args: "VM [--force] [flags]",
			summary: "activate this daemon's replica of a VM (on the backup)",
			desc: `Run on the backup: makes this daemon's replica of VM take over from the
last acknowledged checkpoint. It is refused while the primary is
connected and heartbeating (that would run two copies); --force
activates anyway, logged loudly. Make sure the primary is really dead (or
fenced) first.`,
			run: runFailover,
		},
		{
			name: "forget", args: "VM [flags]",
			summary: "drop this daemon's replica of a VM (on the backup)",
			desc: `Run on the backup: drops the replica of VM (its standby stops, its memory
is freed). A replica only accepts its owner (the peer whose protection
created it); forget is how another peer may protect the VM to this host.`,
			run: runForget,
		},
		{
			name: "start", args: "VM [flags]",
			summary: "start a configured VM that does not run here",
			desc: `Launches a QEMU VM of this daemon's configuration that does not run here:
one with autostart off, one stopped by 'remusd stop', or one the daemon
did not restart because it had been protected or active here and may now
run on the other host. Make sure it runs nowhere else.`,
			run: runStart,
		},
		{
			name: "switchover", args: "VM [--json] [flags]",
			summary: "move a protected VM to its backup with no loss (planned maintenance)",
			desc: `Run on the primary: pauses VM, replicates its last epoch and waits for the
backup's ack, writes the witness record over to the backup (if a witness
is configured), has the backup start the VM from that epoch, stops the
guest here, and lets the new primary protect it back towards this host.
Prints how long the guest was paused. If anything fails before the
backup runs the VM, the VM resumes here, protected.`,
			run: runSwitchover,
		},
		{
			name: "stop", args: "VM [flags]",
			summary: "stop a VM that runs here unprotected",
			desc: `Stops (quits) a QEMU VM that runs here unprotected (role local or
active). A protected VM must be unprotected first. Stopping or restarting
the daemon never stops its guests: this is the command that does.`,
			run: runStop,
		},
		{
			name: "status", args: "[--json] [flags]",
			summary: "show every VM's role, link and replication figures",
			desc:    `Prints a table of the VMs the daemon knows of, or JSON with --json.`,
			run:     runStatus,
		},
		{
			name: "witness", args: "serve [--host IP] [--port N] [--data-dir DIR]",
			summary: "run a single-member etcd witness (labs and demos)",
			desc: `Runs a one-member etcd cluster in this process as the witness daemons
race on for automatic failover (config witness: {"endpoints":
["http://IP:PORT"]}), until SIGINT or SIGTERM; its data stays in
--data-dir. For labs and demos: production runs a three-member etcd
cluster of its own, on hosts other than the pair's, with etcd's TLS.`,
			run: runWitness,
		},
		{
			name: "demo", args: "[args...]",
			summary: "run a self-contained primary/backup failover demo",
			desc: `Runs a primary and a backup daemon as two processes on loopback with a
simulated guest, kills the primary with SIGKILL, shows the backup taking
over and checks the invariants (exit 0 only if they hold). The demo parses its
own flags: run 'remusd demo --help' for them. Logs go to stderr at the
level in $REMUSD_LOG_LEVEL (default warn).`,
			run: runDemo,
		},
		{
			name: "bench", args: "[--backend sim|qemu|all|xen] [--quick] [--json] [--out DIR] [--no-failover] [--failover-trials N] [--soak DURATION] [--skip LIST]",
			summary: "measure what protection costs, against the machine's bounds",
			desc: `Measures, on the embedded sim backend: pause time per epoch against a
memcpy of the same dirty pages; the page-delta codec against raw lz4 and
an XOR+RLE codec on the same pages; pages/s replicated primary to backup
over loopback TCP; client-observed latency of a request/response service
whose replies go through the output buffer, unprotected vs protected, beside
the output-commit floor (epoch/2 + ack); failover time with two real daemon
processes (SIGKILL of the primary → the client's next reply); a sweep of
epoch interval × workload × dirty rate × guest size; and how pause and
throughput scale with the dirty set and with many VMs. Every figure is
printed beside its bound, measured in the same run. Markdown tables go to
stdout (or one JSON object with --json), one progress line per point to
stderr. --quick finishes in under a minute on 2 cores; the default is the
full run (several minutes). --out DIR also writes report.json, CSV files
and PNG plots. Exit status 1 if any section failed (the others are still
reported).

--backend qemu measures client latency, switchover and failover on real
QEMU guests (root); all is sim and qemu. --backend xen (never part of all:
it takes minutes) boots Debian's Xen 4.17 under QEMU TCG and measures, in
its dom0, the pause per checkpoint and its parts for a 128 and a 512 MiB
PVH guest under a known dirtying load, bare and with a cooperative
suspend, against a memcpy of the same pages in dom0 and the bare pause,
and the standby's activation after a failover (--quick: 128 MiB only,
fewer epochs). This remusd needs no Xen support compiled in: it builds the
dom0 side from the source tree it was built from (go test -c -tags xen,
which needs the Go toolchain, gcc and libxen-dev; sh xentest/setup.sh
fetches the Xen packages), and says so when that is missing.`,
			run: runBench,
		},
		certsCommand,
		watchdogCommand,
		{
			name: "version", args: "",
			summary: "print the version",
			desc:    "Prints remusd's version.",
			run:     runVersion,
		},
		{
			name: "help", args: "[COMMAND]",
			summary: "show help for remusd or a command",
			desc:    "Shows the list of commands, or one command's usage and flags.",
			run:     runHelp,
		},
	}
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

// run is the whole CLI: it returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		printTopUsage(stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help":
		printTopUsage(stdout)
		return exitOK
	case "-version", "--version":
		return runVersion(ctx, lookup("version"), nil, stdout, stderr)
	}
	c := lookup(args[0])
	if c == nil {
		fmt.Fprintf(stderr, "remusd: unknown command %q\nRun 'remusd help' for the list of commands.\n", args[0])
		return exitUsage
	}
	return c.run(ctx, c, args[1:], stdout, stderr)
}

func printTopUsage(w io.Writer) {
	fmt.Fprint(w, `Usage: remusd COMMAND [flags] [args]

remusd keeps virtual machines running through a host failure, Remus-style:
the primary checkpoints each protected VM many times a second, streams the
changed memory to a backup host, and holds the VM's network output until
the backup has acknowledged the checkpoint it depends on.

Commands:
`)
	tw := 0
	for _, c := range commands {
		tw = max(tw, len(c.name))
	}
	for _, c := range commands {
		fmt.Fprintf(w, "  %-*s  %s\n", tw, c.name, c.summary)
	}
	fmt.Fprint(w, `
Run 'remusd COMMAND --help' for a command's usage and flags.
Exit codes: 0 ok, 1 failure, 2 usage error, 3 invalid configuration.
`)
}

// newFlagSet returns a flag set that prints nothing itself: run reports
// errors and help.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("remusd "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

func printCommandHelp(w io.Writer, c *command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: remusd %s %s\n\n%s\n", c.name, c.args, c.desc)
	if fs == nil {
		return
	}
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n == 0 {
		return
	}
	fmt.Fprint(w, "\nFlags:\n")
	fs.VisitAll(func(f *flag.Flag) {
		typ, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if typ != "" {
			line += " " + typ
		}
		fmt.Fprintln(w, line)
		fmt.Fprintf(w, "      %s", strings.ReplaceAll(usage, "\n", "\n      "))
		if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "0s" && f.DefValue != "false" {
			fmt.Fprintf(w, " (default %s)", f.DefValue)
		}
		fmt.Fprintln(w)
	})
}

// usageError reports a usage problem and returns exitUsage.
func usageError(stderr io.Writer, c *command, format string, a ...any) int {
	fmt.Fprintf(stderr, "remusd %s: %s\nRun 'remusd %s --help' for usage.\n", c.name, fmt.Sprintf(format, a...), c.name)
	return exitUsage
}

// parse parses flags and positional arguments in any order ("VM --peer X"
// and "--peer X VM" both work; "--" ends the flags). It prints help and
// returns done=true with the exit code on --help or a usage error.
func parse(c *command, fs *flag.FlagSet, args []string, stdout, stderr io.Writer) (pos []string, code int, done bool) {
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printCommandHelp(stdout, c, fs)
				return nil, exitOK, true
			}
			return nil, usageError(stderr, c, "%v", err), true
		}
		rest := fs.Args()
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), 0, false
		}
		if len(rest) == 0 {
			return pos, 0, false
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// wantVM checks a VM name argument against the one naming rule.
func wantVM(c *command, name string, stderr io.Writer) (int, bool) {
	if err := hypervisor.ValidateVMName(name); err != nil {
		return usageError(stderr, c, "%v", err), false
	}
	return 0, true
}

// wantArgs checks the number of positional arguments.
func wantArgs(c *command, pos []string, names []string, stderr io.Writer) (int, bool) {
	switch {
	case len(pos) < len(names):
		return usageError(stderr, c, "missing %s argument", names[len(pos)]), false
	case len(pos) > len(names):
		return usageError(stderr, c, "unexpected argument %q", pos[len(names)]), false
	}
	return 0, true
}

func defaultControl() string {
	if p := os.Getenv(envControl); p != "" {
		return p
	}
	return daemon.DefaultConfig().Control
}

func controlFlag(fs *flag.FlagSet) *string {
	return fs.String("control", defaultControl(), "`PATH` of the daemon's control socket (env "+envControl+")")
}

// clientCommand runs one call against the daemon's control socket.
func clientCommand(c *command, err error, stderr io.Writer) int {
	if err != nil {
		fmt.Fprintf(stderr, "remusd %s: %v\n", c.name, err)
		return exitFailure
	}
	return exitOK
}

func runProtect(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	peer := fs.String("peer", "", "the backup: a configured peer's `NAME`, or HOST:PORT of its replication listener (required)")
	interval := fs.Duration("epoch-interval", 0, "checkpoint every `D` (0 = the daemon's epoch_interval)")
	inflight := fs.Int("max-inflight", 0, "`N` epochs may await acknowledgement at once (0 = the daemon's max_inflight)")
	ctl := controlFlag(fs)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, []string{"VM"}, stderr); !ok {
		return code
	}
	if code, ok := wantVM(c, pos[0], stderr); !ok {
		return code
	}
	if *peer == "" {
		return usageError(stderr, c, "--peer NAME or HOST:PORT is required")
	}
	if *interval < 0 {
		return usageError(stderr, c, "--epoch-interval must not be negative")
	}
	if *inflight < 0 {
		return usageError(stderr, c, "--max-inflight must not be negative")
	}
	req := daemon.ProtectRequest{VM: pos[0], Peer: *peer, EpochInterval: *interval, MaxInflight: *inflight}
	if err := (daemon.ControlClient{Path: *ctl}).Protect(ctx, req); err != nil {
		return clientCommand(c, err, stderr)
	}
	fmt.Fprintf(stdout, "%s: protected, replicating to %s\n", req.VM, req.Peer)
	return exitOK
}

func runUnprotect(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	return runVMCommand(ctx, c, args, stdout, stderr, daemon.ControlClient.Unprotect, "unprotected")
}

func runFailover(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	force := fs.Bool("force", false, "activate even though the primary is connected and healthy (both copies then run)")
	ctl := controlFlag(fs)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, []string{"VM"}, stderr); !ok {
		return code
	}
	if code, ok := wantVM(c, pos[0], stderr); !ok {
		return code
	}
	if err := (daemon.ControlClient{Path: *ctl}).Failover(ctx, daemon.FailoverRequest{VM: pos[0], Force: *force}); err != nil {
		return clientCommand(c, err, stderr)
	}
	fmt.Fprintf(stdout, "%s: failed over; the replica here is now active\n", pos[0])
	return exitOK
}

func runForget(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	return runVMCommand(ctx, c, args, stdout, stderr, daemon.ControlClient.Forget, "replica forgotten; another peer may now protect it to this host")
}

func runStart(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	return runVMCommand(ctx, c, args, stdout, stderr, daemon.ControlClient.Start, "started")
}

func runSwitchover(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	ctl := controlFlag(fs)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, []string{"VM"}, stderr); !ok {
		return code
	}
	if code, ok := wantVM(c, pos[0], stderr); !ok {
		return code
	}
	r, err := (daemon.ControlClient{Path: *ctl, Timeout: 3 * time.Minute}).Switchover(ctx, pos[0])
	if err != nil {
		return clientCommand(c, err, stderr)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return clientCommand(c, enc.Encode(r), stderr)
	}
	fmt.Fprintf(stdout, "%s: switched over to %s at epoch %d; the guest was paused %.1f ms (drain %.1f ms, witness %.1f ms, handover %.1f ms); %s protects it back towards here\n",
		r.VM, r.NewPrimary, r.Epoch, r.PausedMs, r.DrainMs, r.WitnessMs, r.HandoverMs, r.NewPrimary)
	return exitOK
}

func runStop(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	return runVMCommand(ctx, c, args, stdout, stderr, daemon.ControlClient.Stop, "stopped")
}

// runVMCommand runs a control operation that takes one VM argument.
func runVMCommand(ctx context.Context, c *command, args []string, stdout, stderr io.Writer,
	op func(daemon.ControlClient, context.Context, string) error, doneMsg string) int {
	fs := newFlagSet(c.name)
	ctl := controlFlag(fs)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, []string{"VM"}, stderr); !ok {
		return code
	}
	if code, ok := wantVM(c, pos[0], stderr); !ok {
		return code
	}
	if err := op(daemon.ControlClient{Path: *ctl}, ctx, pos[0]); err != nil {
		return clientCommand(c, err, stderr)
	}
	fmt.Fprintf(stdout, "%s: %s\n", pos[0], doneMsg)
	return exitOK
}

func runStatus(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	asJSON := fs.Bool("json", false, "print JSON ({\"vms\":[...]}) instead of a table")
	ctl := controlFlag(fs)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	st, err := daemon.ControlClient{Path: *ctl}.Status(ctx)
	if err != nil {
		return clientCommand(c, err, stderr)
	}
	if *asJSON {
		err = daemon.RenderStatusJSON(stdout, st)
	} else {
		err = daemon.RenderStatus(stdout, st)
	}
	return clientCommand(c, err, stderr)
}

func runVersion(_ context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	fmt.Fprintf(stdout, "remusd %s (%s %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return exitOK
}

func runHelp(_ context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		printTopUsage(stdout)
		return exitOK
	}
	if len(args) > 1 {
		return usageError(stderr, c, "unexpected argument %q", args[1])
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "-help" {
		printCommandHelp(stdout, c, nil)
		return exitOK
	}
	target := lookup(args[0])
	if target == nil {
		fmt.Fprintf(stderr, "remusd help: unknown command %q\nRun 'remusd help' for the list of commands.\n", args[0])
		return exitUsage
	}
	if target == c {
		printCommandHelp(stdout, c, nil)
		return exitOK
	}
	// Every command prints its own help, flags included, on --help.
	return target.run(context.Background(), target, []string{"--help"}, stdout, stderr)
}

func runDemo(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	level := os.Getenv(envLogLevel)
	if level == "" {
		level = "warn"
	}
	log, err := newLogger(stderr, level, "console")
	if err != nil {
		fmt.Fprintf(stderr, "remusd demo: $%s: %v\n", envLogLevel, err)
		return exitUsage
	}
	defer log.Sync()
	if err := demo.RunDemo(ctx, args, stdout, log); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		fmt.Fprintf(stderr, "remusd demo: %v\n", err)
		return exitFailure
	}
	return exitOK
}

func runBench(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	quick := fs.Bool("quick", false, "tiny grid and small guests: finishes in under a minute on 2 cores")
	asJSON := fs.Bool("json", false, "print the figures as one JSON object")
	outDir := fs.String("out", "", "also write report.json, CSV files and PNG plots into this directory")
	noFailover := fs.Bool("no-failover", false, "skip the failover trials (they start remusd daemons as child processes)")
	trials := fs.Int("failover-trials", 0, "failover trials of the sim and QEMU sections, 1-1000 (default: 10 sim, 3 QEMU; --quick 3)")
	soak := fs.Duration("soak", 0, "with --backend qemu|all: also run a protected QEMU guest under load for this long with the default timeouts and count false takeovers (e.g. 30m; at most 24h)")
	skipList := fs.String("skip", "", "comma-separated sections to skip: pause,encode,pipeline,latency,failover,sweep,scale,multivm,qemu,disk")
	backend := fs.String("backend", "sim", "sim (every sim section), qemu (client latency and failover on real QEMU VMs: needs root, QEMU and the guest image), all (sim and qemu) or xen (a real Xen 4.17 under QEMU TCG: pause per checkpoint and activation; needs root, the source tree, the Go toolchain and libxen-dev)")
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	log, err := newLogger(stderr, "error", "console")
	if err != nil {
		fmt.Fprintf(stderr, "remusd bench: %v\n", err)
		return exitFailure
	}
	defer log.Sync()
	if !slices.Contains(bench.Backends, *backend) {
		fmt.Fprintf(stderr, "remusd bench: --backend: unknown backend %q (want %s)\n", *backend, strings.Join(bench.Backends, "|"))
		return exitUsage
	}
	if *trials < 0 || *trials > 1000 {
		fmt.Fprintf(stderr, "remusd bench: --failover-trials: %d out of range [1, 1000]\n", *trials)
		return exitUsage
	}
	if *soak < 0 || *soak > 24*time.Hour || (*soak > 0 && *backend != "qemu" && *backend != "all") {
		fmt.Fprintf(stderr, "remusd bench: --soak: %v needs --backend qemu or all and at most 24h\n", *soak)
		return exitUsage
	}
	o := bench.Options{Quick: *quick, Log: log, Progress: stderr, Backend: *backend, FailoverTrials: *trials, Soak: *soak}
	for _, sec := range strings.Split(*skipList, ",") {
		if sec = strings.TrimSpace(sec); sec != "" {
			if !bench.IsSection(sec) {
				fmt.Fprintf(stderr, "remusd bench: --skip: unknown section %q (want %s)\n", sec, strings.Join(bench.Sections, ","))
				return exitUsage
			}
			o.Skip = append(o.Skip, sec)
		}
	}
	skipped := func(sec string) bool { return strings.Contains(","+*skipList+",", ","+sec+",") }
	needExe := *backend != "sim" && (!skipped("qemu") || !skipped("disk") || *soak > 0)
	if *noFailover || strings.Contains(","+*skipList+",", ",failover,") {
		o.Skip = append(o.Skip, "failover")
	} else {
		needExe = true
	}
	if needExe {
		if o.Exe, err = os.Executable(); err != nil {
			fmt.Fprintf(stderr, "remusd bench: find own binary: %v\n", err)
			return exitFailure
		}
	}
	r, runErr := bench.RunWith(ctx, o)
	if ctx.Err() != nil {
		fmt.Fprintf(stderr, "remusd bench: %v\n", runErr)
		return exitFailure
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		enc.SetIndent("", "  ")
		err = enc.Encode(r)
	} else {
		err = r.Write(stdout)
	}
	if err == nil && *outDir != "" {
		var files []string
		files, err = r.WriteOut(*outDir)
		for _, f := range files {
			fmt.Fprintf(stderr, "remusd bench: wrote %s\n", f)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "remusd bench: %v\n", err)
		return exitFailure
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "remusd bench: %v\n", runErr)
		return exitFailure
	}
	return exitOK
}

// newLogger builds a zap logger writing to w: format "json" (production
// encoding) or "console" (human-readable).
func newLogger(w io.Writer, level, format string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("log level %q unknown (want debug|info|warn|error)", level)
	}
	var enc zapcore.Encoder
	switch format {
	case "json":
		ec := zap.NewProductionEncoderConfig()
		ec.EncodeTime = zapcore.ISO8601TimeEncoder
		enc = zapcore.NewJSONEncoder(ec)
	case "console":
		ec := zap.NewDevelopmentEncoderConfig()
		ec.EncodeTime = zapcore.TimeEncoderOfLayout("15:04:05.000")
		enc = zapcore.NewConsoleEncoder(ec)
	default:
		return nil, fmt.Errorf("log format %q unknown (want json|console)", format)
	}
	core := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(core, zap.AddCaller(), zap.ErrorOutput(zapcore.Lock(zapcore.AddSync(w)))), nil
}

// ---- serve ----

// simVMList is the repeatable --sim-vm flag.
type simVMList []daemon.SimVM

func (l *simVMList) String() string { return "" }

func (l *simVMList) Set(spec string) error {
	vm, err := parseSimVM(spec)
	if err != nil {
		return err
	}
	*l = append(*l, vm)
	return nil
}

var simVMKeys = []string{"name", "memory", "workload", "rate", "seed", "output_every", "output"}

// parseSimVM parses "name=web,memory=64MiB,workload=uniform,rate=20000,
// seed=1,output_every=64,output=127.0.0.1:9000". Keys left out stay zero
// (the sim backend's defaults).
func parseSimVM(spec string) (daemon.SimVM, error) {
	var vm daemon.SimVM
	seen := map[string]bool{}
	for _, kv := range strings.Split(spec, ",") {
		kv = strings.TrimSpace(kv)
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k = strings.TrimSpace(k)
		v = strings.TrimSpace(v)
		if !ok {
			return vm, fmt.Errorf("%q is not key=value (keys: %s)", kv, strings.Join(simVMKeys, ", "))
		}
		if seen[k] {
			return vm, fmt.Errorf("key %q given twice", k)
		}
		seen[k] = true
		var err error
		switch k {
		case "name":
			vm.Name = v
		case "memory", "memory_bytes":
			vm.MemoryBytes, err = parseSize(v)
		case "workload":
			vm.Workload = v
		case "rate":
			vm.Rate, err = strconv.Atoi(v)
			if err == nil && vm.Rate < 0 {
				err = errors.New("must not be negative")
			}
		case "seed":
			vm.Seed, err = strconv.ParseUint(v, 0, 64)
		case "output_every":
			vm.OutputEvery, err = strconv.Atoi(v)
			if err == nil && vm.OutputEvery < 0 {
				err = errors.New("must not be negative")
			}
		case "output":
			vm.Output = v
		default:
			return vm, fmt.Errorf("unknown key %q (keys: %s)", k, strings.Join(simVMKeys, ", "))
		}
		if err != nil {
			return vm, fmt.Errorf("key %s: bad value %q: %v", k, v, err)
		}
	}
	if vm.Name == "" {
		return vm, errors.New("missing name=NAME")
	}
	return vm, nil
}

// parseSize parses a byte count with an optional binary suffix: 4096,
// 512KiB, 64MiB, 2GiB, 1TiB (K, M, G, T and KB, MB, ... mean the same).
func parseSize(s string) (int64, error) {
	num := strings.TrimRight(s, "KMGTiBkmgtib")
	suffix := strings.ToLower(s[len(num):])
	num = strings.TrimSpace(num)
	var shift uint
	switch suffix {
	case "", "b":
	case "k", "kb", "kib":
		shift = 10
	case "m", "mb", "mib":
		shift = 20
	case "g", "gb", "gib":
		shift = 30
	case "t", "tb", "tib":
		shift = 40
	default:
		return 0, fmt.Errorf("unknown size suffix %q (want KiB, MiB, GiB or TiB)", s[len(num):])
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("not a size (want e.g. 64MiB)")
	}
	if n < 0 || n > (1<<62)>>shift {
		return 0, fmt.Errorf("size out of range")
	}
	return n << shift, nil
}

func runServe(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	def := daemon.DefaultConfig()
	fs := newFlagSet(c.name)
	configFile := fs.String("config", "", "read settings from the JSON config `FILE` (flags override it)")
	listen := fs.String("listen", def.Listen, "replication `ADDR` peers connect to (empty = accept no replicas)")
	control := fs.String("control", def.Control, "`PATH` of the control socket (env "+envControl+")")
	metrics := fs.String("metrics", def.Metrics, "serve Prometheus /metrics on `ADDR` (empty = off)")
	stateDir := fs.String("state-dir", def.StateDir, "`DIR` for per-VM audit logs (captured, acknowledged, committed, activated epochs)")
	name := fs.String("name", def.Name, "`NAME` of this host in logs and status")
	epochInterval := fs.Duration("epoch-interval", def.EpochInterval.D(), "checkpoint every `D`")
	maxInflight := fs.Int("max-inflight", def.MaxInflight, "`N` epochs may await acknowledgement at once")
	hbInterval := fs.Duration("heartbeat-interval", def.HeartbeatInterval.D(), "send a heartbeat every `D`")
	hbTimeout := fs.Duration("heartbeat-timeout", def.HeartbeatTimeout.D(), "declare the link lost after `D` without heartbeats (at least 3 intervals)")
	ackTimeout := fs.Duration("ack-timeout", def.AckTimeout.D(), "apply --ack-timeout-policy after `D` without an acknowledgement")
	ackPolicy := fs.String("ack-timeout-policy", def.AckTimeoutPolicy, "on ack timeout, `hold|unprotect`: keep holding output, or release it and run unprotected")
	insecure := fs.Bool("insecure", def.Insecure, "plaintext, unauthenticated replication (loopback listeners only unless the config also sets insecure_non_loopback)")
	takeover := fs.String("takeover", def.Takeover, "`manual|auto-unsafe`: on a lost primary, wait for remusd failover, or activate at once (unsafe under a partition)")
	var simVMs simVMList
	fs.Var(&simVMs, "sim-vm", "run a simulated guest described by `SPEC` (repeatable; see above)")
	logLevel := fs.String("log-level", "info", "log `LEVEL`: debug|info|warn|error")
	logFormat := fs.String("log-format", "json", "log `FORMAT`: json (production) or console (human)")

	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	log, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		return usageError(stderr, c, "%v", err)
	}
	defer log.Sync()

	cfg := def
	if *configFile != "" {
		if err := daemon.LoadConfigFile(*configFile, &cfg); err != nil {
			fmt.Fprintf(stderr, "remusd serve: %v\n", err)
			return exitConfig
		}
	}
	if p := os.Getenv(envControl); p != "" {
		cfg.Control = p
	}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "listen":
			cfg.Listen = *listen
		case "control":
			cfg.Control = *control
		case "metrics":
			cfg.Metrics = *metrics
		case "state-dir":
			cfg.StateDir = *stateDir
		case "name":
			cfg.Name = *name
		case "epoch-interval":
			cfg.EpochInterval = daemon.Duration(*epochInterval)
		case "max-inflight":
			cfg.MaxInflight = *maxInflight
		case "heartbeat-interval":
			cfg.HeartbeatInterval = daemon.Duration(*hbInterval)
		case "heartbeat-timeout":
			cfg.HeartbeatTimeout = daemon.Duration(*hbTimeout)
		case "ack-timeout":
			cfg.AckTimeout = daemon.Duration(*ackTimeout)
		case "ack-timeout-policy":
			cfg.AckTimeoutPolicy = *ackPolicy
		case "takeover":
			cfg.Takeover = *takeover
		case "insecure":
			cfg.Insecure = *insecure
		case "sim-vm":
			cfg.SimVMs = simVMs
		}
	})
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "remusd serve: invalid configuration:\n  %s\n", strings.ReplaceAll(err.Error(), "\n", "\n  "))
		return exitConfig
	}

	if err := serve(ctx, cfg, log); err != nil {
		var ce configError
		if errors.As(err, &ce) {
			fmt.Fprintf(stderr, "remusd serve: invalid configuration:\n  %v\n", ce.err)
			return exitConfig
		}
		log.Error("remusd stopped", zap.Error(err))
		fmt.Fprintf(stderr, "remusd serve: %v\n", err)
		return exitFailure
	}
	return exitOK
}

// serve runs the daemon, its control socket and its metrics endpoint
// until ctx is done or one of them fails (which stops the others).
func serve(ctx context.Context, cfg daemon.Config, log *zap.Logger) error {
	// Take the control socket first: if another remusd is running, stop
	// before starting guests or binding ports. Requests wait in the
	// listen backlog until Serve starts, after daemon.New.
	svc := &lateService{}
	ctl, err := daemon.ListenControl(cfg.Control, svc, log)
	if err != nil {
		return err
	}
	var opts []daemon.Option
	if exe, err := os.Executable(); err == nil {
		opts = append(opts, daemon.WithWatchdogExe(exe)) // `remusd watchdog`, if the config enables it
	} else {
		log.Warn("cannot tell this binary's path: no watchdog can be started (a running one is joined)", zap.Error(err))
	}
	d, err := daemon.New(cfg, log, opts...)
	if err != nil {
		done, cancel := context.WithCancel(ctx)
		cancel()
		_ = ctl.Serve(done) // closes and removes the socket
		if strings.Contains(err.Error(), "config field") {
			return configError{err}
		}
		return fmt.Errorf("start daemon: %w", err)
	}
	svc.set(d)

	started := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		what string
		err  error
	}
	var wg sync.WaitGroup
	results := make(chan result, 3)
	start := func(what string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := f(ctx)
			if errors.Is(err, context.Canceled) && ctx.Err() != nil {
				err = nil
			}
			if err == nil && ctx.Err() == nil {
				err = fmt.Errorf("%s stopped unexpectedly", what)
			}
			results <- result{what, err}
			cancel() // the first to stop stops the rest
		}()
	}
	start("daemon", d.Run)
	start("control socket", ctl.Serve)
	if cfg.Metrics != "" {
		h := daemon.NewMetricsHandler(d.Status, log)
		start("metrics", func(ctx context.Context) error { return daemon.ServeMetrics(ctx, cfg.Metrics, h, log) })
	}
	go func() {
		select {
		case <-d.Running():
		case <-ctx.Done():
			return
		}
		if sent, err := sdnotify.Notify("READY=1\nSTATUS=serving"); err != nil {
			log.Warn("cannot tell systemd we are ready", zap.Error(err))
		} else if sent {
			log.Info("told systemd: ready")
		}
	}()
	log.Info("remusd serving",
		zap.String("version", version), zap.String("name", cfg.Name), zap.String("listen", cfg.Listen),
		zap.String("control", cfg.Control), zap.String("metrics", cfg.Metrics),
		zap.Int("sim_vms", len(cfg.SimVMs)))

	<-ctx.Done()
	if _, err := sdnotify.Notify("STOPPING=1\nSTATUS=stopping: guests keep running"); err != nil {
		log.Warn("cannot tell systemd we are stopping", zap.Error(err))
	}
	wg.Wait()
	close(results)
	var errs []error
	for r := range results {
		if r.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.what, r.err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...) // in the order they stopped: the cause first
	}
	log.Info("remusd stopped", zap.Duration("uptime", time.Since(started).Round(time.Millisecond)))
	return nil
}

// configError marks a configuration problem found by daemon.New (such as
// a sim VM's bad workload): exit code 3.
type configError struct{ err error }

func (e configError) Error() string { return e.err.Error() }
func (e configError) Unwrap() error { return e.err }

// lateService is the control socket's Service until, and after, the
// daemon exists.
type lateService struct {
	mu  sync.RWMutex
	svc daemon.Service
}

var _ daemon.Service = (*lateService)(nil)

func (l *lateService) set(s daemon.Service) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.svc = s
}

func (l *lateService) get() (daemon.Service, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.svc == nil {
		return nil, errors.New("remusd is starting; try again")
	}
	return l.svc, nil
}

// do runs f on the daemon once it exists.
func (l *lateService) do(f func(daemon.Service) error) error {
	s, err := l.get()
	if err != nil {
		return err
	}
	return f(s)
}

func (l *lateService) Protect(ctx context.Context, req daemon.ProtectRequest) error {
	return l.do(func(s daemon.Service) error { return s.Protect(ctx, req) })
}

func (l *lateService) Unprotect(ctx context.Context, vm string) error {
	return l.do(func(s daemon.Service) error { return s.Unprotect(ctx, vm) })
}

func (l *lateService) Failover(ctx context.Context, req daemon.FailoverRequest) error {
	return l.do(func(s daemon.Service) error { return s.Failover(ctx, req) })
}

func (l *lateService) Forget(ctx context.Context, vm string) error {
	return l.do(func(s daemon.Service) error { return s.Forget(ctx, vm) })
}

func (l *lateService) Start(ctx context.Context, vm string) error {
	return l.do(func(s daemon.Service) error { return s.Start(ctx, vm) })
}

func (l *lateService) Stop(ctx context.Context, vm string) error {
	return l.do(func(s daemon.Service) error { return s.Stop(ctx, vm) })
}

func (l *lateService) Switchover(ctx context.Context, vm string) (r daemon.SwitchoverResult, err error) {
	err = l.do(func(s daemon.Service) error { r, err = s.Switchover(ctx, vm); return err })
	return r, err
}

func (l *lateService) Status(ctx context.Context) ([]daemon.VMStatus, error) {
	s, err := l.get()
	if err != nil {
		return nil, err
	}
	return s.Status(ctx)
}
