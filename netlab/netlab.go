// Package netlab builds throw-away network topologies out of Linux network
// namespaces (veth pairs, bridges, addresses) for tests and demos, runs
// commands and dials connections inside them, and tears everything down
// again, killing whatever was left running inside. It needs root and the
// ip(8) tool.
package netlab

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// CmdTimeout bounds every ip(8) invocation.
const CmdTimeout = 10 * time.Second

// Check reports why netlab cannot work here (not root, no ip tool), or nil.
func Check() error {
	if os.Geteuid() != 0 {
		return errors.New("netlab: needs root (network namespaces, veth, bridges)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("netlab: the ip tool (iproute2) is not installed")
	}
	return nil
}

// Lab is a set of namespaces created under one unique tag. Close deletes
// them all, after killing every process left inside.
type Lab struct {
	tag string

	mu  sync.Mutex
	nss []string
}

// New returns an empty lab whose namespaces are named prefix + role +
// a tag unique to this process and call (prefix at most 4 characters keeps
// names short).
func New(prefix string) (*Lab, error) {
	if err := Check(); err != nil {
		return nil, err
	}
	for range 100 {
		tag := fmt.Sprintf("%s%d%03d", prefix, os.Getpid()%10000, rand.IntN(1000))
		if matches, _ := globNetns(tag); len(matches) == 0 {
			return &Lab{tag: tag}, nil
		}
	}
	return nil, errors.New("netlab: no free namespace tag")
}

func globNetns(tag string) ([]string, error) {
	ents, err := os.ReadDir("/run/netns")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), tag) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Tag is the lab's unique suffix.
func (l *Lab) Tag() string { return l.tag }

// Namespaces lists the namespaces created so far.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.nss...)
}

// AddNetns creates namespace role+tag with lo up and returns its name.
func (l *Lab) AddNetns(ctx context.Context, role string) (string, error) {
	ns := role + l.tag
	if err := Run(ctx, "ip", "netns", "add", ns); err != nil {
		return "", err
	}
	l.mu.Lock()
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	if err := IP(ctx, ns, "link", "set", "lo", "up"); err != nil {
		return ns, err
	}
	return ns, nil
}

// Bridge creates bridge name in ns (no forward delay) and sets it up.
func Bridge(ctx context.Context, ns, name string) error {
	if err := IP(ctx, ns, "link", "add", name, "type", "bridge", "forward_delay", "0"); err != nil {
		return err
	}
	return IP(ctx, ns, "link", "set", name, "up")
}

// Veth creates a veth pair: ifA in nsA, ifB in nsB, both down.
func Veth(ctx context.Context, nsA, ifA, nsB, ifB string) error {
	return IP(ctx, nsA, "link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", nsB)
}

// Attach makes ifname in ns a port of bridge and sets it up.
func Attach(ctx context.Context, ns, ifname, bridge string) error {
	return IP(ctx, ns, "link", "set", ifname, "master", bridge, "up")
}

// Addr adds cidr to ifname in ns and sets the link up.
func Addr(ctx context.Context, ns, ifname, cidr string) error {
	if err := IP(ctx, ns, "addr", "add", cidr, "dev", ifname); err != nil {
		return err
	}
	return IP(ctx, ns, "link", "set", ifname, "up")
}

// IP runs `ip -n ns ARGS...`.
func IP(ctx context.Context, ns string, args ...string) error {
	return Run(ctx, append([]string{"ip", "-n", ns}, args...)...)
}

// Exec runs ARGS inside ns (ip netns exec) to completion.
func Exec(ctx context.Context, ns string, args ...string) error {
	return Run(ctx, append([]string{"ip", "netns", "exec", ns}, args...)...)
}

// Command returns a command that runs name ARGS inside ns; its children
// inherit the namespace.
func Command(ns, name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

// Run runs a command with CmdTimeout, returning its output in the error.
func Run(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, CmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// EnableBridgeNetfilter loads br_netfilter if needed and makes bridged
// traffic in ns traverse iptables (what NFQUEUE output buffering needs).
func EnableBridgeNetfilter(ctx context.Context, ns string) error {
	const p = "/proc/sys/net/bridge/bridge-nf-call-iptables"
	if _, err := os.Stat(p); err != nil {
		_ = Run(ctx, "modprobe", "br_netfilter")
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("netlab: bridged output buffering needs br_netfilter (modprobe br_netfilter): %w", err)
		}
	}
	return Exec(ctx, ns, "sh", "-c", "echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables && echo 1 >/proc/sys/net/bridge/bridge-nf-call-ip6tables")
}

// Pids lists the processes inside ns.
func Pids(ns string) []int {
	ctx, cancel := context.WithTimeout(context.Background(), CmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KillAll SIGKILLs every process inside ns, by pid, and waits (up to 5 s)
// until none is left.
func KillAll(ns string) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids := Pids(ns)
		if len(pids) == 0 || time.Now().After(deadline) {
			return
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Close kills every process left in the lab's namespaces and deletes
// them (their veths and bridges go with them). Safe to call twice.
func (l *Lab) Close() error {
	l.mu.Lock()
	nss := l.nss
	l.nss = nil
	l.mu.Unlock()
	for _, ns := range nss {
		KillAll(ns)
	}
	var errs []error
	for _, ns := range nss {
		if err := Run(context.Background(), "ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Do runs fn on an OS thread switched into ns; sockets fn creates stay in
// ns. The thread is discarded if it cannot be switched back.
func Do(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			errc <- fmt.Errorf("netlab: %w", err)
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("netlab: setns %s: %w", ns, err)
			return
		}
		err = fn()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Dial connects to a TCP address from inside ns, retrying until it
// succeeds or ctx ends; the connection stays in ns.
func Dial(ctx context.Context, ns, addr string) (net.Conn, error) {
	var c net.Conn
	err := Do(ns, func() error {
		for {
			d := net.Dialer{Timeout: 2 * time.Second}
			conn, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				c = conn
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("netlab: dial %s in netns %s: %w (last: %v)", addr, ns, ctx.Err(), err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	})
	return c, err
}

// Listen opens a TCP listener inside ns.
func Listen(ns, addr string) (net.Listener, error) {
	var ln net.Listener
	err := Do(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	return ln, err
}
