package guestsvc

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"
)

func serveLoopback(t *testing.T, s *State) net.Addr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = Serve(ctx, ln, s) }()
	t.Cleanup(func() { cancel(); <-done })
	return ln.Addr()
}

func TestClientModes(t *testing.T) {
	dir := t.TempDir()
	s := NewState()
	if err := s.SetLog(dir+"/log", dir, nil); err != nil {
		t.Fatal(err)
	}
	addr := serveLoopback(t, s)
	for _, o := range []ClientOptions{{}, {Log: true}, {FillKiB: 4}, {Log: true, LogAppend: true}} {
		t.Run(fmt.Sprintf("%+v", o), func(t *testing.T) {
			conn, err := net.Dial("tcp", addr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			c := NewClient(conn, o)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			done := make(chan struct{})
			go func() { defer close(done); c.Run(ctx) }()
			if err := c.WaitReplies(ctx, 50); err != nil {
				t.Fatal(err)
			}
			c.Finish()
			<-done
			ok, _, lastID, err := c.State()
			if err != nil || ok < 50 || lastID != uint64(ok) {
				t.Fatalf("state: %d replies, last id %d, err %v", ok, lastID, err)
			}
			if o.Log && !o.LogAppend {
				if got, want := s.Handle("LOGSUM"), c.LogModel().Sum(); got != want {
					t.Fatalf("LOGSUM %q, want %q", got, want)
				}
			}
			rs := c.Replies(10)
			if len(rs) != ok-10 || rs[0].ID != 11 {
				t.Fatalf("Replies(10): %d from id %d", len(rs), rs[0].ID)
			}
			if r, found := c.FirstAfter(rs[0].At.Add(-time.Nanosecond)); !found || r.ID != 11 {
				t.Fatalf("FirstAfter: %+v %v", r, found)
			}
			if _, found := c.FirstAfter(time.Now()); found {
				t.Fatal("FirstAfter(now) found a reply")
			}
		})
	}
}

// TestClientDetectsDivergence: a service that lost its state (a second,
// fresh one behind the same connection) is caught at the first reply.
func TestClientDetectsDivergence(t *testing.T) {
	fresh := NewState()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		for i := 0; ; i++ {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			line := string(buf[:n-1])
			if i == 3 {
				fresh = NewState() // state lost
				fresh.Handle("ADD 0 k1 1")
			}
			fmt.Fprintf(c, "%s\n", fresh.Handle(line))
		}
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := NewClient(conn, ClientOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c.Run(ctx)
	if err := c.Err(); !errors.Is(err, ErrDiverged) || !c.Diverged() {
		t.Fatalf("err %v diverged %v", err, c.Diverged())
	}
	if n := c.Count(); n != 3 {
		t.Fatalf("%d replies before the divergence, want 3", n)
	}
}
