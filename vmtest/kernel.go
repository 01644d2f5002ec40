package vmtest

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// Kernel is an extracted Linux kernel: its image and its module tree.
type Kernel struct {
	Version string // e.g. 6.1.0-56-cloud-amd64
	Image   string // path of vmlinuz
	Modules string // path of lib/modules/<Version>
	Source  string // where it came from (.deb or directory), for messages
}

// ErrUnavailable wraps every reason the VM cannot be run on this machine
// (no QEMU, no static busybox, no kernel package). Tests skip on it.
var ErrUnavailable = errors.New("vmtest: unavailable")

func unavailable(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUnavailable}, a...)...)
}

// DefaultCacheDir is $REMUSD_VMTEST_CACHE, else <user cache dir>/remusd/vmtest
// (for root: /root/.cache/remusd/vmtest).
func DefaultCacheDir() string {
	if d := os.Getenv("REMUSD_VMTEST_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "remusd", "vmtest")
	}
	return filepath.Join(os.TempDir(), "remusd-vmtest")
}

// KernelPackage is the Debian package whose kernel has sch_plug as a module.
const KernelPackage = "linux-image-cloud-amd64"

// FindKernel locates a kernel, in this order:
//   - $REMUSD_VMTEST_KERNEL: an extracted tree (holding boot/ and lib/modules/) or a .deb;
//   - a linux-image-*-cloud-amd64 .deb in <cache>/debs or /var/cache/apt/archives;
//   - an installed /boot/vmlinuz-*-cloud-amd64 with its /lib/modules tree;
//   - unless $REMUSD_VMTEST_NO_DOWNLOAD is set: `apt-get download` of the
//     package linux-image-cloud-amd64 depends on, into <cache>/debs.
//
// A .deb is extracted (dpkg-deb -x) once into <cache>/kernel/<deb name>.
func FindKernel(ctx context.Context, cacheDir string) (*Kernel, error) {
	if cacheDir == "" {
		cacheDir = DefaultCacheDir()
	}
	if p := os.Getenv("REMUSD_VMTEST_KERNEL"); p != "" {
		if strings.HasSuffix(p, ".deb") {
			return extractDeb(ctx, cacheDir, p)
		}
		return kernelInTree(p, p)
	}
	if deb := newestDeb(filepath.Join(cacheDir, "debs"), "/var/cache/apt/archives"); deb != "" {
		return extractDeb(ctx, cacheDir, deb)
	}
	if imgs, _ := filepath.Glob("/boot/vmlinuz-*-cloud-amd64"); len(imgs) > 0 {
		sort.Strings(imgs)
		if k, err := kernelInTree("/", "/"); err == nil {
			return k, nil
		}
	}
	if os.Getenv("REMUSD_VMTEST_NO_DOWNLOAD") == "" {
		deb, err := downloadKernel(ctx, filepath.Join(cacheDir, "debs"))
		if err != nil {
			return nil, err
		}
		return extractDeb(ctx, cacheDir, deb)
	}
	return nil, unavailable("no %s kernel found (install it with vmtest/setup.sh, or set REMUSD_VMTEST_KERNEL)", KernelPackage)
}

func newestDeb(dirs ...string) string {
	var all []string
	for _, d := range dirs {
		m, _ := filepath.Glob(filepath.Join(d, "linux-image-*-cloud-amd64_*_amd64.deb"))
		all = append(all, m...)
	}
	if len(all) == 0 {
		return ""
	}
	// The most recently downloaded one wins (version strings do not sort).
	best, bestT := "", time.Time{}
	for _, p := range all {
		if fi, err := os.Stat(p); err == nil && (best == "" || fi.ModTime().After(bestT)) {
			best, bestT = p, fi.ModTime()
		}
	}
	return best
}

// kernelInTree finds boot/vmlinuz-*-cloud-amd64 (or any vmlinuz) and the
// matching lib/modules/<version> under root.
func kernelInTree(root, source string) (*Kernel, error) {
	imgs, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*-cloud-amd64"))
	if len(imgs) == 0 {
		imgs, _ = filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	}
	sort.Strings(imgs)
	for i := len(imgs) - 1; i >= 0; i-- {
		ver := strings.TrimPrefix(filepath.Base(imgs[i]), "vmlinuz-")
		for _, md := range []string{filepath.Join(root, "lib", "modules", ver), filepath.Join(root, "usr", "lib", "modules", ver)} {
			if fi, err := os.Stat(filepath.Join(md, "kernel")); err == nil && fi.IsDir() {
				return &Kernel{Version: ver, Image: imgs[i], Modules: md, Source: source}, nil
			}
		}
	}
	return nil, unavailable("no kernel image with modules under %s", root)
}

func extractDeb(ctx context.Context, cacheDir, deb string) (*Kernel, error) {
	dst := filepath.Join(cacheDir, "kernel", strings.TrimSuffix(filepath.Base(deb), ".deb"))
	if k, err := kernelInTree(dst, deb); err == nil {
		return k, nil
	}
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return nil, unavailable("dpkg-deb not found to extract %s", deb)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dst), ".extract-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(cctx, "dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("vmtest: dpkg-deb -x %s: %v: %s", deb, err, out)
	}
	if err := os.Rename(tmp, dst); err != nil && !errors.Is(err, os.ErrExist) {
		// Another process may have won the race; use its tree if complete.
		if k, err2 := kernelInTree(dst, deb); err2 == nil {
			return k, nil
		}
		return nil, err
	}
	return kernelInTree(dst, deb)
}

// downloadKernel fetches the versioned kernel package that
// linux-image-cloud-amd64 depends on with `apt-get download` (an ordinary
// Debian package download; nothing is installed).
func downloadKernel(ctx context.Context, dir string) (string, error) {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", unavailable("no %s kernel found and no apt-get to download it", KernelPackage)
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(cctx, "apt-cache", "depends", KernelPackage).Output()
	if err != nil {
		return "", unavailable("apt-cache depends %s: %v (run apt-get update, or vmtest/setup.sh)", KernelPackage, err)
	}
	var pkg string
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Depends: "); ok && strings.HasPrefix(v, "linux-image-") {
			pkg = strings.TrimSpace(v)
			break
		}
	}
	if pkg == "" {
		return "", unavailable("apt-cache knows no %s (run apt-get update, or vmtest/setup.sh)", KernelPackage)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(cctx, "apt-get", "download", "-q", pkg)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", unavailable("apt-get download %s: %v: %s", pkg, err, lastLines(string(out), 3))
	}
	if deb := newestDeb(dir); deb != "" {
		return deb, nil
	}
	return "", unavailable("apt-get download %s left no .deb in %s", pkg, dir)
}

// FindBusybox returns a statically linked busybox: $REMUSD_VMTEST_BUSYBOX,
// else /bin/busybox or /usr/bin/busybox if static (package busybox-static).
func FindBusybox() (string, error) {
	cands := []string{"/bin/busybox", "/usr/bin/busybox"}
	if p := os.Getenv("REMUSD_VMTEST_BUSYBOX"); p != "" {
		cands = []string{p}
	}
	for _, p := range cands {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, pr := range f.Progs {
			if pr.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", unavailable("no static busybox (apt-get install busybox-static)")
}

// FindQEMU returns the qemu-system-x86_64 binary (package qemu-system-x86).
func FindQEMU() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", unavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
	}
	return p, nil
}

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}

// ExtractKernelDeb extracts a linux-image .deb (once) into
// <cacheDir>/kernel/<deb name> and returns its kernel. It is how FindKernel
// unpacks the cloud kernel, for harnesses that need another flavour (the
// generic kernel, which can be a Xen dom0).
func ExtractKernelDeb(ctx context.Context, cacheDir, deb string) (*Kernel, error) {
	return extractDeb(ctx, cacheDir, deb)
}
