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
