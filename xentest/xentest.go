// Package xentest boots Debian's Xen 4.17 under QEMU (TCG, no KVM needed)
// with Debian's generic Linux kernel as a PV dom0 and a busybox initramfs
// holding Xen's tools, runs a command in dom0, and reads the verdict from
// the serial console. It is vmtest for Xen: it reuses vmtest's initramfs
// builder (busybox, kernel modules, /init, the per-run archive, the cache
// keyed by input hashes) and its QEMU console reader.
//
// Inputs are Debian packages, downloaded with `apt-get download` into
// <vmtest cache>/xen/debs and unpacked with `dpkg-deb -x` under
// <vmtest cache>/xen/root-<key> (nothing is installed on the host, and no
// kernel becomes the host's): Packages, plus the versioned generic kernel
// linux-image-amd64 depends on (the cloud kernel lacks XEN_DOM0).
//
// Dom0's /init is vmtest's: it loads the Xen modules, sources
// /vmtest/setup.sh (mount xenfs, start xenstored, xen-init-dom0,
// xenconsoled), runs the command and prints vmtest.Marker with the verdict.
// The command sees REMUSD_XENTEST=1 and REMUSD_VMTEST=1, and Xen's tools
// in PATH (BinDir).
package xentest

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/remusd/remusd/vmtest"
)

// EnvInDom0 is set to "1" for the command run in dom0.
const EnvInDom0 = "REMUSD_XENTEST"

// InDom0 reports whether this process runs in a xentest dom0.
func InDom0() bool { return os.Getenv(EnvInDom0) == "1" }

// ErrUnavailable is vmtest.ErrUnavailable: QEMU, busybox or a package is
// missing and cannot be fetched. Tests skip on it.
var ErrUnavailable = vmtest.ErrUnavailable

func unavailable(format string, a ...any) error {
	return fmt.Errorf("%w: xentest: "+format, append([]any{ErrUnavailable}, a...)...)
}

// XenVersion is the Xen release whose packages are used.
const XenVersion = "4.17"

// BinDir is where Debian puts Xen's real tools (/usr/sbin/xl is a wrapper
// script that needs more of the system than the initramfs has).
const BinDir = "/usr/lib/xen-" + XenVersion + "/bin"

// Packages are the Debian packages unpacked for the hypervisor and dom0's
// tools and libraries.
var Packages = []string{
	"xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common",
	"libxenmisc4.17", "libxenstore4", "libxencall1", "libxenevtchn1",
	"libxenforeignmemory1", "libxengnttab1", "libxentoollog1",
	"libxentoolcore1", "libxenhypfs1", "libxendevicemodel1", "libyajl2",
	"xenstore-utils", // xenstore-write for the vif hotplug script (NetVifScript)
}

// DomKernelPackage is the metapackage whose dependency is the dom0 kernel.
const DomKernelPackage = "linux-image-amd64"

// Dom0Modules are the modules dom0 loads (dependencies are added):
// Xen's device files, netback and the bridge for guests with a vif, and
// what the plug output buffer needs on a vif (vmtest.NetModules' qdiscs).
var Dom0Modules = []string{"xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xen-netback", "bridge",
	"sch_plug", "ifb", "act_mirred", "cls_u32", "sch_ingress",
	// The NFQUEUE output buffer on a bridged vif (iptables-nft);
	// libcrc32c (for nf_tables) fails to load without a crc32c first.
	"crc32c_generic", "nf_tables", "nft_compat", "br_netfilter", "xt_physdev", "xt_comment", "xt_NFQUEUE", "nfnetlink_queue"}

// hostIPTables is the host's iptables (Debian 12: iptables-nft's
// multi-call binary) and the extensions the NFQUEUE output buffer's rules
// use; dom0 gets them for the NFQUEUE tests (the host and the dom0 tree
// are both Debian 12).
const hostIPTables = "/usr/sbin/xtables-nft-multi"

var hostXTables = []string{"libxt_NFQUEUE.so", "libxt_comment.so", "libxt_physdev.so", "libxt_standard.so"}

// Tools are the programs of BinDir put in dom0, with their libraries.
var Tools = []string{"xl", "xenstored", "xen-init-dom0", "xenconsoled", "xenconsole", "xenstore-control", "xen-hvmctx", "xenctx"}

// Xen is an unpacked set of Packages.
type Xen struct {
	Root       string // the packages unpacked
	Hypervisor string // uncompressed multiboot ELF for QEMU's -kernel
	Debs       []string
}

// LibDirs are the directories AddELF searches: the packages' libraries
// first, then the host's (glibc, zlib, ... are the host's, also Debian 12).
func (x *Xen) LibDirs() []string {
	return append([]string{filepath.Join(x.Root, "usr/lib/x86_64-linux-gnu"), filepath.Join(x.Root, "lib/x86_64-linux-gnu")}, vmtest.HostLibDirs...)
}

// DebDir is where packages are downloaded: <cacheDir>/xen/debs.
func DebDir(cacheDir string) string { return filepath.Join(cacheDir, "xen", "debs") }

// findDeb returns the newest .deb of package pkg in dirs ("" if none).
func findDeb(pkg string, dirs ...string) string {
	best, bestT := "", time.Time{}
	for _, d := range dirs {
		m, _ := filepath.Glob(filepath.Join(d, pkg+"_*_amd64.deb"))
		for _, p := range m {
			if fi, err := os.Stat(p); err == nil && (best == "" || fi.ModTime().After(bestT)) {
				best, bestT = p, fi.ModTime()
			}
		}
	}
	return best
}

// fetchDebs returns a .deb for every package, from dir or
// /var/cache/apt/archives, downloading the missing ones into dir with
// apt-get download unless $REMUSD_VMTEST_NO_DOWNLOAD is set.
func fetchDebs(ctx context.Context, dir string, pkgs []string) ([]string, error) {
	var debs, missing []string
	for _, p := range pkgs {
		if d := findDeb(p, dir, "/var/cache/apt/archives"); d != "" {
			debs = append(debs, d)
		} else {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return debs, nil
	}
	if os.Getenv("REMUSD_VMTEST_NO_DOWNLOAD") != "" {
		return nil, unavailable("packages %v not in %s and downloads are off", missing, dir)
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return nil, unavailable("packages %v not in %s and no apt-get", missing, dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, "apt-get", append([]string{"download", "-q"}, missing...)...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, unavailable("apt-get download %v: %v: %s (run apt-get update, or xentest/setup.sh)", missing, err, lastLines(string(out), 3))
	}
	for _, p := range missing {
		d := findDeb(p, dir)
		if d == "" {
			return nil, unavailable("apt-get download %s left no .deb in %s", p, dir)
		}
		debs = append(debs, d)
	}
	return debs, nil
}

// FindXen returns Packages unpacked under <cacheDir>/xen/root-<key> (key
// hashes the .deb names), downloading and unpacking them if needed, and
// the hypervisor uncompressed next to them.
func FindXen(ctx context.Context, cacheDir string) (*Xen, error) {
	if cacheDir == "" {
		cacheDir = vmtest.DefaultCacheDir()
	}
	debs, err := fetchDebs(ctx, DebDir(cacheDir), Packages)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(debs))
	for i, d := range debs {
		names[i] = filepath.Base(d)
	}
	sort.Strings(names)
	sum := sha256.Sum256([]byte(strings.Join(names, "\n")))
	root := filepath.Join(cacheDir, "xen", "root-"+hex.EncodeToString(sum[:])[:16])
	x := &Xen{Root: root, Hypervisor: filepath.Join(root, "xen.elf"), Debs: debs}
	if _, err := os.Stat(x.Hypervisor); err == nil {
		return x, nil
	}
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return nil, unavailable("dpkg-deb not found")
	}
	tmp, err := os.MkdirTemp(filepath.Dir(root), ".root-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	for _, d := range debs {
		if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", d, tmp).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("xentest: dpkg-deb -x %s: %v: %s", d, err, out)
		}
	}
	gz, _ := filepath.Glob(filepath.Join(tmp, "boot", "xen-"+XenVersion+"-amd64.gz"))
	if len(gz) == 0 {
		return nil, fmt.Errorf("xentest: no boot/xen-%s-amd64.gz in %v", XenVersion, debs)
	}
	if err := gunzip(gz[0], filepath.Join(tmp, "xen.elf")); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, root); err != nil {
		if _, err2 := os.Stat(x.Hypervisor); err2 == nil { // lost a race
			return x, nil
		}
		return nil, err
	}
	return x, nil
}

func gunzip(src, dst string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return fmt.Errorf("xentest: %s: %w", src, err)
	}
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, zr); err != nil {
		out.Close()
		return fmt.Errorf("xentest: gunzip %s: %w", src, err)
	}
	return out.Close()
}

// FindDom0Kernel returns the generic Debian kernel (the package
// DomKernelPackage depends on), downloaded into DebDir and unpacked by
// vmtest.ExtractKernelDeb; $REMUSD_XENTEST_KERNEL names a .deb instead.
func FindDom0Kernel(ctx context.Context, cacheDir string) (*vmtest.Kernel, error) {
	if cacheDir == "" {
		cacheDir = vmtest.DefaultCacheDir()
	}
	if p := os.Getenv("REMUSD_XENTEST_KERNEL"); p != "" {
		return vmtest.ExtractKernelDeb(ctx, cacheDir, p)
	}
	dir := DebDir(cacheDir)
	m, _ := filepath.Glob(filepath.Join(dir, "linux-image-*-amd64_*_amd64.deb"))
	var generic []string
	for _, p := range m {
		if !strings.Contains(filepath.Base(p), "-cloud-") && !strings.Contains(filepath.Base(p), "-rt-") && !strings.Contains(filepath.Base(p), "-dbg") {
			generic = append(generic, p)
		}
	}
	if len(generic) == 0 {
		pkg, err := kernelDependency(ctx)
		if err != nil {
			return nil, err
		}
		debs, err := fetchDebs(ctx, dir, []string{pkg})
		if err != nil {
			return nil, err
		}
		generic = debs
	}
	sort.Strings(generic)
	return vmtest.ExtractKernelDeb(ctx, cacheDir, generic[len(generic)-1])
}

func kernelDependency(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", DomKernelPackage).Output()
	if err != nil {
		return "", unavailable("apt-cache depends %s: %v", DomKernelPackage, err)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Depends: "); ok && strings.HasPrefix(v, "linux-image-") {
			return strings.TrimSpace(v), nil
		}
	}
	return "", unavailable("apt-cache knows no %s (run apt-get update)", DomKernelPackage)
}

// setupScript is /vmtest/setup.sh, sourced by vmtest's /init after the
// modules are loaded.
const setupScript = `# xentest dom0 setup
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export PATH=$PATH:` + BinDir + `
export REMUSD_XENTEST=1
if [ "$(cat /sys/hypervisor/type 2>/dev/null)" != xen ]; then
	echo "REMUSD-XENTEST: not running on Xen"
	return 1
fi
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts 2>/dev/null # xenconsoled's ttys
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
mkdir -p /proc/xen /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen/console
mount -t xenfs xenfs /proc/xen || { echo "REMUSD-XENTEST: mount xenfs failed"; return 1; }
xenstored --pid-file /run/xenstored.pid || { echo "REMUSD-XENTEST: xenstored failed"; return 1; }
xen-init-dom0 >/var/log/xen/xen-init-dom0.log 2>&1 || { echo "REMUSD-XENTEST: xen-init-dom0 failed"; cat /var/log/xen/xen-init-dom0.log; return 1; }
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || { echo "REMUSD-XENTEST: xenconsoled failed"; return 1; }
echo "REMUSD-XENTEST: dom0 ready"
`

// xlConf keeps xl from looking for things the initramfs lacks.
const xlConf = `autoballoon="off"
run_hotplug_scripts=0
lockfile="/run/xen/xl.lock"
`

// Dom0Tree returns the files Xen adds to vmtest's base initramfs: Tools
// with their libraries (and libgcc_s.so.1, which glibc dlopens), xl.conf,
// /var/run -> /run, and /vmtest/setup.sh.
func Dom0Tree(x *Xen) (*vmtest.Tree, error) {
	t := vmtest.NewTree()
	dirs := x.LibDirs()
	for _, tool := range Tools {
		src := filepath.Join(x.Root, BinDir, tool)
		if _, err := os.Stat(src); err != nil {
			return nil, fmt.Errorf("xentest: %s not in the packages: %w", tool, err)
		}
		if err := t.AddELF(BinDir+"/"+tool, src, dirs); err != nil {
			return nil, err
		}
	}
	if err := t.AddLib("libgcc_s.so.1", dirs); err != nil {
		return nil, err
	}
	// xenstore-utils' one binary answers to the name it is called by.
	if err := t.AddELF("usr/bin/xenstore", filepath.Join(x.Root, "usr/bin/xenstore"), dirs); err != nil {
		return nil, err
	}
	for _, n := range []string{"xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-rm"} {
		t.Symlink("usr/bin/"+n, "xenstore")
	}
	if _, err := os.Stat(hostIPTables); err == nil {
		if err := t.AddELF("usr/sbin/xtables-nft-multi", hostIPTables, dirs); err != nil {
			return nil, err
		}
		t.Symlink("usr/sbin/iptables", "xtables-nft-multi")
		t.Symlink("usr/sbin/ip6tables", "xtables-nft-multi")
		for _, x := range hostXTables {
			src := filepath.Join("/usr/lib/x86_64-linux-gnu/xtables", x)
			if err := t.AddELF("usr/lib/x86_64-linux-gnu/xtables/"+x, src, dirs); err != nil {
				return nil, err
			}
		}
	}
	t.AddFile("etc/xen/xl.conf", 0o644, []byte(xlConf))
	t.Symlink("var/run", "/run")
	t.Symlink("lib64", "lib/x86_64-linux-gnu")
	t.AddFile("vmtest/setup.sh", 0o644, []byte(setupScript))
	return t, nil
}

// The lab's CPU layout. Xen gets LabCPUs pCPUs; dom0's two vCPUs are
// pinned to pCPUs 0 and 1 (dom0_vcpus_pin) and every test guest to pCPU
// DomUCPU (its configuration carries DomUPin), so a guest's vCPU keeps a
// QEMU thread of its own. With two pCPUs shared by dom0 and the guests,
// the domU triple-faulted under TCG in most daemon failover runs (see the
// README's Xen section); pinned, the same runs passed.
const (
	LabCPUs = 3
	DomUCPU = 2
	// DomUPin is the xl configuration line that pins a guest to DomUCPU.
	DomUPin = `cpus = "2"`
)

// Config describes one Xen run.
type Config struct {
	CacheDir string        // default vmtest.DefaultCacheDir()
	Files    []vmtest.File // per-run files in dom0 (ELF libraries: see AddLibs)
	Command  []string      // run in dom0; exit status 0 is PASS
	Env      map[string]string
	Dom0Mem  string        // dom0's memory, default "1024M"
	Memory   string        // the QEMU machine's, default "2048"
	Timeout  time.Duration // whole run, boot included; default 180s
	Console  io.Writer     // optional live copy of the serial console
	XenArgs  string        // extra hypervisor command line
	// Libvirt adds libvirtd with its libxl driver to dom0 (AddLibvirt;
	// start it with StartLibvirtd). Opt-in: it grows dom0's initramfs by
	// ~70 MB.
	Libvirt bool
	// QEMUArgs are added to QEMU's command line (e.g. a NIC: -netdev and
	// -device; the machine has none otherwise).
	QEMUArgs []string
	// Modules are loaded in dom0 on top of Dom0Modules (e.g. NICModules).
	Modules []string
	// Started, if set, is called with the QEMU process once it started
	// (a driver of several machines kills one by its PID).
	Started func(*os.Process)
	// Accel is QEMU's -accel (default "tcg": multi-threaded TCG, one host
	// thread per vCPU).
	Accel string
	// CPUs is the QEMU machine's CPU count, Xen's pCPUs (default
	// LabCPUs; at least 3: dom0's two and DomUCPU).
	CPUs int
	// NoRetry makes RunInDom0 report a domU triple fault instead of
	// retrying the run (a profile that counts them).
	NoRetry bool
}

// Run boots Xen with dom0 and runs cfg.Command there.
func Run(ctx context.Context, cfg Config) (*vmtest.Result, error) {
	if len(cfg.Command) == 0 {
		return nil, errors.New("xentest: no command")
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = vmtest.DefaultCacheDir()
	}
	if cfg.Dom0Mem == "" {
		cfg.Dom0Mem = "1024M"
	}
	if cfg.Memory == "" {
		cfg.Memory = "2048"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 180 * time.Second
	}
	qemu, err := vmtest.FindQEMU()
	if err != nil {
		return nil, err
	}
	x, err := FindXen(ctx, cfg.CacheDir)
	if err != nil {
		return nil, err
	}
	k, err := FindDom0Kernel(ctx, cfg.CacheDir)
	if err != nil {
		return nil, err
	}
	tree, err := Dom0Tree(x)
	if err != nil {
		return nil, err
	}
	if cfg.Libvirt {
		lv, err := FindLibvirtXen(ctx, cfg.CacheDir)
		if err != nil {
			return nil, err
		}
		if err := AddLibvirt(tree, x, lv); err != nil {
			return nil, err
		}
	}
	mods := Dom0Modules
	if len(cfg.Modules) > 0 {
		mods = append(append([]string(nil), Dom0Modules...), cfg.Modules...)
	}
	base, err := vmtest.BuildInitramfs(cfg.CacheDir, k, mods, nil, tree)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "xentest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "dom0.cpio")
	env := map[string]string{EnvInDom0: "1"}
	for k, v := range cfg.Env {
		env[k] = v
	}
	if err := vmtest.WriteRunInitrd(initrd, base, cfg.Files, cfg.Command, env); err != nil {
		return nil, err
	}
	xenArgs := "console=com1 com1=115200,8n1 dom0_mem=" + cfg.Dom0Mem + ",max:" + cfg.Dom0Mem +
		" dom0_max_vcpus=2 dom0_vcpus_pin noreboot console_timestamps=boot " + cfg.XenArgs
	dom0Args := "console=hvc0 earlyprintk=xen loglevel=4 panic=-1 oops=panic rdinit=/init remusd.vmtest=1"
	// QEMU splits -initrd on commas: the first module is dom0's kernel
	// with its command line, the second its initramfs.
	if strings.ContainsAny(k.Image+initrd, ", ") {
		return nil, fmt.Errorf("xentest: paths must not contain commas or spaces: %s, %s", k.Image, initrd)
	}
	accel := cfg.Accel
	if accel == "" {
		accel = "tcg"
	}
	if !strings.HasPrefix(accel, "tcg") || strings.ContainsAny(accel, " \t") {
		return nil, fmt.Errorf("xentest: accel %q: want tcg[,options]", accel)
	}
	args := []string{
		"-accel", accel, "-cpu", "qemu64,+svm,+npt", "-m", cfg.Memory, "-smp", strconv.Itoa(max(cfg.CPUs, LabCPUs)),
		"-nic", "none", "-display", "none", "-monitor", "none", "-serial", "stdio",
		"-no-reboot", "-nodefaults",
		"-kernel", x.Hypervisor, "-append", strings.TrimSpace(xenArgs),
		"-initrd", k.Image + " " + dom0Args + "," + initrd,
	}
	args = append(args, cfg.QEMUArgs...)
	// Xen halts rather than powering the machine off: kill QEMU soon
	// after the verdict.
	return vmtest.RunQEMU(ctx, vmtest.QEMURun{Binary: qemu, Args: args, Timeout: cfg.Timeout, Console: cfg.Console, Grace: 3 * time.Second, Started: cfg.Started})
}

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}

// BuildGoTest compiles the tests of the Go package in pkgDir with cgo and
// the given build tags (go test -c) into out.
func BuildGoTest(ctx context.Context, pkgDir, out string, tags ...string) error {
	args := []string{"test", "-c", "-o", out}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.CommandContext(ctx, "go", append(args, ".")...)
	cmd.Dir = pkgDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("xentest: go test -c in %s: %v: %s", pkgDir, err, b)
	}
	return nil
}

// ELFFiles returns files for a dynamically linked program src put at dst in
// dom0, plus those of its shared libraries that dom0's base tree lacks
// (written into tmpDir).
func ELFFiles(x *Xen, src, dst, tmpDir string) ([]vmtest.File, error) {
	base, err := Dom0Tree(x)
	if err != nil {
		return nil, err
	}
	t := vmtest.NewTree()
	if err := t.AddELF(dst, src, x.LibDirs()); err != nil {
		return nil, err
	}
	files := []vmtest.File{{Src: src, Dst: dst, Mode: 0o755}}
	for name, data := range t.Files() {
		if "/"+name == dst || base.Has(name) {
			continue
		}
		p := filepath.Join(tmpDir, strings.ReplaceAll(name, "/", "_"))
		if err := os.WriteFile(p, data, 0o755); err != nil {
			return nil, err
		}
		files = append(files, vmtest.File{Src: p, Dst: "/" + name, Mode: 0o755})
	}
	return files, nil
}

// RunGoTest builds the tests of the package in pkgDir with cgo and tags,
// boots Xen, and runs the binary in dom0 with -test.v and -test.run=run
// (plus extra files, e.g. a guest's kernel and initramfs).
func RunGoTest(ctx context.Context, pkgDir, run string, tags []string, cfg Config) (*vmtest.Result, error) {
	if cfg.CacheDir == "" {
		cfg.CacheDir = vmtest.DefaultCacheDir()
	}
	x, err := FindXen(ctx, cfg.CacheDir)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "xentest-bin-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "test.bin")
	if err := BuildGoTest(ctx, pkgDir, bin, tags...); err != nil {
		return nil, err
	}
	files, err := ELFFiles(x, bin, "/vmtest/test.bin", tmp)
	if err != nil {
		return nil, err
	}
	cfg.Files = append(cfg.Files, files...)
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = 180 * time.Second
	}
	cfg.Command = []string{"/vmtest/test.bin", "-test.v", "-test.count=1", fmt.Sprintf("-test.timeout=%s", timeout), "-test.run=" + run}
	return Run(ctx, cfg)
}

// BuildDirtierRamdisk builds the dirtier command (a static Go program, in
// this package's dirtier directory) and writes a domU initramfs holding it
// as /init to dst.
func BuildDirtierRamdisk(ctx context.Context, dst string) error {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return errors.New("xentest: cannot locate the dirtier sources")
	}
	tmp, err := os.MkdirTemp("", "xentest-dirtier-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "init")
	if err := buildDirtierAt(ctx, filepath.Join(filepath.Dir(self), "dirtier"), bin); err != nil {
		return err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	a := vmtest.NewArchive(f, 1)
	a.File("init", 0o755, data)
	if err := a.Close(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// BuildNetGuestRamdisk writes to dst a domU initramfs for kernel k (the
// cloud kernel vmtest uses): vmtest's busybox /init, the xen-netfront
// module, the dirtier as /dirtier, and a run script that gives eth0 the
// address addr (CIDR), serves a counting echo on TCP port 7 (busybox nc
// running counterScript per connection) and then runs the dirtier.
func BuildNetGuestRamdisk(ctx context.Context, cacheDir string, k *vmtest.Kernel, dst, addr string) error {
	if cacheDir == "" {
		cacheDir = vmtest.DefaultCacheDir()
	}
	base, err := vmtest.BuildInitramfs(cacheDir, k, []string{"xen-netfront"}, nil, nil)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "xentest-netguest-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "dirtier")
	if err := buildDirtier(ctx, bin); err != nil {
		return err
	}
	counter := filepath.Join(tmp, "counter")
	if err := os.WriteFile(counter, []byte(counterScript), 0o755); err != nil {
		return err
	}
	script := "ip link set eth0 up && ip addr add " + addr + " dev eth0 && (nc -ll -p 7 -e /counter &) && echo netguest: up && exec /dirtier"
	return vmtest.WriteRunInitrd(dst, base, []vmtest.File{{Src: bin, Dst: "dirtier", Mode: 0o755}, {Src: counter, Dst: "counter", Mode: 0o755}},
		[]string{"sh", "-c", script}, nil)
}

// counterScript answers each line L of a connection with "N L", N counting
// the connection's lines from 1: state in guest memory a client can check
// for continuity (a restored copy that lost a reply the client saw would
// repeat or skip a number).
const counterScript = `#!/bin/sh
n=0
while read -r l; do
	n=$((n+1))
	echo "$n $l"
done
`

// buildDirtier builds the dirtier (static) into out.
func buildDirtier(ctx context.Context, out string) error {
	_, self, _, ok := runtime.Caller(0)
	if !ok {
		return errors.New("xentest: cannot locate the dirtier sources")
	}
	return buildDirtierAt(ctx, filepath.Join(filepath.Dir(self), "dirtier"), out)
}

func buildDirtierAt(ctx context.Context, dir, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("xentest: build dirtier: %v: %s", err, b)
	}
	return nil
}
