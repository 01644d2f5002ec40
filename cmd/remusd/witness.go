package main

import (
	"context"
	"fmt"
	"io"
	"net"

	"github.com/remusd/remusd/failover/witness/etcdmember"
	"github.com/remusd/remusd/internal/sdnotify"
)

// runWitness is `remusd witness serve`: a single-member etcd witness for
// labs and demos (production runs a three-member etcd cluster).
func runWitness(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "serve" {
		if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
			printCommandHelp(stdout, c, nil)
			return exitOK
		}
		return usageError(stderr, c, "want: witness serve [flags]")
	}
	fs := newFlagSet(c.name)
	host := fs.String("host", "127.0.0.1", "listen on `IP`")
	port := fs.Int("port", 2379, "client `PORT`")
	dir := fs.String("data-dir", "/var/lib/remusd-witness", "`DIR` for etcd's data (kept across restarts)")
	logLevel := fs.String("log-level", "warn", "etcd's log `LEVEL`: debug|info|warn|error")
	pos, code, done := parse(c, fs, args[1:], stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	if net.ParseIP(*host) == nil {
		return usageError(stderr, c, "--host %q is not an IP address", *host)
	}
	if *port < 1 || *port > 65535 {
		return usageError(stderr, c, "--port %d out of range", *port)
	}
	log, err := newLogger(stderr, *logLevel, "console")
	if err != nil {
		return usageError(stderr, c, "%v", err)
	}
	defer log.Sync()
	srv, err := etcdmember.Start(etcdmember.Options{Host: *host, ClientPort: *port, Dir: *dir, Logger: log})
	if err != nil {
		fmt.Fprintf(stderr, "remusd witness: %v\n", err)
		return exitFailure
	}
	defer srv.Close()
	fmt.Fprintf(stdout, "witness serving at %s (data in %s); configure daemons with \"witness\": {\"endpoints\": [%q]}\n", srv.ClientURLs()[0], *dir, srv.ClientURLs()[0])
	_, _ = sdnotify.Notify("READY=1\nSTATUS=witness serving")
	<-ctx.Done()
	return exitOK
}
