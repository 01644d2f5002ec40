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

	"golang.org/x/sys/unix"

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
	logPath := fs.String("log", "", "file for the LOG commands (on the guest's disk)")
	mount := fs.String("mount", "", "mount point of -log's file system, remounted read-only by FREEZE")
	if err := fs.Parse(args); err != nil {
		return err
	}
	st := guestsvc.NewState()
	if *logPath != "" {
		freeze := func(mnt string) error {
			unix.Sync()
			if mnt == "" {
				return fmt.Errorf("no -mount given")
			}
			if err := unix.Mount("", mnt, "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				return fmt.Errorf("remount %s read-only: %w", mnt, err)
			}
			return nil
		}
		if err := st.SetLog(*logPath, *mount, freeze); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	fmt.Fprintln(os.Stderr, "remus-guestsvc: serving on", ln.Addr())
	return guestsvc.Serve(ctx, ln, st)
}
