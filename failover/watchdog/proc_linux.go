package watchdog

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultQEMUBinary is the binary the daemon launches when a VM names none.
const DefaultQEMUBinary = "qemu-system-x86_64"

// LinuxProcs opens real processes: a pidfd first, then /proc checks, so
// that what was validated is what gets signalled.
type LinuxProcs struct {
	binaries []string // resolved absolute paths
}

// NewLinuxProcs resolves the QEMU binaries the watchdog may stop (names
// are looked up in PATH; symlinks are followed). At least one must
// resolve.
func NewLinuxProcs(binaries []string) (*LinuxProcs, error) {
	if len(binaries) == 0 {
		binaries = []string{DefaultQEMUBinary}
	}
	l := &LinuxProcs{}
	var errs []error
	for _, b := range binaries {
		p, err := ResolveBinary(b)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		l.binaries = append(l.binaries, p)
	}
	if len(l.binaries) == 0 {
		return nil, fmt.Errorf("watchdog: no QEMU binary resolves: %w", errors.Join(errs...))
	}
	return l, nil
}

// Binaries are the resolved binaries.
func (l *LinuxProcs) Binaries() []string { return append([]string(nil), l.binaries...) }

// ResolveBinary returns the absolute path, symlinks followed, of a binary
// name or path.
func ResolveBinary(b string) (string, error) {
	p := b
	if !strings.Contains(b, "/") {
		var err error
		if p, err = exec.LookPath(b); err != nil {
			return "", fmt.Errorf("QEMU binary %q: %w", b, err)
		}
	}
	p, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("QEMU binary %q: %w", b, err)
	}
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("QEMU binary %q: %w", b, err)
	}
	return r, nil
}

// Open implements Procs.
func (l *LinuxProcs) Open(t Target) (Proc, error) {
	if err := t.validate(); err != nil {
		return nil, err
	}
	if t.Pid == os.Getpid() {
		return nil, fmt.Errorf("%w: pid %d is the watchdog itself", ErrInvalidTarget, t.Pid)
	}
	fd, err := unix.PidfdOpen(t.Pid, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: pid %d: %w", ErrInvalidTarget, t.Pid, err)
	}
	p := &linuxProc{pid: t.Pid, fd: fd}
	if err := l.check(t); err != nil {
		p.Close()
		return nil, err
	}
	// The checks read /proc/PID after the pidfd was opened: if the
	// process is still alive now, the pid was not recycled in between and
	// the pidfd names what was checked.
	if p.Exited() {
		p.Close()
		return nil, fmt.Errorf("%w: pid %d exited", ErrInvalidTarget, t.Pid)
	}
	return p, nil
}

// check validates /proc/PID: the executable is an allowed QEMU binary, the
// command line is VM t.VM's with QMP socket t.QMP.
func (l *LinuxProcs) check(t Target) error {
	dir := filepath.Join("/proc", strconv.Itoa(t.Pid))
	exe, err := os.Readlink(filepath.Join(dir, "exe"))
	if err != nil {
		return fmt.Errorf("%w: pid %d: %w", ErrInvalidTarget, t.Pid, err)
	}
	// A binary replaced by an upgrade while QEMU runs reads "PATH (deleted)".
	exe = strings.TrimSuffix(exe, " (deleted)")
	ok := false
	for _, b := range l.binaries {
		if exe == b {
			ok = true
		}
	}
	if !ok {
		return fmt.Errorf("%w: pid %d runs %s, not one of the QEMU binaries %v", ErrInvalidTarget, t.Pid, exe, l.binaries)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "cmdline"))
	if err != nil {
		return fmt.Errorf("%w: pid %d: %w", ErrInvalidTarget, t.Pid, err)
	}
	return checkCmdline(t, raw)
}

// checkCmdline checks a NUL-separated command line: "-name VM" and "-qmp
// unix:QMP,..." (as the qemu backend launches it).
func checkCmdline(t Target, raw []byte) error {
	args := strings.Split(string(bytes.TrimRight(raw, "\x00")), "\x00")
	var name, qmp bool
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-name":
			name = name || args[i+1] == t.VM
		case "-qmp":
			v := args[i+1]
			qmp = qmp || v == "unix:"+t.QMP || strings.HasPrefix(v, "unix:"+t.QMP+",")
		}
	}
	switch {
	case !name:
		return fmt.Errorf("%w: pid %d is not VM %s's QEMU (no -name %s)", ErrInvalidTarget, t.Pid, t.VM, t.VM)
	case !qmp:
		return fmt.Errorf("%w: pid %d does not serve QMP at %s", ErrInvalidTarget, t.Pid, t.QMP)
	}
	return nil
}

type linuxProc struct {
	pid, fd int
}

func (p *linuxProc) signal(sig unix.Signal) error {
	if p.fd < 0 {
		return errors.New("watchdog: process handle closed")
	}
	return unix.PidfdSendSignal(p.fd, sig, nil, 0)
}

func (p *linuxProc) Stop() error { return p.signal(unix.SIGSTOP) }
func (p *linuxProc) Cont() error { return p.signal(unix.SIGCONT) }

// Stopped reads the process state from /proc/PID/stat ('T': stopped by a
// signal, 't': tracing stop).
func (p *linuxProc) Stopped() (bool, error) {
	st, err := ProcState(p.pid)
	if err != nil {
		return false, err
	}
	if p.Exited() {
		return false, errors.New("exited")
	}
	return st == 'T' || st == 't', nil
}

// Exited polls the pidfd (readable once the process exited).
func (p *linuxProc) Exited() bool {
	if p.fd < 0 {
		return true
	}
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			continue
		}
		return err != nil || (n > 0 && fds[0].Revents != 0)
	}
}

func (p *linuxProc) Close() error {
	if p.fd < 0 {
		return nil
	}
	err := unix.Close(p.fd)
	p.fd = -1
	return err
}

// ProcState returns the state letter of process pid (/proc/PID/stat: 'R'
// running, 'S' sleeping, 'T' stopped, 'Z' zombie, ...).
func ProcState(pid int) (byte, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	// "PID (comm) S ...": comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected %q", pid, b)
	}
	return b[i+2], nil
}
