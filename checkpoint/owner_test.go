package checkpoint

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	"github.com/remusd/remusd/outbuf"

	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// strangerLink opens a link to the pair's backup as identity peer with
// hello and returns the backup's Serve result and the Welcome it sent.
func (p *pair) strangerLink(t *testing.T, peer string, hello *remuspb.Hello, frames func(w *transport.Writer)) (error, *remuspb.Welcome) {
	t.Helper()
	a, b := transport.Pipe()
	defer a.Close()
	errc := make(chan error, 1)
	go func() {
		r := transport.NewReader(b, transport.DefaultLimits())
		w := transport.NewWriter(b)
		errc <- p.backup.Serve(context.Background(), b, r, w, hello, peer)
	}()
	// The refusal may echo what the stranger sent (a huge VM name), but
	// bounded: it must fit the limits every primary reads a Welcome with.
	r := transport.NewReader(a, transport.DefaultLimits())
	f, err := r.ReadFrame()
	if err != nil {
		t.Fatalf("stranger: read welcome: %v", err)
	}
	wel, _ := f.Header.(*remuspb.Welcome)
	if frames != nil {
		frames(transport.NewWriter(a))
	}
	a.Close()
	select {
	case err := <-errc:
		return err, wel
	case <-time.After(10 * time.Second):
		t.Fatal("backup's Serve did not return")
	}
	return nil, nil
}

// TestBackupRefusesStrangers is issue 8's hole 1: a peer other than the
// replica's owner, with a valid Hello of a new protection and a full
// epoch, or a Goodbye, must change nothing: not the replica's committed
// epoch, not its content, not the owner's link.
func TestBackupRefusesStrangers(t *testing.T) {
	p := newPair(t, smallGuest("uniform", 21), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second})
	stop := p.run()
	p.waitAcked(10, 20*time.Second)
	before := p.backup.Stats()
	linksBefore := p.primary.Stats().Reconnects

	hello := &remuspb.Hello{ProtocolVersion: ProtocolVersion, VmName: "vm", ProtectionId: "stranger", MemoryBytes: uint64(p.replica.NumPages()) * 4096,
		PageSize: 4096, Backend: "sim", BackendVersion: p.guest.BackendVersion(), Host: "host-a"}
	err, wel := p.strangerLink(t, "host-x", hello, func(w *transport.Writer) {
		_ = w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: 1, Full: true, PageCount: uint32(p.replica.NumPages())}, nil)
		_ = w.WriteFrame(transport.KindGoodbye, &remuspb.Goodbye{Reason: "hide the lost primary"}, nil)
	})
	if !errors.Is(err, ErrNotOwner) || wel == nil || wel.Error == "" {
		t.Fatalf("stranger with a new protection: err %v, welcome %+v", err, wel)
	}
	// The same protection id does not help a stranger either.
	hello.ProtectionId = "test"
	if err, _ := p.strangerLink(t, "host-x", hello, nil); !errors.Is(err, ErrNotOwner) {
		t.Fatalf("stranger with the owner's protection id: %v", err)
	}
	p.waitAcked(before.Committed+10, 20*time.Second)
	stop()
	after := p.backup.Stats()
	if after.Goodbye {
		t.Fatal("a stranger's Goodbye was taken: a lost primary would be hidden")
	}
	if after.Refused < 2 {
		t.Fatalf("refused %d links, want 2", after.Refused)
	}
	if r := p.primary.Stats().Reconnects; r != linksBefore {
		t.Fatalf("the owner's link was cut by a stranger (reconnects %d → %d)", linksBefore, r)
	}
	p.checkReplica()
}

// TestStopWhileWaitingForWelcome: a backup that accepts the connection but
// never answers must not hold up the primary's stop (a daemon shutdown
// pauses the guest meanwhile): the handshake's read ends with the context,
// not with WelcomeTimeout.
func TestStopWhileWaitingForWelcome(t *testing.T) {
	cfg := smallGuest("uniform", 5).WithDefaults()
	g, err := sim.New("vm", cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	dialled := make(chan struct{}, 1)
	p, err := NewPrimary(PrimaryOptions{
		Guest: g, Out: outbuf.NewMemory(0, nil), ProtectionID: "p",
		Dial: func(ctx context.Context) (net.Conn, error) {
			a, b := transport.Pipe()
			go func() { _, _ = io.Copy(io.Discard, b) }() // reads the Hello, answers nothing
			select {
			case dialled <- struct{}{}:
			default:
			}
			return a, nil
		},
		WelcomeTimeout: time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	<-dialled
	time.Sleep(50 * time.Millisecond) // inside connect, waiting for Welcome
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute): // a liveness bound far below WelcomeTimeout
		t.Fatal("Run did not return on cancel while waiting for a Welcome")
	}
}
