package nbd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/vmtest"
)

// TestInVMWriteLatency runs inside the VM that TestMeasureGuestDiskDesigns
// boots: it times 4 KiB O_DIRECT writes to /dev/vda, without and with an
// fdatasync after each, and prints the percentiles on the console.
func TestInVMWriteLatency(t *testing.T) {
	if !vmtest.InVM() {
		t.Skip("runs inside the VM (TestMeasureGuestDiskDesigns)")
	}
	for i := 0; ; i++ {
		if _, err := os.Stat("/dev/vda"); err == nil {
			break
		}
		if i > 100 {
			t.Fatal("no /dev/vda")
		}
		time.Sleep(100 * time.Millisecond)
	}
	fd, err := unix.Open("/dev/vda", unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	for i := range buf {
		buf[i] = byte(i)
	}
	const span = 32 << 20
	timeWrites := func(n int, sync bool, base int64) []time.Duration {
		d := make([]time.Duration, 0, n)
		for i := range n {
			off := (base + int64(i)*4096) % span
			start := time.Now()
			if _, err := unix.Pwrite(fd, buf, off); err != nil {
				t.Fatal(err)
			}
			if sync {
				if err := unix.Fdatasync(fd); err != nil {
					t.Fatal(err)
				}
			}
			d = append(d, time.Since(start))
		}
		slices.Sort(d)
		return d
	}
	timeWrites(100, false, 0) // warm up
	direct := timeWrites(1000, false, 1<<20)
	synced := timeWrites(300, true, 8<<20)
	us := func(d time.Duration) int64 { return d.Microseconds() }
	fmt.Printf("REMUS-LAT direct %d %d synced %d %d\n",
		us(direct[len(direct)/2]), us(direct[len(direct)*99/100]), us(synced[len(synced)/2]), us(synced[len(synced)*99/100]))
}

var latLine = regexp.MustCompile(`REMUS-LAT direct (\d+) (\d+) synced (\d+) (\d+)`)

// TestMeasureGuestDiskDesigns compares, for a guest's 4 KiB O_DIRECT
// writes (QEMU TCG), the two designs issue 11 names for remusd's block
// seam, against the guest's local raw file as the bound:
//   - nbd: the guest's disk is QEMU's NBD client talking to this server,
//     which writes the local raw image;
//   - mirror: the guest's disk is the local raw file, and QEMU's
//     blockdev-mirror in write-blocking mode copies every write to an NBD
//     target served by this server before completing it.
//
// It only runs with REMUSD_NBD_MEASURE=1 and reports.
func TestMeasureGuestDiskDesigns(t *testing.T) {
	if !measure() {
		t.Skip("set REMUSD_NBD_MEASURE=1 to measure")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "test.bin")
	if err := vmtest.BuildGoTest(ctx, wd, bin); err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	type design struct {
		name  string
		args  func(t *testing.T) (args []string, mirrorTo string)
		setup func(ctx context.Context, q *testQMP, mirrorTo string) error
	}
	localFile := func(t *testing.T) string {
		p := filepath.Join(t.TempDir(), "local.raw")
		newImage(t, p, size).Close()
		return p
	}
	designs := []design{
		{"local raw file", func(t *testing.T) ([]string, string) {
			return []string{"-blockdev", "driver=file,filename=" + localFile(t) + ",node-name=f0",
				"-blockdev", "driver=raw,file=f0,node-name=disk0"}, ""
		}, nil},
		{"nbd (this server)", func(t *testing.T) ([]string, string) {
			uri, _, _ := fileExport(t, size, nil)
			return []string{"-blockdev", "driver=nbd,node-name=disk0,server.type=unix,server.path=" + uri[len("nbd+unix:///?socket="):] + ",export=vda"}, ""
		}, nil},
		{"mirror write-blocking to nbd", func(t *testing.T) ([]string, string) {
			uri, _, _ := fileExport(t, size, nil)
			return []string{"-blockdev", "driver=file,filename=" + localFile(t) + ",node-name=f0",
				"-blockdev", "driver=raw,file=f0,node-name=disk0"}, uri[len("nbd+unix:///?socket="):]
		}, func(ctx context.Context, q *testQMP, sock string) error {
			if err := q.Execute(ctx, "blockdev-add", map[string]any{
				"driver": "nbd", "node-name": "target0", "export": "vda",
				"server": map[string]any{"type": "unix", "path": sock},
			}, nil); err != nil {
				return err
			}
			if err := q.Execute(ctx, "blockdev-mirror", map[string]any{
				"job-id": "m0", "device": "disk0", "target": "target0", "sync": "full", "copy-mode": "write-blocking",
			}, nil); err != nil {
				return err
			}
			for range 300 {
				var jobs []struct {
					Ready bool `json:"ready"`
				}
				if err := q.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
					return err
				}
				if len(jobs) == 1 && jobs[0].Ready {
					return nil
				}
				time.Sleep(100 * time.Millisecond)
			}
			return fmt.Errorf("mirror job not ready")
		}},
	}
	for _, d := range designs {
		args, mirrorTo := d.args(t)
		qmpPath := filepath.Join(t.TempDir(), "qmp.sock")
		args = append(args, "-device", "virtio-blk-pci,drive=disk0", "-S", "-qmp", "unix:"+qmpPath+",server=on,wait=off")
		done := make(chan *vmtest.Result, 1)
		errc := make(chan error, 1)
		go func() {
			res, err := vmtest.Run(ctx, vmtest.Config{
				Modules:  []string{"virtio_pci", "virtio_blk"},
				Files:    []vmtest.File{{Src: bin, Dst: "/vmtest/test.bin", Mode: 0o755}},
				Command:  []string{"/vmtest/test.bin", "-test.v", "-test.count=1", "-test.timeout=150s", "-test.run=^TestInVMWriteLatency$"},
				Memory:   "256M",
				Timeout:  3 * time.Minute,
				QEMUArgs: args,
			})
			done <- res
			errc <- err
		}()
		var q *testQMP
		for i := 0; ; i++ {
			if q, err = dialTestQMP(ctx, qmpPath); err == nil {
				break
			}
			if i > 100 {
				t.Fatalf("%s: QMP: %v", d.name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if d.setup != nil {
			if err := d.setup(ctx, q, mirrorTo); err != nil {
				t.Fatalf("%s: %v", d.name, err)
			}
		}
		if err := q.Execute(ctx, "cont", nil, nil); err != nil {
			t.Fatalf("%s: cont: %v", d.name, err)
		}
		res, err := <-done, <-errc
		q.Close()
		if err != nil {
			t.Fatalf("%s: %v", d.name, err)
		}
		m := latLine.FindStringSubmatch(res.Console)
		if m == nil || !res.Passed {
			t.Fatalf("%s: no result:\n%s", d.name, res.Console)
		}
		v := make([]int, 4)
		for i := range v {
			v[i], _ = strconv.Atoi(m[i+1])
		}
		t.Logf("%-30s 4 KiB O_DIRECT write p50 %4d µs p99 %5d µs; write+fdatasync p50 %5d µs p99 %5d µs", d.name, v[0], v[1], v[2], v[3])
	}
}
