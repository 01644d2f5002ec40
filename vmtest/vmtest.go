// Package vmtest boots a Debian kernel under QEMU (TCG, no KVM needed) with
// a small initramfs — static busybox, chosen kernel modules with their
// dependencies, and the files of one test run — runs a command inside, and
// reads the verdict from the serial console.
//
// It exists to test kernel mechanisms the host kernel lacks (sch_plug): the
// base initramfs (busybox, modules, /init) is cached under
// DefaultCacheDir()/initramfs keyed by the SHA-256 of its inputs; the
// per-run files (for instance a static `go test -c` binary) go into a
// second archive appended to it, so the cache is not rebuilt per test
// binary.
//
// Inside the VM, /init loads the modules (dependencies first), mounts proc,
// sys, devtmpfs and a tmpfs on /tmp, brings lo up, exports REMUSD_VMTEST=1
// (the kernel command line also carries remusd.vmtest=1), runs the command,
// prints "REMUSD-VMTEST-RESULT: PASS" or "REMUSD-VMTEST-RESULT: FAIL rc=N",
// and powers off.
package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// EnvInVM is set to "1" for the command run inside the VM.
const EnvInVM = "REMUSD_VMTEST"

// InVM reports whether this process runs inside a vmtest VM.
func InVM() bool { return os.Getenv(EnvInVM) == "1" }

// Marker is the console line prefix carrying the verdict.
const Marker = "REMUSD-VMTEST-RESULT: "

// NetModules are the modules the output-buffer tests need.
var NetModules = []string{"sch_plug", "ifb", "veth", "act_mirred", "cls_u32", "sch_ingress"}

// File is one file put into the VM.
type File struct {
	Src  string // path on the host
	Dst  string // absolute path in the VM
	Mode uint32 // permission bits; 0 means 0755
}

// Config describes one VM run.
type Config struct {
	CacheDir     string            // default DefaultCacheDir()
	Kernel       *Kernel           // default FindKernel(ctx, CacheDir)
	Modules      []string          // module names to load (dependencies are added)
	ModuleParams map[string]string // module name -> insmod parameters
	Files        []File            // per-run files
	Command      []string          // run inside the VM; exit status 0 is PASS
	Env          map[string]string // extra environment for Command
	Memory       string            // default "512M"
	Timeout      time.Duration     // whole run, boot included; default 120s
	Console      io.Writer         // optional live copy of the serial console
	QEMUArgs     []string          // extra QEMU arguments (devices, block nodes)
}

// Result is the outcome of one VM run.
type Result struct {
	Passed  bool
	Verdict string        // the marker line's text after Marker ("PASS", "FAIL rc=1"), "" if none
	Console string        // everything read from the serial console
	Elapsed time.Duration // QEMU start to exit
}

// Run boots the VM described by cfg and returns its verdict. An error is
// returned when the VM could not be run or printed no verdict (crash,
// timeout); errors.Is(err, ErrUnavailable) when a prerequisite is missing.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if len(cfg.Command) == 0 {
		return nil, errors.New("vmtest: no command")
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = DefaultCacheDir()
	}
	if cfg.Memory == "" {
		cfg.Memory = "512M"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 120 * time.Second
	}
	qemu, err := FindQEMU()
	if err != nil {
		return nil, err
	}
	if cfg.Kernel == nil {
		if cfg.Kernel, err = FindKernel(ctx, cfg.CacheDir); err != nil {
			return nil, err
		}
	}
	base, err := BaseInitramfs(cfg.CacheDir, cfg.Kernel, cfg.Modules, cfg.ModuleParams)
	if err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp("", "vmtest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "initrd.cpio")
	if err := WriteRunInitrd(initrd, base, cfg.Files, cfg.Command, cfg.Env); err != nil {
		return nil, err
	}
	args := []string{
		"-accel", "tcg", "-machine", "q35", "-m", cfg.Memory, "-smp", "1",
		"-nic", "none", "-display", "none", "-monitor", "none", "-serial", "stdio",
		"-no-reboot", "-nodefaults",
		"-kernel", cfg.Kernel.Image, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 oops=panic loglevel=4 rdinit=/init remusd.vmtest=1",
	}
	args = append(args, cfg.QEMUArgs...)
	return RunQEMU(ctx, QEMURun{Binary: qemu, Args: args, Timeout: cfg.Timeout, Console: cfg.Console})
}

// QEMURun is one QEMU process whose serial console (on its stdout) carries
// the verdict line (Marker).
type QEMURun struct {
	Binary  string        // qemu-system-x86_64 (FindQEMU)
	Args    []string      // must route the serial console to stdout ("-serial stdio")
	Timeout time.Duration // whole run; default 120s
	Console io.Writer     // optional live copy of the console
	// Grace is how long QEMU may take to exit after the verdict line
	// before it is killed; default 10s. A guest that cannot power the
	// machine off (Xen halts instead) wants a short one.
	Grace time.Duration
	// Started, if set, is called with QEMU's process once it started (a
	// driver that must kill one machine of several, by its PID).
	Started func(*os.Process)
}

// RunQEMU starts QEMU, copies its console, and returns once it exited (or
// was killed Grace after printing the verdict, or at Timeout). An error is
// returned when QEMU could not start or printed no verdict.
func RunQEMU(ctx context.Context, r QEMURun) (*Result, error) {
	if r.Timeout <= 0 {
		r.Timeout = 120 * time.Second
	}
	if r.Grace <= 0 {
		r.Grace = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, r.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.Binary, r.Args...)
	cmd.WaitDelay = 5 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vmtest: start qemu: %w", err)
	}
	if r.Started != nil {
		r.Started(cmd.Process)
	}
	var (
		console bytes.Buffer
		verdict string
		mu      sync.Mutex
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		rd := bufio.NewReader(stdout)
		for {
			line, err := rd.ReadString('\n')
			if len(line) > 0 {
				mu.Lock()
				console.WriteString(line)
				if r.Console != nil {
					_, _ = r.Console.Write([]byte(line))
				}
				// Markers may follow a prefix (Xen's console timestamps).
				if i := strings.Index(line, Marker); i >= 0 && verdict == "" {
					verdict = strings.TrimRight(line[i+len(Marker):], "\r\n")
					// The guest powers off right after; do not wait long for it.
					time.AfterFunc(r.Grace, cancel)
				}
				mu.Unlock()
			}
			if err != nil {
				return
			}
		}
	}()
	<-done
	werr := cmd.Wait()
	res := &Result{Elapsed: time.Since(start)}
	mu.Lock()
	res.Console, res.Verdict = console.String(), verdict
	mu.Unlock()
	res.Passed = res.Verdict == "PASS"
	if res.Verdict == "" {
		why := "qemu exited"
		if ctx.Err() != nil {
			why = fmt.Sprintf("timeout after %s (qemu killed)", r.Timeout)
		}
		return res, fmt.Errorf("vmtest: no verdict on the console: %s (%v; stderr: %s); console tail:\n%s",
			why, werr, strings.TrimSpace(stderr.String()), lastLines(res.Console, 30))
	}
	return res, nil
}

// initScript is /init. /vmtest/modules lists "path params..." lines in load
// order; /vmtest/setup.sh (optional, part of a base archive built with an
// extra Tree) is sourced after the modules are loaded; /vmtest/run.sh (per
// run) runs the command.
const initScript = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp REMUSD_VMTEST=1
mkdir -p /root
echo "REMUSD-VMTEST: init started"
while read -r mod params; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$mod" $params || echo "REMUSD-VMTEST: insmod $mod failed"
done < /vmtest/modules
if [ -f /vmtest/setup.sh ]; then
	. /vmtest/setup.sh || echo "REMUSD-VMTEST: /vmtest/setup.sh failed"
fi
ip link set lo up
cd /tmp
if [ -f /vmtest/run.sh ]; then
	sh /vmtest/run.sh
	rc=$?
else
	echo "REMUSD-VMTEST: no /vmtest/run.sh"
	rc=127
fi
if [ "$rc" = 0 ]; then
	echo "REMUSD-VMTEST-RESULT: PASS"
else
	echo "REMUSD-VMTEST-RESULT: FAIL rc=$rc"
fi
sync
poweroff -f
`

// BaseInitramfs returns the path of the cached base archive (busybox,
// modules with dependencies, /init) for kernel k, building it if needed.
func BaseInitramfs(cacheDir string, k *Kernel, modules []string, params map[string]string) (string, error) {
	return BuildInitramfs(cacheDir, k, modules, params, nil)
}

// BuildInitramfs is BaseInitramfs with the files and links of extra added
// (extra may replace /init or add /vmtest/setup.sh). The archive is cached
// under a key hashing every input, extra included.
func BuildInitramfs(cacheDir string, k *Kernel, modules []string, params map[string]string, extra *Tree) (string, error) {
	bb, err := FindBusybox()
	if err != nil {
		return "", err
	}
	ix, err := loadModuleIndex(k.Modules)
	if err != nil {
		return "", err
	}
	mods, err := ix.resolve(modules)
	if err != nil {
		return "", err
	}
	files := map[string]fileEntry{}
	bbData, err := os.ReadFile(bb)
	if err != nil {
		return "", err
	}
	files["bin/busybox"] = fileEntry{0o755, bbData}
	files["init"] = fileEntry{0o755, []byte(initScript)}
	var list strings.Builder
	for _, m := range mods {
		b, err := os.ReadFile(filepath.Join(k.Modules, m))
		if err != nil {
			return "", err
		}
		files["lib/modules/"+m] = fileEntry{0o644, b}
		list.WriteString(m)
		if p := params[normModName(m)]; p != "" {
			list.WriteString(" " + p)
		}
		list.WriteString("\n")
	}
	files["vmtest/modules"] = fileEntry{0o644, []byte(list.String())}
	var links map[string]string
	if extra != nil {
		for n, e := range extra.files {
			files[n] = e
		}
		links = extra.links
	}

	h := sha256.New()
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(h, "vmtest-base-v1\x00%s\x00", k.Version)
	for _, n := range names {
		sum := sha256.Sum256(files[n].data)
		fmt.Fprintf(h, "%s\x00%o\x00%x\x00", n, files[n].mode, sum)
	}
	linkNames := make([]string, 0, len(links))
	for n := range links {
		linkNames = append(linkNames, n)
	}
	sort.Strings(linkNames)
	for _, n := range linkNames {
		fmt.Fprintf(h, "link\x00%s\x00%s\x00", n, links[n])
	}
	key := hex.EncodeToString(h.Sum(nil))[:24]
	out := filepath.Join(cacheDir, "initramfs", key+".cpio")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(filepath.Dir(out), ".base-")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	bw := bufio.NewWriter(f)
	w := newCPIOWriter(bw)
	w.charDev("dev/console", 0o600, 5, 1)
	w.charDev("dev/null", 0o666, 1, 3)
	w.mkdirAll("proc")
	w.mkdirAll("sys")
	w.mkdirAll("tmp")
	w.writeTree(files)
	for _, n := range linkNames {
		w.symlink(n, links[n])
	}
	if err := w.close(); err != nil {
		f.Close()
		return "", err
	}
	if err := bw.Flush(); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(f.Name(), out); err != nil {
		return "", err
	}
	return out, nil
}

// WriteRunInitrd writes base followed by an archive of the run's files
// and /vmtest/run.sh, which exports env and execs command.
func WriteRunInitrd(dst, base string, files []File, command []string, env map[string]string) error {
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := os.Open(base)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, b)
	b.Close()
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(f)
	w := newCPIOWriter(bw)
	for _, fl := range files {
		data, err := os.ReadFile(fl.Src)
		if err != nil {
			return err
		}
		mode := fl.Mode
		if mode == 0 {
			mode = 0o755
		}
		w.file(fl.Dst, mode, data)
	}
	var sh strings.Builder
	envNames := make([]string, 0, len(env))
	for k := range env {
		envNames = append(envNames, k)
	}
	sort.Strings(envNames)
	for _, k := range envNames {
		fmt.Fprintf(&sh, "export %s=%s\n", k, shellQuote(env[k]))
	}
	sh.WriteString("exec")
	for _, a := range command {
		sh.WriteString(" " + shellQuote(a))
	}
	sh.WriteString("\n")
	w.file("vmtest/run.sh", 0o755, []byte(sh.String()))
	if err := w.close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	return f.Close()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// BuildGoTest compiles the tests of the Go package in pkgDir into a static
// binary (CGO_ENABLED=0 go test -c) at out.
func BuildGoTest(ctx context.Context, pkgDir, out string) error {
	goBin := "go"
	if p := filepath.Join(os.Getenv("GOROOT"), "bin", "go"); os.Getenv("GOROOT") != "" {
		if _, err := os.Stat(p); err == nil {
			goBin = p
		}
	}
	cmd := exec.CommandContext(ctx, goBin, "test", "-c", "-o", out, ".")
	cmd.Dir = pkgDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("vmtest: go test -c in %s: %v: %s", pkgDir, err, b)
	}
	return nil
}

// RunGoTest builds the tests of the package in pkgDir statically, boots a
// VM loading modules, and runs the binary there with -test.v and
// -test.run=run. The result's Passed reflects the in-VM go test verdict.
func RunGoTest(ctx context.Context, pkgDir, run string, cfg Config) (*Result, error) {
	tmp, err := os.MkdirTemp("", "vmtest-bin-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "test.bin")
	if err := BuildGoTest(ctx, pkgDir, bin); err != nil {
		return nil, err
	}
	cfg.Files = append(cfg.Files, File{Src: bin, Dst: "/vmtest/test.bin", Mode: 0o755})
	cfg.Command = []string{"/vmtest/test.bin", "-test.v", "-test.count=1", "-test.timeout=90s", "-test.run=" + run}
	return Run(ctx, cfg)
}
