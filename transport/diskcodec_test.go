package transport

import (
	"bytes"
	"errors"
	"hash/crc32"
	"math/rand/v2"
	"testing"

	"github.com/remusd/remusd/disk"
	remuspb "github.com/remusd/remusd/proto"
	"google.golang.org/protobuf/proto"
)

func sampleChanges() []disk.Change {
	text := bytes.Repeat([]byte("remus disk "), 1000)
	noise := make([]byte, 3000)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	return []disk.Change{
		{Kind: disk.KindWrite, Offset: 0, Length: int64(len(text)), Data: text, FUA: true},
		{Kind: disk.KindTrim, Offset: 1 << 20, Length: 4096},
		{Kind: disk.KindZero, Offset: 8192, Length: 512, NoHole: true},
		{Kind: disk.KindFlush},
		{Kind: disk.KindWrite, Offset: 12345, Length: int64(len(noise)), Data: noise},
	}
}

// TestDiskWritesRoundTrip: changes survive encode and decode in order,
// with kinds, flags, ranges and data; records split at the change limit;
// the digest of decoded changes equals the sender's.
func TestDiskWritesRoundTrip(t *testing.T) {
	in := sampleChanges()
	for _, maxChanges := range []int{1, 2, 4096} {
		lim := Limits{MaxDiskBatchChanges: maxChanges}
		var got []disk.Change
		var sent, recv Digest
		for _, c := range in {
			sent.AddDiskChange("d0", c)
		}
		st, err := NewDiskEncoder(lim).Encode(9, "d0", 3, in, func(h *remuspb.DiskWrites, p []byte) error {
			if h.Epoch != 9 || h.DiskId != "d0" || h.FirstIndex != uint32(3+len(got)) {
				t.Fatalf("header %+v after %d changes", h, len(got))
			}
			cs, _, err := DecodeDiskWrites(h, p, 2<<20, lim, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cs {
				c.Data = append([]byte(nil), c.Data...) // p is reused
				got = append(got, c)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(in) || st.Records != (len(in)+maxChanges-1)/maxChanges {
			t.Fatalf("max %d: %d changes in %d records", maxChanges, len(got), st.Records)
		}
		for i := range in {
			a, b := in[i], got[i]
			if a.Kind != b.Kind || a.Offset != b.Offset || a.Length != b.Length || a.FUA != b.FUA || a.NoHole != b.NoHole || !bytes.Equal(a.Data, b.Data) {
				t.Fatalf("change %d: sent %+v, got %+v", i, a, b)
			}
			recv.AddDiskChange("d0", b)
		}
		if sent.Sum(nil) != recv.Sum(nil) {
			t.Fatal("digests differ")
		}
	}
}

// TestDiskWritesCompressesOnlyWhenItPays: text is sent lz4, noise raw.
func TestDiskWritesCompressesOnlyWhenItPays(t *testing.T) {
	ch := sampleChanges()
	for i, c := range []disk.Change{ch[0], ch[4]} {
		var lz bool
		var plen int
		NewDiskEncoder(Limits{}).Encode(1, "d", 0, []disk.Change{c}, func(h *remuspb.DiskWrites, p []byte) error {
			lz, plen = h.Lz4, len(p)
			return nil
		})
		if want := i == 0; lz != want || (lz && plen >= len(c.Data)/2) {
			t.Fatalf("change %d: lz4 %v (want %v), payload %d of %d", i, lz, want, plen, len(c.Data))
		}
	}
}

// TestDiskDigestCoversChanges: any change to a disk change alters the
// epoch digest.
func TestDiskDigestCoversChanges(t *testing.T) {
	base := sampleChanges()
	sum := func(cs []disk.Change, id string) uint64 {
		var d Digest
		d.AddPage(1, 2)
		for _, c := range cs {
			d.AddDiskChange(id, c)
		}
		return d.Sum([]byte("dev"))
	}
	want := sum(base, "d0")
	alter := []func(c []disk.Change){
		func(c []disk.Change) { c[0].Offset++ },
		func(c []disk.Change) { c[1].Length++ },
		func(c []disk.Change) { c[2].NoHole = false },
		func(c []disk.Change) { c[0].FUA = false },
		func(c []disk.Change) { c[4].Data = append([]byte{1}, c[4].Data[1:]...) },
		func(c []disk.Change) { c[1], c[2] = c[2], c[1] },
	}
	for i, f := range alter {
		cs := append([]disk.Change(nil), base...)
		f(cs)
		if sum(cs, "d0") == want {
			t.Fatalf("alteration %d not covered", i)
		}
	}
	if sum(base, "d1") == want || sum(base[:4], "d0") == want {
		t.Fatal("disk id or change count not covered")
	}
}

// TestDiskWritesHostile: every field of a record is checked before use.
func TestDiskWritesHostile(t *testing.T) {
	lim := DefaultLimits()
	var good *remuspb.DiskWrites
	var payload []byte
	NewDiskEncoder(lim).Encode(1, "d", 0, []disk.Change{{Kind: disk.KindWrite, Offset: 10, Length: 5, Data: []byte("hello")}}, func(h *remuspb.DiskWrites, p []byte) error {
		good, payload = proto.Clone(h).(*remuspb.DiskWrites), append([]byte(nil), p...)
		return nil
	})
	if _, _, err := DecodeDiskWrites(good, payload, 100, lim, nil); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func(h *remuspb.DiskWrites) []byte{
		"beyond size":     func(h *remuspb.DiskWrites) []byte { h.Offsets[0] = 96; return payload },
		"offset overflow": func(h *remuspb.DiskWrites) []byte { h.Offsets[0] = 1<<64 - 1; return payload },
		"no changes": func(h *remuspb.DiskWrites) []byte {
			h.Kinds, h.Offsets, h.Lengths, h.RawLength = nil, nil, nil, 0
			return nil
		},
		"counts":      func(h *remuspb.DiskWrites) []byte { h.Lengths = append(h.Lengths, 1); return payload },
		"kind 0":      func(h *remuspb.DiskWrites) []byte { h.Kinds[0] = 0; return payload },
		"flag":        func(h *remuspb.DiskWrites) []byte { h.Kinds[0] |= 0x40; return payload },
		"raw length":  func(h *remuspb.DiskWrites) []byte { h.RawLength = 4; return payload },
		"short":       func(h *remuspb.DiskWrites) []byte { return payload[:4] },
		"crc":         func(h *remuspb.DiskWrites) []byte { h.PayloadCrc32C++; return payload },
		"lz4 garbage": func(h *remuspb.DiskWrites) []byte { h.Lz4 = true; return payload },
		"over limit":  func(h *remuspb.DiskWrites) []byte { h.RawLength = 1 << 30; h.Lengths[0] = 1 << 30; return payload },
		"too many": func(h *remuspb.DiskWrites) []byte {
			n := lim.MaxDiskBatchChanges + 1
			h.Kinds = make([]byte, n)
			return payload
		},
		"flush ranged": func(h *remuspb.DiskWrites) []byte { h.Kinds[0] = 4; h.RawLength = 0; return nil },
	} {
		h := proto.Clone(good).(*remuspb.DiskWrites)
		p := f(h)
		if name != "crc" {
			h.PayloadCrc32C = crc32.Checksum(p, diskCRC)
		}
		if _, _, err := DecodeDiskWrites(h, p, 100, lim, nil); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// FuzzDecodeDiskWrites decodes arbitrary records: no panic; either
// ErrMalformed or changes that lie within the disk and carry exactly
// their data.
func FuzzDecodeDiskWrites(f *testing.F) {
	NewDiskEncoder(Limits{}).Encode(1, "d", 0, sampleChanges(), func(h *remuspb.DiskWrites, p []byte) error {
		b, _ := proto.Marshal(h)
		f.Add(b, append([]byte(nil), p...), true)
		f.Add(b, append([]byte(nil), p...), false)
		return nil
	})
	const size = 2 << 20
	lim := Limits{MaxDiskBatchChanges: 64, MaxDiskBatchBytes: 1 << 20}
	f.Fuzz(func(t *testing.T, hb, payload []byte, fixCRC bool) {
		var h remuspb.DiskWrites
		if proto.Unmarshal(hb, &h) != nil {
			return
		}
		if fixCRC {
			h.PayloadCrc32C = crc32.Checksum(payload, diskCRC)
		}
		cs, _, err := DecodeDiskWrites(&h, payload, size, lim, nil)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		var total int64
		for _, c := range cs {
			if c.Kind != disk.KindFlush && !disk.CheckRange(c.Offset, c.Length, size) {
				t.Fatalf("change %+v outside the disk", c)
			}
			if int64(len(c.Data)) != map[bool]int64{true: c.Length, false: 0}[c.Kind == disk.KindWrite] {
				t.Fatalf("change %+v carries %d bytes", c, len(c.Data))
			}
			total += int64(len(c.Data))
		}
		if total != int64(h.RawLength) || len(cs) > lim.MaxDiskBatchChanges {
			t.Fatalf("%d changes, %d bytes, raw_length %d", len(cs), total, h.RawLength)
		}
	})
}
