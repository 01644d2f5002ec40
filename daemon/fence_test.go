package daemon

import (
	"context"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/outbuf"
)

// fenceGuest records whether it is paused (the rest of the interface is
// not used by fencing).
type fenceGuest struct {
	hypervisor.Guest
	mu     sync.Mutex
	paused bool
}

func (g *fenceGuest) Pause(context.Context) error {
	g.mu.Lock()
	g.paused = true
	g.mu.Unlock()
	return nil
}
func (g *fenceGuest) Resume(context.Context) error {
	g.mu.Lock()
	g.paused = false
	g.mu.Unlock()
	return nil
}
func (g *fenceGuest) isPaused() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.paused }

type fenceBuf struct {
	outbuf.Buffer
	mu               sync.Mutex
	closed, detached bool
}

func (b *fenceBuf) Close() error  { b.mu.Lock(); b.closed = true; b.mu.Unlock(); return nil }
func (b *fenceBuf) Detach() error { b.mu.Lock(); b.detached = true; b.mu.Unlock(); return nil }
func (b *fenceBuf) Hold() error   { return nil }

// TestFenceStopsProtectionBeforePausing: a primary that lost its witness
// record is fenced while its protection's runner is in a checkpoint; the
// checkpoint, when it ends, resumes the guest. Fencing must leave the
// guest paused once the runner is gone, and leave the output buffer's
// rules in place (Detach, not Close), so that nothing the guest sends
// gets out should it run again. Found by the partition trials on the QEMU
// guest (class sigstop-primary, seed 301): the fenced guest ran on with
// its NFQUEUE rules removed, its replies leaving host A's uplink next to
// the new primary's.
func TestFenceStopsProtectionBeforePausing(t *testing.T) {
	g := &fenceGuest{}
	done := make(chan struct{})
	// Stopping the runner ends the checkpoint in progress, which resumes
	// the guest (as Primary.capture does), then the runner exits.
	stop := func() {
		go func() {
			_ = g.Resume(context.Background())
			close(done)
		}()
	}
	buf := &fenceBuf{}
	v := &vm{name: "vm", guest: g, stop: stop, done: done, netOut: buf}
	d := &Daemon{log: zap.NewNop()}
	d.mu.Lock()
	d.fenceLocked(v, "test")
	d.mu.Unlock()
	d.wg.Wait()
	<-done
	if !g.isPaused() {
		t.Fatal("the fenced guest runs: the checkpoint that ended after the fence's pause resumed it")
	}
	buf.mu.Lock()
	defer buf.mu.Unlock()
	if buf.closed || !buf.detached {
		t.Fatalf("fencing closed the output buffer (its rules gone: what the guest sends is unbuffered) instead of detaching it: closed %v, detached %v", buf.closed, buf.detached)
	}
	if s, _ := v.runErr.Load().(string); s == "" {
		t.Fatal("fencing left no reason in the VM's last error")
	}
}

// TestUnprotectRefusedWhenFenced: unprotecting a fenced copy would let
// its held output go and make it a local VM beside the copy the witness
// names; it is refused, and the VM stays fenced.
func TestUnprotectRefusedWhenFenced(t *testing.T) {
	v := &vm{name: "vm", role: RolePrimary, resume: &protectionRecord{ID: "p1"}}
	v.w.view, v.w.err = WitnessFenced, "hostB holds the VM at generation 2"
	d := &Daemon{log: zap.NewNop(), vms: map[string]*vm{"vm": v}}
	err := d.Unprotect(context.Background(), "vm")
	if err == nil || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("Unprotect of a fenced copy: %v, want a refusal naming the fence", err)
	}
	if v.role != RolePrimary || v.resume == nil {
		t.Fatalf("the refused unprotect changed the VM: role %s, resume %v", v.role, v.resume)
	}
}
