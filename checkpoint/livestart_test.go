package checkpoint

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// TestLiveStartPreloads: a new protection started live streams the guest's
// memory to the backup while the guest runs (and its output passes), then
// the first epoch carries only what changed meanwhile; the replica is
// exact at every committed epoch, and output commit holds from the first
// checkpoint on.
func TestLiveStartPreloads(t *testing.T) {
	for _, usePlug := range []bool{false, true} {
		t.Run(map[bool]string{false: "memory", true: "plug"}[usePlug], func(t *testing.T) {
			cfg := sim.Config{MemoryBytes: 8 << 20, Workload: "hotset", Rate: 50000, Seed: 5, OutputEvery: 8}
			p := newPairWith(t, cfg, PrimaryConfig{Interval: 5 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second}, pairOptions{plug: usePlug, liveStart: true})
			stop := p.run()
			p.waitAcked(10, 30*time.Second)
			stop()
			p.checkReplica()
			n := p.guest.NumPages()
			ps, bs := p.primary.Stats(), p.backup.Stats()
			if ps.PagesPreloaded != uint64(n) || bs.PagesPreloaded != uint64(n) {
				t.Fatalf("preloaded %d pages (backup wrote %d) of %d", ps.PagesPreloaded, bs.PagesPreloaded, n)
			}
			p.mu.Lock()
			first, pages := p.captures[0], p.capturePages[0]
			p.mu.Unlock()
			if first != 1 || pages >= n {
				t.Fatalf("first epoch %d carried %d of %d pages: the preload did not spare a full copy", first, pages, n)
			}
			released, passed, windows := p.check.counts()
			if windows != 1 || passed == 0 || released <= passed {
				t.Fatalf("output: %d released, %d before the first checkpoint, %d unheld episodes (want exactly the one before protection)", released, passed, windows)
			}
			t.Logf("preload of %d pages took %v; first epoch %d pages; %d messages passed before protection, %d released in all", n, ps.Preload, pages, passed, released)
		})
	}
}

// TestLiveStartNoPreloadOverCommittedReplica: a replica that holds a
// committed epoch (of any protection) is never preloaded: a new
// protection's first epoch is a plain full one, and until it commits the
// replica stays usable for failover.
func TestLiveStartNoPreloadOverCommittedReplica(t *testing.T) {
	p := newPairWith(t, smallGuest("uniform", 3), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second}, pairOptions{liveStart: true})
	stop := p.run()
	p.waitAcked(5, 20*time.Second)
	stop()
	// A new protection of the same VM by its owner: Welcome must not offer
	// a preload, and a Preload record is refused without touching the
	// committed replica.
	before := p.backup.Stats()
	hello := &remuspb.Hello{ProtocolVersion: ProtocolVersion, VmName: "vm", ProtectionId: "another", MemoryBytes: uint64(p.replica.NumPages()) * 4096,
		PageSize: 4096, Backend: "sim", BackendVersion: p.guest.BackendVersion(), Host: "host-a"}
	mem := append([]byte(nil), p.replica.Memory()...)
	err, wel := p.strangerLink(t, "host-a", hello, func(w *transport.Writer) {
		_ = w.WriteFrame(transport.KindPreload, preloadBatch(t, 0, 1), preloadPayload)
	})
	if wel == nil || wel.AcceptsPreload {
		t.Fatalf("welcome offered a preload over a committed replica: %+v", wel)
	}
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "may not be preloaded") {
		t.Fatalf("preload over a committed replica: %v", err)
	}
	if after := p.backup.Stats(); after.Committed != before.Committed || string(p.replica.Memory()) != string(mem) {
		t.Fatal("the refused preload changed the committed replica")
	}
}

// TestPreloadedEpochNeedsCompletePreload: a first epoch that claims a
// preload the link did not complete is refused; nothing commits.
func TestPreloadedEpochNeedsCompletePreload(t *testing.T) {
	p := newPairWith(t, smallGuest("uniform", 4), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second}, pairOptions{})
	hello := &remuspb.Hello{ProtocolVersion: ProtocolVersion, VmName: "vm", ProtectionId: "fresh", MemoryBytes: uint64(p.replica.NumPages()) * 4096,
		PageSize: 4096, Backend: "sim", BackendVersion: p.guest.BackendVersion(), Host: "host-a"}
	err, wel := p.strangerLink(t, "host-a", hello, func(w *transport.Writer) {
		_ = w.WriteFrame(transport.KindPreload, preloadBatch(t, 0, 1), preloadPayload)
		_ = w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: 1, Full: true, Preloaded: true, PageCount: 0}, nil)
	})
	if wel == nil || !wel.AcceptsPreload {
		t.Fatalf("a fresh replica did not offer a preload: %+v", wel)
	}
	if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), "only 1 of") {
		t.Fatalf("epoch over an incomplete preload: %v", err)
	}
	if c := p.backup.Committed(); c != 0 {
		t.Fatalf("committed %d", c)
	}
}

// preloadPayload is one zero page's payload (PAGE_ZERO has none).
var preloadPayload []byte

// preloadBatch is a Preload record of n zero pages from pfn first.
func preloadBatch(t *testing.T, first uint64, n int) *remuspb.PageBatch {
	t.Helper()
	h := &remuspb.PageBatch{Encodings: make([]byte, n), Lengths: make([]uint32, n)}
	for i := range n {
		h.Pfns = append(h.Pfns, first+uint64(i))
		h.Encodings[i] = byte(remuspb.PageEncoding_PAGE_ZERO)
	}
	return h
}

// TestPreloadFailuresFallBack: links that die during the preload do not
// keep protection from starting: after two failed preloads the first
// epoch is a plain full copy, and the replica is exact.
func TestPreloadFailuresFallBack(t *testing.T) {
	p := newPairWith(t, smallGuest("hotset", 6), PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1, AckTimeout: 5 * time.Second}, pairOptions{liveStart: true})
	cut := func(link, i int, b []byte) transport.Fault {
		if k, ok := transport.FrameKind(b); ok && k == transport.KindPreload && link <= 5 {
			return transport.Fault{Action: transport.Cut}
		}
		return transport.Fault{}
	}
	p.hook.Store(&cut)
	stop := p.run()
	p.waitAcked(5, 20*time.Second)
	stop()
	p.checkReplica()
	p.mu.Lock()
	pages := p.capturePages[0]
	links := p.links
	p.mu.Unlock()
	if n := p.guest.NumPages(); pages != n || links != maxPreloadFails+1 {
		t.Fatalf("first epoch carried %d of %d pages after %d links (want a full copy on link %d)", pages, n, links, maxPreloadFails+1)
	}
	if s := p.primary.Stats(); s.PagesPreloaded != 0 {
		t.Fatalf("%d pages counted as preloaded although no preload completed", s.PagesPreloaded)
	}
}
