package guestsvc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
)

func TestModelPredictsService(t *testing.T) {
	s := NewState()
	m := NewModel()
	for i := uint64(1); i <= 50; i++ {
		key := fmt.Sprintf("k%d", i%3)
		req, want := m.Add(i, key, int64(i))
		if err := Check(s.Handle(req), want); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLostStateIsDetected(t *testing.T) {
	s := NewState()
	m := NewModel()
	req, _ := m.Add(1, "a", 5)
	s.Handle(req)
	// The service "loses" request 2 (a failover to a state before it).
	lost := NewState()
	lost.Handle(req)
	req2, _ := m.Add(2, "a", 7)
	s.Handle(req2)
	req3, want3 := m.Add(3, "a", 1)
	if err := Check(lost.Handle(req3), want3); !errors.Is(err, ErrDiverged) {
		t.Fatalf("lost request not detected: %v", err)
	}
	// A replayed request is detected too.
	if err := Check(s.Handle(req2), want3); !errors.Is(err, ErrDiverged) {
		t.Fatalf("replay not detected: %v", err)
	}
}

func TestErrors(t *testing.T) {
	s := NewState()
	for _, line := range []string{"", "ADD 1 a", "ADD 1 a x", "GET", "NOPE"} {
		if r := s.Handle(line); !strings.HasPrefix(r, "ERR ") {
			t.Errorf("%q: %q", line, r)
		}
	}
	if r := s.Handle("PING"); !strings.HasPrefix(r, "PONG 0 ") {
		t.Errorf("ping: %q", r)
	}
}

func TestServeOverTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, NewState()) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	m := NewModel()
	for i := uint64(1); i <= 20; i++ {
		req, want := m.Add(i, "x", 2)
		fmt.Fprintf(c, "%s\n", req)
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if err := Check(strings.TrimSpace(got), want); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
