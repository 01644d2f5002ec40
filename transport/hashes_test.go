package transport

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	remuspb "github.com/remusd/remusd/proto"
)

func TestReplicaHashesRoundTrip(t *testing.T) {
	const page = 4096
	pages := ReplicaHashesPerFrame + 37 // two records
	mem := make([]byte, pages*page)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < pages; i += 7 {
		mem[i*page+rnd.IntN(page)] = byte(rnd.Uint32())
	}
	var buf bytes.Buffer
	if err := WriteReplicaHashes(NewWriter(&buf), mem, page); err != nil {
		t.Fatal(err)
	}
	got := make([]uint64, pages)
	if err := ReadReplicaHashes(NewReader(&buf, DefaultLimits()), got); err != nil {
		t.Fatal(err)
	}
	for p := range got {
		if got[p] != PageHash(mem[p*page:(p+1)*page]) {
			t.Fatalf("page %d hash differs", p)
		}
	}
}

func TestReplicaHashesMalformed(t *testing.T) {
	hashes := func(n int) []byte { return make([]byte, 8*n) }
	cases := []struct {
		name string
		hdr  *remuspb.ReplicaHashes
		pay  []byte
	}{
		{"gap", &remuspb.ReplicaHashes{FirstPfn: 1, Count: 2}, hashes(2)},
		{"past the end", &remuspb.ReplicaHashes{FirstPfn: 0, Count: 11}, hashes(11)},
		{"empty", &remuspb.ReplicaHashes{FirstPfn: 0, Count: 0}, nil},
		{"short payload", &remuspb.ReplicaHashes{FirstPfn: 0, Count: 4}, hashes(3)},
		{"over the limit", &remuspb.ReplicaHashes{FirstPfn: 0, Count: ReplicaHashesPerFrame + 1}, hashes(10)},
	}
	for _, c := range cases {
		var buf bytes.Buffer
		if err := NewWriter(&buf).WriteFrame(KindReplicaHashes, c.hdr, c.pay); err != nil {
			t.Fatal(err)
		}
		err := ReadReplicaHashes(NewReader(&buf, DefaultLimits()), make([]uint64, 10))
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v, want ErrMalformed", c.name, err)
		}
	}
	var buf bytes.Buffer
	_ = NewWriter(&buf).WriteFrame(KindAck, &remuspb.Ack{Epoch: 3}, nil)
	if err := ReadReplicaHashes(NewReader(&buf, DefaultLimits()), make([]uint64, 10)); !errors.Is(err, ErrMalformed) {
		t.Errorf("wrong record kind: %v", err)
	}
}
