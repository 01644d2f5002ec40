package outbuf

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestProbeSelectsNFQueue asserts what ARCHITECTURE.md §5 measured on our
// machines: no sch_plug, NFQUEUE works. On a kernel with sch_plug the
// probe must say "plug" instead; set REMUSD_EXPECT_PLUG=1 there.
func TestProbeSelectsNFQueue(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and binds an NFQUEUE queue")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := Probe(ctx)
	t.Logf("probe: %+v", r)
	if os.Getenv("REMUSD_EXPECT_PLUG") == "1" {
		if r.Kind != "plug" {
			t.Fatalf("probe = %+v, want plug", r)
		}
		return
	}
	if r.Kind != "nfqueue" {
		t.Fatalf("probe = %+v, want nfqueue on this kernel", r)
	}
	if !strings.Contains(r.Reason, "sch_plug unavailable") || !strings.Contains(r.Reason, "Specified qdisc kind is unknown") {
		t.Fatalf("reason %q does not say that plug is unavailable", r.Reason)
	}
}

// TestProbeLeaksNothing: the probe closes its namespace, netlink and
// queue sockets (a file descriptor left open would keep the namespace
// alive), and answers the same every time.
func TestProbeLeaksNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	first := Probe(context.Background())
	before := openFDs(t)
	for i := 0; i < 5; i++ {
		if r := Probe(context.Background()); r != first {
			t.Fatalf("probe %d = %+v, first %+v", i, r, first)
		}
	}
	if after := openFDs(t); after > before {
		t.Fatalf("open file descriptors grew from %d to %d", before, after)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
