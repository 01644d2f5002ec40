package daemon

// The daemon's side of the watchdog (issue 9, item 2; package
// failover/watchdog): a separate process that stops (SIGSTOP) a protected
// primary's QEMU guest when this daemon stops proving that the host still
// holds the VM, so that a hung, stopped or crashed daemon cannot leave a
// running primary behind while the backup takes over.
//
// Every pet (each watchdog.timeout/10, at most every 250 ms) lists each
// protected QEMU guest whose backup has answered at least once (before
// that the backup holds nothing to take over with) and how long this
// daemon's proof stays valid:
//
//   - no witness: watchdog.timeout (the watchdog then only guards the
//     daemon's liveness: without a witness no takeover is automatic);
//   - the backup heard within heartbeat_timeout, or a claim of the witness
//     record won since the link was lost (the backup can no longer win it):
//     watchdog.timeout;
//   - otherwise (link lost or silent, no claim won since): until
//     fence_after (+ a margin, so that the daemon's own QMP pause comes
//     first) after the loss, or after the last witness confirmation —
//     when the daemon itself self-fences.
//
// So a hung daemon's guest is stopped at most watchdog.timeout after the
// daemon's last pet, and a living daemon that cannot prove anything is
// backed by a stop that works even if QMP is wedged. A daemon whose
// process dies without a restart notice has its guests stopped at once.
//
// A stopped guest is reported in every reply. The daemon then checks
// whether it still holds the VM (the link to its backup is fresh, or the
// witness names this host) and asks the watchdog to continue it: if it
// holds the VM the guest runs on, otherwise the daemon pauses it over QMP
// and fences the protection. If the witness cannot be asked, the guest
// stays stopped. A restarting daemon does the same before re-attaching to
// its guests (QMP does not answer while QEMU is stopped). A clean
// shutdown announces a restart: the guests whose backup was told get
// restart_grace.

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/checkpoint"
	"github.com/remusd/remusd/failover/watchdog"
	"github.com/remusd/remusd/hypervisor/qemu"
	"github.com/remusd/remusd/hypervisor/xen"
)

// Option configures New.
type Option func(*Daemon)

// WithWatchdogExe names the remusd binary New starts as `remusd watchdog`
// when the configuration enables the watchdog and none runs for the state
// directory. Without it the daemon only joins a running watchdog.
func WithWatchdogExe(exe string) Option {
	return func(d *Daemon) { d.watchdogExe = exe }
}

// wdog is the daemon's watchdog bookkeeping.
type wdog struct {
	timeout, interval, margin time.Duration
	spawn                     watchdog.SpawnOptions
	log                       *zap.Logger

	mu     sync.Mutex // guards c and err
	c      *watchdog.Client
	err    string // why the watchdog cannot be reached ("" = fine)
	wpid   int    // the watchdog's pid
	stop   context.CancelFunc
	done   chan struct{}
	closed bool
	// nextTry: no (re)connection attempt before then (each may start a
	// watchdog process).
	nextTry time.Time

	// Guarded by d.mu.
	vms        map[string]*wdVM
	restarting []string // VMs whose backup is told the daemon restarts
	shutdown   bool
}

// wdVM is one VM as the watchdog saw it last.
type wdVM struct {
	pid         int
	listed      bool
	refused     string
	stopped     *watchdog.StoppedVM
	recovering  bool
	confirmedAt time.Time // the witness last confirmed this host holds it
	loggedAt    time.Time // last "stays stopped" warning
}

// watchdogRetry spaces reconnection attempts and repeated warnings.
const (
	watchdogRetry   = time.Second
	watchdogLogEach = 10 * time.Second
)

// watchdogPetInterval is how often a pet goes out for a timeout.
func watchdogPetInterval(timeout time.Duration) time.Duration {
	return min(max(timeout/10, 10*time.Millisecond), 250*time.Millisecond)
}

// watchdogInit connects to (or starts) the watchdog if the configuration
// enables it, and continues the guests it holds stopped that this daemon
// may run (New calls it before re-attaching to guests: a stopped QEMU
// does not answer QMP). Failing to reach the watchdog is logged and
// retried: the daemon runs on without its last resort.
func (d *Daemon) watchdogInit() {
	if !d.cfg.watchdogEnabled() {
		return
	}
	t := d.cfg.watchdogTimeout()
	d.wd = &wdog{timeout: t, interval: watchdogPetInterval(t), margin: max(500*time.Millisecond, 2*d.cfg.HeartbeatInterval.D()),
		spawn: watchdog.SpawnOptions{Exe: d.watchdogExe, StateDir: d.cfg.StateDir, Binaries: d.qemuBinaries(), XenDomains: d.xenDomains()},
		log:   d.log.Named("watchdog"), vms: map[string]*wdVM{}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := d.wd.connect(ctx)
	if err != nil {
		d.wd.log.Error("watchdog unavailable: a hung daemon's guests would not be stopped; retrying", zap.Error(err))
	}
	d.watchdogBeforeAttach(rep.Stopped)
}

// qemuBinaries are the QEMU binaries this daemon's guests run (its VMs'
// and its standbys', which run a VM after a failover).
func (d *Daemon) qemuBinaries() []string {
	seen := map[string]bool{}
	var out []string
	add := func(b string) {
		if b == "" {
			b = qemu.DefaultBinary
		}
		if !seen[b] {
			seen[b] = true
			out = append(out, b)
		}
	}
	for _, q := range d.cfg.QemuVMs {
		if !q.Libvirt {
			add(q.Binary)
		}
	}
	add(d.cfg.Standby.Binary)
	sort.Strings(out)
	return out
}

// xenDomains are the names of this daemon's Xen domains (its VMs' and,
// after a failover, its activated standbys', which run under the same
// entry's domain name).
func (d *Daemon) xenDomains() []string {
	var out []string
	for _, x := range d.cfg.XenVMs {
		if !slices.Contains(out, x.domain()) {
			out = append(out, x.domain())
		}
	}
	sort.Strings(out)
	return out
}

// connect (re)connects, starting a watchdog if none answers.
func (w *wdog) connect(ctx context.Context) (watchdog.Reply, error) {
	c, rep, err := watchdog.Connect(ctx, w.spawn, w.log)
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		w.err = err.Error()
		return rep, err
	}
	if w.c != nil {
		w.c.Close() // after the new hello: the watchdog sees this daemon live on
	}
	w.c, w.err, w.wpid = c, "", rep.WatchdogPid
	w.log.Info("connected to the watchdog", zap.Int("pid", rep.WatchdogPid), zap.Duration("timeout", w.timeout), zap.Int("stopped_guests", len(rep.Stopped)))
	return rep, nil
}

func (w *wdog) client() *watchdog.Client {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.c
}

func (w *wdog) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err == "" {
		w.log.Error("watchdog unreachable: reconnecting", zap.Error(err))
	}
	w.err = err.Error()
	if w.c != nil {
		w.c.Close()
		w.c = nil
	}
}

// watchdogBeforeAttach decides, before New re-attaches to recorded
// guests, about those the watchdog (or anyone: state T) holds stopped:
// each is continued, and paused over QMP at once unless the witness says
// this host still holds it (the resumed protection then fences it).
func (d *Daemon) watchdogBeforeAttach(reported []watchdog.StoppedVM) {
	byName := map[string]watchdog.StoppedVM{}
	for _, s := range reported {
		byName[s.Name] = s
	}
	for _, x := range d.cfg.XenVMs {
		d.xenBeforeAttach(x, byName)
	}
	for _, q := range d.cfg.QemuVMs {
		rec, err := d.records.load(q.Name)
		if err != nil || rec == nil || rec.QEMU == nil || rec.QEMU.Pid <= 0 {
			continue
		}
		pid, qmpPath := rec.QEMU.Pid, rec.QEMU.QMP
		s, known := byName[q.Name]
		if known && s.Pid != pid {
			known = false
		}
		if !known {
			// Left in state T by a watchdog that is gone? Only a primary's
			// guest is ever stopped by one.
			if st, err := watchdog.ProcState(pid); err != nil || st != 'T' || rec.Role != RolePrimary {
				continue
			}
		}
		holds, sure, why := d.holdsRecord(q.Name)
		run := holds && sure
		if err := d.continueGuest(q.Name, pid, qmpPath, known, run); err != nil {
			d.log.Error("cannot continue a guest stopped while no daemon vouched for it: it stays stopped", zap.String("vm", q.Name), zap.Int("pid", pid), zap.Error(err))
			continue
		}
		if run {
			d.log.Warn("continued a guest the watchdog had stopped: this host still holds the VM", zap.String("vm", q.Name), zap.Int("pid", pid), zap.String("why", why))
		} else {
			d.log.Error("a guest the watchdog had stopped is continued paused (QMP stop): this host cannot show it holds the VM", zap.String("vm", q.Name), zap.Int("pid", pid), zap.String("why", why), zap.Bool("witness_answered", sure))
		}
	}
}

// xenBeforeAttach decides about a recorded Xen primary the watchdog holds
// paused, before the daemon re-attaches (whose Recover would adopt a
// pause reference as its own): if the witness says this host still holds
// the VM, the watchdog drops its reference; otherwise its pause stays, and
// the resumed protection, which resumes the guest only once the witness
// agrees, fences it.
func (d *Daemon) xenBeforeAttach(x XenVM, stopped map[string]watchdog.StoppedVM) {
	rec, err := d.records.load(x.Name)
	if err != nil || rec == nil || rec.Xen == nil || rec.Role != RolePrimary {
		return
	}
	s, known := stopped[x.Name]
	if !known || s.XenDomID == 0 || s.XenDomID != rec.Xen.DomID {
		return
	}
	// Left paused, the domain is not attached (bringUpXen): its pause
	// stays the watchdog's.
	leave := func(why string) {
		if d.xenWatchdogHeld == nil {
			d.xenWatchdogHeld = map[string]string{}
		}
		d.xenWatchdogHeld[x.Name] = fmt.Sprintf("the watchdog holds domain %d paused (%s): not attached, it stays paused: %s", s.XenDomID, s.Why, why)
		d.log.Error("the watchdog holds a Xen primary paused: not attached, it stays paused", zap.String("vm", x.Name),
			zap.Uint32("domid", s.XenDomID), zap.String("why", why))
	}
	holds, sure, why := d.holdsRecord(x.Name)
	switch {
	case !sure:
		leave(fmt.Sprintf("the witness cannot be asked whether this host holds the VM (%s); restart remusd once it answers", why))
		return
	case !holds:
		leave(fmt.Sprintf("another host holds the VM (%s); destroy the domain (xl destroy %d)", why, s.XenDomID))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.sendCont(ctx, x.Name, 0, "", true, 0, true); err != nil {
		leave(fmt.Sprintf("this host holds the VM (%s) but the watchdog could not drop its pause (%v); restart remusd", why, err))
		return
	}
	d.log.Warn("the watchdog had paused a Xen primary; this host still holds the VM: its pause is dropped", zap.String("vm", x.Name),
		zap.Uint32("domid", s.XenDomID), zap.String("why", why))
}

// continueGuest lifts a stop (through the watchdog if it holds it, else
// with a pidfd after checking the process is the VM's QEMU) and, unless
// run, pauses the guest over its QMP socket at once (before re-attach:
// nobody else is connected; QMP answers only a running QEMU, so the guest
// runs for the few milliseconds of a QMP connection, its output held).
func (d *Daemon) continueGuest(vm string, pid int, qmpPath string, viaWatchdog, run bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.sendCont(ctx, vm, pid, qmpPath, viaWatchdog, 0, true); err != nil {
		return err
	}
	if run {
		return nil
	}
	q, err := qemu.DialQMP(ctx, qmpPath)
	if err != nil {
		return fmt.Errorf("pause over QMP: %w", err)
	}
	defer q.Close()
	if err := q.Execute(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("pause over QMP: %w", err)
	}
	return nil
}

// sendCont asks the watchdog to continue vm (validFor more, or released),
// or, when it does not hold it (none reachable, or it does not know the
// VM), continues pid itself (a QEMU guest: pid > 0; a Xen domain's pause
// is the watchdog's to drop).
func (d *Daemon) sendCont(ctx context.Context, vm string, pid int, qmpPath string, viaWatchdog bool, validFor time.Duration, release bool) error {
	if viaWatchdog && d.wd != nil {
		if c := d.wd.client(); c != nil {
			_, err := c.Cont(ctx, vm, validFor, release)
			if err == nil || !strings.Contains(err.Error(), watchdog.ErrUnknownVM.Error()) {
				return err
			}
		}
	}
	if pid <= 0 {
		return fmt.Errorf("the watchdog does not hold %s (or cannot be reached): its pause is not this daemon's to drop", vm)
	}
	return contProcess(pid, qmpPath)
}

// contProcess sends SIGCONT to pid through a pidfd, after checking that
// it is the QEMU serving qmpPath.
func contProcess(pid int, qmpPath string) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("process %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if err := processAlive(pid, qmpPath); err != nil {
		return err
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGCONT, nil, 0); err != nil {
		return fmt.Errorf("SIGCONT %d: %w", pid, err)
	}
	return nil
}

// holdsRecord asks the witness whether vm may run here: no other host
// holds its record (this host does, or nobody: released by unprotect, or
// absent). sure is false when the witness could not be asked. Without a
// witness the daemon's word stands (holds, sure).
func (d *Daemon) holdsRecord(vm string) (holds, sure bool, why string) {
	if d.wit == nil {
		return true, true, "no witness configured"
	}
	ctx, cancel := d.witnessCtx()
	defer cancel()
	rec, held, err := d.wit.Get(ctx, vm)
	switch {
	case err != nil:
		return false, false, "witness: " + err.Error()
	case held && rec.Holder != d.cfg.Name:
		return false, true, "witness record " + rec.String()
	}
	return true, true, "witness record " + rec.String()
}

// watchdogRun starts the pet loop (Run calls it).
func (d *Daemon) watchdogRun() {
	if d.wd == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.wd.stop, d.wd.done = cancel, make(chan struct{})
	go func() {
		defer close(d.wd.done)
		t := time.NewTicker(d.wd.interval)
		defer t.Stop()
		for {
			d.petWatchdog(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// petWatchdog sends one pet and acts on the stops it reports.
func (d *Daemon) petWatchdog(ctx context.Context) {
	w := d.wd
	c := w.client()
	if c == nil {
		if time.Now().Before(w.nextTry) {
			return
		}
		w.nextTry = time.Now().Add(watchdogRetry)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := w.connect(cctx)
		cancel()
		if err != nil {
			return
		}
		d.recoverUnreported()
		c = w.client()
	}
	now := time.Now()
	d.mu.Lock()
	pets := d.watchdogPets(now)
	d.mu.Unlock()
	pctx, cancel := context.WithTimeout(ctx, max(w.timeout/2, time.Second))
	rep, err := c.Pet(pctx, pets)
	cancel()
	if err != nil && rep.Error == "" {
		w.fail(err)
		return
	}
	stopped := map[string]watchdog.StoppedVM{}
	for _, s := range rep.Stopped {
		stopped[s.Name] = s
	}
	for _, p := range pets {
		// Stopped, but not by this watchdog (one that exited did): the
		// same decision. (QEMU only: a Xen domain's pause does not say
		// whose it is.)
		if _, ok := stopped[p.Name]; !ok && p.Pid > 0 {
			if st, err := watchdog.ProcState(p.Pid); err == nil && st == 'T' {
				stopped[p.Name] = watchdog.StoppedVM{Name: p.Name, Pid: p.Pid, QMP: p.QMP, AtUnixMs: time.Now().UnixMilli(),
					Why: "found stopped (not by the running watchdog)"}
			}
		}
	}
	var recover []string
	d.mu.Lock()
	wasRefused := map[string]string{}
	for name, st := range w.vms {
		wasRefused[name] = st.refused
		st.listed, st.refused, st.stopped = false, "", nil
		if _, ok := d.vms[name]; !ok {
			delete(w.vms, name)
		}
	}
	for _, p := range pets {
		w.state(p.Name).listed = true
	}
	for _, r := range rep.Refused {
		st := w.state(r.Name)
		if wasRefused[r.Name] != r.Error {
			w.log.Error("the watchdog refuses to supervise this guest: a hung daemon would leave it running", zap.String("vm", r.Name), zap.Int("pid", r.Pid), zap.String("why", r.Error))
		}
		st.listed, st.refused = false, r.Error
	}
	for name, s := range stopped {
		v := d.vms[name]
		if v == nil {
			continue
		}
		st := w.state(name)
		st.stopped = &s
		if !st.recovering && !w.shutdown && v.busy == "" && v.guest != nil {
			st.recovering = true
			recover = append(recover, name)
		}
	}
	d.mu.Unlock()
	for _, name := range recover {
		go d.recoverStopped(name, stopped[name])
	}
}

func (w *wdog) state(name string) *wdVM {
	st := w.vms[name]
	if st == nil {
		st = &wdVM{}
		w.vms[name] = st
	}
	return st
}

// watchdogPets lists what this daemon vouches for now (d.mu held).
func (d *Daemon) watchdogPets(now time.Time) []watchdog.PetVM {
	var out []watchdog.PetVM
	for name, v := range d.vms {
		if v.role != RolePrimary || v.primary == nil || v.w.view == WitnessFenced {
			continue
		}
		var pet watchdog.PetVM
		switch g := v.guest.(type) {
		case *qemu.Guest:
			if g.Pid() <= 0 {
				continue
			}
			pet = watchdog.PetVM{Name: name, Pid: g.Pid(), QMP: g.Spec().QMPPath}
		case *xen.Guest:
			if v.xcfg == nil || g.DomID() == 0 {
				continue
			}
			pet = watchdog.PetVM{Name: name, XenDomID: g.DomID(), XenDomain: v.xcfg.domain()}
		default:
			continue
		}
		st := v.primary.Stats()
		if st.HeartbeatAge == 0 && st.Link != LinkUp {
			continue // the backup never answered: it holds nothing to take over with
		}
		valid := d.wd.timeout
		if !d.wd.shutdown {
			valid = proofValidFor(d.proofOf(v, st), now, d.proofLimits())
		}
		pet.ValidForNs = int64(valid)
		out = append(out, pet)
		d.wd.state(name).pid = pet.Pid
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// proof is what a primary can show of its right to run the VM.
type proof struct {
	witness     bool          // a witness decides takeovers
	linkUp      bool          // the link to the backup is up
	hbAge       time.Duration // since the backup was last heard (0: never)
	since       time.Time     // the link was lost then (zero: not lost)
	holder      bool          // this side holds the record, no claim in flight
	heldAt      time.Time     // when it last won (or registered) the record
	confirmedAt time.Time     // when the witness last confirmed it
}

type proofLimits struct {
	timeout, hbTimeout, fenceAfter, margin time.Duration
}

func (d *Daemon) proofLimits() proofLimits {
	return proofLimits{timeout: d.wd.timeout, hbTimeout: d.cfg.HeartbeatTimeout.D(), fenceAfter: d.cfg.FenceAfter.D(), margin: d.wd.margin}
}

// proofOf gathers v's proof (d.mu held).
func (d *Daemon) proofOf(v *vm, st checkpoint.PrimaryStats) proof {
	p := proof{witness: d.wit != nil, linkUp: st.Link == LinkUp, hbAge: st.HeartbeatAge, since: v.w.since,
		holder: v.w.view == WitnessHolder && !v.w.claiming, heldAt: v.w.heldAt}
	if st := d.wd.vms[v.name]; st != nil {
		p.confirmedAt = st.confirmedAt
	}
	return p
}

// proofValidFor is how long from now the watchdog may let the guest run
// on this proof (see the file comment).
func proofValidFor(p proof, now time.Time, l proofLimits) time.Duration {
	if !p.witness {
		return l.timeout
	}
	if p.linkUp && p.hbAge > 0 && p.hbAge < l.hbTimeout && p.since.IsZero() {
		return l.timeout
	}
	start := p.since
	if start.IsZero() && p.hbAge > 0 {
		start = now.Add(-p.hbAge)
	}
	if p.holder && !p.heldAt.Before(start) {
		return l.timeout // a claim won since the loss: the backup cannot win any more
	}
	if p.confirmedAt.After(start) {
		start = p.confirmedAt
	}
	return min(l.timeout, start.Add(l.fenceAfter+l.margin).Sub(now))
}

// recoverStopped decides about a guest the watchdog stopped while this
// daemon runs: continue it if this host still holds the VM; continue and
// pause it (fence) if not; leave it stopped if nobody can tell.
func (d *Daemon) recoverStopped(name string, s watchdog.StoppedVM) {
	w := d.wd
	defer func() {
		d.mu.Lock()
		if st := w.vms[name]; st != nil {
			st.recovering = false
		}
		d.mu.Unlock()
	}()
	d.mu.Lock()
	v := d.vms[name]
	if v == nil {
		d.mu.Unlock()
		return
	}
	g, _ := v.guest.(*qemu.Guest)
	xg, _ := v.guest.(*xen.Guest)
	switch {
	case g != nil && s.XenDomID == 0 && g.Pid() == s.Pid:
	case xg != nil && s.XenDomID != 0 && xg.DomID() == s.XenDomID:
	default:
		d.mu.Unlock()
		w.log.Warn("the watchdog holds stopped a process (or domain) this daemon does not run the VM in: left alone", zap.String("vm", name), zap.Int("pid", s.Pid), zap.Uint32("xen_domid", s.XenDomID))
		return
	}
	running := v.role == RolePrimary && v.primary != nil && v.w.view != WitnessFenced
	fresh := false
	if running {
		st := v.primary.Stats()
		fresh = st.Link == LinkUp && st.HeartbeatAge > 0 && st.HeartbeatAge < d.cfg.HeartbeatTimeout.D()
	}
	fenced := v.w.view == WitnessFenced
	d.mu.Unlock()

	holds, sure, why := false, true, "fenced"
	switch {
	case fenced:
	case fresh:
		holds, why = true, "the backup is connected and heard within heartbeat_timeout"
	default:
		holds, sure, why = d.holdsRecord(name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch {
	case !sure:
		d.mu.Lock()
		st := w.state(name)
		logIt := time.Since(st.loggedAt) >= watchdogLogEach
		if logIt {
			st.loggedAt = time.Now()
		}
		d.mu.Unlock()
		if logIt {
			w.log.Warn("the watchdog stopped the guest and the witness cannot be asked whether this host still holds the VM: it stays stopped", zap.String("vm", name), zap.Int("pid", s.Pid), zap.String("why", why))
		}
	case holds:
		d.mu.Lock()
		w.state(name).confirmedAt = time.Now()
		valid := w.timeout
		if running {
			valid = proofValidFor(d.proofOf(v, v.primary.Stats()), time.Now(), d.proofLimits())
		}
		d.mu.Unlock()
		if err := d.sendCont(ctx, name, s.Pid, s.QMP, true, valid, !running); err != nil {
			w.log.Error("cannot continue the guest", zap.String("vm", name), zap.Error(err))
			return
		}
		w.log.Warn("the watchdog had stopped the guest (its daemon could not vouch for it in time); this host still holds the VM: it runs on",
			zap.String("vm", name), zap.Int("pid", s.Pid), zap.String("stopped_because", s.Why), zap.String("why", why),
			zap.Duration("stopped_for", time.Since(time.UnixMilli(s.AtUnixMs))))
	case xg != nil:
		// A fence pause of the daemon's own first (the fence adds its
		// own too; a fenced domain waits for the operator's remusd
		// stop), the protection fenced, then the watchdog's pause
		// dropped: the domain does not run in between.
		if err := xg.PauseNow(ctx); err != nil {
			w.log.Error("fencing after the watchdog's pause: pause failed: the watchdog's pause stays", zap.String("vm", name), zap.Error(err))
			return
		}
		d.mu.Lock()
		if v.role == RolePrimary && v.primary != nil && v.w.view != WitnessFenced {
			v.w.view, v.w.err = WitnessFenced, why
			d.fenceLocked(v, why)
		}
		d.mu.Unlock()
		if err := d.sendCont(ctx, name, 0, "", true, 0, true); err != nil {
			w.log.Error("fencing after the watchdog's pause: cannot release it", zap.String("vm", name), zap.Error(err))
		}
		w.log.Error("the watchdog had paused the domain and this host no longer holds the VM: paused (fenced)", zap.String("vm", name), zap.Uint32("domid", s.XenDomID), zap.String("why", why))
	default:
		// Continue, then pause at once: QMP answers only a running QEMU.
		if err := d.sendCont(ctx, name, s.Pid, s.QMP, true, 0, true); err != nil {
			w.log.Error("cannot continue the guest to fence it: it stays stopped", zap.String("vm", name), zap.Error(err))
			return
		}
		if err := g.Pause(ctx); err != nil {
			w.log.Error("fencing after the watchdog's stop: pause failed", zap.String("vm", name), zap.Error(err))
		}
		d.mu.Lock()
		if v.role == RolePrimary && v.primary != nil && v.w.view != WitnessFenced {
			v.w.view, v.w.err = WitnessFenced, why
			d.fenceLocked(v, why)
		}
		d.mu.Unlock()
		w.log.Error("the watchdog had stopped the guest and this host no longer holds the VM: paused (fenced)", zap.String("vm", name), zap.Int("pid", s.Pid), zap.String("why", why))
	}
}

// recoverUnreported handles guests left in state T by a watchdog that
// is gone (a new one does not know them): the same decision as for a
// reported stop.
func (d *Daemon) recoverUnreported() {
	d.mu.Lock()
	var todo []watchdog.StoppedVM
	for name, v := range d.vms {
		g, ok := v.guest.(*qemu.Guest)
		if !ok || g.Pid() <= 0 || v.role != RolePrimary {
			continue
		}
		if st, err := watchdog.ProcState(g.Pid()); err == nil && st == 'T' {
			if s := d.wd.state(name); !s.recovering {
				s.recovering = true
				todo = append(todo, watchdog.StoppedVM{Name: name, Pid: g.Pid(), QMP: g.Spec().QMPPath, AtUnixMs: time.Now().UnixMilli(), Why: "found stopped"})
			}
		}
	}
	d.mu.Unlock()
	for _, s := range todo {
		go d.recoverStopped(s.Name, s)
	}
}

// watchdogShutdownBegin: from here on the daemon stops its protections for
// a restart; pets vouch for the full timeout (the guests are paused and
// resumed by the shutdown itself), and the VMs whose backup is reachable
// (told the daemon restarts) are noted for the restart grace.
func (d *Daemon) watchdogShutdownBegin() {
	if d.wd == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.wd.shutdown = true
	d.wd.restarting = nil
	for name, v := range d.vms {
		if v.role == RolePrimary && v.primary != nil && (v.backend == qemu.BackendName || v.backend == xen.BackendName) && v.primary.Stats().Link == LinkUp {
			d.wd.restarting = append(d.wd.restarting, name)
		}
	}
}

// watchdogShutdownEnd announces the restart (the guests named get
// restart_grace; the others keep their deadlines) and closes the channel.
func (d *Daemon) watchdogShutdownEnd() {
	w := d.wd
	if w == nil {
		return
	}
	if w.stop != nil {
		w.stop()
		<-w.done
	}
	d.mu.Lock()
	names := w.restarting
	d.mu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	w.closed = true
	if w.c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := w.c.Restart(ctx, names, d.cfg.RestartGrace.D()); err != nil {
		w.log.Error("could not tell the watchdog the daemon restarts: it stops the guests at their deadlines", zap.Error(err))
	} else {
		w.log.Info("told the watchdog the daemon restarts", zap.Strings("restart_grace_for", names), zap.Duration("restart_grace", d.cfg.RestartGrace.D()))
	}
	w.c.Close()
	w.c = nil
}

// Watchdog views of a VM, shown in status.
const (
	WatchdogSupervised = "supervised"
	WatchdogStopped    = "stopped"
)

// watchdogStatus fills a VM's watchdog fields (d.mu held).
func (d *Daemon) watchdogStatus(v *vm, s *VMStatus) {
	if g, ok := v.guest.(*qemu.Guest); ok {
		s.QEMUPid = g.Pid() // no lock: Paused would wait for a QMP call in flight
	}
	if d.wd == nil {
		return
	}
	st := d.wd.vms[v.name]
	switch {
	case st == nil:
	case st.stopped != nil:
		s.Watchdog = WatchdogStopped
		s.WatchdogError = st.stopped.Why
		s.WatchdogStoppedAtUnixMs = st.stopped.AtUnixMs
	case st.refused != "":
		s.WatchdogError = "refused: " + st.refused
	case st.listed:
		s.Watchdog = WatchdogSupervised
	}
	if s.Watchdog == "" && v.role == RolePrimary {
		d.wd.mu.Lock()
		if d.wd.err != "" {
			s.WatchdogError = "unavailable: " + d.wd.err
		}
		d.wd.mu.Unlock()
	}
}

// Guest run states in status.
const (
	GuestRunning = "running"
	GuestPaused  = "paused"
	GuestStopped = "stopped" // SIGSTOP
)

// guestStateTimeout bounds the QMP query of one guest's state in status.
const guestStateTimeout = 300 * time.Millisecond

// fillGuestStates sets GuestState of the QEMU guests (without d.mu: it
// asks QMP, which does not answer a stopped QEMU).
func fillGuestStates(ctx context.Context, out []VMStatus, guests []any) {
	for i, g := range guests {
		qg, ok := g.(*qemu.Guest)
		if !ok {
			continue
		}
		pid := qg.Pid()
		if pid <= 0 {
			// Its monitor is libvirt's QMP passthrough: a go-libvirt
			// call cannot be abandoned, so a query timing out here would
			// close the connection the protection runs on (CI: a loaded
			// libvirtd, the next checkpoint's pause failed for good).
			// Status does not ask; the state stays unreported.
			continue
		}
		if st, err := watchdog.ProcState(pid); err == nil && (st == 'T' || st == 't') {
			out[i].GuestState = GuestStopped
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, guestStateTimeout)
		var st qemu.Status
		err := qg.Monitor().Execute(qctx, "query-status", nil, &st)
		cancel()
		switch {
		case err != nil:
		case st.Running:
			out[i].GuestState = GuestRunning
		case st.Status == "paused":
			out[i].GuestState = GuestPaused
		default:
			out[i].GuestState = st.Status
		}
	}
}
