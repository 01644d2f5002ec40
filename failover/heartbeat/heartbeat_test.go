package heartbeat

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/internal/pki"
)

func counter(start uint64) func() uint64 {
	n := start
	return func() uint64 { n++; return n }
}

func TestEncodeVerify(t *testing.T) {
	k := newKey(bytes.Repeat([]byte{7}, KeySize))
	r := NewKeyring()
	r.Add("hostA", k)
	seq := counter(100)
	dgs, err := Encode("hostA", &k, seq, []string{"web", "db"})
	if err != nil || len(dgs) != 1 {
		t.Fatalf("encode: %d datagrams, %v", len(dgs), err)
	}
	bt, err := r.Verify(dgs[0])
	if err != nil || bt.Sender != "hostA" || !bt.Authenticated || bt.Seq != 101 || strings.Join(bt.VMs, ",") != "web,db" {
		t.Fatalf("verify: %+v, %v", bt, err)
	}
	// The same datagram again is a replay.
	if _, err := r.Verify(dgs[0]); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay accepted: %v", err)
	}
	// Every flipped bit is refused (MAC, structure, or both).
	dg, _ := Encode("hostA", &k, seq, []string{"web"})
	for i := range len(dg[0]) * 8 {
		b := bytes.Clone(dg[0])
		b[i/8] ^= 1 << (i % 8)
		if bt, err := r.Verify(b); err == nil {
			t.Fatalf("bit %d flipped accepted: %+v", i, bt)
		}
	}
	// A key the receiver does not have.
	other := newKey(bytes.Repeat([]byte{8}, KeySize))
	dg, _ = Encode("hostA", &other, seq, nil)
	if _, err := r.Verify(dg[0]); !errors.Is(err, ErrNoKey) {
		t.Fatalf("unknown key: %v", err)
	}
	// A sender with no keys at all.
	dg, _ = Encode("hostZ", &k, seq, nil)
	if _, err := r.Verify(dg[0]); !errors.Is(err, ErrNoKey) {
		t.Fatalf("unknown sender: %v", err)
	}
	// Forged: right key id, wrong key.
	forged := other
	forged.ID = k.ID
	dg, _ = Encode("hostA", &forged, seq, nil)
	if _, err := r.Verify(dg[0]); !errors.Is(err, ErrBadMAC) {
		t.Fatalf("forged MAC: %v", err)
	}
	// Unauthenticated datagrams decode (the endpoint decides).
	dg, _ = Encode("hostA", nil, seq, []string{"web"})
	if bt, err := r.Verify(dg[0]); err != nil || bt.Authenticated {
		t.Fatalf("unauthenticated: %+v %v", bt, err)
	}
}

func TestMalformed(t *testing.T) {
	k := newKey(bytes.Repeat([]byte{1}, KeySize))
	r := NewKeyring()
	r.Add("a", k)
	good, _ := Encode("a", nil, counter(0), []string{"vm"})
	for name, b := range map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte("XXXX"), good[0][4:]...),
		"version":   append(append([]byte("RMHB"), 9), good[0][5:]...),
		"truncated": good[0][:len(good[0])-1],
		"trailing":  append(bytes.Clone(good[0]), 0),
		"oversize":  bytes.Repeat([]byte{0}, MaxDatagram+1),
	} {
		if _, err := r.Verify(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := Encode("", nil, counter(0), nil); err == nil {
		t.Error("empty sender encoded")
	}
	if _, err := Encode("a", nil, counter(0), []string{strings.Repeat("v", MaxName+1)}); err == nil {
		t.Error("long VM name encoded")
	}
}

func TestManyVMsSplit(t *testing.T) {
	k := newKey(bytes.Repeat([]byte{3}, KeySize))
	r := NewKeyring()
	r.Add("a", k)
	var vms []string
	for i := range 300 {
		vms = append(vms, fmt.Sprintf("vm-%03d-%s", i, strings.Repeat("x", 40)))
	}
	dgs, err := Encode("a", &k, counter(0), vms)
	if err != nil || len(dgs) < 2 {
		t.Fatalf("%d datagrams, %v", len(dgs), err)
	}
	var got []string
	// Reordered delivery within a burst is accepted.
	for i := len(dgs) - 1; i >= 0; i-- {
		if len(dgs[i]) > MaxDatagram {
			t.Fatalf("datagram of %d bytes", len(dgs[i]))
		}
		bt, err := r.Verify(dgs[i])
		if err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		got = append(bt.VMs, got...)
	}
	if strings.Join(got, ",") != strings.Join(vms, ",") {
		t.Fatalf("VMs lost in the split")
	}
}

func TestReplayWindow(t *testing.T) {
	var w window
	for _, c := range []struct {
		seq uint64
		ok  bool
	}{{5, true}, {5, false}, {3, true}, {3, false}, {4, true}, {200, true}, {137, true}, {136, true}, {135, false}, {199, true}, {199, false}, {100, false}, {201, true}} {
		if got := w.accept(c.seq); got != c.ok {
			t.Fatalf("seq %d: accepted %v, want %v (top %d)", c.seq, got, c.ok, w.top)
		}
	}
}

func TestKeyringBounded(t *testing.T) {
	r := NewKeyring()
	var first Key
	for i := range keysPerPeer + 3 {
		k := newKey(bytes.Repeat([]byte{byte(i + 1)}, KeySize))
		if i == 0 {
			first = k
		}
		r.Add("a", k)
	}
	if n := len(r.peers["a"].keys); n != keysPerPeer {
		t.Fatalf("%d keys kept", n)
	}
	dg, _ := Encode("a", &first, counter(0), nil)
	if _, err := r.Verify(dg[0]); !errors.Is(err, ErrNoKey) {
		t.Fatalf("forgotten key still verifies: %v", err)
	}
}

// TestKeyFromTLS: both ends of one mutual-TLS connection derive the same
// key; another connection gives another key.
func TestKeyFromTLS(t *testing.T) {
	dir := t.TempDir()
	files, err := pki.Mesh(filepath.Join(dir, "tls"), "hostA", "hostB")
	if err != nil {
		t.Fatal(err)
	}
	scfg, err := files["hostB"].ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	ccfg, err := files["hostA"].ClientConfig(func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	pair := func() (Key, Key) {
		a, b := net.Pipe()
		srv := tls.Server(a, scfg)
		cli := tls.Client(b, ccfg)
		var wg sync.WaitGroup
		var sk Key
		var serr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			if serr = srv.Handshake(); serr == nil {
				sk, serr = KeyFromTLS(srv.ConnectionState())
			}
		}()
		if err := cli.Handshake(); err != nil {
			t.Fatal(err)
		}
		ck, err := KeyFromTLS(cli.ConnectionState())
		wg.Wait()
		if err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		a.Close() // not tls Close: its close_notify would block on the unread pipe
		b.Close()
		return ck, sk
	}
	c1, s1 := pair()
	c2, _ := pair()
	if c1 != s1 {
		t.Fatal("the two ends derived different keys")
	}
	if c1.ID == c2.ID {
		t.Fatal("two connections derived the same key")
	}
}

// TestEndpoints: two endpoints on loopback hear each other once they share
// a key; a stranger's datagrams, unauthenticated ones and replays are
// refused and counted.
func TestEndpoints(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	k := newKey(bytes.Repeat([]byte{9}, KeySize))
	type beat struct {
		peer string
		vms  []string
	}
	beats := make(chan beat, 100)
	mk := func(self string) *Endpoint {
		e, err := Listen(Options{Self: self, Listen: "127.0.0.1:0", Interval: 10 * time.Millisecond,
			VMs:    func(string) []string { return []string{self + "-vm"} },
			OnBeat: func(p string, vms []string, _ time.Time) { beats <- beat{p, vms} }})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	a, b := mk("hostA"), mk("hostB")
	ap := netip.MustParseAddrPort(a.Addr().String())
	bp := netip.MustParseAddrPort(b.Addr().String())
	a.o.Peers = []Peer{{Name: "hostB", Addr: bp}}
	b.o.Peers = []Peer{{Name: "hostA", Addr: ap}}
	done := make(chan struct{}, 2)
	for _, e := range []*Endpoint{a, b} {
		go func() { _ = e.Run(ctx); done <- struct{}{} }()
	}
	// No key yet: nothing is sent.
	time.Sleep(50 * time.Millisecond)
	if len(beats) != 0 || !b.LastHeard("hostA").IsZero() {
		t.Fatalf("heartbeats without a key: %d", len(beats))
	}
	a.Keys().Add("hostB", k)
	b.Keys().Add("hostA", k)
	got := <-beats
	if got.peer != "hostA" && got.peer != "hostB" {
		t.Fatalf("beat %+v", got)
	}
	deadline := time.After(5 * time.Second)
	for a.LastHeard("hostB").IsZero() || b.LastHeard("hostA").IsZero() {
		select {
		case <-beats:
		case <-deadline:
			t.Fatal("the endpoints did not hear each other")
		}
	}
	// A stranger with the right name but no key, and one with a MAC under
	// an unknown key, and an unauthenticated one: all refused.
	s, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2)}) // another address than hostA's
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	bad := newKey(bytes.Repeat([]byte{1}, KeySize))
	for _, key := range []*Key{&bad, nil} {
		dg, _ := Encode("hostA", key, counter(1<<62), []string{"x"})
		if _, err := s.WriteToUDPAddrPort(dg[0], bp); err != nil {
			t.Fatal(err)
		}
	}
	// The right key from the wrong address.
	dg, _ := Encode("hostA", &k, counter(1<<63), []string{"x"})
	if _, err := s.WriteToUDPAddrPort(dg[0], bp); err != nil {
		t.Fatal(err)
	}
	deadline = time.After(5 * time.Second)
	for {
		r := b.Refused()
		if r["no_key"] >= 1 && r["unauthenticated"] >= 1 && r["unknown_sender"] >= 1 {
			break
		}
		select {
		case bt := <-beats:
			for _, v := range bt.vms {
				if v == "x" {
					t.Fatalf("a stranger's heartbeat was accepted: %+v", bt)
				}
			}
		case <-deadline:
			t.Fatalf("refusals %v", r)
		}
	}
	cancel()
	<-done
	<-done
}
