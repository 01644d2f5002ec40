package plug

import (
	"context"
	"fmt"
	"sync"

	"go.uber.org/zap"

	"github.com/remusd/remusd/outbuf"
)

// Plug actions, as SimKernel.Change takes them (TCQ_PLUG_*).
const (
	SimBuffer            = actionBuffer
	SimReleaseOne        = actionReleaseOne
	SimReleaseIndefinite = actionReleaseIndefinite
)

// SimKernel is a pure-Go model of the kernel's sch_plug qdisc
// (net/sched/sch_plug.c), for tests on hosts without it. Packets are tags
// (e.g. the guest's output sequence number); a dequeued packet goes to the
// sink at once, as if the qdisc ran after every enqueue and change.
//
// The model keeps the kernel's counters and their quirks: the qdisc counts
// packets, not epochs. TCQ_PLUG_BUFFER overwrites pkts_last_epoch with
// the packets since the previous BUFFER, and TCQ_PLUG_RELEASE_ONE lets out
// that many packets from the head of the queue. So a BUFFER while a closed
// epoch is still pending loses that epoch's boundary: the next RELEASE_ONE
// lets out as many packets as the second epoch had, counted from the head,
// which spills into the second epoch when it is the larger one (and
// strands packets of the first when it is the smaller one). plug.Buffer
// never issues that second BUFFER (it merges instead).
type SimKernel struct {
	mu    sync.Mutex
	limit int // packets held at most (the kernel counts bytes); 0: no limit
	sink  func(tag uint64)

	queue []uint64
	// The kernel's plug_sched_data.
	pktsCurrentEpoch uint32
	pktsLastEpoch    uint32
	pktsToRelease    uint32
	unplugIndefinite bool
	throttled        bool

	gone    bool // the qdisc was deleted (teardown): traffic is not buffered
	stats   outbuf.Stats
	actions []uint32
}

// SimState is a snapshot of a SimKernel.
type SimState struct {
	Queue            []uint64 // tags held, head first
	PktsCurrentEpoch uint32
	PktsLastEpoch    uint32
	PktsToRelease    uint32
	UnplugIndefinite bool
	Throttled        bool
	Actions          []uint32 // every change received, in order
}

// NewSimKernel returns a freshly created plug qdisc (plug_init: plugged,
// nothing to release) holding at most limit packets (0: no limit), that
// hands dequeued packets to sink in order. sink is called with the
// kernel's lock held and must not call back into it.
func NewSimKernel(limit int, sink func(tag uint64)) *SimKernel {
	if sink == nil {
		sink = func(uint64) {}
	}
	return &SimKernel{limit: limit, sink: sink, throttled: true}
}

// Enqueue is a packet arriving at the qdisc (plug_enqueue). It reports
// false if the packet was dropped (limit reached).
func (k *SimKernel) Enqueue(tag uint64) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gone {
		k.out(tag)
		return true
	}
	if k.limit > 0 && len(k.queue) >= k.limit {
		k.stats.DroppedPackets++
		return false
	}
	if !k.unplugIndefinite {
		k.pktsCurrentEpoch++
	}
	k.queue = append(k.queue, tag)
	k.run()
	return true
}

// Change applies a plug action (plug_change).
func (k *SimKernel) Change(action uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.gone {
		return fmt.Errorf("plug sim: qdisc deleted")
	}
	k.actions = append(k.actions, action)
	switch action {
	case actionBuffer:
		k.pktsLastEpoch = k.pktsCurrentEpoch
		k.pktsCurrentEpoch = 0
		if k.unplugIndefinite {
			k.throttled = true
		}
		k.unplugIndefinite = false
	case actionReleaseOne:
		k.pktsToRelease += k.pktsLastEpoch
		k.pktsLastEpoch = 0
		k.throttled = false
	case actionReleaseIndefinite:
		k.unplugIndefinite = true
		k.pktsToRelease, k.pktsLastEpoch, k.pktsCurrentEpoch = 0, 0, 0
		k.throttled = false
	case actionLimit:
	default:
		return fmt.Errorf("plug sim: invalid action %d", action)
	}
	k.run()
	return nil
}

// run dequeues what plug_dequeue lets out.
func (k *SimKernel) run() {
	for len(k.queue) > 0 && !k.throttled {
		if !k.unplugIndefinite {
			if k.pktsToRelease == 0 {
				k.throttled = true
				return
			}
			k.pktsToRelease--
		}
		tag := k.queue[0]
		k.queue = k.queue[1:]
		k.out(tag)
	}
}

func (k *SimKernel) out(tag uint64) {
	k.stats.ReleasedPackets++
	k.sink(tag)
}

// State returns a snapshot of the qdisc.
func (k *SimKernel) State() SimState {
	k.mu.Lock()
	defer k.mu.Unlock()
	return SimState{
		Queue:            append([]uint64(nil), k.queue...),
		PktsCurrentEpoch: k.pktsCurrentEpoch, PktsLastEpoch: k.pktsLastEpoch, PktsToRelease: k.pktsToRelease,
		UnplugIndefinite: k.unplugIndefinite, Throttled: k.throttled,
		Actions: append([]uint32(nil), k.actions...),
	}
}

// NewSimulated returns a Buffer, with the real Buffer logic, over k in
// place of the netlink-driven kernel qdisc.
func NewSimulated(k *SimKernel, log *zap.Logger) *Buffer {
	return newBuffer(simControl{k}, DefaultTimeout, log)
}

type simControl struct{ k *SimKernel }

func (c simControl) plug(_ context.Context, action uint32) error { return c.k.Change(action) }

func (c simControl) stats(context.Context) (outbuf.Stats, error) {
	c.k.mu.Lock()
	defer c.k.mu.Unlock()
	st := c.k.stats
	st.HeldPackets = uint64(len(c.k.queue))
	return st, nil
}

// teardown deletes the qdisc: what it holds is dropped, and the guest's
// traffic passes unbuffered from now on.
func (c simControl) teardown(context.Context) error {
	k := c.k
	k.mu.Lock()
	defer k.mu.Unlock()
	k.stats.DroppedPackets += uint64(len(k.queue))
	k.queue, k.gone = nil, true
	return nil
}
