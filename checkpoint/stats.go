package checkpoint

import (
	"slices"
	"sync"
	"time"
)

// Samples keeps the most recent durations in a bounded ring and reports
// quantiles over them. Safe for concurrent use.
type Samples struct {
	mu   sync.Mutex
	ring []time.Duration
	next int
	full bool
	last time.Duration
}

// NewSamples keeps the last n samples.
func NewSamples(n int) *Samples { return &Samples{ring: make([]time.Duration, n)} }

// Add records a sample.
func (s *Samples) Add(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ring[s.next] = d
	s.last = d
	s.next++
	if s.next == len(s.ring) {
		s.next, s.full = 0, true
	}
}

// Last is the most recent sample.
func (s *Samples) Last() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// Quantiles returns the given quantiles (0..1) of the kept samples, 0 when
// there are none.
func (s *Samples) Quantiles(qs ...float64) []time.Duration {
	s.mu.Lock()
	n := s.next
	if s.full {
		n = len(s.ring)
	}
	v := slices.Clone(s.ring[:n])
	s.mu.Unlock()
	out := make([]time.Duration, len(qs))
	if len(v) == 0 {
		return out
	}
	slices.Sort(v)
	for i, q := range qs {
		k := int(q*float64(len(v)-1) + 0.5)
		k = max(0, min(k, len(v)-1))
		out[i] = v[k]
	}
	return out
}

// Ms converts a duration to float milliseconds.
func Ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
