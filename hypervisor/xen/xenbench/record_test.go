package xenbench

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestWriteParse(t *testing.T) {
	var b bytes.Buffer
	c := Case{GuestMiB: 128, Mode: ModeBare, Epochs: 3, Stopped: Durations([]time.Duration{3 * time.Millisecond, time.Millisecond, 2 * time.Millisecond})}
	if err := Write(&b, KindPause, c); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, KindError, Error{Case: "128/cooperative", Error: "attempt 1: gone", Final: false}); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, KindDone, Done{Seconds: 12}); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	if len(lines) != 6 {
		t.Fatalf("%d lines, want every record twice:\n%s", len(lines), b.String())
	}
	// The console prefixes lines (Xen's timestamps) and garbles one copy
	// of the first record: the other is read.
	lines[0] = "[    12.345] " + strings.Replace(lines[0], `"epochs":3`, `"epochs":4`, 1)
	lines[1] = "(d0) " + lines[1]
	r := Parse(strings.Join(lines, "\r\n") + "\nnoise " + Prefix + "pause 00000000 {}\n")
	if len(r.Pauses) != 1 || r.Pauses[0].Epochs != 3 || r.Pauses[0].Stopped != (Stat{P50: 2, P90: 3, Max: 3}) {
		t.Fatalf("pauses %+v", r.Pauses)
	}
	if len(r.Errors) != 1 || r.Errors[0].Final || r.Done == nil || r.Done.Seconds != 12 {
		t.Fatalf("errors %+v done %+v", r.Errors, r.Done)
	}
	if r.Corrupt != 2 {
		t.Fatalf("corrupt %d, want 2 (the garbled copy and the bad checksum)", r.Corrupt)
	}
}

func TestStats(t *testing.T) {
	if (Values(nil) != Stat{}) {
		t.Fatal("empty")
	}
	v := make([]float64, 20)
	for i := range v {
		v[i] = float64(20 - i)
	}
	if s := Values(v); s != (Stat{P50: 11, P90: 19, Max: 20}) {
		t.Fatalf("%+v", s)
	}
}
