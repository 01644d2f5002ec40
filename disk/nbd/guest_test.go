package nbd

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/vmtest"
)

// guestScript runs in the guest (busybox): it finds the virtio disk, reads
// the host's mark, writes its own with fsync, writes 4 MiB of 'G', discards
// 1 MiB, and reads its mark back past the page cache.
const guestScript = `
i=0
while [ ! -b /dev/vda ]; do
	i=$((i+1)); [ $i -gt 100 ] && { echo "REMUS-NBD no /dev/vda"; exit 1; }
	sleep 0.1
done
echo "REMUS-NBD sectors=$(cat /sys/block/vda/size)"
mark=$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 15)
[ "$mark" = "REMUS-HOST-MARK" ] || { echo "REMUS-NBD host mark not seen: $mark"; exit 1; }
printf 'REMUS-GUEST-WROTE' | dd of=/dev/vda bs=512 seek=4096 conv=sync,fsync 2>/dev/null || exit 1
dd if=/dev/zero bs=1M count=4 2>/dev/null | tr '\000' 'G' | dd of=/dev/vda bs=1M seek=4 conv=fsync 2>/dev/null || exit 1
blkdiscard -o 16777216 -l 1048576 /dev/vda || echo "REMUS-NBD blkdiscard failed"
sync
echo 3 > /proc/sys/vm/drop_caches
back=$(dd if=/dev/vda bs=512 skip=4096 count=1 2>/dev/null | head -c 17)
[ "$back" = "REMUS-GUEST-WROTE" ] || { echo "REMUS-NBD read back: $back"; exit 1; }
echo "REMUS-NBD guest ok"
`

// TestGuestVirtioDisk boots the project's test kernel under QEMU with a
// virtio disk whose block node is QEMU's NBD client connected to this
// server, and checks that the guest sees the disk, reads what the host put
// there, and that its writes, flushes and discards reach the image and the
// observer.
func TestGuestVirtioDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	const size = 32 << 20
	rec := &recorder{}
	uri, path, b := fileExport(t, size, rec)
	sock := strings.TrimPrefix(uri, "nbd+unix:///?socket=")
	if err := b.WriteAt(context.Background(), []byte("REMUS-HOST-MARK"), 1<<20); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var console bytes.Buffer
	res, err := vmtest.Run(ctx, vmtest.Config{
		Modules: []string{"virtio_pci", "virtio_blk"},
		Command: []string{"sh", "-c", guestScript},
		Memory:  "256M",
		Timeout: 3 * time.Minute,
		QEMUArgs: []string{
			"-blockdev", "driver=nbd,node-name=nbd0,server.type=unix,server.path=" + sock + ",export=vda,discard=unmap",
			"-device", "virtio-blk-pci,drive=nbd0",
		},
		Console: &console,
	})
	if errors.Is(err, vmtest.ErrUnavailable) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if !res.Passed {
		t.Fatalf("guest: %s\n%s", res.Verdict, res.Console)
	}
	t.Logf("guest ran in %v", res.Elapsed)
	img, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(img[2<<20 : 2<<20+17]); got != "REMUS-GUEST-WROTE" {
		t.Errorf("image at 2 MiB: %q", got)
	}
	if !bytes.Equal(img[4<<20:8<<20], bytes.Repeat([]byte{'G'}, 4<<20)) {
		t.Errorf("image [4 MiB, 8 MiB) is not the guest's 'G's")
	}
	var writes, flushes, trims int
	for _, c := range rec.list() {
		switch c.Kind {
		case disk.KindWrite:
			writes++
		case disk.KindFlush:
			flushes++
		case disk.KindTrim:
			if c.Offset <= 16<<20 && c.Offset+c.Length >= 17<<20 {
				trims++
			}
		}
	}
	t.Logf("observed %d writes, %d flushes, %d trims of the discarded MiB", writes, flushes, trims)
	if writes == 0 || flushes == 0 {
		t.Errorf("observed %d writes and %d flushes", writes, flushes)
	}
	if trims == 0 {
		if strings.Contains(res.Console, "blkdiscard failed") {
			t.Errorf("the guest could not discard: %s", res.Console)
		} else {
			t.Errorf("the guest's discard of [16 MiB, 17 MiB) was not observed as one trim")
		}
	}
}

// TestGuestSurvivesServerRestart: with reconnect-delay on QEMU's NBD
// client, the server can stop and a new one start on the same socket and
// image while the guest writes with fsync; the guest sees no I/O error.
// This is what a restart of remusd would do to a protected guest's disk.
func TestGuestSurvivesServerRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		t.Skip(err)
	}
	const size = 16 << 20
	dir := t.TempDir()
	path, sock := dir+"/img.raw", dir+"/nbd.sock"
	newImage(t, path, size).Close()
	serve := func(rec *recorder) (stop func()) {
		b, err := disk.OpenFile(path, false)
		if err != nil {
			t.Fatal(err)
		}
		srv, err := New(Config{Name: "vda"}, b, rec, nil)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := ListenUnix(sock)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { srv.Serve(ctx, ln); close(done) }()
		return func() { cancel(); <-done; b.Close() }
	}
	first, second := &recorder{}, &recorder{}
	stop := serve(first)
	defer func() { stop() }()
	const script = `
while [ ! -b /dev/vda ]; do sleep 0.1; done
echo "REMUS-NBD writing"
end=$(( $(date +%s) + 9 ))
n=0 err=0
while [ "$(date +%s)" -lt "$end" ]; do
	printf 'REC%08d' "$n" | dd of=/dev/vda bs=512 seek=$((n % 1000)) conv=sync,fsync 2>/dev/null || err=$((err+1))
	n=$((n+1))
done
echo "REMUS-NBD writes=$n errors=$err"
[ "$err" = 0 ]
`
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g := bootWritingGuest(ctx, t, sock, script, ",reconnect-delay=10")
	time.Sleep(2 * time.Second)
	stop()
	down := time.Now()
	time.Sleep(2 * time.Second)
	stop = serve(second)
	t.Logf("server down for %v", time.Since(down))
	r := <-g.done
	if r.err != nil {
		t.Fatal(r.err)
	}
	line := ""
	for _, l := range strings.Split(r.res.Console, "\n") {
		if strings.Contains(l, "REMUS-NBD writes=") {
			line = strings.TrimSpace(l)
		}
	}
	t.Logf("guest: %s; changes observed by the first server %d, by the second %d", line, len(first.list()), len(second.list()))
	if !r.res.Passed {
		t.Fatalf("guest saw I/O errors: %s\n%s", line, r.res.Console)
	}
	if len(second.list()) == 0 {
		t.Fatalf("the guest never reached the second server")
	}
}
