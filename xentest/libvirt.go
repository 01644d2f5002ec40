package xentest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/libvirt/lvtest"
	"github.com/remusd/remusd/vmtest"
)

// libvirtd with its libxl driver in dom0 (Config.Libvirt). The daemon,
// virsh and their libraries are the host's (Debian 12's libvirt-daemon and
// libvirt-clients, installed on the host); the driver module comes from
// Debian's libvirt-daemon-driver-xen of the very same version, downloaded
// into DebDir and unpacked under <cacheDir>/xen/libvirt-<version>. It is
// opt-in: it adds ~70 MB (libvirtd's libraries, ICU's data among them) to
// dom0's initramfs, which the other Xen tests do not load.

// LibvirtDriverPackage is the Debian package holding libvirtd's libxl
// driver module.
const LibvirtDriverPackage = "libvirt-daemon-driver-xen"

// LibvirtPackages are the Debian packages Config.Libvirt unpacks; each is
// fetched at the version of the host's libvirt-daemon.
var LibvirtPackages = []string{LibvirtDriverPackage}

// Host programs and directories Config.Libvirt puts in dom0.
const (
	HostLibvirtd      = "/usr/sbin/libvirtd"
	HostVirsh         = "/usr/bin/virsh"
	LibvirtDriverDir  = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver"
	LibvirtDriverFile = "libvirt_driver_libxl.so"
	hostCPUMapDir     = "/usr/share/libvirt/cpu_map"
)

// Where libvirtd lives in dom0.
const (
	LibvirtdSocket  = "/run/libvirt/libvirt-sock"
	LibvirtdPidFile = "/run/libvirtd.pid"
	LibvirtdLog     = "/var/log/libvirt/libvirtd.log"
	LibxlLogDir     = "/var/log/libvirt/libxl"
)

// libvirtdConf: root's clients on the unix socket without polkit (there
// is no polkitd in dom0), warnings and errors to a file.
const libvirtdConf = `unix_sock_dir = "/run/libvirt"
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:` + LibvirtdLog + `"
`

// libxlConf: dom0's memory is fixed (dom0_mem), as xl.conf says.
const libxlConf = `autoballoon = 0
`

// cpuModelTCG is a CPU model added to dom0's copy of libvirt's CPU map.
// libvirt 9.0's libxl driver names the host CPU from Xen's featureset
// (physinfo hw_cap) and does not start when no model of the map fits it
// ("Cannot find suitable CPU model for given data", then "cannot create
// capabilities for libxenlight"). Under QEMU's qemu64 (an AMD CPU), Xen's
// featureset has neither SEP (Xen drops SYSENTER on AMD in long mode) nor
// VME (qemu64 has none), and every model of the map needs one of them
// (qemu64 SEP, 486 VME). This model needs only an FPU: as libvirt prefers the
// model that leaves the fewest extra features, it takes this one when
// nothing else fits, and a real CPU is still named by its own model.
// guest='off': no domain's <cpu> can name it.
const cpuModelTCG = `<cpus>
  <model name='xentest-tcg'>
    <decode host='on' guest='off'/>
    <feature name='fpu'/>
  </model>
</cpus>
`

const cpuModelTCGFile = "x86_xentest-tcg.xml"

// hostPackageVersion returns the installed version of a host package.
func hostPackageVersion(ctx context.Context, pkg string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, "dpkg-query", "-W", "-f=${Version}", pkg).Output()
	if err != nil || len(out) == 0 {
		return "", unavailable("host package %s is not installed (apt-get install --no-install-recommends libvirt-daemon libvirt-clients): %v", pkg, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// debName is the file name apt-get download gives package pkg at version
// ver (an epoch's colon is escaped).
func debName(pkg, ver string) string {
	return pkg + "_" + strings.ReplaceAll(ver, ":", "%3a") + "_amd64.deb"
}

// FindLibvirtXen returns the directory where LibvirtPackages are unpacked
// at the host's libvirt-daemon version (<cacheDir>/xen/libvirt-<version>),
// downloading (apt-get download PKG=VERSION into DebDir) and unpacking
// them if needed.
func FindLibvirtXen(ctx context.Context, cacheDir string) (string, error) {
	if cacheDir == "" {
		cacheDir = vmtest.DefaultCacheDir()
	}
	for _, p := range []string{HostLibvirtd, HostVirsh} {
		if _, err := os.Stat(p); err != nil {
			return "", unavailable("%s not on the host (apt-get install --no-install-recommends libvirt-daemon libvirt-clients): %v", p, err)
		}
	}
	ver, err := hostPackageVersion(ctx, "libvirt-daemon")
	if err != nil {
		return "", err
	}
	root := filepath.Join(cacheDir, "xen", "libvirt-"+strings.NewReplacer(":", "_", "/", "_").Replace(ver))
	if _, err := os.Stat(filepath.Join(root, LibvirtDriverDir, LibvirtDriverFile)); err == nil {
		return root, nil
	}
	dir := DebDir(cacheDir)
	var debs, missing []string
	for _, p := range LibvirtPackages {
		d := ""
		for _, cand := range []string{filepath.Join(dir, debName(p, ver)), filepath.Join("/var/cache/apt/archives", debName(p, ver))} {
			if _, err := os.Stat(cand); err == nil {
				d = cand
				break
			}
		}
		if d == "" {
			missing = append(missing, p+"="+ver)
		} else {
			debs = append(debs, d)
		}
	}
	if len(missing) > 0 {
		if os.Getenv("REMUSD_VMTEST_NO_DOWNLOAD") != "" {
			return "", unavailable("packages %v not in %s and downloads are off", missing, dir)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(cctx, "apt-get", append([]string{"download", "-q"}, missing...)...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", unavailable("apt-get download %v: %v: %s (run apt-get update, or xentest/setup.sh)", missing, err, lastLines(string(out), 3))
		}
		for _, m := range missing {
			p, _, _ := strings.Cut(m, "=")
			d := filepath.Join(dir, debName(p, ver))
			if _, err := os.Stat(d); err != nil {
				return "", unavailable("apt-get download %s left no %s", m, d)
			}
			debs = append(debs, d)
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(root), ".libvirt-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	for _, d := range debs {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		out, err := exec.CommandContext(cctx, "dpkg-deb", "-x", d, tmp).CombinedOutput()
		cancel()
		if err != nil {
			return "", fmt.Errorf("xentest: dpkg-deb -x %s: %v: %s", d, err, out)
		}
	}
	if _, err := os.Stat(filepath.Join(tmp, LibvirtDriverDir, LibvirtDriverFile)); err != nil {
		return "", fmt.Errorf("xentest: %s not in %v: %w", LibvirtDriverFile, debs, err)
	}
	if err := os.Rename(tmp, root); err != nil {
		if _, err2 := os.Stat(filepath.Join(root, LibvirtDriverDir, LibvirtDriverFile)); err2 == nil {
			return root, nil // lost a race
		}
		return "", err
	}
	return root, nil
}

// AddLibvirt adds to t (a Dom0Tree) what libvirtd with the libxl driver
// needs in dom0: the host's libvirtd and virsh with their libraries (the
// Xen libraries from x's packages), the driver module unpacked by
// FindLibvirtXen (lvRoot), libvirt's CPU map, libvirtd.conf and
// libxl.conf, and the users and groups file libvirt reads. Only the libxl
// driver is there: libvirtd skips the modules it does not find.
func AddLibvirt(t *vmtest.Tree, x *Xen, lvRoot string) error {
	dirs := x.LibDirs()
	if err := t.AddELF(HostLibvirtd, HostLibvirtd, dirs); err != nil {
		return err
	}
	if err := t.AddELF(HostVirsh, HostVirsh, dirs); err != nil {
		return err
	}
	drv := filepath.Join(LibvirtDriverDir, LibvirtDriverFile)
	if err := t.AddELF(drv, filepath.Join(lvRoot, drv), dirs); err != nil {
		return err
	}
	maps, err := filepath.Glob(filepath.Join(hostCPUMapDir, "*.xml"))
	if err != nil || len(maps) == 0 {
		return fmt.Errorf("xentest: no libvirt CPU map in %s (libvirt0 installed?): %v", hostCPUMapDir, err)
	}
	for _, m := range maps {
		if err := t.AddHostFile(m, m, 0o644); err != nil {
			return err
		}
	}
	// The emulated CPU fits no model of the map (see cpuModelTCG).
	index, err := os.ReadFile(filepath.Join(hostCPUMapDir, "index.xml"))
	if err != nil {
		return fmt.Errorf("xentest: %w", err)
	}
	const after = "<include filename='x86_features.xml'/>"
	if !strings.Contains(string(index), after) {
		return fmt.Errorf("xentest: %s/index.xml has no %s to add the TCG model after", hostCPUMapDir, after)
	}
	t.AddFile(filepath.Join(hostCPUMapDir, "index.xml"), 0o644,
		[]byte(strings.Replace(string(index), after, after+"\n    <include filename='"+cpuModelTCGFile+"'/>", 1)))
	t.AddFile(filepath.Join(hostCPUMapDir, cpuModelTCGFile), 0o644, []byte(cpuModelTCG))
	t.AddFile("etc/libvirt/libvirtd.conf", 0o644, []byte(libvirtdConf))
	t.AddFile("etc/libvirt/libxl.conf", 0o644, []byte(libxlConf))
	if !t.Has("etc/passwd") {
		t.AddFile("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	}
	if !t.Has("etc/group") {
		t.AddFile("etc/group", 0o644, []byte("root:x:0:\n"))
	}
	return nil
}

// Libvirtd is a libvirtd started in dom0 by StartLibvirtd.
type Libvirtd struct {
	Pid     int
	Socket  string        // its read-write unix socket
	Started time.Duration // from exec until the socket accepted a connection
}

// StartLibvirtd starts libvirtd (daemonized, -d) in a dom0 booted with
// Config.Libvirt and waits until its socket accepts connections; the
// daemon is killed by its pid (SIGTERM, then SIGKILL) at t's cleanup.
// The libxl driver may still be initializing then: libvirtd answers a
// client only once its drivers are up, so the first call can take longer.
func StartLibvirtd(t testing.TB) *Libvirtd {
	t.Helper()
	if !InDom0() {
		t.Fatal("xentest: StartLibvirtd runs in a xentest dom0")
	}
	l, err := startLibvirtd(context.Background())
	if l != nil {
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("libvirtd log:\n%s", LibvirtLogs())
			}
			lvtest.StopPid(l.Pid, syscall.SIGTERM)
		})
	}
	if err != nil {
		t.Fatalf("%v\nlibvirtd log:\n%s", err, LibvirtLogs())
	}
	return l
}

func startLibvirtd(ctx context.Context) (*Libvirtd, error) {
	for _, d := range []string{"/run/libvirt", "/var/log/libvirt", "/var/lib/libvirt", "/etc/libvirt/libxl", "/var/lib/xen/dump"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("xentest: %w", err)
		}
	}
	if _, err := os.Stat(filepath.Join(LibvirtDriverDir, LibvirtDriverFile)); err != nil {
		return nil, fmt.Errorf("xentest: no libxl driver in dom0 (boot with Config.Libvirt): %w", err)
	}
	t0 := time.Now()
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	// -d: the parent returns once the daemon is set up.
	out, err := exec.CommandContext(cctx, HostLibvirtd, "-d", "-p", LibvirtdPidFile).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("xentest: libvirtd -d: %w: %s", err, out)
	}
	b, err := os.ReadFile(LibvirtdPidFile)
	if err != nil {
		return nil, fmt.Errorf("xentest: libvirtd pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil, fmt.Errorf("xentest: libvirtd pid file %s holds %q", LibvirtdPidFile, b)
	}
	l := &Libvirtd{Pid: pid, Socket: LibvirtdSocket}
	for {
		c, err := net.DialTimeout("unix", l.Socket, time.Second)
		if err == nil {
			c.Close()
			l.Started = time.Since(t0)
			return l, nil
		}
		if cctx.Err() != nil {
			return l, fmt.Errorf("xentest: libvirtd's socket %s: %w (%w)", l.Socket, err, cctx.Err())
		}
		if syscall.Kill(pid, 0) != nil {
			return l, fmt.Errorf("xentest: libvirtd (pid %d) exited", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// LibvirtLogs returns the tails of libvirtd's log and of the libxl
// driver's logs (for failure messages).
func LibvirtLogs() string {
	var b strings.Builder
	files := []string{LibvirtdLog}
	m, _ := filepath.Glob(filepath.Join(LibxlLogDir, "*.log"))
	files = append(files, m...)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				fmt.Fprintf(&b, "%s: %v\n", f, err)
			}
			continue
		}
		fmt.Fprintf(&b, "== %s\n%s\n", f, Tail(string(data), 30))
	}
	return b.String()
}
