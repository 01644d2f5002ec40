package bench

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/pierrec/lz4/v4"

	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// EncodeConfig configures MeasureEncode.
type EncodeConfig struct {
	// Pages per epoch (default 4096: 16 MiB).
	Pages int
	// Words is how many 8-byte words differ from the cached copy on a
	// sparse-write page (default 4).
	Words int
	// Workers of the encoder (default 1, so that it compares with the
	// single-core lz4 bound; the engine uses GOMAXPROCS).
	Workers int
	// Rounds: each round times one epoch of the encoder, then raw lz4 and
	// XOR+RLE on the same pages, interleaved so that machine noise hits
	// all three alike; medians are reported (default 15).
	Rounds int
	Seed   uint64
}

func (c EncodeConfig) withDefaults() EncodeConfig {
	if c.Pages <= 0 {
		c.Pages = 4096
	}
	if c.Words <= 0 {
		c.Words = 4
	}
	if c.Workers <= 0 {
		c.Workers = 1
	}
	if c.Rounds <= 0 {
		c.Rounds = 15
	}
	if c.Seed == 0 {
		c.Seed = 1
	}
	return c
}

// EncodeResult is the codec figures for one kind of page.
type EncodeResult struct {
	// Kind is "sparse" (Words words changed vs the cached copy, base page
	// random) or "random" (the whole page rewritten with random bytes).
	Kind           string
	Pages, Workers int
	// EncodePagesPerSec is transport.Encoder.EncodeEpoch (zero/same/dup
	// checks, XOR vs cache, lz4, xxhash, crc32c, cache update).
	EncodePagesPerSec float64
	// LZ4PagesPerSec is the bound: one core lz4-compressing the same pages
	// (raw, not XORed). LZ4DeltaPagesPerSec compresses their XOR deltas.
	LZ4PagesPerSec, LZ4DeltaPagesPerSec float64
	// Ratio is EncodePagesPerSec / LZ4PagesPerSec.
	Ratio float64
	// XORRLEPagesPerSec is the anchor codec's encode rate (one core).
	XORRLEPagesPerSec float64
	// Wire bytes / raw bytes: the encoder's payload, raw lz4 of each page
	// (incompressible pages counted at full size), and XOR+RLE.
	WireRatio, LZ4WireRatio, XORRLEWireRatio float64
	// WireVsXORRLE is the encoder's wire bytes / XOR+RLE's.
	WireVsXORRLE float64
	// Stats of the last encoded epoch (which encodings were chosen).
	Stats transport.EncodeStats
}

// MeasureEncode measures the delta codec on sparse-write and random-write
// pages against raw lz4 and XOR+RLE.
func MeasureEncode(ctx context.Context, cfg EncodeConfig) ([]EncodeResult, error) {
	cfg = cfg.withDefaults()
	var out []EncodeResult
	for _, kind := range []string{"sparse", "random"} {
		r, err := measureEncodeKind(ctx, cfg, kind)
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

// encodePages builds two versions of cfg.Pages pages.
func encodePages(cfg EncodeConfig, kind string) (a, b []byte) {
	rng := rand.New(rand.NewPCG(cfg.Seed, 0xc0dec))
	n := cfg.Pages * pageSize
	a = make([]byte, n)
	b = make([]byte, n)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(a[i:], rng.Uint64())
	}
	switch kind {
	case "sparse":
		copy(b, a)
		for p := range cfg.Pages {
			for range cfg.Words {
				off := p*pageSize + 8*rng.IntN(pageSize/8)
				binary.LittleEndian.PutUint64(b[off:], rng.Uint64()|1)
			}
		}
	default:
		for i := 0; i < n; i += 8 {
			binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
		}
	}
	return a, b
}

func measureEncodeKind(ctx context.Context, cfg EncodeConfig, kind string) (EncodeResult, error) {
	res := EncodeResult{Kind: kind, Pages: cfg.Pages, Workers: cfg.Workers}
	va, vb := encodePages(cfg, kind)
	enc, err := transport.NewEncoder(transport.EncoderConfig{PageSize: pageSize, CachePages: cfg.Pages, Workers: cfg.Workers})
	if err != nil {
		return res, err
	}
	pfns := make([]uint64, cfg.Pages)
	for i := range pfns {
		pfns[i] = uint64(i)
	}
	discard := func(*remuspb.PageBatch, []byte) error { return nil }
	// Warm-up epoch: fills (and first-touches) the encoder's cache.
	if _, err := enc.EncodeEpoch(ctx, 1, pfns, va, discard); err != nil {
		return res, err
	}
	var comp lz4.Compressor
	lzOut := make([]byte, lz4.CompressBlockBound(pageSize))
	delta := make([]byte, len(va))
	rleOut := make([]byte, 0, len(va)+len(va)/8+64)
	pretouch(delta)
	pretouch(rleOut[:cap(rleOut)])
	pretouch(lzOut)

	var encRate, lzRate, lzDeltaRate, rleRate []float64
	var wire, lzWire, rleWire, raw int64
	pages := float64(cfg.Pages)
	for round := range cfg.Rounds {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		cur, prev := vb, va // the encoder's cache holds prev
		if round%2 == 1 {
			cur, prev = va, vb
		}
		t0 := time.Now()
		sum, err := enc.EncodeEpoch(ctx, uint64(round+2), pfns, cur, discard)
		if err != nil {
			return res, err
		}
		encRate = append(encRate, pages/time.Since(t0).Seconds())
		res.Stats = sum.Stats

		t0 = time.Now()
		var lw int64
		for p := 0; p < len(cur); p += pageSize {
			c, err := comp.CompressBlock(cur[p:p+pageSize], lzOut)
			if err != nil {
				return res, fmt.Errorf("bench: lz4: %w", err)
			}
			if c == 0 || c >= pageSize {
				c = pageSize
			}
			lw += int64(c)
		}
		lzRate = append(lzRate, pages/time.Since(t0).Seconds())

		subtle.XORBytes(delta, cur, prev)
		t0 = time.Now()
		for p := 0; p < len(delta); p += pageSize {
			if _, err := comp.CompressBlock(delta[p:p+pageSize], lzOut); err != nil {
				return res, fmt.Errorf("bench: lz4: %w", err)
			}
		}
		lzDeltaRate = append(lzDeltaRate, pages/time.Since(t0).Seconds())

		t0 = time.Now()
		rleOut = rleOut[:0]
		for p := 0; p < len(cur); p += pageSize {
			rleOut = xorRLEEncode(rleOut, cur[p:p+pageSize], prev[p:p+pageSize])
		}
		rleRate = append(rleRate, pages/time.Since(t0).Seconds())

		wire += sum.Stats.PayloadBytes
		lzWire += lw
		rleWire += int64(len(rleOut))
		raw += int64(len(cur))
	}
	res.EncodePagesPerSec = medianFloat(encRate)
	res.LZ4PagesPerSec = medianFloat(lzRate)
	res.LZ4DeltaPagesPerSec = medianFloat(lzDeltaRate)
	res.XORRLEPagesPerSec = medianFloat(rleRate)
	if res.LZ4PagesPerSec > 0 {
		res.Ratio = res.EncodePagesPerSec / res.LZ4PagesPerSec
	}
	res.WireRatio = float64(wire) / float64(raw)
	res.LZ4WireRatio = float64(lzWire) / float64(raw)
	res.XORRLEWireRatio = float64(rleWire) / float64(raw)
	if rleWire > 0 {
		res.WireVsXORRLE = float64(wire) / float64(rleWire)
	}
	return res, nil
}
