package guestimage

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// DialInNetns dials a TCP address from inside the named network namespace
// (/run/netns/NAME); the connection stays in that namespace.
func DialInNetns(ctx context.Context, ns, addr string) (net.Conn, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// This goroutine's thread changes namespace; it is never unlocked
		// if restoring fails, so the thread dies with the goroutine.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			ch <- res{nil, err}
			return
		}
		defer orig.Close()
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			ch <- res{nil, err}
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			ch <- res{nil, fmt.Errorf("setns %s: %w", ns, err)}
			return
		}
		var c net.Conn
		for {
			d := net.Dialer{Timeout: 2 * time.Second}
			c, err = d.DialContext(ctx, "tcp", addr)
			if err == nil || ctx.Err() != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-ctx.Done():
		// The dialer gives up with ctx too; drop a late connection.
		go func() {
			if r := <-ch; r.c != nil {
				r.c.Close()
			}
		}()
		return nil, fmt.Errorf("dial %s in netns %s: %w", addr, ns, ctx.Err())
	}
}
