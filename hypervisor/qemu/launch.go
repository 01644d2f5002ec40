package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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

// process is a QEMU child process.
type process struct {
	cmd    *exec.Cmd
	out    *tailBuffer
	done   chan struct{}
	waitMu sync.Mutex
	err    error // exit status, valid after done
}

func startProcess(s Spec, incoming bool) (*process, error) {
	args := s.Args(incoming)
	cmd := exec.Command(s.binary(), args...)
	out := &tailBuffer{max: 16 << 10}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Stdin = nil
	// Own process group: a terminal's ^C goes to remusd, which decides.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("qemu: start %s: %w", s.binary(), err)
	}
	p := &process{cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.waitMu.Lock()
		p.err = err
		p.waitMu.Unlock()
		close(p.done)
	}()
	return p, nil
}

// exitErr describes how QEMU exited, with the tail of its output.
func (p *process) exitErr() error {
	p.waitMu.Lock()
	defer p.waitMu.Unlock()
	status := "exited"
	if p.err != nil {
		status = p.err.Error()
	}
	return fmt.Errorf("%w (pid %d, %s): %s", ErrQEMUExited, p.cmd.Process.Pid, status, strings.TrimSpace(p.out.String()))
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
	_ = p.cmd.Process.Kill()
	<-p.done
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
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := withStartTimeout(ctx)
	defer cancel()
	start := time.Now()
	if err := createRAM(spec.RAMPath, spec.MemoryBytes(), false); err != nil {
		return nil, err
	}
	g, err := launch(ctx, spec, false, log)
	if err != nil {
		os.Remove(spec.RAMPath)
		return nil, err
	}
	g.removeRAM = true
	g.log.Info("qemu guest launched", zap.String("version", g.version), zap.Int("pid", g.proc.cmd.Process.Pid),
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

// tailBuffer keeps the last max bytes written (QEMU's output, for errors).
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(bytes.ToValidUTF8(t.buf, nil))
}

var errClosed = errors.New("qemu: guest closed")
