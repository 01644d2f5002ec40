package outbuf

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"time"

	gonfq "github.com/florianl/go-nfqueue/v2"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ProbeResult says which output buffer mechanism the kernel offers.
type ProbeResult struct {
	// Kind is "plug" (sch_plug works), "nfqueue" (no plug, NFQUEUE works)
	// or "none" (neither: refuse to protect unless unbuffered mode was
	// chosen explicitly).
	Kind string
	// Reason explains why a better mechanism was not chosen ("" for plug).
	Reason string
}

// probeQueue is the NFQUEUE queue number bound briefly by Probe inside its
// throw-away namespace (queues are per namespace: no clash with real ones).
const probeQueue = 65535

// Probe detects the output buffer mechanism, without touching the host's
// network configuration: it creates a throw-away network namespace, tries
// to create a plug qdisc on an ifb device (or lo) there, and tries to bind
// an NFQUEUE queue there; then the namespace is released. Needs
// CAP_SYS_ADMIN and CAP_NET_ADMIN.
func Probe(ctx context.Context) ProbeResult {
	ns, err := newThrowawayNetns()
	if err != nil {
		return ProbeResult{Kind: "none", Reason: "cannot create a network namespace to probe in: " + err.Error()}
	}
	defer ns.Close()

	plugErr := probePlug(ns)
	if plugErr == nil {
		return ProbeResult{Kind: "plug"}
	}
	reason := "sch_plug unavailable: " + plugErr.Error()
	if err := probeNFQueue(ctx, ns); err != nil {
		return ProbeResult{Kind: "none", Reason: reason + "; NFQUEUE unavailable: " + err.Error()}
	}
	return ProbeResult{Kind: "nfqueue", Reason: reason}
}

// newThrowawayNetns creates an unnamed network namespace and returns a
// handle to it, leaving the calling thread where it was.
func newThrowawayNetns() (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), err
	}
	defer orig.Close()
	ns, err := netns.New() // unshare: this thread is now in ns
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), err
	}
	if err := netns.Set(orig); err != nil {
		// The thread stays locked and dies with this goroutine's end.
		ns.Close()
		return netns.None(), fmt.Errorf("restore netns: %w", err)
	}
	runtime.UnlockOSThread()
	return ns, nil
}

func probePlug(ns netns.NsHandle) error {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer h.Close()
	_ = h.SetSocketTimeout(5 * time.Second)

	link, err := probeLink(h)
	if err != nil {
		return err
	}
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: link.Attrs().Index,
			Handle:    netlink.MakeHandle(1, 0),
			Parent:    netlink.HANDLE_ROOT,
		},
		QdiscType: "plug",
	}
	if err := h.QdiscAdd(q); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("Specified qdisc kind is unknown (%w)", err)
		}
		return err
	}
	_ = h.QdiscDel(q)
	return nil
}

// probeLink returns an ifb device created in the probe namespace, or its
// loopback if ifb is unavailable.
func probeLink(h *netlink.Handle) (netlink.Link, error) {
	ifb := &netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}}
	if err := h.LinkAdd(ifb); err == nil {
		if l, err := h.LinkByName("probe0"); err == nil {
			return l, nil
		}
	}
	l, err := h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("no device to probe on: %w", err)
	}
	return l, nil
}

func probeNFQueue(ctx context.Context, ns netns.NsHandle) error {
	nfq, err := gonfq.Open(&gonfq.Config{
		NetNS:        int(ns),
		NfQueue:      probeQueue,
		MaxQueueLen:  16,
		Copymode:     gonfq.NfQnlCopyMeta,
		Flags:        gonfq.NfQaCfgFlagGSO,
		AfFamily:     unix.AF_INET,
		WriteTimeout: 5 * time.Second,
	})
	if err != nil {
		return err
	}
	deadline := time.Now().Add(5 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = nfq.Con.SetDeadline(deadline)
	rctx, cancel := context.WithCancel(ctx)
	err = nfq.RegisterWithErrorFunc(rctx,
		func(gonfq.Attribute) int { return 0 },
		func(error) int { return 1 })
	cancel()
	_ = nfq.Close() // the bind answered: a close error does not make NFQUEUE unusable
	return err
}
