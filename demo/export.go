package demo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/netlab"
	"github.com/remusd/remusd/vmtest"
)

// This file exports the pieces of the QEMU demo that other packages (the
// benchmark harness) reuse: the same topology, daemons and guest as
// `remusd demo --backend qemu`, without the demo's script.

// QEMUPrereqs reports why the QEMU lab cannot run here (nil: it can,
// modulo the guest image, which QEMULab builds or takes from its cache).
func QEMUPrereqs() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces, tap devices, NFQUEUE output buffering)")
	}
	if err := netlab.Check(); err != nil {
		return err
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		return err
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return errors.New("iptables not installed (output buffering uses NFQUEUE)")
	}
	return nil
}

// QEMULabConfig configures StartQEMULab.
type QEMULabConfig struct {
	// Exe is the remusd binary started as `remusd serve` on both hosts.
	Exe string
	// Prefix of the network namespaces (default "rb").
	Prefix string
	// MemoryMiB of the guest (default 128).
	MemoryMiB int
	// EpochInterval is the daemons' default (default 50 ms).
	EpochInterval time.Duration
	// HeartbeatTimeout of the backup (default 1 s; heartbeats every
	// tenth of it) and Takeover (default auto: a witness, `remusd witness
	// serve`, runs on the topology's witness host).
	HeartbeatTimeout time.Duration
	Takeover         string
	Log              *zap.Logger
	// DiskMiB > 0 gives the guest a protected virtio disk of that size
	// holding ext4 (mounted on /data; remus-guestsvc's LOG and FILL write
	// to it). Host A's image is made with mkfs.ext4; host B's daemon
	// creates its replica image.
	DiskMiB int64
	// Tweak, if set, adjusts the two daemons' configurations (host A's,
	// host B's) before they start.
	Tweak func(a, b *daemon.Config)
}

// QEMULab is the demo's topology with the guest booted on hostA and a
// backup daemon on hostB; the guest is not protected yet.
type QEMULab struct {
	Cfg        QEMULabConfig
	QEMU       string // version
	Kernel     string // guest kernel version
	ClientNS   string
	ServiceAdr string // guest service HOST:PORT
	VM         string
	PeerAddr   string // the backup's replication address
	Primary    daemon.ControlClient
	Backup     daemon.ControlClient
	BootTime   time.Duration
	// DiskA and DiskB are the disk images of hosts A and B (DiskMiB > 0).
	DiskA, DiskB string

	q         *qrun
	n         *netlab.Remus
	shm       string
	primary   *DaemonProc
	backup    *DaemonProc
	witness   *WitnessProc
	primaryNS string
	acfg      daemon.Config
}

// StartQEMULab builds the guest image (cached), the namespaces, starts the
// two daemons (the primary launches QEMU) and waits for the guest's
// service. Close releases everything.
func StartQEMULab(ctx context.Context, cfg QEMULabConfig) (l *QEMULab, err error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "rb"
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 128
	}
	if cfg.EpochInterval == 0 {
		cfg.EpochInterval = 50 * time.Millisecond
	}
	if cfg.HeartbeatTimeout == 0 {
		cfg.HeartbeatTimeout = time.Second
	}
	if cfg.Takeover == "" {
		cfg.Takeover = daemon.TakeoverAuto
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Exe == "" {
		return nil, errors.New("demo: QEMULabConfig.Exe (the remusd binary) is required")
	}
	if err := QEMUPrereqs(); err != nil {
		return nil, err
	}
	qemuBin, err := vmtest.FindQEMU()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	l = &QEMULab{Cfg: cfg, QEMU: qemuVersion(ctx, qemuBin), VM: qemuVM, ServiceAdr: netlab.GuestIP + ":" + qemuPort}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	dir, err := os.MkdirTemp("", "remusd-bench-")
	if err != nil {
		return l, err
	}
	l.q = &qrun{o: qemuOptions{json: true, interval: cfg.EpochInterval, memMiB: cfg.MemoryMiB, takeover: cfg.Takeover, hbTO: cfg.HeartbeatTimeout, dir: dir},
		log: cfg.Log, dir: dir, t0: t0}
	if l.shm, err = os.MkdirTemp("/dev/shm", qemuShmPf); err != nil {
		return l, err
	}
	bctx, bcancel := context.WithTimeout(ctx, 10*time.Minute)
	img, err := guestimage.Build(bctx, guestimage.Config{})
	bcancel()
	if err != nil {
		return l, fmt.Errorf("guest image: %w (sh vmtest/setup.sh installs its inputs)", err)
	}
	l.Kernel = img.KernelVersion
	if l.n, err = netlab.NewRemus(ctx, cfg.Prefix); err != nil {
		return l, fmt.Errorf("topology: %w", err)
	}
	l.ClientNS, l.primaryNS = l.n.Client, l.n.A
	if cfg.Takeover == daemon.TakeoverAuto {
		if l.witness, err = StartWitness(ctx, cfg.Exe, l.n.W, netlab.WitnessIP, witnessPort, filepath.Join(l.q.dir, "witness")); err != nil {
			return l, err
		}
	}
	acfg, bcfg, err := qemuPairConfigs(l.q.dir, l.shm, cfg.MemoryMiB, cfg.EpochInterval, cfg.HeartbeatTimeout, cfg.Takeover, l.witness)
	if err != nil {
		return l, err
	}
	if cfg.DiskMiB > 0 {
		if l.DiskA, l.DiskB, err = addGuestDisk(ctx, dir, cfg.DiskMiB, &acfg, &bcfg); err != nil {
			return l, err
		}
	}
	if cfg.Tweak != nil {
		cfg.Tweak(&acfg, &bcfg)
	}
	l.acfg = acfg
	l.PeerAddr = bcfg.Listen
	l.Primary = daemon.ControlClient{Path: acfg.Control, Timeout: 5 * time.Second}
	l.Backup = daemon.ControlClient{Path: bcfg.Control, Timeout: 5 * time.Second}
	if l.backup, err = StartDaemon(ctx, StartOptions{Exe: cfg.Exe, Dir: l.q.dir, Netns: l.n.B, Wait: 3 * time.Minute}, bcfg); err != nil {
		return l, err
	}
	if l.primary, err = StartDaemon(ctx, StartOptions{Exe: cfg.Exe, Dir: l.q.dir, Netns: l.n.A, Wait: 3 * time.Minute}, acfg); err != nil {
		return l, err
	}
	wctx, wcancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err = guestimage.WaitReady(wctx, filepath.Join(l.shm, "a", qemuVM+".serial"))
	wcancel()
	if err != nil {
		return l, err
	}
	l.BootTime = time.Since(t0)
	return l, nil
}

// Dial opens a TCP connection from the client namespace to the guest's
// service.
func (l *QEMULab) Dial(ctx context.Context) (net.Conn, error) {
	return netlab.Dial(ctx, l.ClientNS, l.ServiceAdr)
}

// Protect protects the guest to the backup at the given epoch interval
// (0: the daemon's default) and waits until minAcked epochs are
// acknowledged.
func (l *QEMULab) Protect(ctx context.Context, interval time.Duration, minAcked uint64) error {
	if err := l.Primary.Protect(ctx, daemon.ProtectRequest{VM: qemuVM, Peer: l.PeerAddr, EpochInterval: interval}); err != nil {
		return fmt.Errorf("protect: %w", err)
	}
	var ps daemon.VMStatus
	if err := waitUntil(ctx, 2*time.Minute, func() (bool, error) {
		st, err := l.Primary.VMStatus(ctx, qemuVM)
		ps = st
		return err == nil && st.AckedEpoch >= minAcked, nil
	}); err != nil {
		return fmt.Errorf("no epochs acknowledged (primary status %+v): %w", ps, err)
	}
	return nil
}

// Unprotect stops protecting the guest (its held output is released).
func (l *QEMULab) Unprotect(ctx context.Context) error {
	return l.Primary.Unprotect(ctx, qemuVM)
}

// PrimaryStatus and BackupStatus are the guest's status on each host.
func (l *QEMULab) PrimaryStatus(ctx context.Context) (daemon.VMStatus, error) {
	return l.Primary.VMStatus(ctx, qemuVM)
}

// BackupStatus is the guest's status on the backup host.
func (l *QEMULab) BackupStatus(ctx context.Context) (daemon.VMStatus, error) {
	return l.Backup.VMStatus(ctx, qemuVM)
}

// PrimaryDaemon and BackupDaemon are the two `remusd serve` processes.
func (l *QEMULab) PrimaryDaemon() *DaemonProc { return l.primary }

// BackupDaemon is host B's daemon process.
func (l *QEMULab) BackupDaemon() *DaemonProc { return l.backup }

// PrimaryNetns is host A's network namespace.
func (l *QEMULab) PrimaryNetns() string { return l.primaryNS }

// RestartPrimary starts host A's daemon again (same configuration and
// state directory) after it exited or was killed; its guests are left to
// it to re-attach.
func (l *QEMULab) RestartPrimary(ctx context.Context) error {
	if l.primary != nil {
		select {
		case <-l.primary.Done():
		default:
			return errors.New("demo: the primary's daemon still runs")
		}
	}
	p, err := StartDaemon(ctx, StartOptions{Exe: l.Cfg.Exe, Dir: l.q.dir, Netns: l.primaryNS, Wait: 3 * time.Minute}, l.acfg)
	if err != nil {
		return err
	}
	l.primary = p
	return nil
}

// KillPrimary SIGKILLs everything in the primary host's namespace (remusd
// and its QEMU), as the demo does, and returns the time of the kill.
func (l *QEMULab) KillPrimary() time.Time {
	pids := netlab.Pids(l.primaryNS)
	at := time.Now()
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	netlab.KillAll(l.primaryNS)
	if l.primary != nil {
		<-l.primary.Done()
	}
	return at
}

// WaitActive waits until the backup has taken over and returns its status
// (ActivatedAtUnixMs, ActivationMs).
func (l *QEMULab) WaitActive(ctx context.Context, limit time.Duration) (daemon.VMStatus, error) {
	var active daemon.VMStatus
	err := waitUntil(ctx, limit, func() (bool, error) {
		st, err := l.Backup.VMStatus(ctx, qemuVM)
		active = st
		return err == nil && st.Role == daemon.RoleActive, nil
	})
	return active, err
}

// Close stops the daemons and removes the namespaces and files.
func (l *QEMULab) Close() {
	if l.q != nil {
		if l.primary != nil {
			l.primary.Stop()
		}
		if l.backup != nil {
			l.backup.Stop()
		}
	}
	l.primary, l.backup = nil, nil
	if l.witness != nil {
		l.witness.Stop()
		l.witness = nil
	}
	if l.n != nil {
		if err := l.n.Close(); err != nil {
			l.Cfg.Log.Warn("netlab cleanup", zap.Error(err))
		}
		l.n = nil
	}
	if l.shm != "" {
		os.RemoveAll(l.shm)
		l.shm = ""
	}
	if l.q != nil && l.q.dir != "" {
		os.RemoveAll(l.q.dir)
		l.q.dir = ""
	}
}

// qemuGuestConfig is the guest-image VM of the QEMU topology as one host
// configures it: on that host's tap and bridge; autostart on the primary,
// off on the backup (whose standby is built from it).
func qemuGuestConfig(memMiB int, tap, bridge, runDir string, autostart bool) daemon.QemuVM {
	return daemon.QemuVM{Name: qemuVM, MemoryMiB: memMiB, UseGuestImage: true, GuestIP: netlab.GuestIP + netlab.Prefix,
		Tap: tap, MAC: netlab.GuestMAC, Bridge: bridge, RunDir: runDir, Autostart: &autostart}
}

// witnessPort is the witness's client port in the QEMU topology.
const witnessPort = 2379

// qemuPairConfigs is the two hosts' daemon configuration of the QEMU
// topology, shared by the QEMU demo and the lab: host A runs the guest,
// host B backs it up from its own description of it; mutual TLS with a
// throw-away CA; the witness when takeover is auto.
// addGuestDisk gives the pair's guest a protected disk: host A's image (an
// empty ext4 made in dir) and host B's replica image path.
func addGuestDisk(ctx context.Context, dir string, mib int64, acfg, bcfg *daemon.Config) (a, b string, err error) {
	a, b = filepath.Join(dir, "disk0-a.img"), filepath.Join(dir, "disk0-b.img")
	if err := guestimage.MakeDisk(ctx, a, mib); err != nil {
		return "", "", err
	}
	acfg.QemuVMs[0].Disks = []daemon.QemuDisk{{ID: "disk0", Path: a, SizeMiB: mib}}
	bcfg.QemuVMs[0].Disks = []daemon.QemuDisk{{ID: "disk0", Path: b, SizeMiB: mib}}
	return a, b, nil
}

func qemuPairConfigs(dir, shm string, memMiB int, interval, hbTO time.Duration, takeover string, w *WitnessProc) (acfg, bcfg daemon.Config, err error) {
	common := func(name string) daemon.Config {
		c := daemon.DefaultConfig()
		c.Name = name
		c.Control = filepath.Join(dir, name+".sock")
		c.StateDir = filepath.Join(dir, name+"-state")
		c.EpochInterval = daemon.Duration(interval)
		c.HeartbeatInterval = daemon.Duration(hbTO / 10)
		c.HeartbeatTimeout = daemon.Duration(hbTO)
		c.Takeover = takeover
		if w != nil {
			c.Witness = w.Config()
		}
		return c
	}
	bcfg = common("hostB")
	bcfg.Listen = netlab.HostBIP + ":" + replPort
	bcfg.Standby = daemon.StandbyConfig{Tap: qemuTapB, Bridge: netlab.BridgeB, RunDir: filepath.Join(shm, "b")}
	acfg = common("hostA")
	acfg.Listen = netlab.HostAIP + ":" + replPort
	acfg.QemuVMs = []daemon.QemuVM{qemuGuestConfig(memMiB, qemuTapA, netlab.BridgeA, filepath.Join(shm, "a"), true)}
	// The backup describes the VM itself (its standby is built from this,
	// never from what the primary sends), on its own tap and bridge.
	bcfg.QemuVMs = []daemon.QemuVM{qemuGuestConfig(memMiB, qemuTapB, netlab.BridgeB, filepath.Join(shm, "b-run"), false)}
	if err := daemon.MeshConfigs(filepath.Join(dir, "tls"), &acfg, &bcfg); err != nil {
		return acfg, bcfg, err
	}
	return acfg, bcfg, nil
}
