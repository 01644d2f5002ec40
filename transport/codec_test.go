package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	remuspb "github.com/remusd/remusd/proto"
	"google.golang.org/protobuf/proto"
)

const ps = DefaultPageSize

// batch is an emitted batch, copied out of the emit call.
type batch struct {
	hdr     *remuspb.PageBatch
	payload []byte
}

// encodeAll encodes an epoch and collects its batches.
func encodeAll(t testing.TB, e *Encoder, epoch uint64, pfns []uint64, pages []byte) ([]batch, EpochSummary) {
	t.Helper()
	var out []batch
	sum, err := e.EncodeEpoch(context.Background(), epoch, pfns, pages, func(h *remuspb.PageBatch, p []byte) error {
		out = append(out, batch{proto.Clone(h).(*remuspb.PageBatch), bytes.Clone(p)})
		return nil
	})
	if err != nil {
		t.Fatalf("EncodeEpoch(%d): %v", epoch, err)
	}
	return out, sum
}

// backup is a model of the backup side: committed memory plus staging.
type backup struct {
	mem     []byte
	dec     *Decoder
	staging [][]byte
}

func newBackup(numPages int) *backup {
	return &backup{mem: make([]byte, numPages*ps), dec: NewDecoder(ps, numPages)}
}

func (b *backup) page(pfn uint64) []byte { return b.mem[int(pfn)*ps : int(pfn+1)*ps] }

// apply decodes batches into staging then commits them; it returns the digest.
func (b *backup) apply(t testing.TB, batches []batch, dev []byte) uint64 {
	t.Helper()
	var d Digest
	var pfns []uint64
	next := uint32(0)
	for _, bt := range batches {
		for len(b.staging) < int(next)+len(bt.hdr.Pfns) {
			b.staging = append(b.staging, make([]byte, ps))
		}
		hs, err := b.dec.DecodeBatch(bt.hdr, bt.payload, next, b.page, func(i uint32) []byte { return b.staging[i] })
		if err != nil {
			t.Fatalf("DecodeBatch: %v", err)
		}
		d.AddPages(bt.hdr.Pfns, hs)
		pfns = append(pfns, bt.hdr.Pfns...)
		next += uint32(len(bt.hdr.Pfns))
	}
	for i, pfn := range pfns {
		copy(b.page(pfn), b.staging[i])
	}
	return d.Sum(dev)
}

func randPage(r *rand.Rand) []byte {
	p := make([]byte, ps)
	for i := 0; i < ps; i += 8 {
		v := r.Uint64()
		for k := range 8 {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	return p
}

var words = strings.Fields("the quick brown fox jumps over a lazy dog while remus replicates every epoch of memory to its backup")

func textPage(r *rand.Rand) []byte {
	var b []byte
	for len(b) < ps {
		b = append(b, words[r.IntN(len(words))]...)
		b = append(b, ' ')
	}
	return b[:ps]
}

// patterned returns a copy of p whose first n bytes are XORed with a
// repeating nonzero word: a delta too long for XOR_RLE that lz4 shrinks.
func patterned(p []byte, n int) []byte {
	q := bytes.Clone(p)
	pat := []byte{1, 2, 3, 4, 5, 6, 7, 8}
	for i := range n {
		q[i] ^= pat[i%8]
	}
	return q
}

// sparse returns a copy of p with k 8-byte words changed.
func sparse(r *rand.Rand, p []byte, k int) []byte {
	q := bytes.Clone(p)
	for range k {
		o := r.IntN(ps/8) * 8
		for j := range 8 {
			q[o+j] = byte(r.Uint32()) | 1
		}
	}
	return q
}

func cat(pages ...[]byte) []byte { return bytes.Join(pages, nil) }

func encodings(batches []batch) []remuspb.PageEncoding {
	var out []remuspb.PageEncoding
	for _, b := range batches {
		for _, e := range b.hdr.Encodings {
			out = append(out, remuspb.PageEncoding(e))
		}
	}
	return out
}

const (
	RAW  = remuspb.PageEncoding_PAGE_RAW
	ZERO = remuspb.PageEncoding_PAGE_ZERO
	SAME = remuspb.PageEncoding_PAGE_SAME
	DUP  = remuspb.PageEncoding_PAGE_DUP
	LZ4  = remuspb.PageEncoding_PAGE_LZ4
	XOR  = remuspb.PageEncoding_PAGE_XOR_LZ4
	RLE  = remuspb.PageEncoding_PAGE_XOR_RLE
)

func TestEncodingsRoundTrip(t *testing.T) {
	for _, cache := range []int{0, 16} {
		t.Run(fmt.Sprintf("cache=%d", cache), func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			e, err := NewEncoder(EncoderConfig{CachePages: cache, BatchPages: 4, Workers: 2})
			if err != nil {
				t.Fatal(err)
			}
			bk := newBackup(16)
			mem := make([]byte, 16*ps)
			set := func(pfn uint64, p []byte) { copy(mem[pfn*ps:], p) }
			zero, rnd, txt, rnd2, txt2 := make([]byte, ps), randPage(r), textPage(r), randPage(r), textPage(r)

			// Epoch 1: DUP within the first batch (pfn 3 duplicates pfn 2).
			pfns := []uint64{0, 1, 2, 3, 4, 5}
			pages := cat(zero, rnd, txt, txt, rnd2, txt2)
			for i, p := range pfns {
				set(p, pages[i*ps:(i+1)*ps])
			}
			b, sum := encodeAll(t, e, 1, pfns, pages)
			want := []remuspb.PageEncoding{ZERO, RAW, LZ4, DUP, RAW, LZ4}
			if got := encodings(b); !slices.Equal(got, want) {
				t.Errorf("epoch 1 encodings %v, want %v", got, want)
			}
			if len(b) != 2 || b[1].hdr.FirstIndex != 4 || b[0].hdr.Refs[3] != 2 || len(b[1].hdr.Refs) != 0 {
				t.Errorf("epoch 1 batches: %v", b)
			}
			if got := bk.apply(t, b, []byte("dev1")); got != EpochDigest(pfns, sum.PageHashes, []byte("dev1")) {
				t.Errorf("epoch 1 digest mismatch")
			}
			if !bytes.Equal(bk.mem, mem) {
				t.Fatal("epoch 1: backup differs")
			}
			st := sum.Stats
			if st.Pages != 6 || st.Zero != 1 || st.Raw != 2 || st.LZ4 != 2 || st.Dup != 1 || st.RawBytes != 6*ps || st.PayloadBytes == 0 {
				t.Errorf("epoch 1 stats %+v", st)
			}

			// Epoch 2: SAME, XOR of a sparse delta, fresh random, zero again.
			delta := sparse(r, rnd2, 4)
			rnd3 := randPage(r)
			pfns = []uint64{0, 1, 4, 5, 7}
			pages = cat(zero, rnd, delta, rnd3, txt)
			for i, p := range pfns {
				set(p, pages[i*ps:(i+1)*ps])
			}
			b, sum = encodeAll(t, e, 2, pfns, pages)
			want = []remuspb.PageEncoding{ZERO, SAME, RLE, RAW, LZ4}
			if cache == 0 {
				want = []remuspb.PageEncoding{ZERO, RAW, RAW, RAW, LZ4}
			}
			if got := encodings(b); !slices.Equal(got, want) {
				t.Errorf("epoch 2 encodings %v, want %v", got, want)
			}
			if got := bk.apply(t, b, nil); got != EpochDigest(pfns, sum.PageHashes, nil) {
				t.Errorf("epoch 2 digest mismatch")
			}
			if !bytes.Equal(bk.mem, mem) {
				t.Fatal("epoch 2: backup differs")
			}
			if cache > 0 && sum.Stats.PayloadBytes > 2*ps+ps/2 {
				t.Errorf("epoch 2 wire bytes %d: XOR delta not small", sum.Stats.PayloadBytes)
			}

			// Epoch 3: Invalidate forbids SAME and XOR for the page.
			e.Invalidate(1)
			e.Invalidate(4)
			delta2 := sparse(r, delta, 2)
			pfns = []uint64{1, 4, 5}
			pages = cat(rnd, delta2, rnd3)
			for i, p := range pfns {
				set(p, pages[i*ps:(i+1)*ps])
			}
			b, _ = encodeAll(t, e, 3, pfns, pages)
			want = []remuspb.PageEncoding{RAW, RAW, RAW}
			if cache > 0 {
				want[2] = SAME
			}
			if got := encodings(b); !slices.Equal(got, want) {
				t.Errorf("epoch 3 encodings %v, want %v", got, want)
			}
			bk.apply(t, b, nil)

			// Epoch 4: after re-sending, the cache works again; then InvalidateAll.
			b, _ = encodeAll(t, e, 4, pfns, pages)
			want = []remuspb.PageEncoding{RAW, RAW, RAW}
			if cache > 0 {
				want = []remuspb.PageEncoding{SAME, SAME, SAME}
			}
			if got := encodings(b); !slices.Equal(got, want) {
				t.Errorf("epoch 4 encodings %v, want %v", got, want)
			}
			bk.apply(t, b, nil)
			e.InvalidateAll()
			b, _ = encodeAll(t, e, 5, pfns, pages)
			if got, want := encodings(b), []remuspb.PageEncoding{RAW, RAW, RAW}; !slices.Equal(got, want) {
				t.Errorf("epoch 5 (after InvalidateAll) encodings %v, want %v", got, want)
			}
			bk.apply(t, b, nil)
			if !bytes.Equal(bk.mem, mem) {
				t.Fatal("backup differs at the end")
			}
		})
	}
}

func TestCacheEviction(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	e, err := NewEncoder(EncoderConfig{CachePages: 2, BatchPages: 2, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	bk := newBackup(8)
	mem := make([]byte, 8*ps)
	for i := range 8 {
		copy(mem[i*ps:], randPage(r))
	}
	all := []uint64{0, 1, 2, 3, 4, 5, 6, 7}
	b, _ := encodeAll(t, e, 1, all, mem)
	bk.apply(t, b, nil)
	// 8 pages, 2 slots: at most 2 pages can be SAME next time.
	b, _ = encodeAll(t, e, 2, all, mem)
	same := 0
	for _, enc := range encodings(b) {
		if enc == SAME {
			same++
		}
	}
	if same > 2 {
		t.Errorf("%d SAME pages with a 2-page cache", same)
	}
	bk.apply(t, b, nil)
	// Now rotate through pages with small deltas; check correctness.
	for ep := uint64(3); ep < 30; ep++ {
		pfns := []uint64{uint64(r.IntN(4)), 4 + uint64(r.IntN(4))}
		var pages []byte
		for _, p := range pfns {
			q := sparse(r, mem[p*ps:(p+1)*ps], 3)
			copy(mem[p*ps:], q)
			pages = append(pages, q...)
		}
		b, _ := encodeAll(t, e, ep, pfns, pages)
		bk.apply(t, b, nil)
		if !bytes.Equal(bk.mem, mem) {
			t.Fatalf("epoch %d: backup differs", ep)
		}
	}
}

// TestRandomEpochs replays many epochs of random writes, with torn epochs
// (an emit failure the backup never applies), and checks after every epoch
// that the backup's copy equals primary memory and the digests agree.
func TestRandomEpochs(t *testing.T) {
	for _, cfg := range []EncoderConfig{
		{CachePages: 0, BatchPages: 7, Workers: 3},
		{CachePages: 13, BatchPages: 5, Workers: 2},
		{CachePages: 1024, BatchPages: 16, Workers: 4},
		{CachePages: 1024, BatchPages: 256, Workers: 1},
	} {
		t.Run(fmt.Sprintf("cache=%d,batch=%d,workers=%d", cfg.CachePages, cfg.BatchPages, cfg.Workers), func(t *testing.T) {
			const numPages = 96
			r := rand.New(rand.NewPCG(uint64(cfg.CachePages), uint64(cfg.BatchPages)))
			e, err := NewEncoder(cfg)
			if err != nil {
				t.Fatal(err)
			}
			bk := newBackup(numPages)
			mem := make([]byte, numPages*ps)
			pending := map[uint64]bool{} // dirty since the last committed epoch
			text := textPage(r)
			var stats EncodeStats
			for ep := uint64(1); ep <= 60; ep++ {
				for range r.IntN(40) {
					pfn := uint64(r.IntN(numPages))
					p := mem[pfn*ps : (pfn+1)*ps]
					switch r.IntN(6) {
					case 0:
						clear(p)
					case 1:
						copy(p, randPage(r))
					case 2:
						copy(p, text) // duplicates
					case 3:
						copy(p, textPage(r))
					case 4:
						copy(p, sparse(r, p, 1+r.IntN(8)))
					case 5: // written but unchanged
					}
					pending[pfn] = true
				}
				pfns := make([]uint64, 0, len(pending))
				for p := range pending {
					pfns = append(pfns, p)
				}
				slices.Sort(pfns)
				var pages []byte
				for _, p := range pfns {
					pages = append(pages, mem[p*ps:(p+1)*ps]...)
				}
				if r.IntN(8) == 0 && len(pfns) > cfg.BatchPages {
					// Torn epoch: fail after the first batch.
					n := 0
					_, err := e.EncodeEpoch(context.Background(), ep, pfns, pages, func(*remuspb.PageBatch, []byte) error {
						n++
						if n == 2 {
							return errors.New("link down")
						}
						return nil
					})
					if err == nil || !strings.Contains(err.Error(), "link down") {
						t.Fatalf("epoch %d: torn epoch error %v", ep, err)
					}
					continue // pending kept: resent next epoch
				}
				b, sum := encodeAll(t, e, ep, pfns, pages)
				stats.add(&sum.Stats)
				dev := []byte(fmt.Sprint("device state ", ep))
				if got, want := bk.apply(t, b, dev), EpochDigest(pfns, sum.PageHashes, dev); got != want {
					t.Fatalf("epoch %d: digest backup %x primary %x", ep, got, want)
				}
				if !bytes.Equal(bk.mem, mem) {
					t.Fatalf("epoch %d: backup differs from primary", ep)
				}
				clear(pending)
			}
			t.Logf("stats %+v", stats)
			if stats.Zero == 0 || stats.Raw == 0 || stats.LZ4 == 0 || stats.Dup == 0 {
				t.Errorf("encodings not all exercised: %+v", stats)
			}
			if cfg.CachePages > 0 && (stats.Same == 0 || stats.XORLZ4 == 0) {
				t.Errorf("cache encodings not exercised: %+v", stats)
			}
		})
	}
}

// TestPipelineOverFrames runs epochs through Writer, Pipe and Reader.
func TestPipelineOverFrames(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	const numPages = 512
	a, bconn := Pipe()
	defer a.Close()
	defer bconn.Close()
	w := NewWriter(a)
	rd := NewReader(bconn, DefaultLimits())
	e, err := NewEncoder(EncoderConfig{CachePages: 128, BatchPages: 32})
	if err != nil {
		t.Fatal(err)
	}
	bk := newBackup(numPages)
	mem := make([]byte, numPages*ps)
	for ep := uint64(1); ep <= 10; ep++ {
		set := map[uint64]bool{}
		for range 200 {
			pfn := uint64(r.IntN(numPages))
			set[pfn] = true
			copy(mem[pfn*ps:], sparse(r, mem[pfn*ps:(pfn+1)*ps], 2))
		}
		pfns := slices.Sorted(func(yield func(uint64) bool) {
			for p := range set {
				if !yield(p) {
					return
				}
			}
		})
		var pages []byte
		for _, p := range pfns {
			pages = append(pages, mem[p*ps:(p+1)*ps]...)
		}
		done := make(chan error, 1)
		go func() {
			sum, err := e.EncodeEpoch(context.Background(), ep, pfns, pages, func(h *remuspb.PageBatch, p []byte) error {
				return w.WriteFrame(KindPageBatch, h, p)
			})
			if err == nil {
				err = w.WriteFrame(KindEpochEnd, &remuspb.EpochEnd{Epoch: ep, PageCount: uint32(len(pfns)), Digest: EpochDigest(pfns, sum.PageHashes, nil)}, nil)
			}
			done <- err
		}()
		var batches []batch
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			if f.Kind == KindEpochEnd {
				end := f.Header.(*remuspb.EpochEnd)
				if got := bk.apply(t, batches, nil); got != end.Digest {
					t.Fatalf("epoch %d digest mismatch", ep)
				}
				break
			}
			batches = append(batches, batch{f.Header.(*remuspb.PageBatch), bytes.Clone(f.Payload)})
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bk.mem, mem) {
			t.Fatalf("epoch %d: backup differs", ep)
		}
	}
}

func TestEncodeCancel(t *testing.T) {
	e, err := NewEncoder(EncoderConfig{CachePages: 64, BatchPages: 2, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(7, 8))
	var pages []byte
	pfns := make([]uint64, 20)
	for i := range pfns {
		pfns[i] = uint64(i)
		pages = append(pages, randPage(r)...)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	_, err = e.EncodeEpoch(ctx, 1, pfns, pages, func(*remuspb.PageBatch, []byte) error {
		n++
		if n == 2 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
	// The failed epoch's pages must not be SAME next time.
	b, _ := encodeAll(t, e, 2, pfns, pages)
	for i, enc := range encodings(b) {
		if enc == SAME || enc == XOR || enc == RLE {
			t.Fatalf("page %d encoded %v after a failed epoch", i, enc)
		}
	}
	if _, err := e.EncodeEpoch(context.Background(), 3, []uint64{2, 1}, make([]byte, 2*ps), nil); err == nil {
		t.Error("descending pfns accepted")
	}
	if _, err := e.EncodeEpoch(context.Background(), 3, []uint64{1}, make([]byte, 2*ps), nil); err == nil {
		t.Error("pages length mismatch accepted")
	}
	if s, err := e.EncodeEpoch(context.Background(), 3, nil, nil, nil); err != nil || len(s.PageHashes) != 0 {
		t.Errorf("empty epoch: %v %v", s, err)
	}
}

func TestNewEncoderConfig(t *testing.T) {
	for _, c := range []EncoderConfig{{PageSize: 100}, {PageSize: -8}, {CachePages: -1}, {BatchPages: -1}, {Workers: -1}} {
		if _, err := NewEncoder(c); err == nil {
			t.Errorf("NewEncoder(%+v) accepted", c)
		}
	}
	e, err := NewEncoder(EncoderConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if c := e.Config(); c.PageSize != 4096 || c.BatchPages != 256 || c.Workers < 1 || c.CachePages != 0 {
		t.Errorf("defaults %+v", c)
	}
	if d := DefaultEncoderConfig(); d.CachePages != 16384 {
		t.Errorf("DefaultEncoderConfig %+v", d)
	}
}

// validBatch returns a batch at index 10 that uses every encoding, with the
// backup state it decodes against.
func validBatch(t testing.TB) (batch, *backup, [][]byte) {
	r := rand.New(rand.NewPCG(9, 10))
	e, err := NewEncoder(EncoderConfig{CachePages: 64, BatchPages: 10, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	const numPages = 32
	bk := newBackup(numPages)
	mem := make([]byte, numPages*ps)
	for i := range numPages {
		copy(mem[i*ps:], randPage(r))
	}
	all := make([]uint64, numPages)
	for i := range all {
		all[i] = uint64(i)
	}
	b, _ := encodeAll(t, e, 1, all, mem)
	bk.apply(t, b, nil)
	// epoch 2: 10 filler pages (indices 0..9), then the interesting batch.
	txt := textPage(r)
	pfns := []uint64{}
	var pages []byte
	for i := range 10 {
		pfns = append(pfns, uint64(i))
		pages = append(pages, mem[i*ps:(i+1)*ps]...)
	}
	add := func(pfn uint64, p []byte) { pfns = append(pfns, pfn); pages = append(pages, p...) }
	add(12, make([]byte, ps))                  // ZERO
	add(13, mem[13*ps:14*ps])                  // SAME
	add(14, txt)                               // LZ4
	add(15, txt)                               // DUP
	add(16, patterned(mem[16*ps:17*ps], 2048)) // XOR
	add(17, randPage(r))                       // RAW
	b2, _ := encodeAll(t, e, 2, pfns, pages)
	if len(b2) != 2 {
		t.Fatalf("%d batches", len(b2))
	}
	want := []remuspb.PageEncoding{ZERO, SAME, LZ4, DUP, XOR, RAW}
	if got := encodings(b2[1:]); !slices.Equal(got, want) {
		t.Fatalf("valid batch encodings %v, want %v", got, want)
	}
	staging := make([][]byte, 16)
	for i := range staging {
		staging[i] = make([]byte, ps)
	}
	return b2[1], bk, staging
}

func TestDecodeMalformed(t *testing.T) {
	good, bk, staging := validBatch(t)
	decode := func(h *remuspb.PageBatch, p []byte, expect uint32, numPages int) error {
		d := NewDecoder(ps, numPages)
		_, err := d.DecodeBatch(h, p, expect, bk.page, func(i uint32) []byte { return staging[i] })
		return err
	}
	if err := decode(good.hdr, good.payload, 10, 32); err != nil {
		t.Fatalf("valid batch: %v", err)
	}
	// Layout of good: idx 10 ZERO, 11 SAME, 12 LZ4, 13 DUP(ref 12), 14 XOR, 15 RAW.
	lz4Len := int(good.hdr.Lengths[2])
	tests := []struct {
		name     string
		mutate   func(h *remuspb.PageBatch, p []byte) []byte
		expect   uint32
		numPages int
		msg      string
	}{
		{"first index", nil, 11, 32, "first index 10, expected 11"},
		{"pfn range", nil, 10, 17, "pfn 17 out of range"},
		{"too many pages", func(h *remuspb.PageBatch, p []byte) []byte {
			h.Pfns = make([]uint64, 5000)
			return p
		}, 10, 32, "5000 pages exceed limit 4096"},
		{"encodings count", func(h *remuspb.PageBatch, p []byte) []byte { h.Encodings = h.Encodings[:5]; return p }, 10, 32, "6 pfns, 5 encodings, 6 lengths"},
		{"lengths count", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths = append(h.Lengths, 0); return p }, 10, 32, "6 pfns, 6 encodings, 7 lengths"},
		{"refs count", func(h *remuspb.PageBatch, p []byte) []byte { h.Refs = h.Refs[:2]; return p }, 10, 32, "2 refs for 6 pages"},
		{"pfn order", func(h *remuspb.PageBatch, p []byte) []byte { h.Pfns[3] = h.Pfns[2]; return p }, 10, 32, "pfn 14 not ascending"},
		{"unknown encoding", func(h *remuspb.PageBatch, p []byte) []byte { h.Encodings[1] = 9; return p }, 10, 32, "page 11 (pfn 13): unknown encoding 9"},
		{"unspecified encoding", func(h *remuspb.PageBatch, p []byte) []byte { h.Encodings[1] = 0; return p }, 10, 32, "unknown encoding 0"},
		{"raw length", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths[5]--; return p }, 10, 32, "RAW length 4095, want 4096"},
		{"zero length", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths[0] = 1; return p }, 10, 32, "PAGE_ZERO length 1, want 0"},
		{"same length", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths[1] = 1; return p }, 10, 32, "PAGE_SAME length 1, want 0"},
		{"dup length", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths[3] = 1; return p }, 10, 32, "PAGE_DUP length 1, want 0"},
		{"lz4 zero length", func(h *remuspb.PageBatch, p []byte) []byte { h.Lengths[2] = 0; return p }, 10, 32, "PAGE_LZ4 length 0 out of range"},
		{"lengths sum", func(h *remuspb.PageBatch, p []byte) []byte { return p[:len(p)-1] }, 10, 32, "payload is"},
		{"crc", func(h *remuspb.PageBatch, p []byte) []byte { p[0] ^= 1; return p }, 10, 32, "payload crc32c"},
		{"dup ref self", func(h *remuspb.PageBatch, p []byte) []byte { h.Refs[3] = 13; return p }, 10, 32, "DUP ref 13 not before the page"},
		{"dup ref ahead", func(h *remuspb.PageBatch, p []byte) []byte { h.Refs[3] = 99; return p }, 10, 32, "DUP ref 99"},
		{"dup without refs", func(h *remuspb.PageBatch, p []byte) []byte { h.Refs = nil; return p }, 10, 32, "DUP without refs"},
		{"ref on non-dup", func(h *remuspb.PageBatch, p []byte) []byte { h.Refs[0] = 1; return p }, 10, 32, "ref 1 on a non-DUP page"},
		{"lz4 garbage", func(h *remuspb.PageBatch, p []byte) []byte {
			for i := range lz4Len {
				p[i] = 0xFF
			}
			h.PayloadCrc32C = crc32c(p)
			return p
		}, 10, 32, "LZ4: bad lz4 block"},
		{"lz4 short output", func(h *remuspb.PageBatch, p []byte) []byte {
			// replace the LZ4 page by a valid block of 100 bytes
			blk := []byte{0xF0, 0x55}
			blk = append(blk, bytes.Repeat([]byte{7}, 15+0x55)...)
			np := append(append([]byte{}, blk...), p[lz4Len:]...)
			h.Lengths[2] = uint32(len(blk))
			h.PayloadCrc32C = crc32c(np)
			return np
		}, 10, 32, "lz4 output 100 bytes, want 4096"},
		{"nil header", func(h *remuspb.PageBatch, p []byte) []byte { return nil }, 10, 32, "nil PageBatch header"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := proto.Clone(good.hdr).(*remuspb.PageBatch)
			p := bytes.Clone(good.payload)
			if tc.mutate != nil {
				p = tc.mutate(h, p)
			}
			if tc.name == "nil header" {
				h = nil
			}
			err := decode(h, p, tc.expect, tc.numPages)
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("err %v, want ErrMalformed", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("err %q does not contain %q", err, tc.msg)
			}
		})
	}
	// SAME/XOR without a committed copy.
	d := NewDecoder(ps, 32)
	_, err := d.DecodeBatch(good.hdr, good.payload, 10, func(uint64) []byte { return nil }, func(i uint32) []byte { return staging[i] })
	if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), "no committed copy") {
		t.Errorf("no base: %v", err)
	}
}

func TestDigest(t *testing.T) {
	var d Digest
	d.AddPage(1, PageHash([]byte("a")))
	d.AddPage(2, PageHash([]byte("b")))
	s1 := d.Sum([]byte("dev"))
	if s1 != d.Sum([]byte("dev")) {
		t.Error("Sum is not idempotent")
	}
	if s1 == d.Sum([]byte("dev2")) {
		t.Error("device state not in digest")
	}
	if s1 != EpochDigest([]uint64{1, 2}, []uint64{PageHash([]byte("a")), PageHash([]byte("b"))}, []byte("dev")) {
		t.Error("EpochDigest differs")
	}
	if s1 == EpochDigest([]uint64{2, 1}, []uint64{PageHash([]byte("a")), PageHash([]byte("b"))}, []byte("dev")) {
		t.Error("pfns not in digest")
	}
	d.Reset()
	var z Digest
	if d.Sum(nil) != z.Sum(nil) {
		t.Error("Reset digest differs from zero digest")
	}
}

func TestIsZero(t *testing.T) {
	p := make([]byte, ps)
	if !isZero(p) {
		t.Fatal("zero page not zero")
	}
	for _, i := range []int{0, 7, 8, 63, 64, 4095} {
		p[i] = 1
		if isZero(p) {
			t.Errorf("byte %d set: isZero true", i)
		}
		p[i] = 0
	}
}

func crc32c(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }
