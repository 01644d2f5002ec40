package checkpoint

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// TestBusyBackupIsNotSilence: a backup that is slow to apply one
// epoch (a big epoch, a stalled disk under its audit log, CPU starvation)
// stops reading its socket; with pipelined epochs (max_inflight > 1) the
// primary's writes then block in a full TCP send buffer for longer than
// the heartbeat timeout. The backup never considered the primary lost:
// it was connected all along, and its read deadline is set only when it
// reads again. The sendClock nevertheless marks the link silent and the
// primary drops a healthy link on the backup's next ack (and, in the
// daemon, claims the witness record and bumps its generation). Real TCP
// on loopback with small buffers.
func TestBusyBackupIsNotSilence(t *testing.T) {
	p := newPair(t, smallGuest("uniform", 11), PrimaryConfig{Interval: 5 * time.Millisecond, MaxInflight: 4, AckTimeout: 60 * time.Second})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*net.TCPConn).SetReadBuffer(64 << 10)
			go func() {
				defer c.Close()
				r := transport.NewReader(c, transport.DefaultLimits())
				w := transport.NewWriter(c)
				f, err := r.ReadFrame()
				if err != nil {
					return
				}
				h, ok := f.Header.(*remuspb.Hello)
				if !ok {
					return
				}
				if err := p.backup.Serve(ctx, c, r, w, h, "host-a"); err != nil {
					t.Logf("backup serve: %v", err)
				}
			}()
		}
	}()
	p.primary.o.Dial = func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			return nil, err
		}
		_ = c.(*net.TCPConn).SetWriteBuffer(64 << 10)
		p.mu.Lock()
		p.links++
		p.mu.Unlock()
		return c, nil
	}
	var stall atomic.Bool
	p.backup.o.OnCommit = func(uint64, []byte) {
		if stall.CompareAndSwap(true, false) {
			time.Sleep(3 * time.Second) // the heartbeat timeout is 2 s
		}
	}
	stop := p.run()
	defer stop()
	p.waitAcked(5, 20*time.Second)
	p.mu.Lock()
	links, acked := p.links, p.acked
	p.mu.Unlock()
	stall.Store(true)
	p.waitAcked(acked+20, 30*time.Second)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.links != links {
		t.Fatalf("the primary dropped a healthy link (links %d → %d; last error %q) while its backup, connected and never silent towards it, applied one epoch slowly", links, p.links, p.primary.Stats().LastError)
	}
}
