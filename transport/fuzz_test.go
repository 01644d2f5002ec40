package transport

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/pierrec/lz4/v4"
	remuspb "github.com/remusd/remusd/proto"
	"google.golang.org/protobuf/proto"
)

// FuzzReadFrame feeds arbitrary bytes to a Reader: it must never panic and
// must end in a clean io.EOF or an ErrMalformed error.
func FuzzReadFrame(f *testing.F) {
	f.Add(encodeFrames(f, sampleFrames()))
	for _, fr := range sampleFrames() {
		f.Add(encodeFrames(f, []Frame{fr}))
	}
	good, _, _ := validBatch(f)
	f.Add(encodeFrames(f, []Frame{{KindPageBatch, good.hdr, good.payload}}))
	f.Add(rawFrame(99999999, 4, 0, nil))
	f.Add([]byte{0, 0, 0, 5, 77, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data), Limits{MaxFrame: 1 << 20, MaxHeader: 1 << 16, MaxBatchPages: 64, MaxDeviceState: 1 << 19})
		for {
			fr, err := r.ReadFrame()
			if err == io.EOF {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("error %v is not ErrMalformed", err)
				}
				return
			}
			if !fr.Kind.Valid() || fr.Header == nil || (len(fr.Payload) > 0 && !fr.Kind.HasPayload()) {
				t.Fatalf("bad frame %v %T %d", fr.Kind, fr.Header, len(fr.Payload))
			}
		}
	})
}

// FuzzDecodeBatch decodes arbitrary (header, payload) pairs: no panic, and
// either success or ErrMalformed. The crc check is bypassed half of the time
// (by fixing up the crc) so that the page decoders are exercised.
func FuzzDecodeBatch(f *testing.F) {
	good, bk, _ := validBatch(f)
	hb, err := proto.Marshal(good.hdr)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(hb, good.payload, true)
	f.Add(hb, good.payload, false)
	e, _ := NewEncoder(EncoderConfig{CachePages: 4, BatchPages: 8, Workers: 1})
	pages := append(bytes.Repeat([]byte{0}, ps), bytes.Repeat([]byte("xyz"), ps)[:ps]...)
	bs, _ := encodeAll(f, e, 1, []uint64{1, 5}, pages)
	hb2, _ := proto.Marshal(bs[0].hdr)
	f.Add(hb2, bs[0].payload, false)
	f.Fuzz(func(t *testing.T, hdrBytes, payload []byte, fixCRC bool) {
		var h remuspb.PageBatch
		if proto.Unmarshal(hdrBytes, &h) != nil {
			return
		}
		if fixCRC {
			h.PayloadCrc32C = crc32c(payload)
		}
		staging := make([][]byte, 16)
		d := NewDecoder(ps, 32)
		d.MaxBatchPages = 64
		hashes, err := d.DecodeBatch(&h, payload, 10, bk.page, func(i uint32) []byte {
			if int(i) >= len(staging) {
				return nil
			}
			if staging[i] == nil {
				staging[i] = make([]byte, ps)
			}
			return staging[i]
		})
		if err != nil {
			if !errors.Is(err, ErrMalformed) && h.FirstIndex+uint32(len(h.Pfns)) <= 16 {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		if len(hashes) != len(h.Pfns) {
			t.Fatalf("%d hashes for %d pages", len(hashes), len(h.Pfns))
		}
		for j := range h.Pfns {
			if hashes[j] != PageHash(staging[10+j]) {
				t.Fatalf("hash of page %d does not match", j)
			}
		}
	})
}

// FuzzLZ4Decode checks lz4Decode against pierrec/lz4: never a panic; where
// both accept an input they agree; and every block pierrec compresses
// decodes back to its input.
func FuzzLZ4Decode(f *testing.F) {
	r := rand.New(rand.NewPCG(1, 1))
	f.Add(sparse(r, make([]byte, ps), 3), false)
	f.Add(textPage(r), false)
	f.Add([]byte{0xF0, 0x55, 1, 2, 3}, true)
	f.Fuzz(func(t *testing.T, data []byte, raw bool) {
		if !raw {
			var c lz4.Compressor
			blk := make([]byte, lz4.CompressBlockBound(len(data)))
			n, err := c.CompressBlock(data, blk)
			if err != nil {
				t.Fatal(err)
			}
			out := make([]byte, len(data))
			m, err := lz4Decode(blk[:n], out)
			if n > 0 && (err != nil || m != len(data) || !bytes.Equal(out, data)) {
				t.Fatalf("round trip of %d bytes: %d %v", len(data), m, err)
			}
			data = blk[:n]
		}
		a, b := make([]byte, ps), make([]byte, ps)
		n1, err1 := lz4Decode(data, a)
		n2, err2 := lz4.UncompressBlock(data, b)
		if err1 == nil && err2 == nil && (n1 != n2 || !bytes.Equal(a[:n1], b[:n2])) {
			t.Fatalf("decoders disagree: %d vs %d bytes", n1, n2)
		}
	})
}
