package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remusd/remusd/hypervisor/sim"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// TestHostilePeerTrials is the hostile peer class: against a running
// pair's backup, links from strangers (any identity but the owner) with
// valid-looking Hellos and valid frames, and links from the owner's
// identity with a Hello that does not match the replica (another VM name,
// page size, memory size, ...), carrying new protection ids with whole
// valid epochs, Goodbyes, replayed acks, oversized fields (memory beyond
// the replica, huge strings and backend_config) and VM names with path
// characters. After each: the link was refused, the replica's committed
// epoch did not go backwards and its content is the primary's replayed
// state at that epoch, the owner's link was not cut (the primary never
// reconnected and keeps getting acks), and no Goodbye was taken.
func TestHostilePeerTrials(t *testing.T) {
	n := trials(40, 20)
	const perPair = 50 // a fresh pair now and then keeps replays short
	kinds := map[string]int{}
	for done, round := 0, 0; done < n; round++ {
		k := min(perPair, n-done)
		hostileRound(t, uint64(round+1), k, kinds)
		if t.Failed() {
			return
		}
		done += k
	}
	reportTrials(t, "hostile", n, "%v", kinds)
}

func hostileRound(t *testing.T, seed uint64, n int, kinds map[string]int) {
	rng := rand.New(rand.NewPCG(seed, 31))
	cfg := sim.Config{MemoryBytes: 1 << 20, Workload: []string{"uniform", "hotset", "sequential", "sparse"}[rng.IntN(4)], Rate: 3000, Seed: seed, OutputEvery: 8}
	p := newPair(t, cfg, PrimaryConfig{Interval: 3 * time.Millisecond, MaxInflight: 1 + rng.IntN(2), AckTimeout: 5 * time.Second})
	defer p.close()
	var goodbyes atomic.Int32
	p.backup.o.OnGoodbye = func(bool) { goodbyes.Add(1) }
	// A stranger's epochs carry a genuine guest state, so that a replica
	// that accepted one would apply it.
	strangerMem, strangerDev, err := sim.Replay(p.cfg, uint64(rng.IntN(300)))
	if err != nil {
		t.Fatal(err)
	}
	stop := p.run()
	defer func() {
		if stop != nil {
			stop()
		}
	}()
	p.waitAcked(3, 20*time.Second)
	for i := 0; i < n; i++ {
		atk := randomAttack(rng, p, strangerMem, strangerDev)
		kinds[atk.class]++
		before := p.backup.Stats()
		err, wel := p.strangerLink(t, atk.peer, atk.hello, atk.frames)
		after := p.backup.Stats()
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("round %d trial %d (%s: %s): %s", seed, i, atk.class, atk.desc, fmt.Sprintf(format, args...))
		}
		// The invariants first, then the refusal itself.
		switch {
		case after.Committed < before.Committed:
			fail("committed epoch went backwards: %d → %d", before.Committed, after.Committed)
		case after.Goodbye || after.Restarting || goodbyes.Load() != 0:
			fail("a foreign Goodbye was taken: %+v", after)
		case after.ProtectionID != "test":
			fail("replica now belongs to protection %q", after.ProtectionID)
		}
		p.mu.Lock()
		acked := p.acked
		p.mu.Unlock()
		p.waitAcked(acked+1, 20*time.Second) // the owner carries on...
		p.mu.Lock()
		links := p.links
		p.mu.Unlock()
		if links != 1 || p.primary.Stats().Reconnects != 0 { // ...on its first link
			fail("the owner's link was cut (links %d, reconnects %d)", links, p.primary.Stats().Reconnects)
		}
		p.checkReplicaLive()
		switch {
		case !errors.Is(err, atk.wantErr):
			fail("Serve returned %v, want %v", err, atk.wantErr)
		case wel == nil || wel.Error == "" || wel.CommittedEpoch != 0 || wel.ReplicaHashes:
			fail("welcome %+v: a refusal must tell nothing", wel)
		case after.Refused != before.Refused+1:
			fail("refused %d → %d", before.Refused, after.Refused)
		}
	}
	stop()
	stop = nil
	p.checkReplica()
}

type attack struct {
	class, desc string
	peer        string
	hello       *remuspb.Hello
	frames      func(w *transport.Writer)
	wantErr     error
}

// randomAttack makes one hostile link: a stranger with any Hello, or the
// owner's identity with a Hello that does not fit the replica; then
// valid-looking frames.
func randomAttack(rng *rand.Rand, p *pair, strangerMem, strangerDev []byte) attack {
	mem := uint64(p.replica.NumPages()) * 4096
	huge := func() string { return strings.Repeat(string(rune('a'+rng.IntN(26))), 1<<(10+rng.IntN(11))) }
	h := &remuspb.Hello{ProtocolVersion: ProtocolVersion, VmName: "vm", ProtectionId: "test", MemoryBytes: mem,
		PageSize: 4096, Backend: sim.BackendName, BackendVersion: sim.BackendVersion, BackendConfig: p.cfg.Marshal(), Host: "host-a"}
	var desc []string
	// Fields the backup checks: any one makes the Hello incompatible.
	mismatch := []func(){
		func() {
			h.VmName = []string{"../x", "a/b", "vm\x00", "../vm", "vm/", "/vm", "vm/../vm", ".", "..", "", "VM", huge()}[rng.IntN(12)]
			desc = append(desc, fmt.Sprintf("vm name %.20q", h.VmName))
		},
		func() {
			h.PageSize = []uint32{0, 1, 2048, 8192, 1 << 31, math.MaxUint32}[rng.IntN(6)]
			desc = append(desc, fmt.Sprintf("page size %d", h.PageSize))
		},
		func() {
			h.MemoryBytes = []uint64{0, mem - 4096, mem + 4096, 2 * mem, 1 << 40, math.MaxUint64}[rng.IntN(6)]
			desc = append(desc, fmt.Sprintf("memory %d", h.MemoryBytes))
		},
		func() {
			h.ProtocolVersion = []uint32{0, ProtocolVersion + 1, math.MaxUint32}[rng.IntN(3)]
			desc = append(desc, fmt.Sprintf("protocol %d", h.ProtocolVersion))
		},
		func() {
			h.Backend = []string{"qemu", "xen", "", "sim\x00", "../sim"}[rng.IntN(5)]
			desc = append(desc, fmt.Sprintf("backend %q", h.Backend))
		},
		func() {
			h.BackendVersion = []string{"", "999", huge()}[rng.IntN(3)]
			desc = append(desc, fmt.Sprintf("backend version %.20q", h.BackendVersion))
		},
	}
	// Fields that do not make a Hello incompatible but must not help.
	extra := []func(){
		func() {
			h.ProtectionId = []string{fmt.Sprintf("stranger-%d", rng.Uint32()), "", "../../etc/passwd", "test", huge()}[rng.IntN(5)]
			desc = append(desc, fmt.Sprintf("protection %.20q", h.ProtectionId))
		},
		func() {
			h.BackendConfig = bytes.Repeat([]byte{byte(rng.Uint32()), 0xff, 0}, 1<<(9+rng.IntN(13)))
			desc = append(desc, fmt.Sprintf("backend_config of %d bytes", len(h.BackendConfig)))
		},
		func() { h.Host = huge(); desc = append(desc, "huge host") },
		func() { h.PrimaryAckedEpoch = rng.Uint64(); desc = append(desc, "acked epoch") },
		func() { h.NeedReplicaHashes = true; desc = append(desc, "asks for the replica's page hashes") },
	}
	a := attack{}
	if rng.IntN(3) == 0 {
		a.class, a.peer, a.wantErr = "owner, mismatched hello", "host-a", ErrProtocol
		mismatch[rng.IntN(len(mismatch))]()
	} else {
		a.class, a.wantErr = "stranger", ErrNotOwner
		a.peer = []string{"host-x", "", "HOST-A", "host-a ", " host-a", "host-a\x00", "host-b", "host-a/../host-a", huge()}[rng.IntN(9)]
		desc = append(desc, fmt.Sprintf("peer %.20q", a.peer))
		if rng.IntN(2) == 0 {
			mismatch[rng.IntN(len(mismatch))]()
		}
	}
	for range rng.IntN(4) {
		extra[rng.IntN(len(extra))]()
	}
	a.hello = h

	committed := p.backup.Committed()
	type frame func(w *transport.Writer) error
	var frames []frame
	var fdesc []string
	for range 1 + rng.IntN(4) {
		switch rng.IntN(5) {
		case 0: // a whole, valid full epoch of a new protection
			e := []uint64{1, committed + 1, committed + 1000, math.MaxUint64 - 1}[rng.IntN(4)]
			frames = append(frames, func(w *transport.Writer) error { return writeEpoch(w, e, 0, true, strangerMem, strangerDev, nil) })
			fdesc = append(fdesc, fmt.Sprintf("full epoch %d", e))
		case 1: // an epoch on the replica's committed epoch
			pfns := []uint64{uint64(rng.IntN(p.replica.NumPages()))}
			frames = append(frames, func(w *transport.Writer) error {
				return writeEpoch(w, committed+1, committed, false, strangerMem, strangerDev, pfns)
			})
			fdesc = append(fdesc, fmt.Sprintf("epoch %d on %d", committed+1, committed))
		case 2:
			restart := rng.IntN(2) == 0
			frames = append(frames, func(w *transport.Writer) error {
				return w.WriteFrame(transport.KindGoodbye, &remuspb.Goodbye{Reason: "stranger", Restart: restart}, nil)
			})
			fdesc = append(fdesc, fmt.Sprintf("goodbye (restart %v)", restart))
		case 3: // acks replayed towards the backup
			e := committed + uint64(rng.IntN(2))
			frames = append(frames, func(w *transport.Writer) error { return w.WriteFrame(transport.KindAck, &remuspb.Ack{Epoch: e}, nil) })
			fdesc = append(fdesc, fmt.Sprintf("ack %d", e))
		default:
			frames = append(frames, func(w *transport.Writer) error {
				return w.WriteFrame(transport.KindHeartbeat, &remuspb.Heartbeat{Seq: 1, Role: "primary", CommittedEpoch: math.MaxUint64}, nil)
			})
			fdesc = append(fdesc, "heartbeat")
		}
	}
	a.frames = func(w *transport.Writer) {
		for _, f := range frames {
			if f(w) != nil {
				return
			}
		}
	}
	a.desc = strings.Join(desc, ", ") + "; then " + strings.Join(fdesc, ", ")
	return a
}

// writeEpoch writes a complete, valid epoch of the pages pfns (all pages if
// full) of mem with device state dev, as a primary would.
func writeEpoch(w *transport.Writer, epoch, base uint64, full bool, mem, dev []byte, pfns []uint64) error {
	if full {
		pfns = make([]uint64, len(mem)/4096)
		for i := range pfns {
			pfns[i] = uint64(i)
		}
	}
	pages := make([]byte, 0, len(pfns)*4096)
	for _, pfn := range pfns {
		pages = append(pages, mem[pfn*4096:(pfn+1)*4096]...)
	}
	enc, err := transport.NewEncoder(transport.EncoderConfig{Workers: 1})
	if err != nil {
		return err
	}
	if err := w.WriteFrame(transport.KindEpochBegin, &remuspb.EpochBegin{Epoch: epoch, BaseEpoch: base, PageCount: uint32(len(pfns)), Full: full}, nil); err != nil {
		return err
	}
	sum, err := enc.EncodeEpoch(context.Background(), epoch, pfns, pages, func(hdr *remuspb.PageBatch, payload []byte) error {
		return w.WriteFrame(transport.KindPageBatch, hdr, payload)
	})
	if err != nil {
		return err
	}
	if err := w.WriteFrame(transport.KindDeviceState, &remuspb.DeviceState{Epoch: epoch, PayloadCrc32C: crc32.Checksum(dev, crcTable)}, dev); err != nil {
		return err
	}
	return w.WriteFrame(transport.KindEpochEnd, &remuspb.EpochEnd{Epoch: epoch, PageCount: uint32(len(pfns)), Digest: transport.EpochDigest(pfns, sum.PageHashes, dev)}, nil)
}

// checkReplicaLive is checkReplica while the primary runs: the replica
// (memory and device state, read under the backup's lock, so never half
// applied) is the primary's replayed state at the backup's committed
// epoch, which is no older than the last ack the primary saw.
func (p *pair) checkReplicaLive() {
	p.t.Helper()
	p.mu.Lock()
	acked := p.acked
	p.mu.Unlock()
	p.backup.mu.Lock()
	committed := p.backup.core.Committed()
	epoch, dev := p.replica.DeviceState()
	mem := bytes.Clone(p.replica.Memory())
	p.backup.mu.Unlock()
	p.mu.Lock()
	ops, ok := p.captured[committed]
	p.mu.Unlock()
	switch {
	case committed < acked:
		p.t.Fatalf("backup committed %d < last ack seen by primary %d", committed, acked)
	case !ok:
		p.t.Fatalf("backup committed epoch %d the primary never captured", committed)
	case epoch != committed:
		p.t.Fatalf("replica device state is of epoch %d, committed %d", epoch, committed)
	}
	wantMem, wantDev, err := sim.Replay(p.cfg, ops)
	if err != nil {
		p.t.Fatal(err)
	}
	if !bytes.Equal(wantMem, mem) || !bytes.Equal(wantDev, dev) {
		p.t.Fatalf("replica at epoch %d differs from the primary's state (%d pages differ, device state equal %v)", committed, diffPages(wantMem, mem), bytes.Equal(wantDev, dev))
	}
}
