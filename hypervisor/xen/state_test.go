package xen

import (
	"bytes"
	"testing"
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
