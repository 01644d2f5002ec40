package checkpoint

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/outbuf"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// pair is a primary and a backup joined by in-memory links, with fault
// hooks and invariant bookkeeping. It is the fault-injection harness.
type pair struct {
	t       *testing.T
	cfg     sim.Config
	guest   *sim.Guest
	replica *sim.Replica
	backup  *Backup
	primary *Primary
	out     *outbuf.Memory

	// hook, if set, decides the fault for each frame the primary writes.
	hook atomic.Pointer[func(link, i int, b []byte) transport.Fault]
	// backHook does the same for frames the backup writes (acks).
	backHook atomic.Pointer[func(link, i int, b []byte) transport.Fault]

	mu sync.Mutex
	// captured[epoch] = ops of the guest at that epoch's checkpoint.
	captured map[uint64]uint64
	acked    uint64
	// violations of invariant 1: output released for an epoch the backup
	// had not committed at the moment of release.
	violations []string
	released   int
	lastSeq    uint64
	links      int
	wg         sync.WaitGroup
}

func newPair(t *testing.T, cfg sim.Config, pc PrimaryConfig) *pair {
	t.Helper()
	cfg = cfg.WithDefaults()
	g, err := sim.New("vm", cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := sim.NewReplica("vm", cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{t: t, cfg: cfg, guest: g, replica: rep, captured: map[uint64]uint64{}}
	p.backup = NewBackup(BackupOptions{
		VMName: "vm", Replica: rep, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, Owner: "host-a",
		HeartbeatInterval: 20 * time.Millisecond, HeartbeatTimeout: 2 * time.Second,
	})
	p.out = outbuf.NewMemory(0, func(epoch uint64, msg []byte) {
		// Invariant 1: the backup must hold this epoch before its output leaves.
		if c := p.backup.Committed(); epoch > c {
			p.violations = append(p.violations, fmt.Sprintf("output of epoch %d released while backup committed %d", epoch, c))
		}
		seq := binary.LittleEndian.Uint64(msg)
		if seq <= p.lastSeq {
			p.violations = append(p.violations, fmt.Sprintf("output seq %d after %d: reordered", seq, p.lastSeq))
		}
		p.lastSeq = seq
		p.released++
	})
	g.SetOutput(func(_ uint64, msg []byte) { p.out.Emit(msg) })
	pr, err := NewPrimary(PrimaryOptions{
		Guest: g, Out: p.out, Dial: p.dial, ProtectionID: "test",
		Core:              pc,
		Encoder:           transport.EncoderConfig{CachePages: 64},
		HeartbeatInterval: 20 * time.Millisecond, HeartbeatTimeout: 2 * time.Second,
		ReconnectBackoff: 5 * time.Millisecond,
		OnCapture: func(ci CaptureInfo) {
			info, err := sim.DecodeDeviceState(ci.DeviceState)
			if err != nil {
				t.Errorf("capture %d: %v", ci.Epoch, err)
				return
			}
			p.mu.Lock()
			p.captured[ci.Epoch] = info.Ops
			p.mu.Unlock()
		},
		OnAck: func(e uint64) {
			p.mu.Lock()
			p.acked = e
			p.mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	p.primary = pr
	t.Cleanup(func() { g.Close() })
	return p
}

// dial makes a new in-memory link and serves its far end as the backup's
// daemon would: read Hello, then Backup.Serve.
func (p *pair) dial(ctx context.Context) (net.Conn, error) {
	p.mu.Lock()
	p.links++
	link := p.links
	p.mu.Unlock()
	a, b := transport.Pipe()
	pc := transport.NewFaultConn(a, func(i int, buf []byte) transport.Fault {
		if h := p.hook.Load(); h != nil {
			return (*h)(link, i, buf)
		}
		return transport.Fault{}
	})
	bc := transport.NewFaultConn(b, func(i int, buf []byte) transport.Fault {
		if h := p.backHook.Load(); h != nil {
			return (*h)(link, i, buf)
		}
		return transport.Fault{}
	})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		r := transport.NewReader(bc, transport.DefaultLimits())
		w := transport.NewWriter(bc)
		f, err := r.ReadFrame()
		if err != nil {
			bc.Close()
			return
		}
		h, ok := f.Header.(*remuspb.Hello)
		if !ok {
			bc.Close()
			return
		}
		_ = p.backup.Serve(ctx, bc, r, w, h, "host-a")
	}()
	return pc, nil
}

// run starts the primary; the returned func stops it and waits.
func (p *pair) run() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.primary.Run(ctx) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			p.t.Errorf("primary: %v", err)
		}
		p.wg.Wait()
	}
}

// waitAcked waits until the primary saw an ack of an epoch >= n.
func (p *pair) waitAcked(n uint64, within time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		a := p.acked
		p.mu.Unlock()
		if a >= n {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 1)
	p.t.Fatalf("no ack of epoch %d within %v (acked %d, backup committed %d, stats %+v)\n%s", n, within, p.acked, p.backup.Committed(), p.primary.Stats(), buf.String())
}

// checkReplica verifies invariants 2 and 4 after the primary stopped: the
// replica is byte for byte the primary's state at the backup's committed
// epoch, which is no older than the last epoch the primary saw acked.
func (p *pair) checkReplica() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	committed := p.backup.Committed()
	if committed < p.acked {
		p.t.Fatalf("backup committed %d < last ack seen by primary %d", committed, p.acked)
	}
	ops, ok := p.captured[committed]
	if !ok {
		p.t.Fatalf("backup committed epoch %d the primary never captured", committed)
	}
	epoch, dev := p.replica.DeviceState()
	if epoch != committed {
		p.t.Fatalf("replica device state is of epoch %d, committed %d", epoch, committed)
	}
	info, err := sim.DecodeDeviceState(dev)
	if err != nil {
		p.t.Fatal(err)
	}
	if info.Ops != ops {
		p.t.Fatalf("replica at epoch %d has ops %d, primary captured %d", committed, info.Ops, ops)
	}
	mem, wantDev, err := sim.Replay(p.cfg, ops)
	if err != nil {
		p.t.Fatal(err)
	}
	if !bytes.Equal(mem, p.replica.Memory()) {
		p.t.Fatalf("replica memory at epoch %d differs from the primary's state (%d pages differ)", committed, diffPages(mem, p.replica.Memory()))
	}
	if !bytes.Equal(wantDev, dev) {
		p.t.Fatalf("replica device state at epoch %d differs", committed)
	}
	if len(p.violations) > 0 {
		p.t.Fatalf("output commit violated: %v", p.violations)
	}
}

func diffPages(a, b []byte) int {
	n := 0
	for i := 0; i+4096 <= len(a) && i+4096 <= len(b); i += 4096 {
		if !bytes.Equal(a[i:i+4096], b[i:i+4096]) {
			n++
		}
	}
	return n
}

var errInjected = errors.New("injected")
