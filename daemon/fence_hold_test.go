package daemon

import (
	"sync"
	"testing"

	"go.uber.org/zap"

	"github.com/remusd/remusd/outbuf"
)

// orderBuf records the calls fencing makes on the output buffer.
type orderBuf struct {
	outbuf.Buffer
	mu    sync.Mutex
	calls []string
}

func (b *orderBuf) note(c string) { b.mu.Lock(); b.calls = append(b.calls, c); b.mu.Unlock() }
func (b *orderBuf) Hold() error   { b.note("hold"); return nil }
func (b *orderBuf) Detach() error { b.note("detach"); return nil }
func (b *orderBuf) Close() error  { b.note("close"); return nil }

// TestFenceHoldsBeforeDetach: a fenced primary whose buffer was
// letting output pass (ack-timeout solo mode, or a live start before the
// first checkpoint) must leave it holding: a detached plug keeps its
// qdisc in TCQ_PLUG_RELEASE_INDEFINITE, so a fenced guest that runs again
// would send unbuffered.
func TestFenceHoldsBeforeDetach(t *testing.T) {
	g := &fenceGuest{}
	buf := &orderBuf{}
	v := &vm{name: "vm", guest: g, stop: func() {}, netOut: buf}
	d := &Daemon{log: zap.NewNop()}
	d.mu.Lock()
	d.fenceLocked(v, "test")
	d.mu.Unlock()
	d.wg.Wait()
	buf.mu.Lock()
	defer buf.mu.Unlock()
	if len(buf.calls) != 2 || buf.calls[0] != "hold" || buf.calls[1] != "detach" {
		t.Fatalf("fencing called %v on the output buffer; want [hold detach]", buf.calls)
	}
}

// statsBuf reports fixed counters.
type statsBuf struct {
	orderBuf
	st outbuf.Stats
}

func (b *statsBuf) Kind() string        { return "nfqueue" }
func (b *statsBuf) Stats() outbuf.Stats { return b.st }

// TestStatusReportsHoldRepairs: a host-level buffer's counters reach the
// status, the hold repairs among them (an operator must learn that output
// may have left unheld).
func TestStatusReportsHoldRepairs(t *testing.T) {
	buf := &statsBuf{st: outbuf.Stats{HeldPackets: 4, ReleasedPackets: 9, DroppedPackets: 1, HoldRepairs: 2}}
	d := &Daemon{log: zap.NewNop(), vms: map[string]*vm{"vm": {name: "vm", role: RolePrimary, netOut: buf}}}
	st, err := d.Status(t.Context())
	if err != nil || len(st) != 1 {
		t.Fatalf("Status: %+v, %v", st, err)
	}
	s := st[0]
	if s.OutBuf != "nfqueue" || s.OutputHeld != 4 || s.OutputReleased != 9 || s.OutputDropped != 1 || s.OutputHoldRepairs != 2 {
		t.Fatalf("status %+v; want the buffer's counters", s)
	}
}
