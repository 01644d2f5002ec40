package xentest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// The network of the dom0 tests: dom0 on a bridge, a guest built by
// BuildNetGuestRamdisk on it.
const (
	NetBridge   = "xenbr0"
	NetDom0Addr = "10.99.0.1/24"
	NetGuestIP  = "10.99.0.2"
	NetGuestMAC = "00:16:3e:52:4d:01"
)

// netVifScript is the vif hotplug script libxl runs for a guest's vif
// (Xen's vif-bridge needs more than the initramfs has): it puts the
// backend vif on the bridge and tells netback hotplug is done (netback
// does not connect before hotplug-status says connected).
const netVifScript = `#!/bin/sh
v=${vif:-$netdev}
echo "vif-script $1 $v $XENBUS_PATH" >>/tmp/vif-script.log
case "$1" in
online|add)
	ip link set "$v" up && brctl addif ` + NetBridge + ` "$v" &&
	xenstore-write "$XENBUS_PATH/hotplug-status" connected
	;;
esac
exit 0
`

// SetupNet creates the bridge with dom0's address on it (once) and writes
// the vif hotplug script into dir; its path is the script= of a guest's
// vif.
func SetupNet(ctx context.Context, dir string) (string, error) {
	return SetupNetAddr(ctx, dir, NetDom0Addr)
}

// SetupNetAddr is SetupNet with addr (CIDR) as dom0's address on the
// bridge: each dom0 of a two-host lab has its own (TwoHostAddrs).
func SetupNetAddr(ctx context.Context, dir, addr string) (string, error) {
	if _, err := os.Stat("/sys/class/net/" + NetBridge); err == nil {
		p := filepath.Join(dir, "vif-script")
		return p, os.WriteFile(p, []byte(netVifScript), 0o755)
	}
	for _, args := range [][]string{
		{"brctl", "addbr", NetBridge},
		{"ip", "addr", "add", addr, "dev", NetBridge},
		{"ip", "link", "set", NetBridge, "up"},
	} {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, err := exec.CommandContext(cctx, args[0], args[1:]...).CombinedOutput()
		cancel()
		if err != nil {
			return "", fmt.Errorf("xentest: %v: %w: %s", args, err, out)
		}
	}
	p := filepath.Join(dir, "vif-script")
	if err := os.WriteFile(p, []byte(netVifScript), 0o755); err != nil {
		return "", err
	}
	return p, nil
}

// NetVifLine is the xl configuration line of a guest's one vif on the
// bridge, with NetGuestMAC and SetupNet's script.
func NetVifLine(script string) string {
	return fmt.Sprintf("vif = ['mac=%s,bridge=%s,script=%s']", NetGuestMAC, NetBridge, script)
}

// WaitPing waits until ip answers ICMP echo and returns how long it took.
func WaitPing(ip string, within time.Duration) (time.Duration, bool) {
	t0 := time.Now()
	for time.Since(t0) < within {
		if exec.Command("ping", "-c", "1", "-W", "1", ip).Run() == nil {
			return time.Since(t0), true
		}
	}
	return time.Since(t0), false
}

// EchoClient keeps one TCP connection to the guest's counting echo
// service (BuildNetGuestRamdisk: line L is answered "N L", N counting the
// connection's lines in guest memory) and exchanges a numbered line every
// 100 ms until stopped or an exchange fails: reply i must be "i+1 line i",
// so a guest whose state went back (or forward) across a failover fails
// it.
type EchoClient struct {
	mu      sync.Mutex
	ok      int
	lastOK  time.Time
	times   []time.Time // of every successful exchange
	err     error
	stopped bool
	conn    net.Conn
}

// StartEcho connects to addr (HOST:PORT) and starts exchanging.
func StartEcho(addr string) (*EchoClient, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to the guest's echo service: %w", err)
	}
	e := &EchoClient{conn: c}
	go func() {
		r := bufio.NewReader(c)
		for i := 0; ; i++ {
			e.mu.Lock()
			stop := e.stopped
			e.mu.Unlock()
			if stop {
				return
			}
			req := fmt.Sprintf("line %d", i)
			want := fmt.Sprintf("%d %s\n", i+1, req)
			// Generous: an exchange waits for an epoch to be acked, and
			// epochs took seconds on a loaded machine.
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			_, err := fmt.Fprintln(c, req)
			var got string
			if err == nil {
				got, err = r.ReadString('\n')
			}
			if err == nil && got != want {
				err = fmt.Errorf("reply %q, want %q", got, want)
			}
			e.mu.Lock()
			if err != nil {
				if !e.stopped {
					e.err = err
				}
				e.mu.Unlock()
				return
			}
			e.ok++
			e.lastOK = time.Now()
			e.times = append(e.times, e.lastOK)
			e.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return e, nil
}

// State returns the exchanges so far, when the last succeeded, and the
// error that ended the loop (nil while it runs).
func (e *EchoClient) State() (int, time.Time, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.ok, e.lastOK, e.err
}

// Stop ends the loop and closes the connection.
func (e *EchoClient) Stop() {
	e.mu.Lock()
	e.stopped = true
	e.mu.Unlock()
	e.conn.Close()
}

// FirstAfter is how long after t the first exchange completed (-1 if none).
func (e *EchoClient) FirstAfter(t time.Time) time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, x := range e.times {
		if x.After(t) {
			return x.Sub(t).Round(time.Millisecond)
		}
	}
	return -1
}

// WaitCarriesOn waits until the connection has made n more exchanges than
// it had when called, within d; it fails if the connection breaks (a
// wrong reply included).
func (e *EchoClient) WaitCarriesOn(n int, d time.Duration) error {
	before, _, _ := e.State()
	deadline := time.Now().Add(d)
	for {
		got, _, err := e.State()
		if err != nil {
			return fmt.Errorf("the connection broke: %w (%d exchanges, %d before the wait)", err, got, before)
		}
		if got >= before+n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the connection made %d exchanges in %v, want %d", got-before, d, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// EchoOnce opens a new connection to addr and exchanges one line.
func EchoOnce(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, "hello"); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != "1 hello\n" {
		return fmt.Errorf("reply %q, want %q", got, "1 hello\n")
	}
	return nil
}

// WaitConsole waits until domain name's console log (xenconsoled
// --log=guest, as dom0's setup starts it) contains want; a domain that is
// gone meanwhile (crashed and destroyed) fails at once, not at the
// deadline.
func WaitConsole(ctx context.Context, name, want string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	lastCheck := time.Now()
	for {
		b, _ := os.ReadFile("/var/log/xen/console/guest-" + name + ".log")
		if bytes.Contains(b, []byte(want)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s's console did not show %q within %s", name, want, timeout)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Since(lastCheck) > 2*time.Second {
			lastCheck = time.Now()
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := exec.CommandContext(cctx, filepath.Join(BinDir, "xl"), "domid", name).Run()
			cancel()
			if err != nil {
				return fmt.Errorf("%s is gone while waiting for %q on its console; console:\n%s", name, want, Tail(string(b), 20))
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// ConsoleTail returns the last n lines of domain name's console log
// (xenconsoled --log=guest) without the dirtier's progress lines, so that
// a kernel's oops is not crowded out; "" if there is none.
func ConsoleTail(name string, n int) string {
	b, err := os.ReadFile("/var/log/xen/console/guest-" + name + ".log")
	if err != nil {
		return ""
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "dirtier: round ") {
			out = append(out, l)
		}
	}
	return Tail(strings.Join(out, "\n"), n)
}
