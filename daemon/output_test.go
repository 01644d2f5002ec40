package daemon

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

func outputRecord(epoch uint64, msg string) []byte {
	b := binary.BigEndian.AppendUint64(nil, epoch)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msg)))
	return append(b, msg...)
}

func TestReadOutputStream(t *testing.T) {
	var stream bytes.Buffer
	fmt.Fprintf(&stream, "%s hostA vm1\n", OutputMagic)
	stream.Write(outputRecord(3, "hello"))
	stream.Write(outputRecord(4, ""))
	var got []string
	err := ReadOutputStream(&stream, func(host string, epoch uint64, msg []byte) {
		got = append(got, fmt.Sprintf("%s/%d/%s", host, epoch, msg))
	})
	if err != nil || strings.Join(got, ",") != "hostA/3/hello,hostA/4/" {
		t.Fatalf("got %v, %v", got, err)
	}

	bad := map[string][]byte{
		"bad header": []byte("HELLO a b\n"),
		"oversize":   append([]byte(OutputMagic+" h v\n"), binary.BigEndian.AppendUint32(make([]byte, 8), 2<<20)...),
		"truncated":  append([]byte(OutputMagic+" h v\n"), outputRecord(1, "abcdef")[:15]...),
	}
	for name, b := range bad {
		if err := ReadOutputStream(bytes.NewReader(b), func(string, uint64, []byte) {}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestOutputSinkDropsStaleReleases: released output (epoch > 0) that
// waited in the sink longer than its max age is dropped, not delivered (a
// daemon stopped between an ack and the delivery may have been declared
// lost meanwhile: partition trials, sigstop-primary, seeds 5000028 and
// 5000138); unbuffered output (epoch 0) and fresh releases are delivered.
func TestOutputSinkDropsStaleReleases(t *testing.T) {
	const maxAge = 200 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens yet: the sink holds what it is given
	s := newOutputSink(addr, "hostA", "vm", maxAge, zap.NewNop())
	defer s.close()
	s.send(0, []byte("unbuffered"))
	s.send(7, []byte("stale"))
	time.Sleep(3 * maxAge) // the sink's dial retries meanwhile
	if ln, err = net.Listen("tcp", addr); err != nil {
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	defer ln.Close()
	type msg struct {
		epoch uint64
		text  string
	}
	got := make(chan msg, 16)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = ReadOutputStream(c, func(_ string, epoch uint64, m []byte) { got <- msg{epoch, string(m)} })
	}()
	next := func() msg {
		select {
		case m := <-got:
			return m
		case <-time.After(5 * time.Second):
			t.Fatal("nothing delivered within 5 s")
			return msg{}
		}
	}
	// The unbuffered message arrives once the sink is connected; the
	// stale release queued with it must not.
	if m := next(); m != (msg{0, "unbuffered"}) {
		t.Fatalf("first delivered %v, want the unbuffered message", m)
	}
	s.send(8, []byte("fresh")) // the sink is connected: delivered at once
	if m := next(); m != (msg{8, "fresh"}) {
		t.Fatalf("then delivered %v, want the fresh release (the stale one dropped)", m)
	}
	if n := s.stale.Load(); n != 1 {
		t.Fatalf("stale drops %d, want 1", n)
	}
}
