package daemon

// Guests outlive their daemon (issue 8, item 6): a daemon that stops
// leaves its QEMU guests running and writes where they are into its state
// directory; the next daemon re-attaches to them. Only an explicit
// command (`remusd stop VM`) stops a guest. A configured VM the state
// directory says was protected or took over here, and which is gone,
// is not started automatically: it may be running on the other host.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/hypervisor/xen"
)

// reattachTimeout bounds re-attaching to one running QEMU.
const reattachTimeout = 30 * time.Second

// bringUpQemu makes a configured QEMU VM known at daemon start: re-attached
// (a previous daemon left it running), launched (autostart), or stopped.
func (d *Daemon) bringUpQemu(q QemuVM) error {
	v := &vm{name: q.Name, backend: "qemu", role: RoleStopped, qcfg: &q,
		qnet: qemuNet{tap: q.Tap, bridge: q.Bridge, bridged: q.Bridge != "" || q.Bridged}}
	d.vms[q.Name] = v
	rec, err := d.records.load(q.Name)
	if err != nil {
		// This VM only: the others (and the replicas this host keeps) go on.
		v.stoppedWhy = fmt.Sprintf("its state record is unreadable (%v): not started; check whether it runs, then fix or remove the file", err)
		d.log.Error("unreadable state record: the VM is left alone", zap.String("vm", q.Name), zap.Error(err))
		return nil
	}
	if rec != nil {
		g, pid, attached, err := d.reattach(q, rec)
		if err == nil {
			v.guest, v.pid, v.attached, v.role = g, pid, attached, rec.Role
			if rec.Role == RoleActive {
				// It runs on the standby's tap.
				if t := g.Spec().Tap; t != "" && q.Tap == "" {
					v.qnet = d.standbyNet(q, g.Spec())
				}
			}
			if rec.Role == RolePrimary && rec.Protection != nil {
				p := *rec.Protection
				v.resume = &p
				v.busy = "resuming protection"
			}
			d.log.Warn("re-attached to a guest a previous daemon left running", zap.String("vm", q.Name), zap.String("role", rec.Role), zap.Int("pid", pid))
			return nil
		}
		if unprovable(q, rec) {
			// A libvirt domain has no QEMU pid of ours to check: failing
			// to re-attach (libvirtd restarting, a timeout) does not prove
			// it gone. It may run on with its output held by the rules a
			// previous daemon left: leave it, and them, alone.
			v.stoppedWhy = fmt.Sprintf("this daemon cannot re-attach to it (%v) and cannot tell whether it still runs (no QEMU pid recorded: a libvirt domain); it is left alone, its output held as it was: restart remusd once libvirtd answers", err)
			d.log.Error("cannot re-attach to a recorded libvirt guest, which may still run: leaving it and its output rules alone", zap.String("vm", q.Name), zap.Error(err))
			return nil
		}
		if rec.QEMU != nil && processAlive(rec.QEMU.Pid, rec.QEMU.QMP) == nil {
			// Alive but unreachable (QMP busy, another client, a hung
			// QEMU): never launch a second one on its RAM file.
			v.stoppedWhy = fmt.Sprintf("its QEMU (pid %d) is alive but this daemon cannot attach to it (%v); a second copy is not started: find out what holds its QMP socket, then restart remusd (or end that pid if the guest must go)", rec.QEMU.Pid, err)
			d.log.Error("a recorded guest is alive but cannot be re-attached: leaving it alone", zap.String("vm", q.Name), zap.Int("pid", rec.QEMU.Pid), zap.Error(err))
			return nil
		}
		d.log.Warn("a guest recorded in the state directory is gone", zap.String("vm", q.Name), zap.String("role", rec.Role), zap.Error(err))
		if p := rec.Protection; p != nil && p.OutBuf != "" {
			// The guest is dead, so it has no output to hold; its dead
			// daemon's queue rules would drop the next guest's.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			rerr := removeStaleNetBuffer(ctx, p.OutBuf, netBufferSpec{Interface: v.qnet.tap, Bridged: v.qnet.bridged, QueueNum: p.Queue})
			cancel()
			if rerr != nil {
				d.log.Error("cannot remove a dead guest's output buffer rules: a guest started on its tap may be cut off", zap.String("vm", q.Name), zap.Error(rerr))
			} else {
				d.log.Info("removed the output buffer rules a dead guest's daemon left", zap.String("vm", q.Name), zap.String("kind", p.OutBuf), zap.String("tap", v.qnet.tap))
			}
		}
		if rec.Role == RolePrimary || rec.Role == RoleActive {
			v.stoppedWhy = fmt.Sprintf("it was %s here when the daemon stopped and is gone (%v); it may run on the other host now, so it is not started automatically: `remusd start %s` if it runs nowhere",
				rec.Role, err, q.Name)
			return nil
		}
		_ = d.records.remove(q.Name)
	}
	if !q.autostart() {
		v.stoppedWhy = "autostart is off: this host backs the VM up or runs it after a failover"
		return nil
	}
	return d.launch(v)
}

// launch starts v's configured QEMU (or attaches to the libvirt domain).
// d.mu held or not yet shared (New).
func (d *Daemon) launch(v *vm) error {
	ctx, cancel := context.WithTimeout(context.Background(), qemuStartTimeout)
	defer cancel()
	if q := v.qcfg; !q.Libvirt && q.QMP == "" {
		spec := q.qemuSpec(d.cfg.Name, nil)
		if pid := qemuUsing(spec.RAMPath, spec.QMPPath); pid > 0 {
			return fmt.Errorf("a process (pid %d) still uses %s or %s: the VM may still run here; not launching a second copy", pid, spec.RAMPath, spec.QMPPath)
		}
	}
	g, attached, err := d.startQemu(ctx, *v.qcfg)
	if err != nil {
		return err
	}
	v.guest, v.attached, v.role, v.stoppedWhy, v.pid = g, attached, RoleLocal, "", g.Pid()
	d.saveRecord(v)
	d.log.Info("qemu VM running", zap.String("vm", v.name), zap.Bool("attached", attached), zap.Int("pid", g.Pid()),
		zap.String("tap", v.qcfg.Tap), zap.String("serial", g.Spec().SerialPath))
	return nil
}

// reattach connects to the QEMU a record names, if it still runs.
func (d *Daemon) reattach(q QemuVM, rec *vmRecord) (*qemu.Guest, int, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), reattachTimeout)
	defer cancel()
	if rec.Backend != qemu.BackendName || rec.QEMU == nil {
		return nil, 0, false, fmt.Errorf("record of backend %q without QEMU details", rec.Backend)
	}
	switch rec.Role {
	case RoleLocal, RolePrimary, RoleActive:
	default:
		return nil, 0, false, fmt.Errorf("record of role %q", rec.Role)
	}
	if q.Libvirt {
		g, _, err := d.startLibvirt(ctx, q)
		if err != nil {
			return nil, 0, false, err
		}
		return g, 0, true, nil
	}
	r := rec.QEMU
	if err := processAlive(r.Pid, r.QMP); err != nil {
		return nil, 0, false, err
	}
	// This host's description of the VM, at the paths it runs under.
	spec := q.qemuSpec(d.cfg.Name, d.cachedImage(ctx, q))
	spec.QMPPath, spec.RAMPath, spec.SerialPath = r.QMP, r.RAM, r.Serial
	if rec.Role == RoleActive && q.Tap == "" && spec.MAC != "" {
		spec.Tap = d.cfg.Standby.TapFor(q.Name)
	}
	if !r.Launched {
		g, err := qemu.Attach(ctx, r.QMP, r.RAM, d.log)
		if err != nil {
			return nil, 0, false, err
		}
		spec.MemoryMiB = g.Spec().MemoryMiB
		g.SetSpec(spec)
		return g, r.Pid, true, nil
	}
	g, err := qemu.ReattachWithDisks(ctx, spec, r.Pid, qemu.DiskOptions{JournalBytes: d.cfg.diskJournalBytes()}, d.log)
	if err != nil {
		return nil, 0, false, err
	}
	if g.Paused() && rec.Role != RolePrimary {
		// The previous daemon died inside an epoch's pause: an unprotected
		// guest must not stay stopped. (A primary's guest is resumed by its
		// protection's first checkpoint.)
		if err := g.Resume(ctx); err != nil {
			g.Detach()
			return nil, 0, false, fmt.Errorf("resume the re-attached guest: %w", err)
		}
	}
	return g, r.Pid, false, nil
}

// cachedImage returns the guest image a use_guestimage VM boots (for its
// spec), or nil.
func (d *Daemon) cachedImage(ctx context.Context, q QemuVM) *guestimage.Image {
	if !q.UseGuestImage {
		return nil
	}
	img, err := guestimage.Build(ctx, guestimage.Config{})
	if err != nil {
		d.log.Warn("guest image unavailable for a re-attached VM's description", zap.String("vm", q.Name), zap.Error(err))
		return nil
	}
	return img
}

// unprovable reports whether a recorded guest that could not be
// re-attached cannot be proved gone: no QEMU pid was recorded (a libvirt
// domain). Only a recorded pid that is no longer that QEMU proves it.
func unprovable(q QemuVM, rec *vmRecord) bool {
	return q.Libvirt || rec.QEMU == nil || rec.QEMU.Pid <= 0
}

// processAlive checks that pid runs and is the QEMU serving qmpPath (a
// recycled pid is not ours).
func processAlive(pid int, qmpPath string) error {
	if pid <= 0 {
		return errors.New("no pid recorded")
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return fmt.Errorf("process %d: %w", pid, err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", fmt.Sprint(pid), "cmdline"))
	if err != nil {
		return fmt.Errorf("process %d: %w", pid, err)
	}
	if !strings.Contains(string(b), qmpPath) {
		return fmt.Errorf("process %d is not the QEMU serving %s (pid reused)", pid, qmpPath)
	}
	return nil
}

// Start implements Service: it launches a configured QEMU VM that does not
// run here.
func (d *Daemon) Start(ctx context.Context, name string) error {
	d.mu.Lock()
	v, err := d.lookup("start", name)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	switch {
	case v.role == RoleBackup:
		d.mu.Unlock()
		return fmt.Errorf("start %s: this host holds its replica (role backup): use `remusd failover %s` to run it from the replica, or `remusd forget %s` first", name, name, name)
	case v.role != RoleStopped:
		d.mu.Unlock()
		return fmt.Errorf("start %s: already running here (role %s)", name, v.role)
	case v.qcfg == nil && v.xcfg == nil:
		d.mu.Unlock()
		return fmt.Errorf("start %s: no qemu_vms or xen_vms entry describes it on %s", name, d.cfg.Name)
	}
	v.busy = "starting"
	d.mu.Unlock()
	if v.xcfg != nil {
		err = d.startXen(ctx, v)
	} else {
		err = d.launch(v)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	v.busy = ""
	if err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	d.log.Warn("VM started by the operator", zap.String("vm", name))
	return nil
}

// Stop implements Service: it stops a QEMU VM that runs here unprotected
// (QMP quit, killed after a grace period if it does not exit).
func (d *Daemon) Stop(ctx context.Context, name string) error {
	d.mu.Lock()
	v, err := d.lookup("stop", name)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	fenced := v.role == RolePrimary && v.w.view == WitnessFenced
	switch {
	case v.role == RolePrimary && !fenced:
		d.mu.Unlock()
		return fmt.Errorf("stop %s: it is protected: `remusd unprotect %s` first (stopping a protected VM would look like a failure to its backup)", name, name)
	case fenced:
		// A fenced copy: its protection stopped, its guest is paused.
	case v.role != RoleLocal && v.role != RoleActive:
		d.mu.Unlock()
		return fmt.Errorf("stop %s: it does not run here (role %s)", name, v.role)
	case v.backend == sim.BackendName:
		d.mu.Unlock()
		return fmt.Errorf("stop %s: a %s guest runs as long as its daemon", name, v.backend)
	}
	g := v.guest
	v.busy = "stopping"
	d.mu.Unlock()
	err = d.stopGuest(ctx, g)
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, isXen := g.(*xen.Guest); isXen && err != nil {
		// The domain may still exist (paused): it stays this VM's, with
		// its record, for another try.
		v.busy = ""
		return fmt.Errorf("stop %s: %w", name, err)
	}
	v.busy, v.guest, v.role, v.stoppedWhy = "", nil, RoleStopped, "stopped by the operator"
	v.backup, v.qreplica, v.primary, v.w = nil, nil, nil, wstate{}
	if rerr := d.records.remove(name); rerr != nil {
		d.log.Error("remove state record", zap.String("vm", name), zap.Error(rerr))
	}
	if v.qcfg == nil && v.xcfg == nil {
		delete(d.vms, name)
	}
	d.log.Warn("VM stopped by the operator", zap.String("vm", name), zap.Error(err))
	if err != nil {
		return fmt.Errorf("stop %s: %w", name, err)
	}
	return nil
}

// qemuUsing returns the pid of a process whose command line names the
// RAM file or QMP socket (a QEMU still running this VM), or 0.
func qemuUsing(ramPath, qmpPath string) int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, arg := range strings.Split(string(b), "\x00") {
			if strings.Contains(arg, "mem-path="+ramPath+",") || strings.Contains(arg, "unix:"+qmpPath+",") {
				if !zombie(pid) {
					return pid
				}
			}
		}
	}
	return 0
}
