package plug

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/outbuf"
	"github.com/remusd/remusd/vmtest"
)

// fakeControl records plug actions.
type fakeControl struct {
	actions  []uint32
	failNext error
	torn     bool
}

func (f *fakeControl) plug(_ context.Context, a uint32) error {
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	f.actions = append(f.actions, a)
	return nil
}

func (f *fakeControl) stats(context.Context) (outbuf.Stats, error) {
	return outbuf.Stats{HeldPackets: 3, HeldBytes: 300}, nil
}

func (f *fakeControl) teardown(context.Context) error { f.torn = true; return nil }

func newFake() (*Buffer, *fakeControl) {
	f := &fakeControl{}
	return newBuffer(f, DefaultTimeout, nil), f
}

func TestPlugOptionsEncoding(t *testing.T) {
	b := plugOptions(actionReleaseOne, 1<<20)
	if len(b) != 8 {
		t.Fatalf("len %d, want 8 (struct tc_plug_qopt)", len(b))
	}
	if a, l := binary.NativeEndian.Uint32(b), binary.NativeEndian.Uint32(b[4:]); a != 1 || l != 1<<20 {
		t.Fatalf("decoded action %d limit %d", a, l)
	}
	if actionBuffer != 0 || actionReleaseOne != 1 || actionReleaseIndefinite != 2 || actionLimit != 3 {
		t.Fatal("plug action constants differ from pkt_sched.h")
	}
}

func TestIFBName(t *testing.T) {
	if got := IFBName("vif3.0"); got != "ifb-vif3.0" {
		t.Fatalf("IFBName(vif3.0) = %q", got)
	}
	a, b := IFBName("tap-guest-number-1"), IFBName("tap-guest-number-2")
	if len(a) > 15 || len(b) > 15 || a == b || !strings.HasPrefix(a, "ifb-tap-g") {
		t.Fatalf("long names: %q %q", a, b)
	}
}

func TestOneUnreleasedEpochMerges(t *testing.T) {
	buf, f := newFake()
	if buf.Kind() != "plug" {
		t.Fatal(buf.Kind())
	}
	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	// A second checkpoint while epoch 1 is pending places no boundary: a
	// second BUFFER would make RELEASE_ONE let out part of epoch 2.
	if err := buf.Checkpoint(2); err != nil {
		t.Fatalf("second checkpoint: %v", err)
	}
	if err := buf.Release(0); err != nil {
		t.Fatal(err)
	}
	if err := buf.Release(2); err != nil { // lets out epoch 1; epoch 2 waits for a boundary
		t.Fatal(err)
	}
	if st := buf.Stats(); st.LastReleased != 1 {
		t.Fatalf("after Release(2) with epoch 2 merged: last released %d, want 1", st.LastReleased)
	}
	if err := buf.Release(2); err != nil { // nothing pending: no second RELEASE_ONE
		t.Fatal(err)
	}
	if err := buf.Checkpoint(2); err == nil {
		t.Fatal("checkpoint of an old epoch accepted")
	}
	if err := buf.Checkpoint(3); err != nil { // boundary after epochs 2 and 3
		t.Fatal(err)
	}
	if err := buf.Release(5); err != nil { // releases <= 5: epochs 2 and 3
		t.Fatal(err)
	}
	want := []uint32{actionBuffer, actionReleaseOne, actionBuffer, actionReleaseOne}
	if len(f.actions) != len(want) {
		t.Fatalf("actions %v, want %v", f.actions, want)
	}
	for i := range want {
		if f.actions[i] != want[i] {
			t.Fatalf("actions %v, want %v", f.actions, want)
		}
	}
	if st := buf.Stats(); st.LastReleased != 3 || st.HeldPackets != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestHoldAfterReleaseAllAndDetach(t *testing.T) {
	buf, f := newFake()
	if err := buf.Hold(); err != nil || len(f.actions) != 0 {
		t.Fatalf("hold while holding: %v, actions %v", err, f.actions)
	}
	if err := buf.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	if err := buf.Hold(); err != nil {
		t.Fatal(err)
	}
	if err := buf.Checkpoint(4); err != nil {
		t.Fatal(err)
	}
	want := []uint32{actionReleaseIndefinite, actionBuffer, actionBuffer}
	if len(f.actions) != len(want) {
		t.Fatalf("actions %v, want %v", f.actions, want)
	}
	for i := range want {
		if f.actions[i] != want[i] {
			t.Fatalf("actions %v, want %v", f.actions, want)
		}
	}
	if err := buf.Detach(); err != nil {
		t.Fatal(err)
	}
	if f.torn {
		t.Fatal("Detach tore the plug down: a running guest's output would flow unheld")
	}
	if err := buf.Release(4); !errors.Is(err, outbuf.ErrClosed) {
		t.Fatalf("release after detach: %v", err)
	}
	if len(f.actions) != len(want) {
		t.Fatalf("actions after detach: %v", f.actions)
	}
}

func TestFailedCheckpointFailsClosed(t *testing.T) {
	buf, f := newFake()
	f.failNext = unix.ETIMEDOUT
	if err := buf.Checkpoint(1); err == nil {
		t.Fatal("checkpoint error lost")
	}
	if err := buf.Checkpoint(2); !errors.Is(err, ErrBroken) {
		t.Fatalf("checkpoint after failure: %v", err)
	}
	if err := buf.Release(2); !errors.Is(err, ErrBroken) {
		t.Fatalf("release after failure: %v", err)
	}
	if len(f.actions) != 0 {
		t.Fatalf("actions sent after failure: %v", f.actions)
	}
	if err := buf.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
}

func TestReleaseAllAndClose(t *testing.T) {
	buf, f := newFake()
	if err := buf.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	if err := buf.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	if err := buf.Checkpoint(2); err != nil { // pass-through: no-op
		t.Fatal(err)
	}
	if len(f.actions) != 2 || f.actions[1] != actionReleaseIndefinite {
		t.Fatalf("actions %v", f.actions)
	}
	if err := buf.Close(); err != nil || !f.torn {
		t.Fatalf("close: %v torn=%v", err, f.torn)
	}
	if err := buf.Close(); err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{buf.Checkpoint(3), buf.Release(3), buf.ReleaseAll()} {
		if !errors.Is(err, outbuf.ErrClosed) {
			t.Fatalf("after close: %v", err)
		}
	}
	if st := buf.Stats(); st.HeldPackets != 0 || st.DroppedPackets != 3 {
		t.Fatalf("stats after close %+v", st)
	}
}

func TestInVMTestsSkipOnHost(t *testing.T) {
	if vmtest.InVM() {
		t.Skip("in the VM")
	}
	// needVM must skip (not fail) outside the VM.
	ok := t.Run("probe", func(t *testing.T) { needVM(t); t.Fatal("needVM did not skip") })
	if !ok {
		t.Fatal("needVM did not skip on the host")
	}
}

// TestNewWithoutSchPlug runs New on a kernel without sch_plug (this host's)
// in a scratch network namespace: it must fail with ErrNotSupported and
// leave nothing behind.
func TestNewWithoutSchPlug(t *testing.T) {
	if vmtest.InVM() {
		t.Skip("the VM kernel has sch_plug")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	err := inScratchNS(func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer h.Close()
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vt0"}, PeerName: "vt1"}); err != nil {
			return errors.New("skip: no veth: " + err.Error())
		}
		_, nerr := New(context.Background(), Config{Interface: "vt0"}, nil)
		if nerr == nil {
			return errors.New("skip: this kernel has sch_plug")
		}
		if !errors.Is(nerr, ErrNotSupported) {
			return errors.New("New: " + nerr.Error())
		}
		l, _ := h.LinkByName("vt0")
		qs, _ := h.QdiscList(l)
		for _, q := range qs {
			if q.Type() == "ingress" {
				return errors.New("ingress qdisc left behind")
			}
		}
		if _, err := h.LinkByName(IFBName("vt0")); err == nil {
			return errors.New("ifb left behind")
		}
		t.Logf("New without sch_plug: %v", nerr)
		return nil
	})
	if err != nil && strings.HasPrefix(err.Error(), "skip: ") {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// inScratchNS runs f in a new, private network namespace.
func inScratchNS(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the namespace
		ns, err := netns.New()
		if err != nil {
			errc <- errors.New("skip: no network namespace: " + err.Error())
			return
		}
		defer ns.Close()
		errc <- f()
	}()
	return <-errc
}
