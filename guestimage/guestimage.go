// Package guestimage builds the small Linux guest remusd's QEMU tests and
// demo protect: the Debian cloud kernel found by vmtest.FindKernel and an
// initramfs holding static busybox, the kernel's virtio-net modules (with
// their dependencies), the static remus-guestsvc TCP service and an /init
// that configures eth0 from the kernel command line and runs the service.
//
// The initramfs is cached under <cache>/guestimage/<key>.cpio, key being a
// hash of every input (kernel version, busybox, modules, /init, the
// guestsvc binary), so it is rebuilt exactly when an input changes.
//
// The guest's kernel command line (see Append) carries:
//
//	remus.ip=10.77.0.10/24   eth0's address (required for networking)
//	remus.gw=10.77.0.1       default route (optional)
//	remus.port=7000          remus-guestsvc's TCP port (default 7000)
//	remus.disk=/dev/vda      an ext4 disk to mount on /data; remus-guestsvc
//	                         then serves LOG records into /data/log
//
// The serial console (ttyS0) shows ReadyMarker once the service listens.
//
// Give the guest at least 128 MiB (MinMemoryMiB): with 64 MiB on QEMU 7.2
// q35/TCG it resets right after SeaBIOS hands over to the kernel, in a
// loop (not investigated further).
package guestimage

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/remusd/remusd/vmtest"
)

// Modules are the kernel modules the guest loads for a virtio-net-pci NIC
// and a virtio-blk disk with an ext4 file system
// (dependencies are added by vmtest; built-in ones are skipped).
var Modules = []string{"virtio_pci", "virtio_net", "virtio_blk", "ext4"}

// MinMemoryMiB is the smallest guest RAM the image is known to boot in.
const MinMemoryMiB = 128

// DefaultPort is remus-guestsvc's port in the guest.
const DefaultPort = 7000

// ReadyMarker starts the console line /init prints once remus-guestsvc
// listens (followed by "ip=<addr> port=<port>").
const ReadyMarker = "REMUS-GUEST-READY"

// FailMarker starts a console line /init prints when setup failed.
const FailMarker = "REMUS-GUEST-FAILED"

// ErrUnavailable wraps vmtest.ErrUnavailable: no kernel, busybox or Go
// toolchain to build the image with. Tests skip on it.
var ErrUnavailable = vmtest.ErrUnavailable

// Config says where to find the image's inputs. Zero values pick defaults.
type Config struct {
	// CacheDir holds built images and the kernel (default
	// vmtest.DefaultCacheDir(); images go to <CacheDir>/guestimage).
	CacheDir string
	// Kernel defaults to vmtest.FindKernel(ctx, CacheDir).
	Kernel *vmtest.Kernel
	// GuestSvc is a prebuilt static remus-guestsvc binary (default
	// $REMUSD_GUESTSVC, else built from SourceDir with CGO_ENABLED=0).
	GuestSvc string
	// SourceDir is the remusd module root to build cmd/remus-guestsvc in
	// (default: $REMUSD_SOURCE, else the module holding the working
	// directory, else the checkout this package was compiled from).
	SourceDir string
	// Go is the go tool (default: "go" on PATH, else $GOROOT/bin/go).
	Go string
}

// Image is a built guest.
type Image struct {
	Kernel        string // vmlinuz path
	Initrd        string // cached initramfs path
	KernelVersion string
	Key           string // hash of the inputs
}

// Append returns a kernel command line for the guest with address ip
// (CIDR, e.g. "10.77.0.10/24"; "" = no network), gateway gw ("" = none)
// and the service on port (0 = DefaultPort).
func Append(ip, gw string, port int) string {
	if port == 0 {
		port = DefaultPort
	}
	a := fmt.Sprintf("console=ttyS0 loglevel=4 rdinit=/init remus.port=%d", port)
	if ip != "" {
		a += " remus.ip=" + ip
	}
	if gw != "" {
		a += " remus.gw=" + gw
	}
	return a
}

// WithDisk adds to a command line from Append the guest disk (e.g.
// "/dev/vda", holding an ext4 file system) that /init mounts on /data for
// remus-guestsvc's log commands.
func WithDisk(appendLine, dev string) string {
	if dev == "" {
		return appendLine
	}
	return appendLine + " remus.disk=" + dev
}

// Build returns the guest image, building and caching it if needed.
func Build(ctx context.Context, cfg Config) (*Image, error) {
	if cfg.CacheDir == "" {
		cfg.CacheDir = vmtest.DefaultCacheDir()
	}
	var err error
	if cfg.Kernel == nil {
		if cfg.Kernel, err = vmtest.FindKernel(ctx, cfg.CacheDir); err != nil {
			return nil, fmt.Errorf("guestimage: %w", err)
		}
	}
	// Busybox and the modules: vmtest's cached base archive (its /init is
	// replaced by ours in the archive appended below).
	base, err := vmtest.BaseInitramfs(cfg.CacheDir, cfg.Kernel, Modules, nil)
	if err != nil {
		return nil, fmt.Errorf("guestimage: base initramfs: %w", err)
	}
	svc, cleanup, err := guestSvcBinary(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	svcData, err := os.ReadFile(svc)
	if err != nil {
		return nil, fmt.Errorf("guestimage: %w", err)
	}
	baseSum, err := fileSum(base)
	if err != nil {
		return nil, fmt.Errorf("guestimage: %w", err)
	}
	kernSum, err := fileSum(cfg.Kernel.Image)
	if err != nil {
		return nil, fmt.Errorf("guestimage: %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "guestimage-v1\x00%s\x00%x\x00%x\x00%x\x00", cfg.Kernel.Version, kernSum, baseSum, sha256.Sum256(svcData))
	h.Write([]byte(initScript))
	key := hex.EncodeToString(h.Sum(nil))[:24]
	img := &Image{Kernel: cfg.Kernel.Image, KernelVersion: cfg.Kernel.Version, Key: key,
		Initrd: filepath.Join(cfg.CacheDir, "guestimage", key+".cpio")}
	if _, err := os.Stat(img.Initrd); err == nil {
		return img, nil
	}
	if err := writeInitrd(img.Initrd, base, svcData); err != nil {
		return nil, fmt.Errorf("guestimage: write %s: %w", img.Initrd, err)
	}
	return img, nil
}

func fileSum(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// writeInitrd writes base followed by an archive with /init and the
// service, atomically (temp file + rename).
func writeInitrd(dst, base string, svc []byte) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(dst), ".guest-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	b, err := os.Open(base)
	if err != nil {
		f.Close()
		return err
	}
	_, err = io.Copy(f, b)
	b.Close()
	if err != nil {
		f.Close()
		return err
	}
	bw := bufio.NewWriter(f)
	// Inodes above the base archive's, so the kernel does not link them.
	w := vmtest.NewArchive(bw, 1<<20)
	w.File("init", 0o755, []byte(initScript))
	w.File("bin/remus-guestsvc", 0o755, svc)
	if err := w.Close(); err != nil {
		f.Close()
		return err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), dst)
}

// guestSvcBinary returns a static remus-guestsvc and a cleanup func.
func guestSvcBinary(ctx context.Context, cfg Config) (string, func(), error) {
	if cfg.GuestSvc == "" {
		cfg.GuestSvc = os.Getenv("REMUSD_GUESTSVC")
	}
	if cfg.GuestSvc != "" {
		if err := checkStatic(cfg.GuestSvc); err != nil {
			return "", nil, err
		}
		return cfg.GuestSvc, func() {}, nil
	}
	src, err := sourceDir(cfg.SourceDir)
	if err != nil {
		return "", nil, err
	}
	goTool := cfg.Go
	if goTool == "" {
		if p, err := exec.LookPath("go"); err == nil {
			goTool = p
		} else if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
			goTool = p
		} else {
			return "", nil, fmt.Errorf("guestimage: %w: no go tool to build remus-guestsvc (set REMUSD_GUESTSVC to a prebuilt static binary)", ErrUnavailable)
		}
	}
	tmp, err := os.MkdirTemp("", "guestimage-")
	if err != nil {
		return "", nil, fmt.Errorf("guestimage: %w", err)
	}
	cleanup := func() { os.RemoveAll(tmp) }
	out := filepath.Join(tmp, "remus-guestsvc")
	bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(bctx, goTool, "build", "-trimpath", "-o", out, "./cmd/remus-guestsvc")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		cleanup()
		return "", nil, fmt.Errorf("guestimage: go build ./cmd/remus-guestsvc in %s: %w: %s", src, err, bytes.TrimSpace(b))
	}
	return out, cleanup, nil
}

func checkStatic(p string) error {
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("guestimage: guestsvc binary: %w", err)
	}
	if bytes.Contains(b, []byte("/lib64/ld-linux")) {
		return fmt.Errorf("guestimage: guestsvc binary %s is dynamically linked (build it with CGO_ENABLED=0)", p)
	}
	return nil
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

const modulePath = "github.com/remusd/remusd"

// sourceDir finds the remusd module root to build the guest service in.
func sourceDir(dir string) (string, error) {
	var cands []string
	if dir != "" {
		cands = append(cands, dir)
	} else {
		if d := os.Getenv("REMUSD_SOURCE"); d != "" {
			cands = append(cands, d)
		}
		if wd, err := os.Getwd(); err == nil {
			for d := wd; ; d = filepath.Dir(d) {
				if fileExists(filepath.Join(d, "go.mod")) {
					cands = append(cands, d)
					break
				}
				if filepath.Dir(d) == d {
					break
				}
			}
		}
		if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
			cands = append(cands, filepath.Dir(filepath.Dir(file)))
		}
	}
	for _, d := range cands {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err != nil {
			continue
		}
		if first, _, _ := strings.Cut(string(b), "\n"); strings.TrimSpace(strings.TrimPrefix(first, "module")) == modulePath &&
			fileExists(filepath.Join(d, "cmd", "remus-guestsvc")) {
			return d, nil
		}
	}
	return "", fmt.Errorf("guestimage: %w: no %s checkout found to build remus-guestsvc (tried %v; set REMUSD_SOURCE or REMUSD_GUESTSVC)", ErrUnavailable, modulePath, cands)
}

// WaitReady polls the serial console file until the guest prints
// ReadyMarker (returning that line), reports FailMarker or a kernel
// panic, or ctx ends.
func WaitReady(ctx context.Context, serialPath string) (string, error) {
	for {
		b, _ := os.ReadFile(serialPath)
		for _, l := range strings.Split(string(b), "\n") {
			l = strings.TrimRight(l, "\r")
			switch {
			case strings.HasPrefix(l, ReadyMarker):
				return l, nil
			case strings.HasPrefix(l, FailMarker), strings.Contains(l, "Kernel panic"):
				return "", fmt.Errorf("guestimage: guest failed: %s (console tail: %s)", l, tail(string(b), 15))
			}
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("guestimage: guest not ready: %w (console tail: %s)", ctx.Err(), tail(string(b), 15))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func tail(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}

// MakeDisk creates at path a sparse raw image of mib MiB holding an empty
// ext4 file system, the disk the guest mounts on /data (WithDisk). It
// needs mkfs.ext4 (e2fsprogs).
func MakeDisk(ctx context.Context, path string, mib int64) error {
	if mib <= 0 {
		return fmt.Errorf("guestimage: disk size %d MiB", mib)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("guestimage: disk: %w", err)
	}
	err = f.Truncate(mib << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("guestimage: disk: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", path).CombinedOutput(); err != nil {
		return fmt.Errorf("guestimage: mkfs.ext4 %s: %w: %s", path, err, bytes.TrimSpace(out))
	}
	return nil
}

// CheckDisk checks a disk made by MakeDisk whose guest froze its file
// system (guestsvc FREEZE) or stopped: e2fsck -fn finds it clean, and
// /log on it holds exactly want (the records the client saw acknowledged).
func CheckDisk(ctx context.Context, path string, want []byte) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "e2fsck", "-fn", path).CombinedOutput(); err != nil {
		return fmt.Errorf("guestimage: e2fsck -fn %s: %w\n%s", path, err, out)
	}
	got, err := exec.CommandContext(ctx, "debugfs", "-R", "cat /log", path).Output()
	if err != nil {
		return fmt.Errorf("guestimage: debugfs cat /log of %s: %w", path, err)
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("guestimage: /log on %s holds %d bytes (%d lines), want the %d acknowledged bytes (%d lines)",
			path, len(got), bytes.Count(got, []byte{'\n'}), len(want), bytes.Count(want, []byte{'\n'}))
	}
	return nil
}
