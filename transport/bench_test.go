package transport

import (
	"context"
	"crypto/subtle"
	"math/rand/v2"
	"testing"

	"github.com/pierrec/lz4/v4"
	remuspb "github.com/remusd/remusd/proto"
)

const benchPages = 1024 // 4 MiB per epoch

// sparsePair returns two versions A and B of benchPages random pages, B
// differing from A in 4 8-byte words per page.
func sparsePair() (pfns []uint64, a, b []byte) {
	r := rand.New(rand.NewPCG(11, 12))
	pfns = make([]uint64, benchPages)
	for i := range pfns {
		pfns[i] = uint64(i)
		p := textPage(r) // realistic, partly compressible base content
		a = append(a, p...)
		b = append(b, sparse(r, p, 4)...)
	}
	return pfns, a, b
}

func reportPages(b *testing.B, pages int) {
	b.SetBytes(int64(pages) * ps)
	b.ReportMetric(float64(pages)*float64(b.N)/b.Elapsed().Seconds(), "pages/s")
}

func discard(*remuspb.PageBatch, []byte) error { return nil }

// BenchmarkEncodeSparse: every page differs from its cached copy in a few
// words (encoded XOR_LZ4). Alternates between versions A and B.
func BenchmarkEncodeSparse(b *testing.B) {
	pfns, va, vb := sparsePair()
	e, err := NewEncoder(DefaultEncoderConfig())
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := e.EncodeEpoch(ctx, 0, pfns, va, discard); err != nil {
		b.Fatal(err)
	}
	var payload int64
	b.ResetTimer()
	for i := range b.N {
		v := vb
		if i%2 == 1 {
			v = va
		}
		s, err := e.EncodeEpoch(ctx, uint64(i+1), pfns, v, discard)
		if err != nil {
			b.Fatal(err)
		}
		if s.Stats.XORLZ4 != benchPages {
			b.Fatalf("stats %+v", s.Stats)
		}
		payload += s.Stats.PayloadBytes
	}
	reportPages(b, benchPages)
	b.ReportMetric(float64(payload)/float64(b.N)/benchPages, "payloadB/page")
}

// BenchmarkEncodeRandom: incompressible pages never seen before (fresh pfns
// every epoch, so the cache misses and evicts), encoded RAW.
func BenchmarkEncodeRandom(b *testing.B) {
	r := rand.New(rand.NewPCG(13, 14))
	var pages []byte
	for range benchPages {
		pages = append(pages, randPage(r)...)
	}
	e, err := NewEncoder(DefaultEncoderConfig())
	if err != nil {
		b.Fatal(err)
	}
	pfns := make([]uint64, benchPages)
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		for j := range pfns {
			pfns[j] = uint64(i*benchPages + j)
		}
		s, err := e.EncodeEpoch(ctx, uint64(i+1), pfns, pages, discard)
		if err != nil {
			b.Fatal(err)
		}
		if s.Stats.Raw != benchPages {
			b.Fatalf("stats %+v", s.Stats)
		}
	}
	reportPages(b, benchPages)
}

// BenchmarkDecodeSparse decodes (sequentially, one goroutine) the XOR_LZ4
// batches of BenchmarkEncodeSparse.
func BenchmarkDecodeSparse(b *testing.B) {
	pfns, va, vb := sparsePair()
	e, err := NewEncoder(DefaultEncoderConfig())
	if err != nil {
		b.Fatal(err)
	}
	encodeAll(b, e, 0, pfns, va)
	batches, _ := encodeAll(b, e, 1, pfns, vb)
	d := NewDecoder(ps, benchPages)
	staging := make([]byte, benchPages*ps)
	base := func(pfn uint64) []byte { return va[pfn*ps : (pfn+1)*ps] }
	dst := func(i uint32) []byte { return staging[int(i)*ps : int(i+1)*ps] }
	b.ResetTimer()
	for range b.N {
		next := uint32(0)
		for _, bt := range batches {
			if _, err := d.DecodeBatch(bt.hdr, bt.payload, next, base, dst); err != nil {
				b.Fatal(err)
			}
			next += uint32(len(bt.hdr.Pfns))
		}
	}
	reportPages(b, benchPages)
}

// BenchmarkLZ4Bound is the single-core bound: XOR (word-wise) plus lz4 block
// compression of the same sparse deltas, with no codec around it; and lz4
// alone on incompressible pages.
func BenchmarkLZ4Bound(b *testing.B) {
	b.Run("sparse-xor", func(b *testing.B) {
		_, va, vb := sparsePair()
		var c lz4.Compressor
		x := make([]byte, ps)
		out := make([]byte, lz4.CompressBlockBound(ps))
		b.ResetTimer()
		for range b.N {
			for j := 0; j < benchPages; j++ {
				subtle.XORBytes(x, vb[j*ps:(j+1)*ps], va[j*ps:(j+1)*ps])
				if _, err := c.CompressBlock(x, out); err != nil {
					b.Fatal(err)
				}
			}
		}
		reportPages(b, benchPages)
	})
	b.Run("random", func(b *testing.B) {
		r := rand.New(rand.NewPCG(13, 14))
		var pages []byte
		for range benchPages {
			pages = append(pages, randPage(r)...)
		}
		var c lz4.Compressor
		out := make([]byte, lz4.CompressBlockBound(ps))
		b.ResetTimer()
		for range b.N {
			for j := 0; j < benchPages; j++ {
				if _, err := c.CompressBlock(pages[j*ps:(j+1)*ps], out); err != nil {
					b.Fatal(err)
				}
			}
		}
		reportPages(b, benchPages)
	})
}
