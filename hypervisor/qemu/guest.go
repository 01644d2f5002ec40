package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
)

const (
	// BackendName is what Guest.Backend returns.
	BackendName = "qemu"
	pageSize    = hypervisor.PageSize
)

var (
	_ hypervisor.Guest       = (*Guest)(nil)
	_ hypervisor.Rebaseliner = (*Guest)(nil)
	_ hypervisor.Replica     = (*Replica)(nil)
)

// ErrNotPaused is returned by HarvestDirty and SaveDeviceState on a
// running guest.
var ErrNotPaused = errors.New("qemu: guest not paused")

// Guest is a QEMU VM driven over QMP whose RAM remusd maps.
//
// Control calls (Pause, Resume, HarvestDirty, SaveDeviceState, Close) are
// serialised by mu.
type Guest struct {
	spec    Spec
	log     *zap.Logger
	mon     Monitor // q, or another transport (NewMonitorGuest)
	q       *QMP    // nil when driven through another Monitor
	ram     *ramFile
	proc    *process // nil when attached
	version string

	mu          sync.Mutex
	paused      bool
	closed      bool
	tracking    Tracking
	tracker     *tracker // created on first harvest
	stateDir    string   // private dir for xen-save-devices-state
	ownStateDir bool     // Close removes stateDir
	removeRAM   bool     // Close removes spec.RAMPath
	disks       *diskSet // the NBD servers of spec.Disks (nil: none)
	seam        DiskSeam // disks of an attached QEMU (MonitorGuestOptions.Disks)
}

func newGuest(ctx context.Context, spec Spec, q *QMP, ram *ramFile, p *process, log *zap.Logger) (*Guest, error) {
	return newGuestMonitor(ctx, spec, q, q, ram, p, "", log)
}

// newGuestMonitor builds a Guest driven through mon (q is the same monitor
// when it is a QMP socket, else nil). stateDir "" = a private directory
// the guest creates and removes.
func newGuestMonitor(ctx context.Context, spec Spec, mon Monitor, q *QMP, ram *ramFile, p *process, stateDir string, log *zap.Logger) (*Guest, error) {
	if log == nil {
		log = zap.NewNop()
	}
	v, err := monitorVersion(ctx, mon)
	if err != nil {
		return nil, err
	}
	st, err := monitorStatus(ctx, mon)
	if err != nil {
		return nil, err
	}
	ownState := false
	if stateDir == "" {
		if stateDir, ownState, err = stateDirFor(spec); err != nil {
			return nil, err
		}
	}
	return &Guest{
		spec:        spec,
		log:         log.With(zap.String("vm", spec.Name), zap.String("backend", BackendName)),
		mon:         mon,
		q:           q,
		ram:         ram,
		proc:        p,
		version:     v.String(),
		paused:      !st.Running,
		stateDir:    stateDir,
		ownStateDir: ownState,
	}, nil
}

// Name returns the VM name.
func (g *Guest) Name() string { return g.spec.Name }

// Backend returns "qemu".
func (g *Guest) Backend() string { return BackendName }

// BackendVersion returns the QEMU version, e.g. "qemu-7.2.22". Primary and
// backup must run the same one.
func (g *Guest) BackendVersion() string { return g.version }

// Config returns the machine part of the spec as JSON (see ParseConfig).
func (g *Guest) Config() []byte { return g.spec.Config() }

// Spec returns the spec the guest was launched (or attached) with.
func (g *Guest) Spec() Spec { return g.spec }

// SetSpec replaces the machine description Config reports (for an attached
// QEMU whose command line remusd did not build). Host-local fields are kept.
func (g *Guest) SetSpec(s Spec) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s.RAMPath, s.QMPPath, s.Tap, s.SerialPath, s.LogPath, s.Binary = g.spec.RAMPath, g.spec.QMPPath, g.spec.Tap, g.spec.SerialPath, g.spec.LogPath, g.spec.Binary
	g.spec = s
}

// NumPages returns the number of guest pages.
func (g *Guest) NumPages() int { return len(g.ram.mem) / pageSize }

// Memory returns guest RAM (the shared mapping of the RAM file). Its
// content is only stable while paused.
func (g *Guest) Memory() []byte { return g.ram.mem }

// QMP returns the monitor connection (for commands the backend does not
// wrap), or nil for a guest driven through another Monitor (see Monitor).
func (g *Guest) QMP() *QMP { return g.q }

// Monitor returns the monitor the guest is driven through.
func (g *Guest) Monitor() Monitor { return g.mon }

// Pid returns the QEMU process id (launched or re-attached with Reattach),
// or 0 for a QEMU someone else launched (Attach, NewMonitorGuest).
func (g *Guest) Pid() int {
	if g.proc == nil {
		return 0
	}
	return g.proc.pid
}

// Paused reports whether the guest is paused as far as the backend knows
// (a re-attached guest reports what QEMU said at Reattach: a daemon that
// died mid-epoch leaves it paused).
func (g *Guest) Paused() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.paused
}

// Exited is closed when the QMP connection ends (QEMU exited).
func (g *Guest) Exited() <-chan struct{} { return g.mon.Done() }

func (g *Guest) qmpErr(op string, err error) error {
	if errors.Is(err, ErrQEMUExited) && g.proc != nil {
		select {
		case <-g.proc.done:
			err = g.proc.exitErr()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("qemu: %s %q: %w", op, g.spec.Name, err)
}

// SetTracking selects how HarvestDirty finds changed pages (default
// TrackShadow). Changing it restarts tracking: the next harvest reports
// every page.
func (g *Guest) SetTracking(t Tracking) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if t != g.tracking {
		g.tracking, g.tracker = t, nil
	}
}

// Pause stops the vCPUs (QMP stop) and returns once QEMU reports the VM
// paused: no guest RAM write can be in progress then.
func (g *Guest) Pause(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	if err := g.mon.Execute(ctx, "stop", nil, nil); err != nil {
		return g.qmpErr("pause", err)
	}
	// stop returns after vm_stop paused every vCPU; confirm it.
	st, err := monitorStatus(ctx, g.mon)
	if err != nil {
		return g.qmpErr("pause", err)
	}
	if st.Running {
		return fmt.Errorf("qemu: pause %q: still running after stop (status %q)", g.spec.Name, st.Status)
	}
	g.paused = true
	return nil
}

// Resume restarts the vCPUs (QMP cont).
func (g *Guest) Resume(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	if err := g.mon.Execute(ctx, "cont", nil, nil); err != nil {
		return g.qmpErr("resume", err)
	}
	g.paused = false
	return nil
}

// HarvestDirty ORs into dst every page whose content changed since the
// previous harvest, by comparing each page with a shadow copy (exact, see
// tracker). The first harvest reports every page (initial sync). Only valid
// while paused. A guest with a disk seam (MonitorGuestOptions.Disks)
// checks it first: an error means a disk write may have completed
// unobserved, and the epoch must not be captured.
func (g *Guest) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	if !g.paused {
		return ErrNotPaused
	}
	if dst.Len() != g.NumPages() {
		return fmt.Errorf("qemu: harvest %q: bitmap has %d pages, guest %d", g.spec.Name, dst.Len(), g.NumPages())
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if g.seam != nil {
		// The engine harvests once per pause: the disks' seam is checked
		// here rather than in Pause, whose other callers (fencing, a
		// restart's detach) only want the guest stopped.
		if err := g.seam.Check(ctx); err != nil {
			return fmt.Errorf("qemu: harvest %q: disks: %w", g.spec.Name, err)
		}
	}
	if g.tracker == nil {
		g.tracker = newTracker(len(g.ram.mem), g.tracking)
	}
	g.tracker.scan(g.ram.mem, dst)
	return nil
}

// Rebaseline implements hypervisor.Rebaseliner: while the guest runs (or
// is paused), every page of RAM becomes the baseline of the next
// HarvestDirty (copied into the shadow and the shadow page hashed, with
// TrackShadow; hashed into the hash table, with TrackHash), and the
// xxhash64 of every baseline page is returned. The next harvest reports
// page p unless p's content then hashes to the returned value (see
// hypervisor.Rebaseliner). The tracker is reused if it exists (the first
// call allocates the shadow or hash table: first-touch cost). It holds
// the guest's control lock throughout (Pause waits for it).
func (g *Guest) Rebaseline(ctx context.Context) ([]uint64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, errClosed
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if g.tracker == nil {
		g.tracker = newTracker(len(g.ram.mem), g.tracking)
	}
	hashes := make([]uint64, g.NumPages())
	if err := g.tracker.rebaseline(ctx, g.ram.mem, hashes); err != nil {
		return nil, fmt.Errorf("qemu: rebaseline %q: %w", g.spec.Name, err)
	}
	return hashes, nil
}

// ReadLive implements hypervisor.LiveReader: a plain copy of the shared
// RAM mapping while the vCPUs run (a page may be copied mid-write; the
// engine resends every page whose content changed, see LiveReader).
func (g *Guest) ReadLive(ctx context.Context, first, n int, dst []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClosed
	}
	if first < 0 || n < 0 || first+n > g.NumPages() || len(dst) < n*pageSize {
		return fmt.Errorf("qemu: read live %q: pages [%d, %d) of %d into %d bytes", g.spec.Name, first, first+n, g.NumPages(), len(dst))
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	copy(dst[:n*pageSize], g.ram.mem[first*pageSize:(first+n)*pageSize])
	return nil
}

// SaveDeviceState saves the CPU and device state (xen-save-devices-state,
// live=false: no RAM) into a private file and appends its content to dst.
// Only valid while paused.
func (g *Guest) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return dst, errClosed
	}
	if !g.paused {
		return dst, ErrNotPaused
	}
	path := filepath.Join(g.stateDir, "devstate")
	args := map[string]any{"filename": path, "live": false}
	if err := g.mon.Execute(ctx, "xen-save-devices-state", args, nil); err != nil {
		return dst, g.qmpErr("save device state", err)
	}
	f, err := os.Open(path)
	if err != nil {
		return dst, fmt.Errorf("qemu: save device state %q: %w", g.spec.Name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return dst, fmt.Errorf("qemu: save device state %q: %w", g.spec.Name, err)
	}
	n := int(st.Size())
	if n > maxDeviceState {
		return dst, fmt.Errorf("qemu: save device state %q: %d bytes exceeds the %d limit", g.spec.Name, n, maxDeviceState)
	}
	off := len(dst)
	dst = append(dst, make([]byte, n)...)
	if _, err := readFull(f, dst[off:]); err != nil {
		return dst[:off], fmt.Errorf("qemu: save device state %q: %w", g.spec.Name, err)
	}
	if err := checkDeviceState(dst[off:]); err != nil {
		return dst[:off], fmt.Errorf("qemu: save device state %q: %w", g.spec.Name, err)
	}
	return dst, nil
}

// Disks returns the guest's protected disks (hypervisor.DiskGuest).
func (g *Guest) Disks() []hypervisor.Disk {
	d := g.disks.disks()
	if g.seam != nil {
		d = append(d, g.seam.Disks()...)
	}
	return d
}

// DiskSeam returns the disk seam of a guest someone else launched
// (MonitorGuestOptions.Disks), or nil.
func (g *Guest) DiskSeam() DiskSeam { return g.seam }

// Close quits QEMU (QMP quit, killed if it has not exited within a few
// seconds), unmaps RAM and removes the files the backend created.
func (g *Guest) Close() error {
	return g.close(true)
}

// Detach releases remusd's hold on the guest (QMP connection, RAM mapping)
// and leaves QEMU running.
func (g *Guest) Detach() error {
	return g.close(false)
}

func (g *Guest) close(stop bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	switch {
	case stop && g.proc != nil:
		g.proc.stop(g.q, quitGrace)
	case stop:
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = g.mon.Execute(ctx, "quit", nil, nil)
		cancel()
	}
	g.mon.Close()
	if g.proc != nil {
		g.proc.release() // an adopted QEMU: stop watching it
	}
	err := g.ram.unmap()
	// The disks' servers stop with remusd's hold on the guest. A detached
	// QEMU keeps running: its NBD client retries (reconnect-delay) until
	// the next daemon serves the images again (Reattach), so its guest's
	// I/O waits instead of failing.
	err = errors.Join(err, g.disks.close())
	if g.seam != nil {
		err = errors.Join(err, g.seam.Close(stop))
	}
	g.tracker = nil
	if g.ownStateDir {
		os.RemoveAll(g.stateDir)
	}
	if stop && g.proc != nil {
		os.Remove(g.spec.QMPPath)
		if g.removeRAM {
			os.Remove(g.spec.RAMPath)
		}
	}
	g.log.Info("qemu guest closed", zap.Bool("stopped", stop))
	return err
}

func readFull(f *os.File, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := f.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
