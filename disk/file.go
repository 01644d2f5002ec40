package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// File is a Backend writing through to a local raw image. Trim and
// WriteZeroes without noHole punch holes (the image stays sparse);
// WriteZeroes with noHole uses FALLOC_FL_ZERO_RANGE. Where the filesystem
// supports neither, zeroes are written. Flush is fdatasync(2), which also
// persists the allocation metadata needed to read the data back.
type File struct {
	f        *os.File
	fd       int
	size     int64
	readOnly bool

	mu      sync.Mutex // guards the fields below
	noPunch bool       // FALLOC_FL_PUNCH_HOLE unsupported here
	noZero  bool       // FALLOC_FL_ZERO_RANGE unsupported here
	zeroes  []byte     // zeroChunk zero bytes, made on first use, never written
}

// zeroChunk bounds the buffer used to write zeroes where fallocate cannot.
const zeroChunk = 1 << 20

// OpenFile opens the raw image at path. Its size is the export size.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("disk: open image: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("disk: stat image: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("disk: %s is not a regular file", path)
	}
	return &File{f: f, fd: int(f.Fd()), size: fi.Size(), readOnly: readOnly}, nil
}

// Size implements Backend.
func (b *File) Size() int64 { return b.size }

// ReadOnly reports whether the image was opened read-only.
func (b *File) ReadOnly() bool { return b.readOnly }

// ReadAt implements Backend.
func (b *File) ReadAt(_ context.Context, p []byte, off int64) error {
	if _, err := b.f.ReadAt(p, off); err != nil {
		return fmt.Errorf("disk: read %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// WriteAt implements Backend.
func (b *File) WriteAt(_ context.Context, p []byte, off int64) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("disk: write %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// Trim implements Backend: it punches a hole (reads back as zeroes).
func (b *File) Trim(ctx context.Context, off, length int64) error {
	return b.WriteZeroes(ctx, off, length, false)
}

// WriteZeroes implements Backend.
func (b *File) WriteZeroes(ctx context.Context, off, length int64, noHole bool) error {
	if length == 0 {
		return nil
	}
	mode, skip := uint32(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE), &b.noPunch
	if noHole {
		mode, skip = unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, &b.noZero
	}
	b.mu.Lock()
	unsupported := *skip
	b.mu.Unlock()
	if !unsupported {
		err := unix.Fallocate(b.fd, mode, off, length)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("disk: fallocate(%#x) %d bytes at %d: %w", mode, length, off, err)
		}
		b.mu.Lock()
		*skip = true
		b.mu.Unlock()
	}
	return b.writeZeroes(ctx, off, length)
}

func (b *File) writeZeroes(ctx context.Context, off, length int64) error {
	b.mu.Lock()
	if b.zeroes == nil {
		b.zeroes = make([]byte, zeroChunk)
	}
	zeroBuf := b.zeroes
	b.mu.Unlock()
	for length > 0 {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("disk: write zeroes: %w", err)
		}
		n := min(length, zeroChunk)
		if _, err := b.f.WriteAt(zeroBuf[:n], off); err != nil {
			return fmt.Errorf("disk: write %d zeroes at %d: %w", n, off, err)
		}
		off += n
		length -= n
	}
	return nil
}

// NextData implements DataFinder with lseek(2) SEEK_DATA and SEEK_HOLE.
// A filesystem without them reports the whole rest as data.
func (b *File) NextData(_ context.Context, off int64) (start, end int64, ok bool, err error) {
	if off >= b.size {
		return 0, 0, false, nil
	}
	start, err = unix.Seek(b.fd, off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return 0, 0, false, nil // only a hole from off on
	case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
		return off, b.size, true, nil
	case err != nil:
		return 0, 0, false, fmt.Errorf("disk: seek data from %d: %w", off, err)
	}
	if start >= b.size {
		return 0, 0, false, nil
	}
	end, err = unix.Seek(b.fd, start, unix.SEEK_HOLE)
	if err != nil {
		return 0, 0, false, fmt.Errorf("disk: seek hole from %d: %w", start, err)
	}
	return start, min(end, b.size), true, nil
}

// Flush implements Backend with fdatasync(2).
func (b *File) Flush(context.Context) error {
	if err := unix.Fdatasync(b.fd); err != nil {
		return fmt.Errorf("disk: fdatasync: %w", err)
	}
	return nil
}

// Close implements Backend.
func (b *File) Close() error {
	if err := b.f.Close(); err != nil {
		return fmt.Errorf("disk: close image: %w", err)
	}
	return nil
}

// Memory is a Backend in memory, for tests and the simulated guest.
type Memory struct {
	mu      sync.RWMutex
	data    []byte
	flushes int
}

// NewMemory returns a zeroed image of size bytes.
func NewMemory(size int) *Memory { return &Memory{data: make([]byte, size)} }

// Size implements Backend.
func (m *Memory) Size() int64 { return int64(len(m.data)) }

// ReadAt implements Backend.
func (m *Memory) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !CheckRange(off, int64(len(p)), int64(len(m.data))) {
		return fmt.Errorf("disk: read %d at %d: out of range", len(p), off)
	}
	copy(p, m.data[off:])
	return nil
}

// WriteAt implements Backend.
func (m *Memory) WriteAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !CheckRange(off, int64(len(p)), int64(len(m.data))) {
		return fmt.Errorf("disk: write %d at %d: out of range", len(p), off)
	}
	copy(m.data[off:], p)
	return nil
}

// Trim implements Backend (zeroes the range).
func (m *Memory) Trim(ctx context.Context, off, length int64) error {
	return m.WriteZeroes(ctx, off, length, false)
}

// WriteZeroes implements Backend.
func (m *Memory) WriteZeroes(_ context.Context, off, length int64, _ bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !CheckRange(off, length, int64(len(m.data))) {
		return fmt.Errorf("disk: zero %d at %d: out of range", length, off)
	}
	clear(m.data[off : off+length])
	return nil
}

// Flush implements Backend.
func (m *Memory) Flush(context.Context) error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

// Flushes is the number of Flush calls so far.
func (m *Memory) Flushes() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.flushes
}

// Bytes returns a copy of the image.
func (m *Memory) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

// Close implements Backend.
func (m *Memory) Close() error { return nil }
