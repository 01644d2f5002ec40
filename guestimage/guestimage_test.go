package guestimage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/vmtest"
)

func TestAppend(t *testing.T) {
	got := Append("10.77.0.10/24", "10.77.0.1", 0)
	for _, want := range []string{"console=ttyS0", "rdinit=/init", "remus.ip=10.77.0.10/24", "remus.gw=10.77.0.1", "remus.port=7000"} {
		if !strings.Contains(got, want) {
			t.Errorf("Append = %q, missing %q", got, want)
		}
	}
	if a := Append("", "", 8000); strings.Contains(a, "remus.ip") || !strings.Contains(a, "remus.port=8000") {
		t.Errorf("Append without ip = %q", a)
	}
}

// build builds the image or skips when a prerequisite is absent.
func build(t *testing.T) *Image {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img, err := Build(ctx, Config{})
	if errors.Is(err, ErrUnavailable) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestBuildCached(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a Go binary")
	}
	img := build(t)
	fi, err := os.Stat(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	img2 := build(t)
	if img2.Initrd != img.Initrd || img2.Key != img.Key {
		t.Fatalf("rebuilt with the same inputs: %+v vs %+v", img, img2)
	}
	fi2, err := os.Stat(img2.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	if !fi2.ModTime().Equal(fi.ModTime()) {
		t.Fatalf("cached initramfs was rewritten")
	}
	// The appended archive holds our /init and the service.
	b, err := os.ReadFile(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"bin/remus-guestsvc", ReadyMarker, "virtio_net.ko", "virtio_pci.ko"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("initramfs lacks %q", want)
		}
	}
}

// TestBootServesTCP boots the guest on a tap in a network namespace
// bridged to a client namespace and talks to remus-guestsvc over TCP.
func TestBootServesTCP(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	qbin, err := vmtest.FindQEMU()
	if err != nil {
		t.Skip(err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no ip (iproute2)")
	}
	img := build(t)
	n := newTestNet(t)
	dir := t.TempDir()
	shm, err := os.MkdirTemp("/dev/shm", "gi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	spec := qemu.Spec{
		Name: "gi", MemoryMiB: 128, Kernel: img.Kernel, Initrd: img.Initrd,
		Append: Append("10.77.0.10/24", "", 0),
		Tap:    n.tap, MAC: "52:54:00:77:00:10",
		RAMPath: filepath.Join(shm, "ram"), QMPPath: filepath.Join(dir, "qmp"), SerialPath: filepath.Join(dir, "serial"),
		Binary: netnsWrapper(t, n.host, qbin),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	g, err := qemu.Launch(ctx, spec, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	line, err := WaitReady(ctx, spec.SerialPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest ready after %v: %s", time.Since(start), line)

	c, err := DialInNetns(ctx, n.client, "10.77.0.10:7000")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	m := guestsvc.NewModel()
	r := bufio.NewReader(c)
	for i := uint64(1); i <= 200; i++ {
		req, want := m.Add(i, fmt.Sprintf("k%d", i%3), int64(i))
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := fmt.Fprintf(c, "%s\n", req); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if err := guestsvc.Check(strings.TrimRight(got, "\n"), want); err != nil {
			t.Fatal(err)
		}
	}
}

// testNet is a host namespace (bridge + tap for the guest) and a client
// namespace joined to the bridge by a veth pair: client 10.77.0.2/24.
type testNet struct {
	host, client, tap string
}

func run(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func newTestNet(t *testing.T) *testNet {
	t.Helper()
	id := fmt.Sprintf("%d%03d", os.Getpid()%10000, rand.IntN(1000))
	n := &testNet{host: "gih" + id, client: "gic" + id, tap: "tap0"}
	ctx := context.Background()
	t.Cleanup(func() {
		_ = run(ctx, "ip", "netns", "del", n.host)
		_ = run(ctx, "ip", "netns", "del", n.client)
	})
	h := func(a ...string) []string { return append([]string{"ip", "-n", n.host}, a...) }
	c := func(a ...string) []string { return append([]string{"ip", "-n", n.client}, a...) }
	for _, cmd := range [][]string{
		{"ip", "netns", "add", n.host},
		{"ip", "netns", "add", n.client},
		h("link", "set", "lo", "up"),
		c("link", "set", "lo", "up"),
		h("link", "add", "br0", "type", "bridge", "forward_delay", "0"),
		h("link", "set", "br0", "up"),
		h("tuntap", "add", "dev", n.tap, "mode", "tap"),
		h("link", "set", n.tap, "master", "br0", "up"),
		h("link", "add", "hv", "type", "veth", "peer", "name", "cv", "netns", n.client),
		h("link", "set", "hv", "master", "br0", "up"),
		c("addr", "add", "10.77.0.2/24", "dev", "cv"),
		c("link", "set", "cv", "up"),
	} {
		if err := run(ctx, cmd...); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// netnsWrapper writes a script that runs qemu inside netns ns (QEMU opens
// the tap in its own network namespace).
func netnsWrapper(t *testing.T, ns, qbin string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-in-netns")
	script := fmt.Sprintf("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n", ns, qbin)
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}
