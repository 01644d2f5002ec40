package nbd

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/vmtest"
)

// flushTimer times a backend's flushes.
type flushTimer struct {
	disk.Backend
	mu    sync.Mutex
	times []time.Duration
}

func (f *flushTimer) Flush(ctx context.Context) error {
	start := time.Now()
	err := f.Backend.Flush(ctx)
	f.mu.Lock()
	f.times = append(f.times, time.Since(start))
	f.mu.Unlock()
	return err
}

func (f *flushTimer) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.times)
}

// consoleWatch signals when a line appears on the console.
type consoleWatch struct {
	mu   sync.Mutex
	buf  strings.Builder
	want string
	seen chan struct{}
	once sync.Once
}

func (c *consoleWatch) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	if strings.Contains(c.buf.String(), c.want) {
		c.once.Do(func() { close(c.seen) })
	}
	return len(p), nil
}

// guestRun is a guest booted with this server's socket as its virtio disk.
type guestRun struct {
	done chan guestResult
}

type guestResult struct {
	res *vmtest.Result
	err error
}

// bootWritingGuest boots a guest running script whose disk is the export
// "vda" at sock (blockdevOpts appended to the -blockdev options, extra
// QEMU arguments after) and returns once its console printed "REMUS-NBD
// writing". It skips the test when QEMU or the kernel is unavailable.
func bootWritingGuest(ctx context.Context, t *testing.T, sock, script, blockdevOpts string, extra ...string) *guestRun {
	t.Helper()
	cw := &consoleWatch{want: "REMUS-NBD writing", seen: make(chan struct{})}
	g := &guestRun{done: make(chan guestResult, 1)}
	args := append([]string{
		"-blockdev", "driver=nbd,node-name=nbd0,server.type=unix,server.path=" + sock + ",export=vda" + blockdevOpts,
		"-device", "virtio-blk-pci,drive=nbd0",
	}, extra...)
	go func() {
		res, err := vmtest.Run(ctx, vmtest.Config{
			Modules:  []string{"virtio_pci", "virtio_blk"},
			Command:  []string{"sh", "-c", script},
			Memory:   "256M",
			Timeout:  2 * time.Minute,
			QEMUArgs: args,
			Console:  cw,
		})
		g.done <- guestResult{res, err}
	}()
	select {
	case <-cw.seen:
	case r := <-g.done:
		if errors.Is(r.err, vmtest.ErrUnavailable) {
			t.Skip(r.err)
		}
		t.Fatalf("guest ended before writing: %v", r.err)
	}
	return g
}

// TestMeasureStopFlushes measures what QMP "stop" costs a guest whose disk
// is served by this server while the guest writes: QEMU's vm_stop drains
// the requests in flight and then flushes every block node
// (bdrv_flush_all), so each checkpoint pause carries an NBD_CMD_FLUSH, an
// fdatasync of the image here. It only runs with REMUSD_NBD_MEASURE=1.
func TestMeasureStopFlushes(t *testing.T) {
	if !measure() {
		t.Skip("set REMUSD_NBD_MEASURE=1 to measure")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	const size = 64 << 20
	path := filepath.Join(t.TempDir(), "img.raw")
	b := newImage(t, path, size)
	ft := &flushTimer{Backend: b}
	sock, _ := startServer(t, Config{Name: "vda"}, ft, nil)
	qmpPath := filepath.Join(t.TempDir(), "qmp.sock")
	const script = `
while [ ! -b /dev/vda ]; do sleep 0.1; done
echo "REMUS-NBD writing"
end=$(( $(date +%s) + 12 ))
i=0
while [ "$(date +%s)" -lt "$end" ]; do
	dd if=/dev/zero of=/dev/vda bs=64k count=16 seek=$((i * 16)) 2>/dev/null
	i=$(( (i + 1) % 60 ))
done
sync
echo "REMUS-NBD done"
`
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g := bootWritingGuest(ctx, t, sock, script, "", "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	time.Sleep(time.Second) // let the writes get going
	q, err := dialTestQMP(ctx, qmpPath)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	var stops []time.Duration
	var flushesPerStop []int
	for range 25 {
		f0 := ft.count()
		start := time.Now()
		if err := q.Execute(ctx, "stop", nil, nil); err != nil {
			t.Fatal(err)
		}
		stops = append(stops, time.Since(start))
		flushesPerStop = append(flushesPerStop, ft.count()-f0)
		time.Sleep(5 * time.Millisecond)
		if err := q.Execute(ctx, "cont", nil, nil); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	r := <-g.done
	if r.err != nil {
		t.Fatal(r.err)
	}
	slices.Sort(stops)
	ft.mu.Lock()
	fl := slices.Clone(ft.times)
	ft.mu.Unlock()
	slices.Sort(fl)
	t.Logf("QMP stop while the guest writes: p50 %v, p90 %v, max %v over %d stops; flushes per stop %v",
		stops[len(stops)/2], stops[len(stops)*9/10], stops[len(stops)-1], len(stops), flushesPerStop)
	t.Logf("server fdatasync: %d calls, p50 %v, p90 %v, max %v", len(fl), fl[len(fl)/2], fl[len(fl)*9/10], fl[len(fl)-1])
}
