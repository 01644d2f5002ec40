package transport

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	remuspb "github.com/remusd/remusd/proto"
)

func TestRLERoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for trial := range 200 {
		base := randPage(r)
		cur := bytes.Clone(base)
		// change a random number of words, sometimes in runs
		for range r.IntN(40) {
			o := r.IntN(ps/8) * 8
			n := 8 * (1 + r.IntN(4))
			for j := o; j < min(o+n, ps); j++ {
				cur[j] = byte(r.Uint32())
			}
		}
		delta := make([]byte, ps)
		for i := range delta {
			delta[i] = cur[i] ^ base[i]
		}
		enc, ok := rleEncode(nil, delta, ps+64)
		if !ok {
			t.Fatalf("trial %d: encode gave up under a page-size limit", trial)
		}
		out := bytes.Clone(base)
		if err := rleApply(enc, out); err != nil {
			t.Fatalf("trial %d: %v", trial, err)
		}
		if !bytes.Equal(out, cur) {
			t.Fatalf("trial %d: round trip differs", trial)
		}
	}
}

func TestRLELimit(t *testing.T) {
	delta := bytes.Repeat([]byte{1}, ps)
	if _, ok := rleEncode(nil, delta, 1024); ok {
		t.Fatal("a whole-page delta fit in 1024 bytes")
	}
	if enc, ok := rleEncode([]byte("keep"), make([]byte, ps), 16); !ok || !bytes.HasPrefix(enc, []byte("keep")) || len(enc) != 4+3 {
		t.Fatalf("zero delta: %v %q", ok, enc)
	}
}

func TestRLEMalformed(t *testing.T) {
	good, _ := rleEncode(nil, patterned(make([]byte, ps), 16), ps)
	cases := map[string][]byte{
		"empty":          nil,
		"truncated":      good[:len(good)-3],
		"trailing bytes": append(bytes.Clone(good), 0),
		"empty run":      {0, 0},
		"run past page":  {0x80, 0x08, 0}, // 1024 zero words > 512
		"bad varint":     {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
	}
	for name, src := range cases {
		out := make([]byte, ps)
		if err := rleApply(src, out); !errors.Is(err, errRLE) {
			t.Errorf("%s: got %v", name, err)
		}
	}
}

// TestEncoderPicksRLEForSparseDeltas: a few changed words go as XOR_RLE,
// a long but repetitive delta as XOR_LZ4, and both decode exactly.
func TestEncoderPicksRLEForSparseDeltas(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	e, err := NewEncoder(EncoderConfig{CachePages: 8, BatchPages: 8, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	bk := newBackup(4)
	a, b := randPage(r), randPage(r)
	first, _ := encodeAll(t, e, 1, []uint64{0, 1}, cat(a, b))
	bk.apply(t, first, nil)
	sa, pb := sparse(r, a, 4), patterned(b, 3000)
	batches, sum := encodeAll(t, e, 2, []uint64{0, 1}, cat(sa, pb))
	if got := encodings(batches); !slices.Equal(got, []remuspb.PageEncoding{RLE, XOR}) {
		t.Fatalf("encodings %v", got)
	}
	bk.apply(t, batches, nil)
	if !bytes.Equal(bk.page(0), sa) || !bytes.Equal(bk.page(1), pb) {
		t.Fatal("backup differs")
	}
	if sum.Stats.XORRLE != 1 || sum.Stats.PayloadBytes > 4*(8+2)+64+512 {
		t.Fatalf("stats %+v", sum.Stats)
	}
}

func FuzzRLEApply(f *testing.F) {
	good, _ := rleEncode(nil, patterned(make([]byte, ps), 40), ps)
	f.Add(good)
	f.Add([]byte{0x80, 0x04, 0})
	f.Fuzz(func(t *testing.T, src []byte) {
		out := make([]byte, ps)
		if err := rleApply(src, out); err != nil && !errors.Is(err, errRLE) {
			t.Fatalf("unexpected error %v", err)
		}
	})
}
