package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DefaultStartTimeout bounds Launch (and a cold start) when ctx has no
// deadline: QEMU must be listening on QMP by then.
const DefaultStartTimeout = 30 * time.Second

// quitGrace is how long Close waits for QEMU to exit after QMP quit before
// killing it.
const quitGrace = 3 * time.Second

// process is a QEMU process: a child this remusd started (cmd set), or one
// a previous remusd started and this one adopted (Reattach: pidfd set).
type process struct {
	pid     int
	cmd     *exec.Cmd // nil when adopted
	pidfd   int       // adopted only: a pidfd, so signals cannot reach a recycled pid
	wake    int       // adopted only: eventfd that ends the watcher (release)
	logPath string    // QEMU's stdout and stderr
	logOff  int64     // where this process's output starts in logPath
	done    chan struct{}
	watched chan struct{} // adopted only: closed when the watcher returned
	waitMu  sync.Mutex
	err     error // exit status, valid after done
}

// maxLogKeep: a QEMU log larger than this is truncated when the next QEMU
// starts on it (it is appended to otherwise).
const maxLogKeep = 1 << 20

// tailBytes is how much of QEMU's output an error carries.
const tailBytes = 16 << 10

// startProcess starts QEMU with its stdout and stderr appended to
// s.LogFile(). Nothing ties the process to remusd: its own session (no
// controlling terminal, no signals from remusd's process group), stdin
// /dev/null, output to a file rather than a pipe (a pipe would break when
// remusd dies), no parent-death signal.
func startProcess(s Spec, incoming bool) (*process, error) {
	args := s.Args(incoming)
	logPath := s.LogFile()
	flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
	if st, err := os.Stat(logPath); err == nil && st.Size() > maxLogKeep {
		flags |= os.O_TRUNC
	}
	lf, err := os.OpenFile(logPath, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemu: log file: %w", err)
	}
	defer lf.Close() // the child has its own copy
	off, err := lf.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, fmt.Errorf("qemu: log file %s: %w", logPath, err)
	}
	hdr := fmt.Sprintf("--- %s remusd: starting %s %s\n", time.Now().Format(time.RFC3339Nano), s.binary(), strings.Join(args, " "))
	if n, err := lf.WriteString(hdr); err == nil {
		off += int64(n)
	}
	cmd := exec.Command(s.binary(), args...)
	cmd.Stdout = lf
	cmd.Stderr = lf
	cmd.Stdin = nil
	// Own session (and so process group): a terminal's ^C or hang-up goes
	// to remusd, which decides; QEMU outlives remusd (a restart re-attaches
	// with Reattach).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: start %s: %w", s.binary(), err)
	}
	p := &process{pid: cmd.Process.Pid, cmd: cmd, pidfd: -1, wake: -1, logPath: logPath, logOff: off, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.waitMu.Lock()
		p.err = err
		p.waitMu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// errNotChild is the exit status of an adopted QEMU: only its parent (init,
// once the remusd that started it died) learns it.
var errNotChild = errors.New("exit status unknown (not remusd's child)")

// adoptProcess watches pid, a QEMU a previous remusd started: done closes
// when it exits. logPath is where its output goes.
func adoptProcess(pid int, logPath string) (*process, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: process %d: %w", pid, err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(pidfd)
		return nil, fmt.Errorf("qemu: eventfd: %w", err)
	}
	p := &process{pid: pid, pidfd: pidfd, wake: wake, logPath: logPath,
		done: make(chan struct{}), watched: make(chan struct{})}
	go p.watch()
	return p, nil
}

// watch closes done when the adopted process exits (its pidfd becomes
// readable); it returns then or when release signals wake, and closes
// watched on return.
func (p *process) watch() {
	defer close(p.watched)
	fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}, {Fd: int32(p.wake), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, -1)
		if err == unix.EINTR {
			continue
		}
		if fds[1].Revents != 0 {
			return
		}
		if err != nil || fds[0].Revents != 0 {
			p.waitMu.Lock()
			p.err = errNotChild
			p.waitMu.Unlock()
			close(p.done)
			return
		}
	}
}

// release lets go of an adopted process (after Detach or Close): the
// watcher ends and the pidfd is closed. A child needs nothing: its Wait
// goroutine reaps it whenever it exits.
func (p *process) release() {
	if p.cmd != nil || p.pidfd < 0 {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(p.wake, one[:])
	<-p.watched
	unix.Close(p.pidfd)
	unix.Close(p.wake)
	p.pidfd, p.wake = -1, -1
}

// kill sends SIGKILL: to the child, or through the adopted process's pidfd.
func (p *process) kill() error {
	if p.cmd != nil {
		return p.cmd.Process.Kill()
	}
	if p.pidfd < 0 {
		return errors.New("qemu: process released")
	}
	return unix.PidfdSendSignal(p.pidfd, unix.SIGKILL, nil, 0)
}

// exitErr describes how QEMU exited, with the tail of its output.
func (p *process) exitErr() error {
	p.waitMu.Lock()
	defer p.waitMu.Unlock()
	status := "exited"
	if p.err != nil {
		status = p.err.Error()
	}
	return fmt.Errorf("%w (pid %d, %s): %s", ErrQEMUExited, p.pid, status, strings.TrimSpace(p.outputTail()))
}

// outputTail is the last tailBytes of what this process wrote to its log.
func (p *process) outputTail() string {
	return readTail(p.logPath, p.logOff, tailBytes)
}

// readTail returns the last n bytes of path from offset from on, as valid
// UTF-8 ("" if unreadable).
func readTail(path string, from int64, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ""
	}
	start := max(from, st.Size()-n)
	if start >= st.Size() {
		return ""
	}
	b := make([]byte, st.Size()-start)
	k, _ := f.ReadAt(b, start)
	return string(bytes.ToValidUTF8(b[:k], nil))
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop asks QEMU to quit over q (if not nil), then kills it after grace.
func (p *process) stop(q *QMP, grace time.Duration) {
	if p.exited() {
		return
	}
	if q != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = q.Execute(ctx, "quit", nil, nil)
		cancel()
	}
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second): // an adopted process in D state; nothing more to do
	}
}

// waitQMP dials the QMP socket until QEMU listens, QEMU exits or ctx ends.
func waitQMP(ctx context.Context, p *process, path string) (*QMP, error) {
	var last error
	for {
		if p.exited() {
			return nil, p.exitErr()
		}
		if _, err := os.Stat(path); err == nil {
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			q, err := DialQMP(dctx, path)
			cancel()
			if err == nil {
				return q, nil
			}
			last = err
		}
		select {
		case <-ctx.Done():
			if last == nil {
				last = fmt.Errorf("socket %s never appeared", path)
			}
			return nil, fmt.Errorf("qemu: QMP not ready before deadline: %w (%w)", ctx.Err(), last)
		case <-p.done:
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// ramFile is a shared mapping of a guest RAM file.
type ramFile struct {
	path string
	mem  []byte
}

// createRAM creates path (truncated to zero first when fresh is set, so
// the RAM starts zeroed) with size bytes.
func createRAM(path string, size int64, fresh bool) error {
	flags := os.O_RDWR | os.O_CREATE
	if fresh {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return fmt.Errorf("qemu: RAM file: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("qemu: RAM file %s: resize to %d: %w", path, size, err)
	}
	return nil
}

// mapRAM maps path (which must be size bytes, or any size if size is 0)
// MAP_SHARED.
func mapRAM(path string, size int64, writable bool) (*ramFile, error) {
	flags, prot := os.O_RDONLY, unix.PROT_READ
	if writable {
		flags, prot = os.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: map RAM: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("qemu: map RAM: %w", err)
	}
	if size == 0 {
		size = st.Size()
	}
	if st.Size() != size || size <= 0 || size%pageSize != 0 {
		return nil, fmt.Errorf("qemu: map RAM %s: file is %d bytes, want %d (a positive multiple of %d)", path, st.Size(), size, pageSize)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("qemu: mmap %s: %w", path, err)
	}
	return &ramFile{path: path, mem: mem}, nil
}

func (r *ramFile) unmap() error {
	if r == nil || r.mem == nil {
		return nil
	}
	err := unix.Munmap(r.mem)
	r.mem = nil
	return err
}

// Launch starts a QEMU for spec and returns the running guest. The RAM
// file is created (or resized) at spec.RAMPath and mapped; it is removed
// by Close. log may be nil.
func Launch(ctx context.Context, spec Spec, log *zap.Logger) (*Guest, error) {
	return LaunchWithDisks(ctx, spec, DiskOptions{}, log)
}

// LaunchWithDisks is Launch with options for spec.Disks: remusd serves
// each disk's image over NBD (it must exist with the configured size)
// before QEMU starts, and the guest's Disks hands their journals to the
// checkpoint engine.
func LaunchWithDisks(ctx context.Context, spec Spec, dopts DiskOptions, log *zap.Logger) (*Guest, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	dopts.Create = false
	disks, err := startDisks(spec, dopts, log)
	if err != nil {
		return nil, err
	}
	ctx, cancel := withStartTimeout(ctx)
	defer cancel()
	start := time.Now()
	if err := createRAM(spec.RAMPath, spec.MemoryBytes(), false); err != nil {
		disks.close()
		return nil, err
	}
	g, err := launch(ctx, spec, false, log)
	if err != nil {
		disks.close()
		os.Remove(spec.RAMPath)
		return nil, err
	}
	g.disks = disks
	g.removeRAM = true
	g.log.Info("qemu guest launched", zap.String("version", g.version), zap.Int("pid", g.proc.pid),
		zap.Int("memory_mib", spec.MemoryMiB), zap.Duration("took", time.Since(start)))
	return g, nil
}

// launch starts QEMU on an existing RAM file, waits for QMP and maps RAM.
func launch(ctx context.Context, spec Spec, incoming bool, log *zap.Logger) (*Guest, error) {
	_ = os.Remove(spec.QMPPath) // a stale socket from a dead QEMU
	p, err := startProcess(spec, incoming)
	if err != nil {
		return nil, err
	}
	q, err := waitQMP(ctx, p, spec.QMPPath)
	if err != nil {
		p.stop(nil, 0)
		return nil, err
	}
	ram, err := mapRAM(spec.RAMPath, spec.MemoryBytes(), incoming)
	if err != nil {
		p.stop(q, quitGrace)
		q.Close()
		return nil, err
	}
	g, err := newGuest(ctx, spec, q, ram, p, log)
	if err != nil {
		p.stop(q, quitGrace)
		q.Close()
		ram.unmap()
		return nil, err
	}
	return g, nil
}

// Attach drives a QEMU someone else launched (e.g. libvirt) through its QMP
// socket and RAM file (memory-backend-file,share=on). The memory size is
// the RAM file's size and the name comes from query-name; Config carries
// only those (set the full machine description with SetSpec). Close quits
// that QEMU; Detach leaves it running. log may be nil.
func Attach(ctx context.Context, qmpPath, ramPath string, log *zap.Logger) (*Guest, error) {
	q, err := DialQMP(ctx, qmpPath)
	if err != nil {
		return nil, err
	}
	ram, err := mapRAM(ramPath, 0, false)
	if err != nil {
		q.Close()
		return nil, err
	}
	var name struct {
		Name string `json:"name"`
	}
	if err := q.Execute(ctx, "query-name", nil, &name); err != nil {
		q.Close()
		ram.unmap()
		return nil, err
	}
	if name.Name == "" {
		name.Name = "qemu"
	}
	spec := Spec{Name: name.Name, MemoryMiB: int(int64(len(ram.mem)) >> 20), QMPPath: qmpPath, RAMPath: ramPath}
	g, err := newGuest(ctx, spec, q, ram, nil, log)
	if err != nil {
		q.Close()
		ram.unmap()
		return nil, err
	}
	return g, nil
}

func withStartTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultStartTimeout)
}

var errClosed = errors.New("qemu: guest closed")
