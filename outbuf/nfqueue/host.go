package nfqueue

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// inNetns runs fn on an OS thread switched into the network namespace at
// path ("" = the current one). Child processes started by fn inherit it.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("nfqueue: open netns %s: %w", path, err)
	}
	defer unix.Close(target)
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("nfqueue: open current netns: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("nfqueue: enter netns %s: %w", path, err)
	}
	ferr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: it is discarded when this goroutine ends.
		return errors.Join(ferr, fmt.Errorf("nfqueue: restore netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// checkBridgeNF refuses a bridged port whose bridged IP traffic would not
// traverse iptables.
func checkBridgeNF(netnsPath string) error {
	return inNetns(netnsPath, func() error {
		for _, f := range []string{"bridge-nf-call-iptables", "bridge-nf-call-ip6tables"} {
			p := "/proc/sys/net/bridge/" + f
			v, err := os.ReadFile(p)
			if err != nil {
				return fmt.Errorf("nfqueue: bridged port needs br_netfilter: %w", err)
			}
			if strings.TrimSpace(string(v)) != "1" {
				return fmt.Errorf("nfqueue: bridged port needs net.bridge.%s=1 (is %s): bridged packets would bypass the buffer", f, strings.TrimSpace(string(v)))
			}
		}
		return nil
	})
}

// The filter chains that get the rule: FORWARD holds what the guest sends
// through the host, INPUT what it sends to the host itself (a client in
// the host namespace, e.g. dom0 on the bridge the vif is a port of). A
// packet is delivered locally or forwarded, so it crosses one of them,
// not both.
const (
	chainForward = "FORWARD"
	chainInput   = "INPUT"
)

// ruleRef is one rule of the set: a binary (one address family) and a
// chain.
type ruleRef struct{ bin, chain string }

func (r ruleRef) String() string { return r.bin + " " + r.chain }

// ruleSet is the four rules (IPv4 and IPv6, FORWARD and INPUT) steering
// the port's packets to the queue.
type ruleSet struct {
	cfg       Config
	installed []ruleRef // rules in place (Close removes them)
	inserted  []ruleRef // of them, those install added (a failed install removes only these)
	adopted   int       // rules that were already in place
}

func newRuleSet(cfg Config) *ruleSet { return &ruleSet{cfg: cfg} }

// refs is every rule of the set, in install order.
func (r *ruleSet) refs() []ruleRef {
	var refs []ruleRef
	for _, bin := range []string{r.cfg.IPTables, r.cfg.IP6Tables} {
		for _, chain := range []string{chainForward, chainInput} {
			refs = append(refs, ruleRef{bin: bin, chain: chain})
		}
	}
	return refs
}

// spec is the rule's match and target, the same in every chain: physdev-in
// matches a bridge port in INPUT as in FORWARD (br_netfilter, which New
// requires for a bridged port), -i the routed port in both.
func (r *ruleSet) spec() []string {
	var s []string
	if r.cfg.Bridged {
		s = []string{"-m", "physdev", "--physdev-in", r.cfg.Interface}
	} else {
		s = []string{"-i", r.cfg.Interface}
	}
	return append(s,
		"-m", "comment", "--comment", fmt.Sprintf("remusd outbuf q%d", r.cfg.QueueNum),
		"-j", "NFQUEUE", "--queue-num", strconv.Itoa(int(r.cfg.QueueNum)))
}

// args is an iptables command on ref's chain (-C, -D: the chain; -I: the
// chain and position 1) followed by the rule.
func (r *ruleSet) args(op string, ref ruleRef) []string {
	a := []string{"-w", "5", op, ref.chain}
	if op == "-I" {
		a = append(a, "1")
	}
	return append(a, r.spec()...)
}

func (r *ruleSet) run(ctx context.Context, bin string, args ...string) error {
	_, err := r.output(ctx, bin, args...)
	return err
}

// output runs bin with args in the host namespace and returns its stdout.
func (r *ruleSet) output(ctx context.Context, bin string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.CallTimeout)
	defer cancel()
	var stdout []byte
	err := inNetns(r.cfg.NetnsPath, func() error {
		cmd := exec.CommandContext(ctx, bin, args...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("nfqueue: %s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(out.String()+errOut.String()))
		}
		stdout = out.Bytes()
		return nil
	})
	return stdout, err
}

// exists reports whether ref's chain holds the rule (iptables -C: exit
// status 1 means absent; anything else that fails is an error).
func (r *ruleSet) exists(ctx context.Context, ref ruleRef) (bool, error) {
	err := r.run(ctx, ref.bin, r.args("-C", ref)...)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &ee) && ee.ExitCode() == 1:
		return false, nil
	default:
		return false, err
	}
}

// count is how many copies of the rule ref's chain holds, read from
// iptables -S (whose rule format this matches; an unrecognised format
// counts 0).
func (r *ruleSet) count(ctx context.Context, ref ruleRef) (int, error) {
	out, err := r.output(ctx, ref.bin, "-w", "5", "-S", ref.chain)
	if err != nil {
		return 0, err
	}
	return countRule(out, r.line(ref.chain)), nil
}

// line is the rule in chain as iptables -S prints it.
func (r *ruleSet) line(chain string) string {
	s := r.spec()
	for i, a := range s {
		if i > 0 && s[i-1] == "--comment" {
			s[i] = strconv.Quote(a)
		}
	}
	return "-A " + chain + " " + strings.Join(s, " ")
}

func countRule(listing []byte, line string) int {
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(listing))
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == line {
			n++
		}
	}
	return n
}

// maxRuleCopies bounds the removal loops (copies a crashed older version
// or an operator may have added), per chain and family.
const maxRuleCopies = 64

// install puts exactly one copy of the rule into the FORWARD and the INPUT
// chain of each family. A rule already there (left by a Buffer that
// detached, or whose process died) is adopted, not duplicated: the kernel
// has been dropping the guest's packets through it since the queue lost
// its listener, and from now on this Buffer's queue holds them. Surplus
// copies are deleted (one at a time: at least one copy stays throughout,
// so nothing leaks).
func (r *ruleSet) install(ctx context.Context) error {
	for _, ref := range r.refs() {
		if err := r.installOne(ctx, ref); err != nil {
			return errors.Join(err, r.undoInstall(context.WithoutCancel(ctx)))
		}
	}
	return nil
}

func (r *ruleSet) installOne(ctx context.Context, ref ruleRef) error {
	present, err := r.exists(ctx, ref)
	if err != nil {
		return err
	}
	if !present {
		if err := r.run(ctx, ref.bin, r.args("-I", ref)...); err != nil {
			return err
		}
		r.installed = append(r.installed, ref)
		r.inserted = append(r.inserted, ref)
		return nil
	}
	r.installed = append(r.installed, ref)
	r.adopted++
	n, err := r.count(ctx, ref)
	if err != nil {
		return err
	}
	for ; n > 1; n-- {
		if err := r.run(ctx, ref.bin, r.args("-D", ref)...); err != nil {
			return err
		}
	}
	return nil
}

// remusdComment is what the listing of every remusd output-buffer rule
// contains (the comment of spec, any queue).
const remusdComment = `--comment "remusd outbuf q`

// check verifies ref's rule in its chain: present, and preceded only by
// other remusd output-buffer rules (another tool's rule ahead of it could
// accept the guest's packets before they reach the queue). A missing rule
// is put back at the head; one behind another tool's rule gets a new copy
// at the head and the old copy is then deleted by its number, re-listed
// first (at least one copy stays throughout). It says what it repaired,
// "" when nothing was wrong.
func (r *ruleSet) check(ctx context.Context, ref ruleRef) (string, error) {
	pos, foreign, err := r.position(ctx, ref)
	if err != nil {
		return "", err
	}
	switch {
	case pos == 0:
		if err := r.run(ctx, ref.bin, r.args("-I", ref)...); err != nil {
			return "", err
		}
		return "the rule was gone: put back at the head of the chain", nil
	case !foreign:
		return "", nil
	}
	if err := r.run(ctx, ref.bin, r.args("-I", ref)...); err != nil {
		return "", err
	}
	// The displaced copy: the last one now (bounded: maxRuleCopies).
	for k := 0; k < maxRuleCopies; k++ {
		last, n, err := r.lastCopy(ctx, ref)
		if err != nil {
			return "", err
		}
		if n <= 1 {
			break
		}
		if err := r.run(ctx, ref.bin, "-w", "5", "-D", ref.chain, strconv.Itoa(last)); err != nil {
			return "", err
		}
	}
	return "another tool's rule came before it: moved back to the head of the chain", nil
}

// rules lists ref's chain: the "-A" lines, in order (rule number i+1).
func (r *ruleSet) rules(ctx context.Context, ref ruleRef) ([]string, error) {
	out, err := r.output(ctx, ref.bin, "-w", "5", "-S", ref.chain)
	if err != nil {
		return nil, err
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); strings.HasPrefix(l, "-A ") {
			lines = append(lines, l)
		}
	}
	return lines, sc.Err()
}

// position returns the rule number of ref's first copy (0: none) and
// whether a rule that is not a remusd output-buffer rule comes before it.
func (r *ruleSet) position(ctx context.Context, ref ruleRef) (int, bool, error) {
	lines, err := r.rules(ctx, ref)
	if err != nil {
		return 0, false, err
	}
	want, foreign := r.line(ref.chain), false
	for i, l := range lines {
		if l == want {
			return i + 1, foreign, nil
		}
		if !strings.Contains(l, remusdComment) {
			foreign = true
		}
	}
	return 0, foreign, nil
}

// lastCopy returns the rule number of ref's last copy and how many copies
// the chain holds.
func (r *ruleSet) lastCopy(ctx context.Context, ref ruleRef) (int, int, error) {
	lines, err := r.rules(ctx, ref)
	if err != nil {
		return 0, 0, err
	}
	want, last, n := r.line(ref.chain), 0, 0
	for i, l := range lines {
		if l == want {
			last, n = i+1, n+1
		}
	}
	return last, n, nil
}

// undoInstall removes the rules install added and forgets the adopted
// ones, which stay: they were dropping the guest's output before New and
// must go on doing so (fail closed).
//
// When any rule was adopted (a restarted daemon's guest, whose output the
// kernel has been dropping), the inserted ones stay too: removing them
// would let that guest's traffic through the chains they cover (e.g. to
// the host itself, after an upgrade from FORWARD-only rules) until the
// next New adopts them all.
func (r *ruleSet) undoInstall(ctx context.Context) error {
	if r.adopted > 0 {
		r.installed, r.inserted = nil, nil
		return nil
	}
	r.installed, r.inserted = r.inserted, nil
	return r.remove(ctx)
}

// RemoveRules deletes every copy of the rules a Buffer with cfg installs
// (IPv4 and IPv6, FORWARD and INPUT; only QueueNum, Interface, Bridged,
// NetnsPath and the binaries matter). It is for a port whose guest is
// known to be gone and whose Buffer died without closing: its rules would
// drop everything a later guest on a port of that name sends.
func RemoveRules(ctx context.Context, cfg Config) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	r := newRuleSet(cfg)
	r.installed = r.refs()
	return r.remove(ctx)
}

// remove deletes every copy of the rule from the chains it was installed
// in (the last installed first). A rule it fails to remove stays listed in
// installed.
func (r *ruleSet) remove(ctx context.Context) error {
	var errs []error
	kept := r.installed[:0:0]
	for i := len(r.installed) - 1; i >= 0; i-- {
		ref := r.installed[i]
		var err error
		for k := 0; k < maxRuleCopies; k++ {
			var present bool
			if present, err = r.exists(ctx, ref); err != nil || !present {
				break
			}
			if err = r.run(ctx, ref.bin, r.args("-D", ref)...); err != nil {
				break
			}
		}
		if err != nil {
			errs = append(errs, err)
			kept = append(kept, ref)
		}
	}
	slices.Reverse(kept)
	r.installed = kept
	return errors.Join(errs...)
}

// openProcStats opens the queue statistics of the host namespace; the file
// stays bound to that namespace.
func openProcStats(netnsPath string) (*os.File, error) {
	var f *os.File
	err := inNetns(netnsPath, func() error {
		var err error
		f, err = os.Open("/proc/thread-self/net/netfilter/nfnetlink_queue")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("nfqueue: nfnetlink_queue statistics: %w", err)
	}
	return f, nil
}

type queueStats struct {
	present     bool
	portID      uint32
	total       uint32 // packets queued now
	dropped     uint64 // queue full
	userDropped uint64 // could not deliver to user space (socket buffer full)
	idSeq       uint32 // last id assigned
}

// readProc parses this queue's line of /proc/net/netfilter/nfnetlink_queue:
// queue portid total copy_mode copy_range dropped user_dropped id_sequence 1.
func (b *Buffer) readProc() (queueStats, error) {
	var st queueStats
	if b.proc == nil {
		return st, os.ErrClosed
	}
	buf := make([]byte, 64<<10)
	n, err := b.proc.ReadAt(buf, 0)
	if n == 0 && err != nil {
		return st, err
	}
	return parseProc(buf[:n], b.cfg.QueueNum)
}

func parseProc(data []byte, queue uint16) (queueStats, error) {
	var st queueStats
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 8 {
			continue
		}
		q, err := strconv.ParseUint(f[0], 10, 16)
		if err != nil || uint16(q) != queue {
			continue
		}
		var v [8]uint64
		for i := 1; i < 8; i++ {
			if v[i], err = strconv.ParseUint(f[i], 10, 32); err != nil {
				return st, fmt.Errorf("nfqueue: parse %q: %w", sc.Text(), err)
			}
		}
		return queueStats{present: true, portID: uint32(v[1]), total: uint32(v[2]), dropped: v[5], userDropped: v[6], idSeq: uint32(v[7])}, nil
	}
	return st, nil
}
