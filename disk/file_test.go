package disk

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestFileBackend(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "img.raw")
	const size = 4 << 20
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	b, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != size {
		t.Fatalf("size %d", b.Size())
	}
	if a := allocated(t, path); a != 0 {
		t.Fatalf("a new sparse image has %d bytes allocated", a)
	}
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	if err := b.WriteAt(ctx, data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if err := b.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	full := allocated(t, path)
	if full < 1<<20 {
		t.Fatalf("only %d bytes allocated after a 1 MiB write", full)
	}

	// Trim punches a hole: reads back as zeroes, allocation shrinks.
	if err := b.Trim(ctx, 1<<20, 512<<10); err != nil {
		t.Fatal(err)
	}
	if err := b.ReadAt(ctx, got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:512<<10], make([]byte, 512<<10)) || !bytes.Equal(got[512<<10:], data[512<<10:]) {
		t.Fatalf("trim: wrong contents")
	}
	if a := allocated(t, path); b.noPunch {
		t.Logf("punch hole unsupported on this filesystem: zeroes were written")
	} else if a > full-(512<<10) {
		t.Errorf("trim did not punch a hole: %d → %d bytes allocated", full, a)
	}

	// Write zeroes without NO_HOLE may punch; with NO_HOLE stays allocated.
	if err := b.WriteZeroes(ctx, 1536<<10, 256<<10, true); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteZeroes(ctx, 1792<<10, 100, false); err != nil {
		t.Fatal(err)
	}
	if err := b.ReadAt(ctx, got, 1<<20); err != nil {
		t.Fatal(err)
	}
	// [1 MiB, 1.5 MiB) trimmed, [1.5, 1.75) zeroed, then 100 bytes zeroed.
	want := append(make([]byte, 768<<10+100), data[768<<10+100:]...)
	if !bytes.Equal(got, want) {
		t.Fatalf("write zeroes: wrong contents")
	}
	// The NO_HOLE range is still allocated (it was written before, and
	// ZERO_RANGE or written zeroes keep it so).
	if a := allocated(t, path); a < 256<<10 {
		t.Fatalf("allocated %d", a)
	}

	// The fallback (written zeroes) gives the same contents.
	b.noPunch, b.noZero = true, true
	if err := b.WriteAt(ctx, data[:4096], 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Trim(ctx, 1, 4094); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 4096)
	if err := b.ReadAt(ctx, head, 0); err != nil {
		t.Fatal(err)
	}
	if head[0] != 0xab || head[4095] != 0xab || !bytes.Equal(head[1:4095], make([]byte, 4094)) {
		t.Fatalf("fallback zeroes: wrong contents")
	}
}

func TestFileBackendRefusesNonRegular(t *testing.T) {
	if _, err := OpenFile(t.TempDir(), false); err == nil {
		t.Fatal("opened a directory")
	}
	if _, err := OpenFile(filepath.Join(t.TempDir(), "missing"), false); err == nil {
		t.Fatal("opened a missing file")
	}
}

func TestCheckRange(t *testing.T) {
	cases := []struct {
		off, n, size int64
		ok           bool
	}{
		{0, 0, 0, true}, {0, 10, 10, true}, {10, 0, 10, true}, {11, 0, 10, false},
		{5, 6, 10, false}, {-1, 1, 10, false}, {1, -1, 10, false},
		{1 << 62, 1 << 62, 1 << 62, false}, {9223372036854775807, 1, 10, false},
	}
	for _, c := range cases {
		if CheckRange(c.off, c.n, c.size) != c.ok {
			t.Errorf("CheckRange(%d, %d, %d) != %v", c.off, c.n, c.size, c.ok)
		}
	}
}

// TestFileNextData: a sparse image reports its data extents (SEEK_DATA,
// SEEK_HOLE); the ranges between read as zeroes.
func TestFileNextData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(16 << 20)
	f.Close()
	img, err := OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	ctx := context.Background()
	if _, _, ok, err := img.NextData(ctx, 0); err != nil || ok {
		t.Fatalf("empty image: data %v, %v", ok, err)
	}
	img.WriteAt(ctx, []byte("x"), 5<<20)
	img.WriteAt(ctx, []byte("y"), 9<<20)
	var found []int64
	for off := int64(0); ; {
		st, end, ok, err := img.NextData(ctx, off)
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		if end <= st {
			t.Fatalf("extent [%d, %d)", st, end)
		}
		found = append(found, st)
		off = end
	}
	if len(found) != 2 || found[0] > 5<<20 || found[1] > 9<<20 || found[1] <= 5<<20 {
		t.Fatalf("data extents at %v", found)
	}
}
