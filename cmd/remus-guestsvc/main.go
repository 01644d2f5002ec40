// Command remus-guestsvc is the TCP service run inside remusd's test
// guests (see package guestsvc). Build it static: CGO_ENABLED=0.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/remusd/remusd/guestsvc"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "remus-guestsvc:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("remus-guestsvc", flag.ContinueOnError)
	addr := fs.String("listen", ":7000", "TCP address to serve on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	fmt.Fprintln(os.Stderr, "remus-guestsvc: serving on", ln.Addr())
	return guestsvc.Serve(ctx, ln, guestsvc.NewState())
}
