// Package partition runs partition trials against real remusd processes:
// the Remus topology of network namespaces (client, primary host A,
// backup host B, witness host W), a `remusd witness serve` etcd member in
// W, `remusd serve` in A and B, and faults made of real packet drops
// (iptables in the hosts' namespaces) and signals sent by PID (SIGKILL,
// SIGSTOP/SIGCONT). After every trial it checks the invariants a
// partition must not break: one host releasing the guest's output at a
// time, nothing acknowledged lost, every fenced side stopped, and the
// service running somewhere once the network heals (issue 9, item 7).
//
// Nothing here is global: a Lab owns its namespaces and processes, and
// Close kills every process it started by PID and removes the namespaces,
// also after a failure.
package partition

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/demo"
	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/netlab"
)

// Prereqs reports why partition trials cannot run here (nil: they can).
func Prereqs() error {
	if os.Geteuid() != 0 {
		return errors.New("partition trials need root (network namespaces, iptables)")
	}
	if err := netlab.Check(); err != nil {
		return err
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return errors.New("partition trials need iptables (packet drops between the namespaces)")
	}
	return nil
}

// The second network: a link between the hosts alone, which carries the
// daemons' second heartbeat path (when a trial configures it).
const (
	SecondIPA    = "10.78.0.1"
	SecondIPB    = "10.78.0.2"
	SecondPrefix = "/24"
	SecondNet    = "10.78.0.0/24"
	// SecondPort is the second path's UDP port on both hosts.
	SecondPort = "7900"
)

// WitnessPort is the witness's client port on the witness host.
const WitnessPort = 2379

// The iptables chains a Lab installs in the raw table of each host's
// namespace, ahead of everything else (raw comes before the filter
// table's NFQUEUE output buffering): inChain is jumped to from
// PREROUTING (packets arriving, bridged ones included), outChain from
// OUTPUT (packets the host sends). A fault appends DROP rules to them;
// healing flushes them.
const (
	inChain  = "PTIN"
	outChain = "PTOUT"
)

// Lab is the topology with the witness running, shared by trials: each
// trial starts its own daemons and uses its own witness key prefix.
type Lab struct {
	Net *netlab.Remus
	Exe string
	log *zap.Logger

	dir      string // witness data, proxy
	wdir     string
	mu       sync.Mutex
	wit      *demo.WitnessProc
	proxy    net.Listener
	proxyWG  sync.WaitGroup
	proxyCtx context.Context
	stopProx context.CancelFunc
}

// NewLab builds the topology (namespace names start with prefix, at most
// 3 characters), starts the witness on the witness host and installs the
// drop chains on both hosts. exe is the remusd binary. On error
// everything created is removed.
func NewLab(ctx context.Context, exe, prefix string, log *zap.Logger) (l *Lab, err error) {
	if err := Prereqs(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	n, err := netlab.NewRemus(ctx, prefix)
	if err != nil {
		return nil, err
	}
	l = &Lab{Net: n, Exe: exe, log: log}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.dir, err = os.MkdirTemp("", "remusd-partition-lab-"); err != nil {
		return l, err
	}
	l.wdir = filepath.Join(l.dir, "witness")
	// A second network between the hosts only (a crossover cable), for
	// the daemons' second heartbeat path.
	if err := netlab.Veth(ctx, n.A, "hb0", n.B, "hb0"); err != nil {
		return l, err
	}
	for _, h := range []struct{ ns, ip string }{{n.A, SecondIPA}, {n.B, SecondIPB}} {
		if err := netlab.Addr(ctx, h.ns, "hb0", h.ip+SecondPrefix); err != nil {
			return l, err
		}
	}
	for _, ns := range []string{n.A, n.B} {
		if err := installChains(ctx, ns); err != nil {
			return l, err
		}
		if err := installCounter(ctx, ns); err != nil {
			return l, err
		}
	}
	if err := l.StartWitness(ctx); err != nil {
		return l, err
	}
	// The harness reads the witness record through a proxy in its own
	// namespace that dials into W: no fault ever cuts it.
	if l.proxy, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return l, err
	}
	l.proxyCtx, l.stopProx = context.WithCancel(context.Background())
	l.proxyWG.Add(1)
	go l.serveProxy()
	return l, nil
}

func installChains(ctx context.Context, ns string) error {
	for _, args := range [][]string{
		{"-t", "raw", "-N", inChain},
		{"-t", "raw", "-N", outChain},
		{"-t", "raw", "-I", "PREROUTING", "1", "-j", inChain},
		{"-t", "raw", "-I", "OUTPUT", "1", "-j", outChain},
		// Loopback is never cut.
		{"-t", "raw", "-A", inChain, "-i", "lo", "-j", "RETURN"},
		{"-t", "raw", "-A", outChain, "-o", "lo", "-j", "RETURN"},
	} {
		if err := iptables(ctx, ns, args...); err != nil {
			return err
		}
	}
	return nil
}

func iptables(ctx context.Context, ns string, args ...string) error {
	return netlab.Exec(ctx, ns, append([]string{"iptables", "-w", "5"}, args...)...)
}

// drop makes host namespace ns drop every packet from (in) and to (out)
// the given addresses or prefixes.
func drop(ctx context.Context, ns string, in, out []string) error {
	for _, a := range in {
		if err := iptables(ctx, ns, "-t", "raw", "-A", inChain, "-s", a, "-j", "DROP"); err != nil {
			return err
		}
	}
	for _, a := range out {
		if err := iptables(ctx, ns, "-t", "raw", "-A", outChain, "-d", a, "-j", "DROP"); err != nil {
			return err
		}
	}
	return nil
}

// heal removes every drop rule of namespace ns (the loopback exemption
// stays).
func heal(ctx context.Context, ns string) error {
	var errs []error
	for _, c := range []struct{ chain, lo string }{{inChain, "-i"}, {outChain, "-o"}} {
		errs = append(errs, iptables(ctx, ns, "-t", "raw", "-F", c.chain),
			iptables(ctx, ns, "-t", "raw", "-A", c.chain, c.lo, "lo", "-j", "RETURN"))
	}
	return errors.Join(errs...)
}

// HealAll removes every drop rule on both hosts.
func (l *Lab) HealAll(ctx context.Context) error {
	return errors.Join(heal(ctx, l.Net.A), heal(ctx, l.Net.B))
}

// StartWitness starts (or restarts: its data is kept) the witness.
func (l *Lab) StartWitness(ctx context.Context) error {
	w, err := demo.StartWitness(ctx, l.Exe, l.Net.W, netlab.WitnessIP, WitnessPort, l.wdir)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.wit = w
	l.mu.Unlock()
	return nil
}

// Witness is the running witness process (nil after a kill until
// restarted).
func (l *Lab) Witness() *demo.WitnessProc {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wit
}

// KillWitness SIGKILLs the witness and waits for it to exit.
func (l *Lab) KillWitness() {
	l.mu.Lock()
	w := l.wit
	l.wit = nil
	l.mu.Unlock()
	if w != nil {
		w.Kill()
	}
}

// WitnessEndpoint is the daemons' witness endpoint.
func (l *Lab) WitnessEndpoint() string {
	return fmt.Sprintf("http://%s:%d", netlab.WitnessIP, WitnessPort)
}

func (l *Lab) serveProxy() {
	defer l.proxyWG.Done()
	for {
		c, err := l.proxy.Accept()
		if err != nil {
			return
		}
		l.proxyWG.Add(1)
		go func() {
			defer l.proxyWG.Done()
			defer c.Close()
			ctx, cancel := context.WithTimeout(l.proxyCtx, 2*time.Second)
			b, err := netlab.Dial(ctx, l.Net.W, fmt.Sprintf("%s:%d", netlab.WitnessIP, WitnessPort))
			cancel()
			if err != nil {
				return
			}
			defer b.Close()
			stop := context.AfterFunc(l.proxyCtx, func() { c.Close(); b.Close() })
			defer stop()
			done := make(chan struct{})
			go func() { _, _ = io.Copy(b, c); b.Close(); close(done) }()
			_, _ = io.Copy(c, b)
			c.Close()
			<-done
		}()
	}
}

// ReadRecord reads VM vm's witness record under prefix, as the harness
// sees it (never through a cut path).
func (l *Lab) ReadRecord(ctx context.Context, prefix, vm string) (witness.Record, error) {
	w, err := witness.Dial(ctx, witness.Config{Endpoints: []string{"http://" + l.proxy.Addr().String()}, Prefix: prefix,
		OpTimeout: 2 * time.Second, DialTimeout: time.Second}, nil)
	if err != nil {
		return witness.Record{}, err
	}
	defer w.Close()
	var last error
	for range 5 {
		rec, _, err := w.Get(ctx, vm)
		if err == nil {
			return rec, nil
		}
		last = err
		if ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	return witness.Record{}, last
}

// Close stops the witness and the proxy and removes the namespaces (every
// process still inside is killed by PID) and the lab's files.
func (l *Lab) Close() {
	if l.stopProx != nil {
		l.stopProx()
	}
	if l.proxy != nil {
		l.proxy.Close()
		l.proxyWG.Wait()
	}
	if w := l.Witness(); w != nil {
		w.Stop()
	}
	if l.Net != nil {
		if err := l.Net.Close(); err != nil {
			l.log.Warn("netlab cleanup", zap.Error(err))
		}
	}
	if l.dir != "" {
		os.RemoveAll(l.dir)
	}
}

// sendSignal sends sig to pid, ignoring a process that is gone.
func sendSignal(pid int, sig syscall.Signal) error {
	if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signal %v to %d: %w", sig, pid, err)
	}
	return nil
}
