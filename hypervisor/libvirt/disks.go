package libvirt

// Disks of libvirt domains (issue 11 item 6).
//
// libvirt starts QEMU with a plain file disk, so remusd cannot put its
// NBD server between QEMU and the image as it does for the QEMUs it
// launches. It builds the seam live instead, through the monitor
// passthrough: an NBD client node to remusd's server (blockdev-add) and a
// blockdev-mirror job from the disk's node to it with sync=none and
// copy-mode=write-blocking. Checked in QEMU 7.2's block/mirror.c:
//
//   - bdrv_mirror_top_do_write writes the guest's data to the source (the
//     image, through libvirt's own file node) and then, when copy_to_target
//     (job->ret >= 0, not cancelled, copy_mode == WRITE_BLOCKING), copies it
//     to the target in do_sync_target_write before the guest's request
//     completes. copy_mode is fixed when the job is created, so writes are
//     copied from the job's start, not only once it is READY; with
//     sync=none the job's dirty bitmap starts empty (and is disabled in
//     write-blocking mode), so no part of a write is left to the
//     background copy. Guest writes to overlapping ranges wait for each
//     other (active_write_prepare), so the target sees them in the order
//     the image did.
//   - write-zeroes and discard take the same path (MIRROR_METHOD_ZERO,
//     MIRROR_METHOD_DISCARD): they reach the server as NBD WRITE_ZEROES and
//     TRIM. Flushes go to the source only (bdrv_mirror_top_flush): a guest
//     flush makes the image durable; the backup makes each epoch durable
//     before it acknowledges, so no flush needs to travel.
//   - A failed target write does NOT fail the guest's write (the source
//     write already succeeded): it marks the range dirty and takes the
//     job's error action (block_job_error_action) before the guest's write
//     completes. remusd uses on-target-error=stop, which pauses the job and
//     sets its io-status to failed right there, synchronously; with
//     "report" the job would only end later, in its own coroutine, so a
//     check could still see it running. That is why the guest checks the
//     job at every checkpoint while paused (DiskSeam.Check from
//     qemu.Guest.HarvestDirty, one query-block-jobs): a job that is gone,
//     paused or failed means a write may have completed unobserved, and
//     the harvest fails (the engine resumes the guest and fails the epoch).
//   - QMP stop drains all I/O (bdrv_drain_all), including the mirror
//     filter's active writes, so every write the guest saw complete before
//     the pause has been observed by the Journal before the cut.
//
// The NBD client node reconnects for reconnectDelay: while a daemon
// restarts, the mirror's copies (and so the guest's writes) wait; if no
// server comes back in time the copies fail, the job stops with an error,
// the guest's I/O carries on, and the next daemon replaces the job (a
// fresh journal: the engine copies the disk again).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/disk/nbd"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/qemu"
)

// diskDef is a <disk> of the domain XML.
type diskDef struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver *struct {
		Name     string `xml:"name,attr"`
		Type     string `xml:"type,attr"`
		Cache    string `xml:"cache,attr"`
		Queues   string `xml:"queues,attr"`
		IOThread string `xml:"iothread,attr"`
	} `xml:"driver"`
	Source *struct {
		File string `xml:"file,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
	Alias *struct {
		Name string `xml:"name,attr"`
	} `xml:"alias"`
	Address   *pciAddress `xml:"address"`
	ReadOnly  *struct{}   `xml:"readonly"`
	Shareable *struct{}   `xml:"shareable"`
}

func (dd diskDef) source() string {
	if dd.Source == nil {
		return ""
	}
	return dd.Source.File
}

// First PCI slot of pcie.0 a disk may take: 0x01 is the NIC's
// (StandbyNICAddress).
const firstDiskSlot = 2

// StandbyDiskXML is the <disk> the direct standby can load the device
// state of: a raw file on virtio at a fixed slot of pcie.0 (libvirt's
// default puts it behind a pcie-root-port, as it does the NIC). Use slot
// 0x02 for the first disk, 0x03 for the second, and so on.
func StandbyDiskXML(dev, file string, slot int) string {
	return fmt.Sprintf("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='%s' bus='virtio'/><address type='pci' domain='0x0000' bus='0x00' slot='0x%02x' function='0x0'/></disk>", file, dev, slot)
}

var diskIDRE = regexp.MustCompile(`^` + qemu.DiskIDPattern + `$`)

// diskProblems lists what in the domain's disks the direct standby could
// not reproduce (see StandbyProblems).
func (d *Domain) diskProblems() []string {
	var p []string
	for i, dd := range d.def.Devices.Disks {
		name := dd.Target.Dev
		if name == "" {
			name = fmt.Sprintf("#%d", i)
		}
		want := StandbyDiskXML(dd.Target.Dev, dd.source(), firstDiskSlot+i)
		bad := func(format string, a ...any) {
			p = append(p, fmt.Sprintf("disk %s: %s", name, fmt.Sprintf(format, a...)))
		}
		if dd.Device != "" && dd.Device != "disk" {
			bad("device %q: the standby has only virtio disks (remove it)", dd.Device)
			continue
		}
		if dd.Type != "file" || dd.source() == "" {
			bad("type %q: remusd protects file-backed disks (<disk type='file'> with <source file='...'/>)", dd.Type)
		}
		if dd.Driver == nil || dd.Driver.Type != "raw" {
			got := ""
			if dd.Driver != nil {
				got = dd.Driver.Type
			}
			bad("format %q: remusd replicates raw images (<driver name='qemu' type='raw'/>)", got)
		}
		if dv := dd.Driver; dv != nil {
			// virtio-blk properties libvirt derives from these, which the
			// standby's device would not have: its device state would not
			// load (queues, iothread) or the guest's write cache would
			// change under it (write-cache=off for these cache modes).
			if dv.Queues != "" || dv.IOThread != "" {
				bad("<driver queues=%q iothread=%q>: the standby's virtio-blk has QEMU's defaults (remove them)", dv.Queues, dv.IOThread)
			}
			if dv.Cache == "writethrough" || dv.Cache == "directsync" {
				bad("<driver cache=%q> turns the device's write cache off; the standby's is on (use cache='none' or leave it out)", dv.Cache)
			}
		}
		if dd.Target.Bus != "virtio" {
			bad("bus %q: the standby's disks are virtio-blk (<target dev='vda' bus='virtio'/>)", dd.Target.Bus)
		}
		if !diskIDRE.MatchString(dd.Target.Dev) {
			bad("target dev %q does not match %s (it names the disk on both hosts)", dd.Target.Dev, qemu.DiskIDPattern)
		}
		if dd.ReadOnly != nil || dd.Shareable != nil {
			bad("readonly or shareable disks are not protected (remove <readonly/>, <shareable/>)")
		}
		if a := dd.Address; a == nil || a.Type != "pci" || hexNum(a.Domain) != 0 || hexNum(a.Bus) != 0 || hexNum(a.Function) != 0 ||
			hexNum(a.Slot) < firstDiskSlot || hexNum(a.Slot) > 0x1e {
			bad("address: the standby puts the disk's virtio-blk at a fixed slot of pcie.0 (0x%02x-0x1e, function 0); use %s", firstDiskSlot, want)
		}
	}
	return p
}

// diskSpecs are the domain's disks as the qemu backend describes them: ID
// the target dev, Path the source file on this host, SizeBytes its size
// (0 when it cannot be read: checkDiskFiles says why), PCISlot its slot.
func (d *Domain) diskSpecs() []qemu.DiskSpec {
	var out []qemu.DiskSpec
	for _, dd := range d.def.Devices.Disks {
		s := qemu.DiskSpec{ID: dd.Target.Dev, Path: dd.source()}
		if a := dd.Address; a != nil {
			s.PCISlot = int(max(hexNum(a.Slot), 0))
		}
		if st, err := os.Stat(s.Path); err == nil && s.Path != "" {
			s.SizeBytes = st.Size()
		}
		out = append(out, s)
	}
	return out
}

// checkDiskFiles checks that every disk's source file exists on this host
// as a regular file whose size is a multiple of 512. On a backup it is the
// replica image, which must have the primary's size (the machine
// descriptions are compared with qemu.CheckCompatible).
func (d *Domain) checkDiskFiles() error {
	var errs []error
	for _, dd := range d.def.Devices.Disks {
		path := dd.source()
		st, err := os.Stat(path)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: source file: %w (on a backup, create the replica image with the primary's size first, e.g. truncate -s SIZE %s)", d.name, dd.Target.Dev, err, path))
		case !st.Mode().IsRegular():
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: source %s is not a regular file", d.name, dd.Target.Dev, path))
		case st.Size() <= 0 || st.Size()%512 != 0:
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: source %s holds %d bytes, not a positive multiple of 512", d.name, dd.Target.Dev, path, st.Size()))
		}
	}
	return errors.Join(errs...)
}

// Names remusd gives its QEMU objects of disk dev.
func jobID(dev string) string      { return "remusd-" + dev }
func targetNode(dev string) string { return "remusd-" + dev + "-nbd" }
func filterNode(dev string) string { return "remusd-" + dev + "-mirror" }

// Seam settings.
const (
	// DefaultDiskJournalBytes bounds each disk's journal.
	DefaultDiskJournalBytes = qemu.DefaultDiskJournalBytes
	diskMaxPayload          = 2 << 20
	// reconnectDelay is how long the NBD client node waits for a server
	// that went away (a restarting daemon) before the mirror's copies fail.
	// Shorter than the qemu backend's (there the NBD node is the disk, and
	// giving up fails the guest's I/O): here giving up only stops the job
	// (the next daemon copies the disk again), while waiting stalls the
	// guest's writes, so a short wait bounds the stall when remusd is gone.
	reconnectDelay = 10
	// jobWait bounds the wait for a cancelled job to go away.
	jobWait = 10 * time.Second
)

// DiskSeam is the block seam of a running domain's disks: per disk, an NBD
// server of remusd's that QEMU's write-blocking mirror copies every write
// to, whose Observer is the disk's Journal. It implements qemu.DiskSeam.
type DiskSeam struct {
	d   *Domain
	m   *Monitor
	ram string
	o   DiskOptions
	log *zap.Logger

	op    sync.Mutex // serialises Start, Remove and Close
	mu    sync.Mutex // guards disks
	disks []*seamDisk
}

var _ qemu.DiskSeam = (*DiskSeam)(nil)

type seamDisk struct {
	id     string // the target dev: the disk's ID on both hosts
	qdev   string // the virtio-blk's backend, /machine/peripheral/<alias>/virtio-backend
	node   string // the disk's node the mirror copies from
	sock   string
	image  *disk.File // read-only: the engine's reads, the server's reads
	j      *disk.Journal
	cancel context.CancelFunc
	done   chan error
}

// DiskOptions configure the seam Attach builds.
type DiskOptions struct {
	// JournalBytes bounds each disk's journal (default
	// DefaultDiskJournalBytes).
	JournalBytes int64
	// Log receives the NBD servers' messages (default: none).
	Log *zap.Logger
	// Deferred: Attach only checks the disks; the seam is built by
	// (*DiskSeam).Start (the daemon starts it when protection starts, and
	// removes it at unprotect, so that an unprotected guest's writes pay
	// nothing and fill no journal).
	Deferred bool
}

// mirrorTarget is the Backend of the server the mirror copies to. QEMU's
// own file node has already written each change to the image when the
// mirror copies it to the target (the source write comes first, see the
// top of this file), so the server applies nothing: applying the write a
// second time would double the image's I/O and race with QEMU's file node
// for nothing. Its Observer (the disk's Journal) gets every change's data.
// Reads are served from the image (the mirror never reads its target with
// sync=none; other NBD clients get what the guest wrote). Flush is a no-op:
// the image's durability is the guest's flushes, which QEMU sends to the
// file node.
type mirrorTarget struct{ img *disk.File }

func (t mirrorTarget) Size() int64 { return t.img.Size() }
func (t mirrorTarget) ReadAt(ctx context.Context, p []byte, off int64) error {
	return t.img.ReadAt(ctx, p, off)
}
func (mirrorTarget) WriteAt(context.Context, []byte, int64) error          { return nil }
func (mirrorTarget) Trim(context.Context, int64, int64) error              { return nil }
func (mirrorTarget) WriteZeroes(context.Context, int64, int64, bool) error { return nil }
func (mirrorTarget) Flush(context.Context) error                           { return nil }
func (mirrorTarget) Close() error                                          { return nil }

// blockInfo is an entry of query-block.
type blockInfo struct {
	Device   string `json:"device"`
	Qdev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		File     string `json:"file"`
		Drv      string `json:"drv"`
		RO       bool   `json:"ro"`
	} `json:"inserted"`
}

// jobInfo is an entry of query-block-jobs.
type jobInfo struct {
	Device   string `json:"device"`
	Type     string `json:"type"`
	Status   string `json:"status"`
	IOStatus string `json:"io-status"`
	Ready    bool   `json:"ready"`
	Paused   bool   `json:"paused"`
}

func (s *DiskSeam) exec(ctx context.Context, cmd string, args, out any) error {
	ctx, cancel := context.WithTimeout(ctx, DefaultTimeout)
	defer cancel()
	return s.m.Execute(ctx, cmd, args, out)
}

func (s *DiskSeam) jobs(ctx context.Context) (map[string]jobInfo, error) {
	var jobs []jobInfo
	if err := s.exec(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, fmt.Errorf("libvirt: domain %q: disks: %w", s.d.name, err)
	}
	out := make(map[string]jobInfo, len(jobs))
	for _, j := range jobs {
		out[j.Device] = j
	}
	return out, nil
}

// healthy says a mirror job still copies every write.
func healthy(j jobInfo) bool {
	return j.Type == "mirror" && (j.Status == "running" || j.Status == "ready") && !j.Paused && (j.IOStatus == "" || j.IOStatus == "ok")
}

// newDiskSeam checks the disks of the running domain d (nil seam when it
// has none) and returns their seam, to be built by Start, through m. ram
// is the domain's RAM file: the sockets go beside it, where the QEMU user
// can reach them.
func newDiskSeam(d *Domain, m *Monitor, ram string, o DiskOptions) (*DiskSeam, error) {
	if len(d.def.Devices.Disks) == 0 {
		return nil, nil
	}
	if p := d.diskProblems(); len(p) > 0 {
		return nil, fmt.Errorf("libvirt: domain %q: %w; change the domain XML (virsh edit %s): %s", d.name, ErrStandbyIncompatible, d.name, strings.Join(p, "; "))
	}
	if err := d.checkDiskFiles(); err != nil {
		return nil, err
	}
	if o.JournalBytes == 0 {
		o.JournalBytes = DefaultDiskJournalBytes
	}
	if o.JournalBytes < diskMaxPayload+disk.ChangeOverhead {
		return nil, fmt.Errorf("libvirt: domain %q: disk journal of %d bytes is below one write of %d", d.name, o.JournalBytes, diskMaxPayload)
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	return &DiskSeam{d: d, m: m, ram: ram, o: o, log: o.Log.With(zap.String("vm", d.name))}, nil
}

// Start builds the seam of every disk (nothing if it is up): an NBD server
// and journal per disk, the nbd node and the write-blocking mirror job. A
// job a previous daemon left is taken over when it still copies writes
// (replaced otherwise). Protection counts from Start's return: every
// write that completes afterwards reaches a journal first.
func (s *DiskSeam) Start(ctx context.Context) error {
	s.op.Lock()
	defer s.op.Unlock()
	s.mu.Lock()
	up := len(s.disks) > 0
	s.mu.Unlock()
	if up {
		return nil
	}
	var blocks []blockInfo
	if err := s.exec(ctx, "query-block", nil, &blocks); err != nil {
		return fmt.Errorf("libvirt: domain %q: disks: %w", s.d.name, err)
	}
	jobs, err := s.jobs(ctx)
	if err != nil {
		return err
	}
	var disks []*seamDisk
	for _, dd := range s.d.def.Devices.Disks {
		sd, err := s.startDisk(ctx, dd, blocks, jobs, s.ram, s.o)
		if err != nil {
			s.remove(ctx, disks)
			return fmt.Errorf("libvirt: domain %q: disk %s: %w", s.d.name, dd.Target.Dev, err)
		}
		disks = append(disks, sd)
	}
	s.mu.Lock()
	s.disks = disks
	s.mu.Unlock()
	return nil
}

func (s *DiskSeam) startDisk(ctx context.Context, dd diskDef, blocks []blockInfo, jobs map[string]jobInfo, ram string, o DiskOptions) (*seamDisk, error) {
	dev := dd.Target.Dev
	if dd.Alias == nil || dd.Alias.Name == "" {
		return nil, errors.New("the live XML gives the disk no <alias> (is the domain running?)")
	}
	qdev := "/machine/peripheral/" + dd.Alias.Name + "/virtio-backend"
	j, hasJob := jobs[jobID(dev)]
	reuse := hasJob && healthy(j)
	if hasJob && !reuse {
		// Its copies failed (e.g. no server within the reconnect delay)
		// or it was paused: writes may have gone unobserved. Replace it
		// (the engine copies the disk again for the new journal).
		s.log.Warn("mirror job left unhealthy by a previous daemon: replacing it", zap.String("disk", dev), zap.Any("job", j))
		if err := s.cancelJob(ctx, dev); err != nil {
			return nil, err
		}
		blocks = nil
		if err := s.exec(ctx, "query-block", nil, &blocks); err != nil {
			return nil, err
		}
	}
	var b *blockInfo
	for i := range blocks {
		if blocks[i].Qdev == qdev || (blocks[i].Device != "" && blocks[i].Device == "drive-"+dd.Alias.Name) {
			b = &blocks[i]
		}
	}
	if b == nil || b.Inserted == nil {
		return nil, fmt.Errorf("query-block has no medium for %s", qdev)
	}
	if b.Inserted.RO {
		return nil, errors.New("QEMU opened the disk read-only")
	}
	node := b.Inserted.NodeName
	if !reuse && node == filterNode(dev) {
		return nil, fmt.Errorf("the disk's node is remusd's mirror filter but its job is %+v", j)
	}
	if !reuse && b.Inserted.File != dd.source() {
		return nil, fmt.Errorf("QEMU's node %s opens %q, the XML says %q", node, b.Inserted.File, dd.source())
	}
	if !reuse {
		// A target node left without its job (a daemon that died between
		// blockdev-add and blockdev-mirror, or a replaced job).
		if err := s.exec(ctx, "blockdev-del", map[string]any{"node-name": targetNode(dev)}, nil); err == nil {
			s.log.Info("removed a stale nbd node", zap.String("disk", dev))
		}
	}

	img, err := disk.OpenFile(dd.source(), true)
	if err != nil {
		return nil, err
	}
	// Tracking until the engine takes the journal (its first act is
	// Track too): a journal nobody cuts must never block the guest.
	jr, err := disk.NewJournal(disk.JournalConfig{Limit: o.JournalBytes, MaxWrite: diskMaxPayload, Tracking: true}, 1)
	if err != nil {
		img.Close()
		return nil, err
	}
	srv, err := nbd.New(nbd.Config{Name: dev, MaxPayload: diskMaxPayload}, mirrorTarget{img}, jr, s.log.With(zap.String("disk", dev)))
	if err != nil {
		img.Close()
		return nil, err
	}
	sock := filepath.Join(filepath.Dir(ram), ".remusd-"+dev+".nbd")
	if len(sock) > 107 {
		img.Close()
		return nil, fmt.Errorf("socket path %s is longer than 107 bytes", sock)
	}
	ln, err := nbd.ListenUnix(sock)
	if err != nil {
		img.Close()
		return nil, err
	}
	if err := chownLike(sock, ram); err != nil {
		ln.Close()
		img.Close()
		return nil, fmt.Errorf("socket for the QEMU user: %w", err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	sd := &seamDisk{id: dev, qdev: qdev, node: node, sock: sock, image: img, j: jr, cancel: cancel, done: make(chan error, 1)}
	go func() { sd.done <- srv.Serve(sctx, ln) }()
	if reuse {
		s.log.Info("took over the mirror job of a previous daemon", zap.String("disk", dev), zap.String("status", j.Status))
		return sd, nil
	}
	err = s.exec(ctx, "blockdev-add", map[string]any{
		"driver": "nbd", "node-name": targetNode(dev), "export": dev, "discard": "unmap",
		"server":          map[string]any{"type": "unix", "path": sock},
		"reconnect-delay": reconnectDelay,
	}, nil)
	if err != nil {
		sd.stop()
		return nil, fmt.Errorf("add the nbd node: %w", err)
	}
	err = s.exec(ctx, "blockdev-mirror", map[string]any{
		"job-id": jobID(dev), "device": node, "target": targetNode(dev), "filter-node-name": filterNode(dev),
		"sync": "none", "copy-mode": "write-blocking", "on-target-error": "stop",
	}, nil)
	if err != nil {
		s.exec(ctx, "blockdev-del", map[string]any{"node-name": targetNode(dev)}, nil)
		sd.stop()
		return nil, fmt.Errorf("start the mirror: %w", err)
	}
	s.log.Info("disk seam up", zap.String("disk", dev), zap.String("node", node), zap.String("socket", sock))
	return sd, nil
}

// stop stops the disk's server and closes its image.
func (sd *seamDisk) stop() error {
	sd.cancel()
	err := <-sd.done
	return errors.Join(err, sd.image.Close())
}

// cancelJob cancels dev's mirror job (the guest keeps its disk: the
// filter node goes, the disk's node stays under its device) and waits
// until it is gone.
func (s *DiskSeam) cancelJob(ctx context.Context, dev string) error {
	err := s.exec(ctx, "block-job-cancel", map[string]any{"device": jobID(dev), "force": true}, nil)
	var ce *qemu.CommandError
	if err != nil && !(errors.As(err, &ce) && ce.Class == "DeviceNotActive") {
		return fmt.Errorf("cancel the mirror: %w", err)
	}
	deadline := time.Now().Add(jobWait)
	for {
		jobs, err := s.jobs(ctx)
		if err != nil {
			return err
		}
		if _, ok := jobs[jobID(dev)]; !ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mirror job %s still there %v after block-job-cancel", jobID(dev), jobWait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Disks implements qemu.DiskSeam (none once removed).
func (s *DiskSeam) Disks() []hypervisor.Disk {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]hypervisor.Disk, 0, len(s.disks))
	for _, sd := range s.disks {
		out = append(out, hypervisor.Disk{ID: sd.id, Image: sd.image, Journal: sd.j})
	}
	return out
}

// Qdev is the QOM path of disk id's virtio-blk backend (for HMP qemu-io
// -d), or "".
func (s *DiskSeam) Qdev(id string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sd := range s.disks {
		if sd.id == id {
			return sd.qdev
		}
	}
	return ""
}

// Check implements qemu.DiskSeam: every disk's mirror job still copies
// writes (one query-block-jobs). A job that is gone, failed, paused or
// reports an I/O error may have let a write complete unobserved.
func (s *DiskSeam) Check(ctx context.Context) error {
	s.mu.Lock()
	n := len(s.disks)
	s.mu.Unlock()
	if n == 0 {
		return nil
	}
	jobs, err := s.jobs(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, sd := range s.disks {
		j, ok := jobs[jobID(sd.id)]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: mirror job %s is gone (a copy to remusd's NBD server failed): writes since may be missing from the journal", s.d.name, sd.id, jobID(sd.id)))
		case !healthy(j):
			b, _ := json.Marshal(j)
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: mirror job %s is not copying writes: %s", s.d.name, sd.id, jobID(sd.id), b))
		}
	}
	return errors.Join(errs...)
}

// Remove takes the seam out of the running domain (unprotect): it cancels
// each disk's mirror job (the guest keeps its disk and its node), deletes
// the NBD node and stops the server. Disks is empty afterwards; Start
// builds it again. Call it before the guest's Close or Detach (it needs
// the monitor).
func (s *DiskSeam) Remove(ctx context.Context) error {
	s.op.Lock()
	defer s.op.Unlock()
	s.mu.Lock()
	disks := s.disks
	s.disks = nil
	s.mu.Unlock()
	return s.remove(ctx, disks)
}

func (s *DiskSeam) remove(ctx context.Context, disks []*seamDisk) error {
	var errs []error
	for _, sd := range disks {
		if err := s.cancelJob(ctx, sd.id); err != nil {
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: %w", s.d.name, sd.id, err))
		}
		if err := s.exec(ctx, "blockdev-del", map[string]any{"node-name": targetNode(sd.id)}, nil); err != nil {
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: delete the nbd node: %w", s.d.name, sd.id, err))
		}
		if err := sd.stop(); err != nil {
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: %w", s.d.name, sd.id, err))
		}
		os.Remove(sd.sock)
		s.log.Info("disk seam removed", zap.String("disk", sd.id))
	}
	return errors.Join(errs...)
}

// Close implements qemu.DiskSeam: it stops the servers. The mirror jobs
// stay: a detached domain's copies wait (reconnect-delay) for the next
// daemon to serve the sockets again.
func (s *DiskSeam) Close(stop bool) error {
	s.op.Lock()
	defer s.op.Unlock()
	s.mu.Lock()
	disks := s.disks
	s.disks = nil
	s.mu.Unlock()
	var errs []error
	for _, sd := range disks {
		if err := sd.stop(); err != nil {
			errs = append(errs, fmt.Errorf("libvirt: domain %q: disk %s: %w", s.d.name, sd.id, err))
		}
		if stop {
			os.Remove(sd.sock)
		}
	}
	return errors.Join(errs...)
}
