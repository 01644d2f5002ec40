// Package lvtest starts a private libvirtd (and virtlogd) for tests: in its
// own mount namespace, with /run/libvirt, /etc/libvirt, /var/lib/libvirt,
// /var/cache/libvirt and /var/log/libvirt bind-mounted from a temporary
// directory, so it does not collide with a system libvirtd or another
// test's. Guest RAM files go to a private directory under /dev/shm
// (memory_backing_dir), visible outside the namespace at the same path.
//
// Needs root, unshare (util-linux) and the Debian packages libvirt-daemon,
// libvirt-daemon-driver-qemu and libvirt-clients (virsh), plus the system
// user libvirt-qemu, which libvirtd's QEMU driver resolves at start even
// when qemu.conf says user = "root" (lvtest creates it when missing: the
// package that normally does, libvirt-daemon-system, pulls in systemd,
// polkit and firewalld).
package lvtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Libvirtd is a running private libvirtd.
type Libvirtd struct {
	Dir    string // private root (run/, etc/, lib/, cache/, log/)
	Socket string // libvirtd's read-write socket
	RAMDir string // memory_backing_dir
	t      testing.TB
}

// URI is the virsh/libvirt URI of this libvirtd.
func (l *Libvirtd) URI() string { return "qemu+unix:///system?socket=" + l.Socket }

// Virsh runs virsh against this libvirtd and returns its output.
func (l *Libvirtd) Virsh(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", l.URI()}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("virsh %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// Define defines a domain from xml without starting it.
func (l *Libvirtd) Define(ctx context.Context, name, xml string) error {
	f := filepath.Join(l.Dir, name+".xml")
	if err := os.WriteFile(f, []byte(xml), 0o600); err != nil {
		return err
	}
	_, err := l.Virsh(ctx, "define", f)
	return err
}

// DefineAndStart defines and starts a domain from xml.
func (l *Libvirtd) DefineAndStart(ctx context.Context, name, xml string) error {
	if err := l.Define(ctx, name, xml); err != nil {
		return err
	}
	_, err := l.Virsh(ctx, "start", name)
	return err
}

// Log returns the tail of libvirtd's log (for failure messages).
func (l *Libvirtd) Log() string {
	b, _ := os.ReadFile(filepath.Join(l.Dir, "libvirtd.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Start starts a private virtlogd + libvirtd, or skips the test saying
// why it cannot. Everything is stopped and removed at the test's end
// (domains destroyed first, so no QEMU outlives the test).
func Start(t testing.TB) *Libvirtd {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("libvirt tests need root (libvirtd in system mode, mount namespace)")
	}
	for _, bin := range []string{"libvirtd", "virtlogd", "virsh", "unshare", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("libvirt tests need %s (apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86): %v", bin, err)
		}
	}
	if err := ensureQEMUUser(); err != nil {
		t.Skipf("libvirtd needs the user libvirt-qemu: %v", err)
	}
	dir, err := os.MkdirTemp("", "lvt-")
	if err != nil {
		t.Fatal(err)
	}
	ramDir, err := os.MkdirTemp("/dev/shm", "remusd-lvt-")
	if err != nil {
		t.Fatal(err)
	}
	l := &Libvirtd{Dir: dir, Socket: filepath.Join(dir, "run", "libvirt-sock"), RAMDir: ramDir, t: t}
	for _, d := range []string{"run", "etc/qemu", "lib", "cache", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	qemuConf := fmt.Sprintf(`memory_backing_dir = %q
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
stdio_handler = "logd"
`, ramDir)
	files := map[string]string{
		"etc/qemu.conf":     qemuConf,
		"etc/libvirtd.conf": "unix_sock_dir = \"/run/libvirt\"\nunix_sock_rw_perms = \"0700\"\n",
		"etc/virtlogd.conf": "",
	}
	for f, c := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The mount points must exist on the host for the bind mounts.
	for _, d := range []string{"/run/libvirt", "/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Skipf("cannot create mount point %s: %v", d, err)
		}
	}
	script := fmt.Sprintf(`set -e
mount --bind %[1]s/run /run/libvirt
mount --bind %[1]s/etc /etc/libvirt
mount --bind %[1]s/lib /var/lib/libvirt
mount --bind %[1]s/cache /var/cache/libvirt
mount --bind %[1]s/log /var/log/libvirt
export LIBVIRT_LOG_OUTPUTS="3:file:%[1]s/libvirtd.log"
virtlogd -d -p %[1]s/virtlogd.pid
libvirtd -d -p %[1]s/libvirtd.pid
`, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
	out, err := cmd.CombinedOutput()
	t.Cleanup(l.stop)
	if err != nil {
		t.Skipf("cannot start libvirtd (unshare + virtlogd -d + libvirtd -d): %v: %s %s", err, out, l.Log())
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(l.Socket); err == nil {
			if _, err := l.Virsh(context.Background(), "version"); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Skipf("libvirtd did not come up within 30s: %s", l.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return l
}

func (l *Libvirtd) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := l.Virsh(ctx, "list", "--all", "--name"); err == nil {
		for _, name := range strings.Fields(out) {
			_, _ = l.Virsh(ctx, "destroy", name)
			_, _ = l.Virsh(ctx, "undefine", name)
		}
	}
	// QEMUs still alive (libvirtd gone): kill them by their pid files.
	qpids, _ := filepath.Glob(filepath.Join(l.Dir, "run", "qemu", "*.pid"))
	for _, f := range qpids {
		killPidFile(f, syscall.SIGKILL)
	}
	killPidFile(filepath.Join(l.Dir, "libvirtd.pid"), syscall.SIGTERM)
	killPidFile(filepath.Join(l.Dir, "virtlogd.pid"), syscall.SIGTERM)
	if l.t.Failed() {
		l.t.Logf("libvirtd log: %s", l.Log())
	}
	os.RemoveAll(l.RAMDir)
	os.RemoveAll(l.Dir)
}

// killPidFile signals the process in a pid file and waits for it (see
// StopPid).
func killPidFile(path string, sig syscall.Signal) {
	b, err := os.ReadFile(path)
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return
	}
	StopPid(pid, sig)
}

// StopPid sends sig to pid and waits up to 10 s for it to exit (SIGKILL
// after that). pid 0 and 1 are left alone.
func StopPid(pid int, sig syscall.Signal) {
	if pid <= 1 || syscall.Kill(pid, sig) != nil {
		return
	}
	for i := 0; i < 200; i++ {
		if !alive(pid) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// alive says whether pid runs (a zombie does not: a daemon re-parented to
// an init that does not reap stays one).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// ensureQEMUUser creates the system group and user libvirt-qemu if absent.
func ensureQEMUUser() error {
	if exec.Command("getent", "passwd", "libvirt-qemu").Run() == nil {
		return nil
	}
	if exec.Command("getent", "group", "libvirt-qemu").Run() != nil {
		if out, err := exec.Command("groupadd", "--system", "libvirt-qemu").CombinedOutput(); err != nil {
			return fmt.Errorf("groupadd: %v: %s", err, out)
		}
	}
	out, err := exec.Command("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
		"--shell", "/usr/sbin/nologin", "-g", "libvirt-qemu", "libvirt-qemu").CombinedOutput()
	if err != nil {
		return fmt.Errorf("useradd: %v: %s", err, out)
	}
	return nil
}

// Domain describes a small TCG test domain: BIOS only, or direct kernel
// boot when Kernel is set; shared file memory backing when Shared is set;
// a serial port writing to the file Serial when set.
type Domain struct {
	Name                    string
	MemoryMiB               int
	Shared                  bool
	Kernel, Initrd, Cmdline string
	Serial                  string
}

// XML returns the domain XML (q35, no USB, no balloon).
func (d Domain) XML() string {
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='qemu'>\n  <name>%s</name>\n  <memory unit='MiB'>%d</memory>\n  <vcpu>1</vcpu>\n", d.Name, d.MemoryMiB)
	if d.Shared {
		b.WriteString("  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>\n")
	}
	b.WriteString("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n")
	for tag, v := range map[string]string{"kernel": d.Kernel, "initrd": d.Initrd, "cmdline": d.Cmdline} {
		if v != "" {
			fmt.Fprintf(&b, "    <%s>%s</%s>\n", tag, v, tag)
		}
	}
	b.WriteString("  </os>\n  <on_crash>destroy</on_crash>\n  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n")
	if d.Serial != "" {
		fmt.Fprintf(&b, "    <serial type='file'><source path='%s'/><target port='0'/></serial>\n", d.Serial)
	}
	b.WriteString("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n")
	return b.String()
}
