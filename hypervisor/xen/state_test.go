package xen

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/remusd/remusd/dirtymap"
)

func TestStateRoundTrip(t *testing.T) {
	s := State{PVH: true, HVM: []byte("hvm-records"), VCPUs: []VCPUState{{ID: 0, Online: true, Context: []byte("ctx0")}, {ID: 1}}}
	b := AppendState([]byte("prefix"), s)
	got, err := ParseState(b[len("prefix"):])
	if err != nil {
		t.Fatal(err)
	}
	if !got.PVH || !bytes.Equal(got.HVM, s.HVM) || len(got.VCPUs) != 2 || got.VCPUs[1].Online || string(got.VCPUs[0].Context) != "ctx0" {
		t.Fatalf("round trip: %+v", got)
	}
	// Every truncation and a trailing byte are rejected.
	enc := b[len("prefix"):]
	for i := 0; i < len(enc); i++ {
		if _, err := ParseState(enc[:i]); err == nil {
			t.Fatalf("truncated to %d bytes: accepted", i)
		}
	}
	if _, err := ParseState(append(enc, 0)); err == nil {
		t.Fatal("trailing byte accepted")
	}
}

func FuzzParseState(f *testing.F) {
	f.Add(AppendState(nil, State{HVM: []byte{1, 2, 3}, VCPUs: []VCPUState{{Context: []byte{4}}}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseState(b)
		if err != nil {
			return
		}
		if !bytes.Equal(AppendState(nil, s), b) {
			t.Fatalf("re-encoding differs")
		}
	})
}

func TestStateVersions(t *testing.T) {
	s := State{PVH: true, Suspended: true, HVM: []byte{1}, VCPUs: []VCPUState{{Online: true, Context: []byte{2}}}}
	got, err := ParseState(AppendState(nil, s))
	if err != nil {
		t.Fatal(err)
	}
	if got.Version != stateVersion || !got.Suspended || !got.PVH {
		t.Fatalf("v2: %+v", got)
	}
	// Version 1 (no flags word) still parses, as not suspended, and
	// re-encodes as itself.
	s.Version, s.Suspended = 1, false
	v1 := AppendState(nil, s)
	got, err = ParseState(v1)
	if err != nil || got.Version != 1 || got.Suspended {
		t.Fatalf("v1: %+v, %v", got, err)
	}
	if !bytes.Equal(AppendState(nil, got), v1) {
		t.Fatal("v1 re-encoding differs")
	}
	// Unknown flags and versions are refused.
	bad := AppendState(nil, State{PVH: true})
	bad[12] = 2
	if _, err := ParseState(bad); err == nil {
		t.Fatal("unknown flag accepted")
	}
	bad = AppendState(nil, State{})
	bad[4] = 3
	if _, err := ParseState(bad); err == nil {
		t.Fatal("version 3 accepted")
	}
}

// hvmRecord appends one HVM context record.
func hvmRecord(b []byte, code, inst uint16, body []byte) []byte {
	b = binary.LittleEndian.AppendUint16(b, code)
	b = binary.LittleEndian.AppendUint16(b, inst)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(body)))
	return append(b, body...)
}

func testHVMContext(cpus int) []byte {
	hdr := binary.LittleEndian.AppendUint32(nil, hvmFileMagic)
	hdr = binary.LittleEndian.AppendUint32(hdr, hvmFileVersion)
	hdr = append(hdr, make([]byte, 16)...)
	b := hvmRecord(nil, hvmCodeHeader, 0, hdr)
	for i := 0; i < cpus; i++ {
		b = hvmRecord(b, hvmCodeCPU, uint16(i), make([]byte, 1024))
	}
	b = hvmRecord(b, 5, 0, make([]byte, 16)) // LAPIC
	return hvmRecord(b, hvmCodeEnd, 0, nil)
}

func TestCheckHVMContext(t *testing.T) {
	good := testHVMContext(2)
	info, err := CheckHVMContext(good)
	if err != nil {
		t.Fatal(err)
	}
	if info.CPUs != 2 || info.MaxCPU != 1 || info.Records != 5 {
		t.Fatalf("info %+v", info)
	}
	for i := 0; i < len(good); i++ {
		if _, err := CheckHVMContext(good[:i]); err == nil {
			t.Fatalf("truncated to %d bytes: accepted", i)
		}
	}
	cases := map[string][]byte{
		"trailing byte":  append(append([]byte(nil), good...), 0),
		"no header":      hvmRecord(hvmRecord(nil, hvmCodeCPU, 0, nil), hvmCodeEnd, 0, nil),
		"unknown type":   append(append([]byte(nil), good[:len(good)-8]...), hvmRecord(hvmRecord(nil, 99, 0, nil), hvmCodeEnd, 0, nil)...),
		"bad magic":      append([]byte{1, 0, 0, 0, 24, 0, 0, 0, 0, 0, 0, 0}, good[12:]...),
		"huge length":    append(append([]byte(nil), good[:32]...), 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff),
		"end with bytes": append(append([]byte(nil), good[:len(good)-8]...), hvmRecord(nil, hvmCodeEnd, 0, []byte{1})...),
	}
	for name, b := range cases {
		if _, err := CheckHVMContext(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestStandbyOptionsValidate(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "vm.cfg")
	if err := os.WriteFile(cfg, []byte("name=\"vm\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ok := StandbyOptions{ConfigPath: cfg, DomainName: "vm-standby"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	if ok.Type != "pvh" || ok.XL != "xl" || ok.Name != "vm-standby" || ok.CreateTimeout <= 0 {
		t.Fatalf("defaults: %+v", ok)
	}
	for name, o := range map[string]StandbyOptions{
		"relative path":                   {ConfigPath: "vm.cfg", DomainName: "x"},
		"missing file":                    {ConfigPath: cfg + ".nope", DomainName: "x"},
		"directory":                       {ConfigPath: filepath.Dir(cfg), DomainName: "x"},
		"quote in name":                   {ConfigPath: cfg, DomainName: `x"; kernel="y`},
		"empty name":                      {ConfigPath: cfg},
		"leading dash":                    {ConfigPath: cfg, DomainName: "-x"},
		"long name":                       {ConfigPath: cfg, DomainName: strings.Repeat("a", 65)},
		"unknown type":                    {ConfigPath: cfg, DomainName: "x", Type: "pv"},
		"hvm (no device model state yet)": {ConfigPath: cfg, DomainName: "x", Type: "hvm"},
		"space in name":                   {ConfigPath: cfg, DomainName: "a b"},
		"newline in name":                 {ConfigPath: cfg, DomainName: "a\nb"},
	} {
		if err := o.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A manager (libvirt) makes the domain: no xl file is needed, the
	// name is checked all the same.
	m := StandbyOptions{DomainName: "vm-standby", Manager: nopManager{}}
	if err := m.Validate(); err != nil || m.source() != "nop domain" {
		t.Fatalf("with a manager: %v (source %q)", err, m.source())
	}
	if err := (&StandbyOptions{DomainName: "a b", Manager: nopManager{}}).Validate(); err == nil {
		t.Error("with a manager: a bad domain name accepted")
	}
}

// nopManager is a DomainManager that is never called.
type nopManager struct{}

func (nopManager) CreatePaused(context.Context) (uint32, error) { return 0, errors.New("not here") }
func (nopManager) Unpause(context.Context, uint32) error        { return errors.New("not here") }
func (nopManager) Destroy(context.Context, uint32) error        { return errors.New("not here") }
func (nopManager) String() string                               { return "nop domain" }

func TestLayout(t *testing.T) {
	// RAM [0, 0x8000) with a hole at 0x100, ACPI tables [0xfbfc0, 0xfbfc8),
	// the special region [0xfeff0, 0xff000): two segments.
	p2m := 0xff000
	populated := func(g int) bool {
		return g < 0x8000 && g != 0x100 || g >= 0xfbfc0 && g < 0xfbfc8 || g >= 0xfeff0
	}
	segs := layoutOf(func(g int) bool { return !populated(g) }, p2m)
	want := []Segment{{GFN: 0, Index: 0, Count: 0x8000}, {GFN: 0xfbfc0, Index: 0x8000, Count: 8}}
	if len(segs) != len(want) || segs[0] != want[0] || segs[1] != want[1] {
		t.Fatalf("segments %+v, want %+v", segs, want)
	}
	if n := layoutPages(segs); n != 0x8008 {
		t.Fatalf("pages %d", n)
	}
	// A short gap joins runs; a long one does not.
	segs2 := layoutOf(func(g int) bool {
		return !(g < 10 || g >= 20 && g < 30 || g >= 20+segmentGap+100 && g < 30+segmentGap+100)
	}, 0x10000+200)
	if len(segs2) != 2 || segs2[0].Count != 30 || segs2[1].Index != 30 {
		t.Fatalf("gaps: %+v", segs2)
	}
	if layoutHash(segs) == layoutHash(segs2) || layoutHash(segs) != layoutHash(append([]Segment(nil), segs...)) {
		t.Fatal("layout hash")
	}
	// Dirty gfns land on their indexes; others are counted outside.
	words := make([]uint64, (p2m+63)/64)
	for _, g := range []int{0, 63, 64, 0x7fff, 0xfbfc0, 0xfbfc7, 0xfbfc8, 0xfeff5, 0x9000} {
		words[g/64] |= 1 << (g % 64)
	}
	dst := dirtymap.New(layoutPages(segs))
	out := gfnsToIndexes(words, segs, dst)
	var got []int
	dst.ForEach(func(i int) bool { got = append(got, i); return true })
	if fmt.Sprint(got) != fmt.Sprint([]int{0, 63, 64, 0x7fff, 0x8000, 0x8007}) || out != 3 {
		t.Fatalf("indexes %#x, outside %d", got, out)
	}

	// The layout check's candidates: dirty gfns the layout does not map
	// (outside the segments, the special region excepted, or a hole inside
	// one); mapped ones never.
	mapped := make([]uint64, (layoutPages(segs)+63)/64)
	for i := 0; i < layoutPages(segs); i++ {
		if populated(int(gfnOf(segs, i))) {
			mapped[i/64] |= 1 << (i % 64)
		}
	}
	words[0x100/64] |= 1 << (0x100 % 64) // the hole inside RAM
	words[0xfefff/64] |= 1 << (0xfefff % 64)
	words[0xfbfbf/64] |= 1 << (0xfbfbf % 64) // just before the ACPI segment
	un := unmappedDirty(words, segs, mapped, nil)
	if fmt.Sprintf("%#x", un) != fmt.Sprintf("%#x", []uint64{0x100, 0x9000, 0xfbfbf, 0xfbfc8}) {
		t.Fatalf("unmapped dirty gfns %#x", un)
	}
	if un := unmappedDirty(make([]uint64, len(words)), segs, mapped, un[:0]); len(un) != 0 {
		t.Fatalf("clean bitmap: %#x", un)
	}
}

// gfnOf is the gfn of page index i (test helper).
func gfnOf(segs []Segment, i int) uint64 {
	for _, s := range segs {
		if uint64(i) >= s.Index && uint64(i) < s.Index+s.Count {
			return s.GFN + uint64(i) - s.Index
		}
	}
	panic("index outside the layout")
}

func TestCheckStateFor(t *testing.T) {
	good := AppendState(nil, State{PVH: true, Suspended: true, HVM: testHVMContext(2),
		VCPUs: []VCPUState{{ID: 0, Online: true, Context: []byte{1}}, {ID: 1, Online: true, Context: []byte{2}}}})
	if _, err := CheckStateFor(good, true, 2); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		b     []byte
		pvh   bool
		vcpus int
	}{
		"hvm standby":       {good, false, 2},
		"fewer vcpus":       {good, true, 1},
		"more vcpus":        {good, true, 3},
		"bad hvm context":   {AppendState(nil, State{PVH: true, HVM: []byte("junk"), VCPUs: []VCPUState{{ID: 0}}}), true, 1},
		"vcpu ids shuffled": {AppendState(nil, State{PVH: true, HVM: testHVMContext(2), VCPUs: []VCPUState{{ID: 1}, {ID: 0}}}), true, 2},
		"junk":              {[]byte("RXEN junk"), true, 1},
	} {
		if _, err := CheckStateFor(c.b, c.pvh, c.vcpus); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
