package netlab

import (
	"bufio"
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

func TestRemusTopology(t *testing.T) {
	if err := Check(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n, err := NewRemus(ctx, "nlt")
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			n.Close()
		}
	}()
	nss := n.Namespaces()
	if len(nss) != 5 {
		t.Fatalf("namespaces %v, want 5 (client, A, B, switch, witness)", nss)
	}

	// A service on host B answers a client in the client namespace across
	// the switch.
	ln, err := Listen(n.B, HostBIP+":7999")
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
		line, _ := bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("echo " + line))
	}()
	// The witness host is reached from the hosts (a listener there, a
	// dial from host A).
	wl, err := Listen(n.W, WitnessIP+":2379")
	if err != nil {
		t.Fatal(err)
	}
	wc, err := Dial(ctx, n.A, WitnessIP+":2379")
	if err != nil {
		t.Fatal(err)
	}
	wc.Close()
	wl.Close()
	c, err := Dial(ctx, n.Client, HostBIP+":7999")
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte("hi\n"))
	got, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || got != "echo hi\n" {
		t.Fatalf("reply %q, %v", got, err)
	}
	// Dial gives up when its context ends.
	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	if _, err := Dial(short, n.A, HostBIP+":1"); err == nil {
		t.Error("dial of a closed port succeeded")
	}
	cancelShort()

	// A process left running inside is killed by Close.
	cmd := Command(n.A, "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	deadline := time.Now().Add(5 * time.Second)
	for len(Pids(n.A)) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if len(Pids(n.A)) == 0 {
		t.Fatal("sleep not seen in namespace A")
	}
	closed = true
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Errorf("sleep ended with %v, want killed", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("sleep still running after Close")
	}
	for _, ns := range nss {
		if _, err := os.Stat("/run/netns/" + ns); !os.IsNotExist(err) {
			t.Errorf("namespace %s left behind (%v)", ns, err)
		}
	}
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
