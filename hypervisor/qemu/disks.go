package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/disk/nbd"
	"github.com/remusd/remusd/hypervisor"
)

// DiskSpec is one protected virtio-blk disk of a QEMU guest. QEMU reaches
// the image only through remusd's NBD server on a unix socket (its own
// block layer is the NBD client), so that remusd sees every write and can
// put it in the epoch in which it happened (issue 11; see disk).
//
// ID and SizeBytes are part of the machine (Config, CheckCompatible): the
// device's id and size must be the same on both hosts. Path and Socket are
// this host's own.
type DiskSpec struct {
	// ID names the disk: the QEMU node and device id and the NBD export
	// name. It matches DiskIDPattern.
	ID string `json:"id"`
	// SizeBytes is the image size; a multiple of 512.
	SizeBytes int64 `json:"size_bytes"`
	// Path is the raw image on this host. On the primary it must exist
	// with SizeBytes; a backup creates (or truncates) its replica image
	// there, sparse.
	Path string `json:"-"`
	// Socket is the NBD unix socket remusd serves the image on (default:
	// the QMP socket's path without ".qmp", then ".ID.nbd").
	Socket string `json:"-"`
	// PCISlot, when not 0, is the slot on pcie.0 (function 0) of the
	// disk's virtio-blk-pci device; 0 lets QEMU take the first free slot.
	// A machine field: a standby loads a device state only with the
	// device at the same PCI address (hypervisor/libvirt fixes it from the
	// domain XML). Omitted from Config when 0, so that an older peer still
	// parses a description without it.
	PCISlot int `json:"pci_slot,omitempty"`
}

// Slots of pcie.0 a disk may take: 0x00 is the host bridge and 0x1f the
// ICH9 functions of q35.
const (
	minDiskSlot = 1
	maxDiskSlot = 0x1e
)

// DiskIDPattern is what a disk ID may look like: it becomes a QEMU id, an
// NBD export name and a metric label.
const DiskIDPattern = `[a-z][a-z0-9_-]{0,31}`

var diskIDRE = regexp.MustCompile(`^` + DiskIDPattern + `$`)

// Limits on disks (also on a peer's description).
const (
	maxDisks     = 8
	maxDiskBytes = 16 << 40 // 16 TiB
)

// reconnectDelay is how long (seconds) QEMU's NBD client keeps a guest's
// disk requests waiting for remusd's disk server to come back (a daemon
// restart or upgrade) before it fails them with EIO.
const reconnectDelay = 60

// Defaults of the disk server. MaxPayload bounds one NBD write (QEMU
// splits larger ones), which bounds the journal's pause overdraft (16
// requests in flight of at most this size, see disk.Journal).
const (
	DefaultDiskJournalBytes = 64 << 20
	diskMaxPayload          = 2 << 20
	// DiskPauseAllowance is what a journal may hold beyond its bound
	// while the guest stops: QEMU's 16 NBD requests in flight of at most
	// diskMaxPayload each, plus each change's accounting
	// (disk.ChangeOverhead).
	DiskPauseAllowance = 16 * (diskMaxPayload + disk.ChangeOverhead)
)

// ValidateDisks checks disk IDs (unique, DiskIDPattern), sizes and count.
func ValidateDisks(ds []DiskSpec) error { return errors.Join(validateDisks(ds)...) }

func validateDisks(ds []DiskSpec) []error {
	var errs []error
	if len(ds) > maxDisks {
		errs = append(errs, fmt.Errorf("qemu: spec Disks: %d disks, at most %d", len(ds), maxDisks))
	}
	seen := map[string]bool{}
	slots := map[int]bool{}
	for i, d := range ds {
		f := fmt.Sprintf("qemu: spec Disks[%d]", i)
		if !diskIDRE.MatchString(d.ID) {
			errs = append(errs, fmt.Errorf("%s: id %q does not match %s", f, d.ID, DiskIDPattern))
		} else if seen[d.ID] {
			errs = append(errs, fmt.Errorf("%s: id %q appears twice", f, d.ID))
		}
		seen[d.ID] = true
		if d.SizeBytes <= 0 || d.SizeBytes > maxDiskBytes || d.SizeBytes%512 != 0 {
			errs = append(errs, fmt.Errorf("%s: size_bytes %d is not a positive multiple of 512 up to %d", f, d.SizeBytes, int64(maxDiskBytes)))
		}
		if d.PCISlot != 0 && (d.PCISlot < minDiskSlot || d.PCISlot > maxDiskSlot) {
			errs = append(errs, fmt.Errorf("%s: pci_slot %d not in [%d, %d] (0: QEMU's choice)", f, d.PCISlot, minDiskSlot, maxDiskSlot))
		} else if d.PCISlot != 0 && slots[d.PCISlot] {
			errs = append(errs, fmt.Errorf("%s: pci_slot %d is taken by another disk", f, d.PCISlot))
		}
		slots[d.PCISlot] = true
	}
	return errs
}

func validateDiskPaths(ds []DiskSpec, qmpPath string) []error {
	var errs []error
	for i, d := range ds {
		f := fmt.Sprintf("qemu: spec Disks[%d]", i)
		if d.Path == "" || !filepath.IsAbs(d.Path) {
			errs = append(errs, fmt.Errorf("%s: path %q is not absolute", f, d.Path))
		}
		sock := d.socket(qmpPath)
		if !filepath.IsAbs(sock) || len(sock) > 107 || strings.Contains(sock, ",") {
			errs = append(errs, fmt.Errorf("%s: socket %q must be an absolute path of at most 107 bytes without ','", f, sock))
		}
	}
	return errs
}

// socket is the disk's NBD socket: Socket, or QMPPATH-without-.qmp.ID.nbd
// (VMs sharing a run directory have their own QMP sockets, so two VMs'
// disks of the same ID never share a socket).
func (d DiskSpec) socket(qmpPath string) string {
	if d.Socket != "" {
		return d.Socket
	}
	return strings.TrimSuffix(qmpPath, ".qmp") + "." + d.ID + ".nbd"
}

// diskArgs are the QEMU options of the disks: an NBD client node per disk
// (reconnecting for reconnectDelay, so that a restarting remusd does not
// fail the guest's I/O: its requests wait instead) under a virtio-blk
// device (at PCISlot of pcie.0 if set).
func (s Spec) diskArgs() []string {
	var a []string
	for _, d := range s.Disks {
		dev := "virtio-blk-pci,drive=" + d.ID + ",id=" + d.ID
		if d.PCISlot != 0 {
			dev += fmt.Sprintf(",bus=pcie.0,addr=0x%x", d.PCISlot)
		}
		a = append(a,
			"-blockdev", "driver=nbd,node-name="+d.ID+",server.type=unix,server.path="+d.socket(s.QMPPath)+
				",export="+d.ID+",reconnect-delay="+strconv.Itoa(reconnectDelay)+",discard=unmap",
			"-device", dev)
	}
	return a
}

// diskDiff compares the disks of two machines for CheckCompatible.
func diskDiff(p, l []DiskSpec) (string, string, bool) {
	str := func(ds []DiskSpec) string {
		if len(ds) == 0 {
			return "none"
		}
		var parts []string
		for _, d := range ds {
			p := d.ID + ":" + strconv.FormatInt(d.SizeBytes, 10)
			if d.PCISlot != 0 {
				p += fmt.Sprintf("@00:%02x.0", d.PCISlot)
			}
			parts = append(parts, p)
		}
		return strings.Join(parts, ",")
	}
	ps, ls := str(p), str(l)
	return ps, ls, ps == ls
}

// diskServer serves one image to QEMU over NBD and journals its changes.
type diskServer struct {
	spec    DiskSpec
	image   *disk.File
	journal *disk.Journal
	cancel  context.CancelFunc
	done    chan error
}

// diskSet is the disks of one QEMU process.
type diskSet struct {
	mu      sync.Mutex
	servers []*diskServer
}

// DiskOptions configure the disk servers of Launch and NewReplica.
type DiskOptions struct {
	// JournalBytes bounds each disk's journal of unacknowledged writes
	// (default DefaultDiskJournalBytes); a guest that writes more waits.
	JournalBytes int64
	// Create makes each image (sparse, SizeBytes) instead of opening an
	// existing one: the backup's replica images.
	Create bool
}

// startDisks opens every disk's image and starts its NBD server. It
// returns an empty set for a spec without disks.
func startDisks(spec Spec, o DiskOptions, log *zap.Logger) (*diskSet, error) {
	set := &diskSet{}
	if o.JournalBytes == 0 {
		o.JournalBytes = DefaultDiskJournalBytes
	}
	for _, d := range spec.Disks {
		srv, err := startDisk(d, spec.QMPPath, o, log)
		if err != nil {
			set.close()
			return nil, fmt.Errorf("qemu: disk %s: %w", d.ID, err)
		}
		set.servers = append(set.servers, srv)
	}
	return set, nil
}

func startDisk(d DiskSpec, qmpPath string, o DiskOptions, log *zap.Logger) (*diskServer, error) {
	if o.Create {
		aside, err := createImage(d.Path, d.SizeBytes)
		if aside != "" {
			log.Warn("an image was already at the replica's path: kept, renamed aside (remove it once the VM's disk is known to be elsewhere)",
				zap.String("disk", d.ID), zap.String("path", d.Path), zap.String("moved_to", aside))
		}
		if err != nil {
			return nil, err
		}
	}
	img, err := disk.OpenFile(d.Path, false)
	if err != nil {
		return nil, err
	}
	if img.Size() != d.SizeBytes {
		img.Close()
		return nil, fmt.Errorf("image %s holds %d bytes, the disk is configured with %d", d.Path, img.Size(), d.SizeBytes)
	}
	// Tracking: the journal is fed from the guest's boot, before any
	// protection releases its epochs (the engine journals once protected).
	j, err := disk.NewJournal(disk.JournalConfig{Limit: o.JournalBytes, MaxWrite: diskMaxPayload, Tracking: true}, 1)
	if err != nil {
		img.Close()
		return nil, err
	}
	srv, err := nbd.New(nbd.Config{Name: d.ID, MaxPayload: diskMaxPayload}, img, j, log.With(zap.String("disk", d.ID)))
	if err != nil {
		img.Close()
		return nil, err
	}
	ln, err := nbd.ListenUnix(d.socket(qmpPath))
	if err != nil {
		img.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	ds := &diskServer{spec: d, image: img, journal: j, cancel: cancel, done: make(chan error, 1)}
	go func() { ds.done <- srv.Serve(ctx, ln) }()
	return ds, nil
}

// createImage makes a sparse image of size bytes at path for a replica
// (rewritten by the full copy that follows). An image already at path is
// never overwritten: it may hold the newest disk of the VM (it ran here
// before a failover, or the operator put it there), so it is renamed
// aside to PATH.superseded-UNIXTIME and the caller logs it.
func createImage(path string, size int64) (aside string, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("replica image dir: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if !fi.Mode().IsRegular() {
			return "", fmt.Errorf("replica image %s exists and is not a regular file", path)
		}
		aside = fmt.Sprintf("%s.superseded-%d", path, time.Now().UnixNano())
		if err := os.Rename(path, aside); err != nil {
			return "", fmt.Errorf("move the existing image %s aside: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("replica image %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return aside, fmt.Errorf("create replica image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return aside, fmt.Errorf("size replica image: %w", err)
	}
	return aside, f.Close()
}

// disks is the engine's view of the set.
func (s *diskSet) disks() []hypervisor.Disk {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]hypervisor.Disk, 0, len(s.servers))
	for _, d := range s.servers {
		out = append(out, hypervisor.Disk{ID: d.spec.ID, Image: d.image, Journal: d.journal})
	}
	return out
}

// replicaDisks is the backup engine's view of the set.
func (s *diskSet) replicaDisks() []hypervisor.ReplicaDisk {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]hypervisor.ReplicaDisk, 0, len(s.servers))
	for _, d := range s.servers {
		out = append(out, hypervisor.ReplicaDisk{ID: d.spec.ID, Image: d.image})
	}
	return out
}

// close stops the servers (after QEMU is gone: the NBD server waits for
// its connections) and closes the images.
func (s *diskSet) close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	servers := s.servers
	s.servers = nil
	s.mu.Unlock()
	var errs []error
	for _, d := range servers {
		d.cancel()
		if err := <-d.done; err != nil {
			errs = append(errs, err)
		}
		if err := d.image.Flush(context.Background()); err != nil && !errors.Is(err, disk.ErrClosed) {
			errs = append(errs, err)
		}
		if err := d.image.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
