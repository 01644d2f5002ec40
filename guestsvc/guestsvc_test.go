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

func TestLogCommands(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/log"
	s := NewState()
	if got := s.Handle("LOG 1 a"); !strings.HasPrefix(got, "ERR") {
		t.Fatalf("LOG without a log file: %q", got)
	}
	froze := ""
	if err := s.SetLog(path, dir, func(m string) error { froze = m; return nil }); err != nil {
		t.Fatal(err)
	}
	var m LogModel
	for i, w := range []string{"alpha", "beta", "gamma"} {
		req, want := m.Log(uint64(i+1), w)
		if err := Check(s.Handle(req), want); err != nil {
			t.Fatal(err)
		}
		m.Logged(uint64(i+1), w)
	}
	if err := Check(s.Handle("LOGSUM"), m.Sum()); err != nil {
		t.Fatal(err)
	}
	// A record the model did not see acknowledged makes the sums differ.
	var other LogModel
	other.Logged(1, "alpha")
	if s.Handle("LOGSUM") == other.Sum() {
		t.Fatal("LOGSUM matches a model with fewer records")
	}
	// A restarted service counts the records already in the file.
	s2 := NewState()
	if err := s2.SetLog(path, dir, nil); err != nil {
		t.Fatal(err)
	}
	req, want := m.Log(4, "delta")
	if err := Check(s2.Handle(req), want); err != nil {
		t.Fatal(err)
	}
	if got := s2.Handle("FILL 5 64"); got != "FILLED 5 65536" {
		t.Fatalf("FILL: %q", got)
	}
	if got := s2.Handle("FILL 6 64"); got != "FILLED 6 131072" {
		t.Fatalf("second FILL: %q", got)
	}
	if got := s2.Handle("FILL 7 0"); !strings.HasPrefix(got, "ERR") {
		t.Fatalf("FILL of 0 KiB: %q", got)
	}
	if got := s2.Handle("FREEZE"); !strings.HasPrefix(got, "ERR") {
		t.Fatalf("FREEZE without a freeze function: %q", got)
	}
	if got := s.Handle("FREEZE"); got != "FROZEN" || froze != dir {
		t.Fatalf("FREEZE: %q, froze %q", got, froze)
	}
	if got := s.Handle("LOG 9 late"); !strings.HasPrefix(got, "ERR") {
		t.Fatalf("LOG after FREEZE: %q", got)
	}
}
