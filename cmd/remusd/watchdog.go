package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/failover/watchdog"
)

var watchdogCommand = &command{
	name: "watchdog", args: "[--state-dir DIR] [--qemu-binary PATH]... [--xen-domain NAME]... [flags]",
	summary: "stop guests whose daemon hangs (started by serve; rarely run by hand)",
	desc: `The last resort against a hung, stopped or crashed daemon: a separate
process that 'remusd serve' starts (detached, in its own session, so it
outlives the daemon as the QEMU guests do) when the configuration enables
the watchdog. The daemon pets it over DIR/watchdog.sock (mode 0600) with
each protected VM's QEMU pid and how long it can still prove this host
holds the VM; when that runs out, or the daemon dies without announcing a
restart, the watchdog stops the guest with SIGSTOP and keeps it stopped
until a daemon, having checked the witness, asks it to continue. It never
kills a guest. Only processes of the given QEMU binaries whose command
line names the VM and its QMP socket are stopped, and only Xen domains of
the given names (paused with a pause reference the watchdog counts as its
own, and drops when a daemon asks it to continue the guest).

One watchdog runs per state directory (a second one exits at once). Run
it by hand or from its own unit only to start it before the daemon.`,
	run: runWatchdog,
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return "" }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

func runWatchdog(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	def := daemon.DefaultConfig()
	fs := newFlagSet(c.name)
	stateDir := fs.String("state-dir", def.StateDir, "the daemon's state `DIR` (the socket is DIR/"+watchdog.SocketName+")")
	var bins stringList
	fs.Var(&bins, "qemu-binary", "a QEMU binary `PATH` (or name in PATH) whose processes may be stopped (repeatable; default "+watchdog.DefaultQEMUBinary+")")
	var doms stringList
	fs.Var(&doms, "xen-domain", "a Xen domain `NAME` that may be paused (repeatable; the daemon's xen_vms domains; needs a remusd built with the xen tag)")
	idle := fs.Duration("idle-exit", time.Minute, "exit after `D` with nothing to supervise and no daemon connected (0: never)")
	logLevel := fs.String("log-level", "info", "log `LEVEL`: debug|info|warn|error")
	logFormat := fs.String("log-format", "json", "log `FORMAT`: json or console")
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	if !filepath.IsAbs(*stateDir) {
		return usageError(stderr, c, "--state-dir %q must be absolute", *stateDir)
	}
	if *idle < 0 {
		return usageError(stderr, c, "--idle-exit must not be negative")
	}
	log, err := newLogger(stderr, *logLevel, *logFormat)
	if err != nil {
		return usageError(stderr, c, "%v", err)
	}
	defer log.Sync()
	err = watchdog.Serve(ctx, watchdog.ServerOptions{StateDir: *stateDir, Binaries: bins, XenDomains: doms, IdleExit: *idle, Log: log.Named("watchdog")})
	switch {
	case errors.Is(err, watchdog.ErrRunning):
		fmt.Fprintf(stderr, "remusd watchdog: %v\n", err)
		return exitOK
	case err != nil:
		fmt.Fprintf(stderr, "remusd watchdog: %v\n", err)
		return exitFailure
	}
	return exitOK
}
