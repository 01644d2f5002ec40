package dirtymap

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

type run struct{ start, n int }

func runsOf(b *Bitmap) []run {
	var rs []run
	b.Runs(func(s, n int) bool { rs = append(rs, run{s, n}); return true })
	return rs
}

func setOf(b *Bitmap) []int {
	var s []int
	b.ForEach(func(i int) bool { s = append(s, i); return true })
	return s
}

func TestTable(t *testing.T) {
	tests := []struct {
		name   string
		n      int
		set    []int
		ranges [][2]int
		want   []run
	}{
		{"empty", 0, nil, nil, nil},
		{"none", 100, nil, nil, nil},
		{"single", 100, []int{5}, nil, []run{{5, 1}}},
		{"first-last", 130, []int{0, 129}, nil, []run{{0, 1}, {129, 1}}},
		{"word boundary", 200, []int{62, 63, 64, 65}, nil, []run{{62, 4}}},
		{"full word", 128, nil, [][2]int{{64, 64}}, []run{{64, 64}}},
		{"span 3 words", 300, nil, [][2]int{{10, 200}}, []run{{10, 200}}},
		{"all", 192, nil, [][2]int{{0, 192}}, []run{{0, 192}}},
		{"all odd", 190, nil, [][2]int{{0, 190}}, []run{{0, 190}}},
		{"to end", 190, nil, [][2]int{{100, 90}}, []run{{100, 90}}},
		{"zero range", 64, nil, [][2]int{{64, 0}, {3, 0}}, nil},
		{"two runs", 256, nil, [][2]int{{1, 3}, {127, 2}}, []run{{1, 3}, {127, 2}}},
		{"alternating", 10, []int{0, 2, 4, 6, 8}, nil, []run{{0, 1}, {2, 1}, {4, 1}, {6, 1}, {8, 1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.n)
			if b.Len() != tc.n {
				t.Fatalf("Len = %d, want %d", b.Len(), tc.n)
			}
			for _, i := range tc.set {
				b.Set(i)
			}
			for _, r := range tc.ranges {
				b.SetRange(r[0], r[1])
			}
			if got := runsOf(b); !slices.Equal(got, tc.want) {
				t.Fatalf("Runs = %v, want %v", got, tc.want)
			}
			want := 0
			for _, r := range tc.want {
				want += r.n
			}
			if b.Count() != want {
				t.Fatalf("Count = %d, want %d", b.Count(), want)
			}
			if b.Any() != (want > 0) {
				t.Fatalf("Any = %v", b.Any())
			}
			b.Reset()
			if b.Any() || b.Count() != 0 {
				t.Fatal("Reset left bits set")
			}
		})
	}
}

func TestClearTest(t *testing.T) {
	b := New(70)
	b.Set(69)
	b.Set(3)
	if !b.Test(69) || !b.Test(3) || b.Test(4) {
		t.Fatal("Test mismatch after Set")
	}
	b.Clear(69)
	if b.Test(69) || b.Count() != 1 {
		t.Fatal("Clear failed")
	}
}

func TestPanics(t *testing.T) {
	b := New(10)
	o := New(11)
	cases := map[string]func(){
		"Set(10)":        func() { b.Set(10) },
		"Set(-1)":        func() { b.Set(-1) },
		"Clear(10)":      func() { b.Clear(10) },
		"Test(10)":       func() { b.Test(10) },
		"SetRange(5,6)":  func() { b.SetRange(5, 6) },
		"SetRange(-1,1)": func() { b.SetRange(-1, 1) },
		"SetRange(0,-1)": func() { b.SetRange(0, -1) },
		"Union":          func() { b.Union(o) },
		"CopyFrom":       func() { b.CopyFrom(o) },
	}
	for name, fn := range cases {
		t.Run(name, func(t *testing.T) {
			defer func() {
				r := recover()
				if r == nil {
					t.Fatal("no panic")
				}
				if s, ok := r.(string); !ok || !strings.HasPrefix(s, "dirtymap: ") {
					t.Fatalf("panic value %v lacks a clear message", r)
				}
			}()
			fn()
		})
	}
}

func TestEarlyStop(t *testing.T) {
	b := New(300)
	b.SetRange(0, 300)
	var n int
	b.ForEach(func(i int) bool { n++; return i < 99 })
	if n != 100 {
		t.Fatalf("ForEach visited %d, want 100", n)
	}
	b.Clear(50)
	b.Clear(200)
	n = 0
	b.Runs(func(s, l int) bool { n++; return false })
	if n != 1 {
		t.Fatalf("Runs visited %d, want 1", n)
	}
}

func TestEqualCopy(t *testing.T) {
	a, b := New(100), New(100)
	a.Set(7)
	if a.Equal(b) {
		t.Fatal("Equal true for different bitmaps")
	}
	b.CopyFrom(a)
	if !a.Equal(b) {
		t.Fatal("CopyFrom did not copy")
	}
	if a.Equal(New(101)) {
		t.Fatal("Equal true for different lengths")
	}
}

// TestRandomized checks every operation against a map reference.
func TestRandomized(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := 0; iter < 300; iter++ {
		n := rng.IntN(400)
		if iter%10 == 0 {
			n = 64 * rng.IntN(5)
		}
		a, b := New(n), New(n)
		ra, rb := map[int]bool{}, map[int]bool{}
		if n == 0 {
			if a.Any() || a.Count() != 0 || len(a.AppendSet(nil)) != 0 || len(runsOf(a)) != 0 {
				t.Fatal("empty bitmap not empty")
			}
			continue
		}
		for op := 0; op < 200; op++ {
			i := rng.IntN(n)
			bm, ref := a, ra
			if rng.IntN(2) == 0 {
				bm, ref = b, rb
			}
			switch rng.IntN(5) {
			case 0, 1:
				bm.Set(i)
				ref[i] = true
			case 2:
				bm.Clear(i)
				delete(ref, i)
			case 3:
				l := rng.IntN(n - i + 1)
				if rng.IntN(4) != 0 {
					l = min(l, 1+rng.IntN(8))
				}
				bm.SetRange(i, l)
				for j := i; j < i+l; j++ {
					ref[j] = true
				}
			case 4:
				if bm.Test(i) != ref[i] {
					t.Fatalf("Test(%d) mismatch", i)
				}
			}
		}
		if rng.IntN(2) == 0 {
			a.Union(b)
			for k := range rb {
				ra[k] = true
			}
		}
		checkAgainst(t, a, ra)
		checkAgainst(t, b, rb)
		c := New(n)
		c.CopyFrom(a)
		if !c.Equal(a) {
			t.Fatal("CopyFrom/Equal mismatch")
		}
	}
}

func checkAgainst(t *testing.T, b *Bitmap, ref map[int]bool) {
	t.Helper()
	var want []int
	for k := range ref {
		want = append(want, k)
	}
	slices.Sort(want)
	if b.Count() != len(want) {
		t.Fatalf("Count = %d, want %d", b.Count(), len(want))
	}
	if b.Any() != (len(want) > 0) {
		t.Fatal("Any mismatch")
	}
	if got := setOf(b); !slices.Equal(got, want) {
		t.Fatalf("ForEach = %v, want %v", got, want)
	}
	got64 := b.AppendSet([]uint64{999})
	if got64[0] != 999 || len(got64) != len(want)+1 {
		t.Fatalf("AppendSet length %d, want %d", len(got64), len(want)+1)
	}
	for k, v := range want {
		if got64[k+1] != uint64(v) {
			t.Fatalf("AppendSet[%d] = %d, want %d", k, got64[k+1], v)
		}
	}
	var wantRuns []run
	for _, v := range want {
		if l := len(wantRuns); l > 0 && wantRuns[l-1].start+wantRuns[l-1].n == v {
			wantRuns[l-1].n++
		} else {
			wantRuns = append(wantRuns, run{v, 1})
		}
	}
	if got := runsOf(b); !slices.Equal(got, wantRuns) {
		t.Fatalf("Runs = %v, want %v", got, wantRuns)
	}
	for i := 0; i < b.Len(); i++ {
		if b.Test(i) != ref[i] {
			t.Fatalf("Test(%d) = %v, want %v", i, b.Test(i), ref[i])
		}
	}
}

func TestOrWords(t *testing.T) {
	b := New(70)
	b.Set(1)
	b.OrWords([]uint64{1 << 3, 1<<5 | 1<<6 | 1<<7, 0xff})
	want := []int{1, 3, 64 + 5}
	var got []int
	b.ForEach(func(i int) bool { got = append(got, i); return true })
	if !slices.Equal(got, want) {
		t.Fatalf("pages %v, want %v (bits beyond Len must be dropped)", got, want)
	}
	if b.Count() != 3 {
		t.Fatalf("Count %d", b.Count())
	}
	b.OrWords(nil)
	s := New(200)
	s.OrWords([]uint64{1})
	if !s.Test(0) || s.Count() != 1 {
		t.Fatal("short source")
	}
}
