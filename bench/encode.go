package bench

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"io"
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
	// the XOR+RLE reference on the same pages, interleaved so that machine
	// noise hits all three alike; medians are reported (default 15).
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
	// checks, XOR vs cache, lz4, xxhash, crc32c, cache update) with the
	// epoch's frames written by a transport.Writer to io.Discard.
	EncodePagesPerSec float64
	// LZ4PagesPerSec is the bound: one core lz4-compressing the same pages
	// (raw, not XORed). LZ4DeltaPagesPerSec compresses their XOR deltas.
	LZ4PagesPerSec, LZ4DeltaPagesPerSec float64
	// Ratio is EncodePagesPerSec / LZ4PagesPerSec.
	Ratio float64
	// XORRLEPagesPerSec is the reference codec's encode rate, with its
	// framing (one core; bench/remusref.go).
	XORRLEPagesPerSec float64
	// Bytes ÷ raw page bytes. WireOverRaw: everything our link carries for
	// the epoch, counted by the frame Writer (EpochBegin, the PageBatch
	// frames, EpochEnd: frame prefixes, protobuf headers, payloads).
	// PayloadOverRaw: the encoded pages alone. LZ4OverRaw: raw lz4 of each
	// page, unframed (incompressible pages counted at full size).
	// XORRLEOverRaw: the XOR+RLE reference with its own framing (per-page
	// pfn entries, batch and chunk headers).
	WireOverRaw, PayloadOverRaw, LZ4OverRaw, XORRLEOverRaw float64
	// WireOverXORRLE is our wire bytes (headers included) ÷ the
	// reference's; above 1 we lose.
	WireOverXORRLE float64
	// Stats of the last encoded epoch (which encodings were chosen).
	Stats transport.EncodeStats
}

// MeasureEncode measures the delta codec on sparse-write and random-write
// pages against raw lz4 and the XOR+RLE reference.
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
	// Our side of the byte counts: the frames of each epoch as the primary
	// writes them (no DeviceState: the reference carries none either).
	fw := transport.NewWriter(io.Discard)
	emit := func(hdr *remuspb.PageBatch, payload []byte) error {
		return fw.WriteFrame(transport.KindPageBatch, hdr, payload)
	}
	var comp lz4.Compressor
	lzOut := make([]byte, lz4.CompressBlockBound(pageSize))
	delta := make([]byte, len(va))
	rleOut := make([]byte, 0, len(va)+len(va)/8+(cfg.Pages/refMaxBatch+1)*16+cfg.Pages*9)
	pretouch(delta)
	pretouch(rleOut[:cap(rleOut)])
	pretouch(lzOut)

	var encRate, lzRate, lzDeltaRate, rleRate []float64
	var wire, payload, lzWire, rleWire, raw int64
	pages := float64(cfg.Pages)
	for round := range cfg.Rounds {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		cur, prev := vb, va // the encoder's cache holds prev
		if round%2 == 1 {
			cur, prev = va, vb
		}
		epoch := uint64(round + 2)
		w0 := fw.BytesWritten()
		t0 := time.Now()
		if err := fw.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: epoch, BaseEpoch: epoch - 1, PageCount: uint32(len(pfns))}, nil); err != nil {
			return res, err
		}
		sum, err := enc.EncodeEpoch(ctx, epoch, pfns, cur, emit)
		if err != nil {
			return res, err
		}
		var d transport.Digest
		d.AddPages(pfns, sum.PageHashes)
		if err := fw.WriteFrame(transport.KindEpochEnd, &remuspb.EpochEnd{Epoch: epoch, PageCount: uint32(len(pfns)), Digest: d.Sum(nil)}, nil); err != nil {
			return res, err
		}
		encRate = append(encRate, pages/time.Since(t0).Seconds())
		wire += int64(fw.BytesWritten() - w0)
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
		rleOut = refEncodeEpoch(rleOut[:0], pageSize, pfns, cur, func(i int) []byte { return prev[i*pageSize : (i+1)*pageSize] })
		rleRate = append(rleRate, pages/time.Since(t0).Seconds())

		payload += sum.Stats.PayloadBytes
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
	res.WireOverRaw = float64(wire) / float64(raw)
	res.PayloadOverRaw = float64(payload) / float64(raw)
	res.LZ4OverRaw = float64(lzWire) / float64(raw)
	res.XORRLEOverRaw = float64(rleWire) / float64(raw)
	if rleWire > 0 {
		res.WireOverXORRLE = float64(wire) / float64(rleWire)
	}
	return res, nil
}
