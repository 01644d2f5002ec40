package dirtymap

import (
	"math/rand/v2"
	"testing"
)

// benchPages is 1 GiB worth of 4 KiB pages.
const benchPages = 1 << 30 / 4096

func randomMap(density float64) *Bitmap {
	b := New(benchPages)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < benchPages; i++ {
		if rng.Float64() < density {
			b.Set(i)
		}
	}
	return b
}

// BenchmarkHarvest measures one harvest step: OR a 1%-dirty map into an
// accumulator and reset the source.
func BenchmarkHarvest(b *testing.B) {
	src := randomMap(0.01)
	saved := New(benchPages)
	saved.CopyFrom(src)
	dst := New(benchPages)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dst.Union(src)
		src.Reset()
		b.StopTimer()
		src.CopyFrom(saved)
		b.StartTimer()
	}
}

func benchForEach(b *testing.B, density float64) {
	m := randomMap(density)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n := 0
		m.ForEach(func(int) bool { n++; return true })
	}
}

func benchRuns(b *testing.B, density float64) {
	m := randomMap(density)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		n := 0
		m.Runs(func(_, l int) bool { n += l; return true })
	}
}

func BenchmarkForEach(b *testing.B) {
	b.Run("1pct", func(b *testing.B) { benchForEach(b, 0.01) })
	b.Run("50pct", func(b *testing.B) { benchForEach(b, 0.5) })
}

func BenchmarkRuns(b *testing.B) {
	b.Run("1pct", func(b *testing.B) { benchRuns(b, 0.01) })
	b.Run("50pct", func(b *testing.B) { benchRuns(b, 0.5) })
}

func BenchmarkCount(b *testing.B) {
	m := randomMap(0.5)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = m.Count()
	}
}
