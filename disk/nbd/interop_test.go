package nbd

// Interoperability with real NBD clients: QEMU's (qemu-io, qemu-img; Debian
// package qemu-utils) and libnbd's (nbdinfo, nbdcopy; libnbd-bin). Each test
// skips, naming the package, only when its tool is not installed.

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
)

func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed (apt-get install -y %s)", name, pkg)
	}
	return p
}

// fileExport serves a new sparse raw image of size bytes; it returns the
// NBD URI, the image path and the backend.
func fileExport(t *testing.T, size int64, obs disk.Observer) (uri, path string, b *disk.File) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "export.raw")
	b = newImage(t, path, size)
	sock, _ := startServer(t, Config{Name: "vda", Description: "remusd test export"}, b, obs)
	return "nbd+unix:///?socket=" + sock, path, b
}

// newImage creates a sparse raw image and opens it.
func newImage(t *testing.T, path string, size int64) *disk.File {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	b, err := disk.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func randomImage(t *testing.T, size int64, holes ...[2]int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "src.raw")
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 11))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, h := range holes {
		clear(data[h[0]:h[1]])
	}
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func sameFiles(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

func TestQemuIO(t *testing.T) {
	qio := needTool(t, "qemu-io", "qemu-utils")
	rec := &recorder{}
	uri, path, _ := fileExport(t, 64<<20, rec)
	out := run(t, qio, "-f", "raw", uri,
		"-c", "write -P 0xab 0 4M",
		"-c", "read -P 0xab 0 4M",
		"-c", "write -z 1M 1M", // NO_HOLE (no -u)
		"-c", "read -P 0 1M 1M",
		"-c", "write -z -u 2M 64k", // may punch a hole
		"-c", "read -P 0 2M 64k",
		"-c", "discard 8M 1M",
		"-c", "flush",
		"-c", "write -f -P 0xcd 16M 64k", // FUA
		"-c", "read -P 0xcd 16M 64k",
		"-c", "write -P 0x11 63M 1M", // the last MiB
		"-c", "read -P 0x11 63M 1M",
		"-c", "read -P 0xab 3M 1M",
	)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	check := func(off, n int, b byte) {
		t.Helper()
		if !bytes.Equal(img[off:off+n], bytes.Repeat([]byte{b}, n)) {
			t.Errorf("image [%d, %d) is not %#x", off, off+n, b)
		}
	}
	check(0, 1<<20, 0xab)
	check(1<<20, 1<<20, 0)
	check(2<<20, 64<<10, 0)
	check(2<<20+64<<10, 2<<20-64<<10, 0xab)
	check(16<<20, 64<<10, 0xcd)
	check(63<<20, 1<<20, 0x11)
	var sawFUA, sawNoHole, sawTrim, sawFlush bool
	for _, c := range rec.list() {
		switch {
		case c.Kind == disk.KindWrite && c.FUA && c.Offset == 16<<20:
			sawFUA = true
		case c.Kind == disk.KindZero && c.NoHole && c.Offset == 1<<20:
			sawNoHole = true
		case c.Kind == disk.KindTrim && c.Offset == 8<<20:
			sawTrim = true
		case c.Kind == disk.KindFlush:
			sawFlush = true
		}
	}
	if !sawFUA || !sawNoHole || !sawTrim || !sawFlush {
		t.Errorf("observed FUA write %v, NO_HOLE zeroes %v, trim %v, flush %v", sawFUA, sawNoHole, sawTrim, sawFlush)
	}
}

func TestQemuImgConvertCompare(t *testing.T) {
	qimg := needTool(t, "qemu-img", "qemu-utils")
	uri, path, _ := fileExport(t, 16<<20, nil)
	src := randomImage(t, 16<<20, [2]int64{4 << 20, 12 << 20})
	run(t, qimg, "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
	out := run(t, qimg, "compare", "-f", "raw", "-F", "raw", src, uri)
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
	sameFiles(t, src, path)
	// Writing a different image over it is seen as a difference.
	src2 := randomImage(t, 16<<20)
	diff, _ := exec.Command(qimg, "compare", "-f", "raw", "-F", "raw", src2, uri).CombinedOutput()
	if !strings.Contains(string(diff), "Content mismatch") {
		t.Fatalf("qemu-img compare of different images: %s", diff)
	}
}

func TestNbdinfo(t *testing.T) {
	ni := needTool(t, "nbdinfo", "libnbd-bin")
	uri, _, _ := fileExport(t, 8<<20, nil)
	var info struct {
		Protocol string `json:"protocol"`
		Exports  []struct {
			Name      string `json:"export-name"`
			Size      int64  `json:"export-size"`
			ReadOnly  bool   `json:"is_read_only"`
			Flush     bool   `json:"can_flush"`
			FUA       bool   `json:"can_fua"`
			Trim      bool   `json:"can_trim"`
			Zero      bool   `json:"can_zero"`
			MultiConn bool   `json:"can_multi_conn"`
			MinBlock  int    `json:"block_size_minimum"`
			PrefBlock int    `json:"block_size_preferred"`
			MaxBlock  int    `json:"block_size_maximum"`
		} `json:"exports"`
	}
	out := run(t, ni, "--json", uri)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	e := info.Exports[0]
	if e.Name != "vda" || e.Size != 8<<20 || e.ReadOnly || !e.Flush || !e.FUA || !e.Trim || !e.Zero || !e.MultiConn ||
		e.MinBlock != 1 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 {
		t.Fatalf("nbdinfo: %+v", e)
	}
	out = run(t, ni, "--list", uri)
	if !strings.Contains(out, `export="vda"`) || !strings.Contains(out, "remusd test export") {
		t.Fatalf("nbdinfo --list:\n%s", out)
	}
	if out := strings.TrimSpace(run(t, ni, "--size", uri)); out != "8388608" {
		t.Fatalf("nbdinfo --size: %q", out)
	}
}

func TestNbdcopy(t *testing.T) {
	nc := needTool(t, "nbdcopy", "libnbd-bin")
	rec := &recorder{}
	uri, path, _ := fileExport(t, 32<<20, rec)
	src := randomImage(t, 32<<20, [2]int64{8 << 20, 16 << 20})
	run(t, nc, "--flush", src, uri) // multi-conn: several connections at once
	sameFiles(t, src, path)
	back := filepath.Join(t.TempDir(), "back.raw")
	run(t, nc, uri, back)
	sameFiles(t, src, back)
	// Replaying what was observed gives the image.
	replay := disk.NewMemory(32 << 20)
	ctx := context.Background()
	flushes := 0
	for _, c := range rec.list() {
		switch c.Kind {
		case disk.KindWrite:
			replay.WriteAt(ctx, c.Data, c.Offset)
		case disk.KindZero, disk.KindTrim:
			replay.WriteZeroes(ctx, c.Offset, c.Length, false)
		case disk.KindFlush:
			flushes++
		}
	}
	img, _ := os.ReadFile(path)
	if !bytes.Equal(replay.Bytes(), img) {
		t.Fatalf("replayed changes differ from the image")
	}
	if flushes == 0 {
		t.Errorf("nbdcopy --flush: no flush observed")
	}
}

// TestTCPLoopback serves on TCP (loopback) instead of a unix socket.
func TestTCPLoopback(t *testing.T) {
	qio := needTool(t, "qemu-io", "qemu-utils")
	mem := disk.NewMemory(4 << 20)
	srv, err := New(Config{}, mem, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	out := run(t, qio, "-f", "raw", "nbd://"+ln.Addr().String(), "-c", "write -P 0x42 512k 1M", "-c", "read -P 0x42 512k 1M")
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatal(out)
	}
	if img := mem.Bytes(); !bytes.Equal(img[512<<10:1536<<10], bytes.Repeat([]byte{0x42}, 1<<20)) {
		t.Fatal("image lacks the write")
	}
}
