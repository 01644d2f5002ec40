package partition

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/netlab"
	"github.com/remusd/remusd/vmtest"
)

// QEMUPrereqs reports why the QEMU trials cannot run here (nil: they can).
// It checks facilities only; the guest image is BuildGuest's, whose
// failure is a failure, not a missing facility.
func QEMUPrereqs(ctx context.Context) error {
	if err := Prereqs(); err != nil {
		return err
	}
	if _, err := vmtest.FindQEMU(); err != nil {
		return err
	}
	return nil
}

// BuildGuest builds the QEMU trials' guest image (or takes it from its
// cache).
func BuildGuest(ctx context.Context) error {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if _, err := guestimage.Build(bctx, guestimage.Config{}); err != nil {
		return fmt.Errorf("guest image: %w", err)
	}
	return nil
}

// QEMUClasses are the classes run on the QEMU guest (a trial boots a
// guest: they are fewer and slower).
var QEMUClasses = []Class{CutReplication, IsolatePrimary, StopPrimary, KillDuringTakeover, IsolateBackup, KillWitness}

// QEMUTiming is the QEMU trials' configuration: the daemons' defaults
// (a checkpoint of a TCG guest takes tens of milliseconds), 50 ms epochs.
func QEMUTiming() Timing {
	d := daemon.DefaultConfig()
	return Timing{
		Epoch:               50 * time.Millisecond,
		HeartbeatInterval:   d.HeartbeatInterval.D(),
		HeartbeatTimeout:    d.HeartbeatTimeout.D(),
		AckTimeout:          d.AckTimeout.D(),
		FenceAfter:          d.FenceAfter.D(),
		TakeoverGrace:       d.TakeoverGrace.D(),
		TakeoverGraceClosed: d.TakeoverGraceClosed.D(),
		WitnessOpTimeout:    500 * time.Millisecond,
	}
}

// qemuObs is the QEMU trials' observer: a client on one TCP connection to
// the guest's service (every reply checked against the service's model:
// nothing lost or replayed), and the packet counters of each host's
// uplink for the guest's packets to the client.
type qemuObs struct {
	conn net.Conn

	mu     sync.Mutex
	ok     int
	lastAt time.Time
	err    error
	// ctr: counter samples of the guest's packets to the client leaving
	// each host (mangle POSTROUTING: after the output buffer let them go).
	ctr []ctrSample
}

type ctrSample struct {
	Start, End time.Time
	Host       string
	Pkts       uint64
}

// counterRule matches the guest's packets to the client; appended (no
// target) to mangle POSTROUTING it only counts, after filter FORWARD's
// NFQUEUE output buffering has let them go.
var counterRule = []string{"-s", netlab.GuestIP, "-d", netlab.ClientIP}

func installCounter(ctx context.Context, ns string) error {
	return iptables(ctx, ns, append([]string{"-t", "mangle", "-A", "POSTROUTING"}, counterRule...)...)
}

// readCounter returns the packets the counter rule in ns has seen.
func readCounter(ctx context.Context, ns string) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "iptables", "-w", "5", "-t", "mangle", "-L", "POSTROUTING", "-v", "-x", "-n").Output()
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		// pkts bytes [target] prot opt in out source destination: the
		// rule has no target.
		if len(f) >= 8 && f[len(f)-2] == netlab.GuestIP && f[len(f)-1] == netlab.ClientIP {
			return strconv.ParseUint(f[0], 10, 64)
		}
	}
	return 0, fmt.Errorf("no counter rule in %s", ns)
}

func zeroCounter(ctx context.Context, ns string) error {
	return iptables(ctx, ns, "-t", "mangle", "-Z", "POSTROUTING")
}

func (q *qemuObs) state() (ok int, last time.Time, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.ok, q.lastAt, q.err
}

// runClient issues ADDs back to back on one connection, checking every
// reply, until ctx ends or a reply is wrong.
func (q *qemuObs) runClient(ctx context.Context) {
	m := guestsvc.NewModel()
	rd := bufio.NewReader(q.conn)
	for id := uint64(1); ctx.Err() == nil; id++ {
		req, want := m.Add(id, "k"+strconv.FormatUint(id%4, 10), int64(id))
		_ = q.conn.SetDeadline(time.Now().Add(90 * time.Second))
		var err error
		if _, err = fmt.Fprintf(q.conn, "%s\n", req); err == nil {
			var got string
			if got, err = rd.ReadString('\n'); err == nil {
				err = guestsvc.Check(strings.TrimRight(got, "\n"), want)
			}
		}
		q.mu.Lock()
		if err != nil {
			if ctx.Err() == nil {
				q.err = fmt.Errorf("request %d: %w", id, err)
			}
			q.mu.Unlock()
			return
		}
		q.ok++
		q.lastAt = time.Now()
		q.mu.Unlock()
	}
}

// pollCounters samples both hosts' uplink counters every 100 ms.
func (r *run) pollCounters(ctx context.Context) {
	for ctx.Err() == nil {
		for _, h := range []string{HostA, HostB} {
			s := ctrSample{Start: time.Now(), Host: h}
			n, err := readCounter(ctx, r.ns(h))
			s.End = time.Now()
			if err != nil {
				continue
			}
			s.Pkts = n
			r.q.mu.Lock()
			r.q.ctr = append(r.q.ctr, s)
			r.q.mu.Unlock()
		}
		_ = sleep(ctx, 100*time.Millisecond)
	}
}

func (r *run) qemuConfigs() error {
	shm, err := os.MkdirTemp("/dev/shm", "pt-")
	if err != nil {
		return err
	}
	r.shm = shm
	off, on := false, true
	guest := func(tap, bridge, runDir string, autostart *bool) daemon.QemuVM {
		return daemon.QemuVM{Name: VM, MemoryMiB: 128, UseGuestImage: true, GuestIP: netlab.GuestIP + netlab.Prefix,
			Tap: tap, MAC: netlab.GuestMAC, Bridge: bridge, RunDir: runDir, Autostart: autostart}
	}
	r.bcfg.Standby = daemon.StandbyConfig{Tap: "tapB", Bridge: netlab.BridgeB, RunDir: filepath.Join(shm, "b")}
	r.bcfg.QemuVMs = []daemon.QemuVM{guest("tapB", netlab.BridgeB, filepath.Join(shm, "b-run"), &off)}
	r.acfg.SimVMs = nil
	r.acfg.QemuVMs = []daemon.QemuVM{guest("tapA", netlab.BridgeA, filepath.Join(shm, "a"), &on)}
	return nil
}

// qemuStart waits for the guest, protects it, connects the client and
// waits for replies under protection.
func (r *run) qemuStart(ctx context.Context) error {
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	_, err := guestimage.WaitReady(wctx, filepath.Join(r.shm, "a", VM+".serial"))
	cancel()
	if err != nil {
		return err
	}
	pc := daemon.ControlClient{Path: r.acfg.Control, Timeout: 30 * time.Second}
	if err := pc.Protect(ctx, daemon.ProtectRequest{VM: VM, Peer: HostB}); err != nil {
		return fmt.Errorf("protect: %w", err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, err := pc.VMStatus(ctx, VM)
		if err == nil && st.AckedEpoch >= 10 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("protection did not get going: %+v (%v)", st, err)
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	conn, err := netlab.Dial(dctx, r.lab.Net.Client, netlab.GuestIP+":"+strconv.Itoa(guestimage.DefaultPort))
	cancel()
	if err != nil {
		return err
	}
	r.q = &qemuObs{conn: conn}
	for _, ns := range []string{r.lab.Net.A, r.lab.Net.B} {
		if err := zeroCounter(ctx, ns); err != nil {
			return err
		}
	}
	return nil
}

// killHost kills a host: with QEMU everything in its namespace (the
// daemon and its QEMU), with the sim guest its daemon.
func (r *run) killHost(host string) {
	if !r.qemu {
		r.killDaemon(host)
		return
	}
	p := r.proc(host)
	netlab.KillAll(r.ns(host))
	if p != nil {
		<-p.Done()
	}
	r.mu.Lock()
	r.dead[host] = true
	r.mu.Unlock()
	r.event("%s killed (daemon and QEMU)", host)
}

// qemuSettled is settled for the QEMU guest: the holder runs it and the
// client's connection carries replies again.
func (r *run) qemuSettled(ctx context.Context, healed time.Time) (string, string) {
	h, why := r.holderSettled(ctx)
	if why != "" {
		return h, why
	}
	ok, last, err := r.q.state()
	if err != nil {
		return h, "client: " + err.Error()
	}
	if !last.After(healed) || ok < r.okAtHeal+5 {
		return h, fmt.Sprintf("the client has %d replies since the heal", ok-r.okAtHeal)
	}
	return h, r.otherStopped(ctx, h)
}

// qemuCheck judges the client's session and the uplink counters.
func (r *run) qemuCheck() {
	_, _, err := r.q.state()
	if err != nil {
		kind := "no-service"
		if errors.Is(err, guestsvc.ErrDiverged) {
			kind = "lost-acked"
		}
		r.violate(kind, "client: %v", err)
	}
	r.q.mu.Lock()
	ctr := append([]ctrSample(nil), r.q.ctr...)
	r.q.mu.Unlock()
	last := map[string]ctrSample{}
	var firstAt map[string]time.Time = map[string]time.Time{}
	for _, s := range ctr {
		if s.Pkts > 0 && firstAt[s.Host].IsZero() {
			firstAt[s.Host] = s.End
		}
		last[s.Host] = s
	}
	r.res.MsgsA, r.res.MsgsB = int(last[HostA].Pkts), int(last[HostB].Pkts)
	ok, _, _ := r.q.state()
	r.note("QEMU: %d client replies (%d after the heal); guest packets to the client on A's uplink %d, on B's %d", ok, ok-r.okAtHeal, r.res.MsgsA, r.res.MsgsB)
	if r.res.MsgsB > 0 && r.res.Holder == HostA {
		r.violate("two-copies", "uplink: the backup's uplink carried %d guest packets but the witness record names the primary", r.res.MsgsB)
	}
	// Once the backup's uplink carried the guest's output, the primary's
	// must carry none: an increase between two samples of A both taken
	// after B's first packets were counted.
	if tb := firstAt[HostB]; !tb.IsZero() {
		var prev *ctrSample
		for i := range ctr {
			s := ctr[i]
			if s.Host != HostA {
				continue
			}
			if prev != nil && prev.Start.After(tb) && s.Pkts > prev.Pkts {
				r.violate("interleaved", "uplink: host A's uplink carried %d guest packets between %s and %s, after host B's had carried some (by %s)",
					s.Pkts-prev.Pkts, prev.Start.Format("15:04:05.000"), s.End.Format("15:04:05.000"), tb.Format("15:04:05.000"))
				break
			}
			prev = &s
		}
	}
	// The side without the record carries nothing in the verdict window.
	r.mu.Lock()
	vat := r.verdictAt
	r.mu.Unlock()
	if vat.IsZero() {
		return
	}
	for _, h := range []string{HostA, HostB} {
		if h == r.res.Holder && r.live() {
			continue
		}
		var first *ctrSample
		for i := range ctr {
			s := ctr[i]
			if s.Host != h || s.Start.Before(vat) {
				continue
			}
			if first == nil {
				first = &s
			} else if s.Pkts > first.Pkts {
				r.violate("fenced-released", "uplink: %s (not the holder) carried %d guest packets after the verdict began", h, s.Pkts-first.Pkts)
				break
			}
		}
	}
}

// stopQEMUs kills what is left in the hosts' namespaces (the guests' QEMUs
// outlive their daemons by design), by PID.
func (r *run) stopQEMUs() {
	for _, ns := range []string{r.lab.Net.A, r.lab.Net.B} {
		netlab.KillAll(ns)
	}
	if r.shm != "" {
		os.RemoveAll(r.shm)
	}
}
