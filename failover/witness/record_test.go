package witness

import (
	"errors"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	for _, r := range []Record{
		{Holder: "hostA", Generation: 1, Revision: 7},
		{Holder: "h.b-c_d", Generation: 1 << 63, Revision: 9},
		{Generation: 4, Released: true, Revision: 12},
		{Holder: "hostA", Generation: 5, Unprotected: true, Revision: 13},
	} {
		got, err := decode("/k", encodeRecord(r), r.Revision)
		if err != nil || got != r {
			t.Errorf("decode(encode(%v)) = %v, %v", r, got, err)
		}
	}
	if s := string(encodeRecord(Record{Holder: "hostA", Generation: 3})); s != `{"v":1,"holder":"hostA","generation":3}` {
		t.Errorf("encoding %s", s)
	}
	if s := string(encodeRecord(Record{Generation: 4, Released: true})); s != `{"v":1,"generation":4,"released":true}` {
		t.Errorf("released encoding %s", s)
	}
	if s := string(encodeRecord(Record{Holder: "hostA", Generation: 5, Unprotected: true})); s != `{"v":1,"holder":"hostA","generation":5,"unprotected":true}` {
		t.Errorf("unprotected encoding %s", s)
	}
	if _, err := decode("/k", []byte(`{"v":1,"generation":4,"released":true,"unprotected":true}`), 1); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a released record marked unprotected decoded: %v", err)
	}
}

// FuzzDecode: any value decodes to a valid record or to ErrCorrupt, never
// a panic, and a decoded record re-encodes to an equal one.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"v":1,"holder":"hostA","generation":3}`))
	f.Add([]byte(`{"v":1,"generation":4,"released":true}`))
	f.Add([]byte(`{"v":1,"holder":"","generation":1}`))
	f.Add([]byte(`{"v":1,"holder":"hostA","generation":5,"unprotected":true}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decode("/k", b, 1)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if r.Generation == 0 || r.Released != (r.Holder == "") {
			t.Fatalf("decoded invalid record %+v", r)
		}
		again, err := decode("/k", encodeRecord(r), 1)
		if err != nil || again != r {
			t.Fatalf("re-encode %+v: %+v, %v", r, again, err)
		}
	})
}
