package plug

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/remusd/remusd/outbuf"
)

var (
	plugHandle    = netlink.MakeHandle(1, 0)
	plugHandleAlt = netlink.MakeHandle(2, 0) // a takeover's fresh plug, when 1: is the old one
	ingressHandle = netlink.MakeHandle(0xffff, 0)
)

const filterPrio = 49152 // fixed, so teardown and tests can find it

// plugOptions encodes struct tc_plug_qopt { int action; __u32 limit; } in
// host byte order, the payload of TCA_OPTIONS for the plug qdisc.
func plugOptions(action, limit uint32) []byte {
	b := make([]byte, 8)
	binary.NativeEndian.PutUint32(b[0:4], action)
	binary.NativeEndian.PutUint32(b[4:8], limit)
	return b
}

// netlinkControl owns the handle, the plug socket and the objects created.
type netlinkControl struct {
	h        *netlink.Handle
	sock     *nl.SocketHandle // for hand-built plug requests
	iface    string
	ifIndex  int
	ifb      string
	ifbIndex int
	plugH    uint32 // the plug qdisc's handle (plugHandle, or plugHandleAlt after a takeover)
	limit    uint32
	timeout  time.Duration
	log      *zap.Logger
}

// deadline sets the handle's and plug socket's timeouts to what remains of
// ctx (at most c.timeout) and fails if ctx is already done.
func (c *netlinkControl) deadline(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := c.timeout
	if dl, ok := ctx.Deadline(); ok {
		if r := time.Until(dl); r < d {
			d = r
		}
	}
	if d < time.Millisecond {
		return context.DeadlineExceeded
	}
	if err := c.h.SetSocketTimeout(d); err != nil {
		return err
	}
	tv := unix.NsecToTimeval(d.Nanoseconds())
	if err := c.sock.Socket.SetSendTimeout(&tv); err != nil {
		return err
	}
	return c.sock.Socket.SetReceiveTimeout(&tv)
}

// plugRequest sends RTM_NEWQDISC for the plug at 1: on the IFB.
func (c *netlinkControl) plugRequest(ctx context.Context, flags int, action uint32) error {
	if err := c.deadline(ctx); err != nil {
		return err
	}
	req := nl.NewNetlinkRequest(unix.RTM_NEWQDISC, flags|unix.NLM_F_ACK)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: c.sock}
	req.AddData(&nl.TcMsg{
		Family:  nl.FAMILY_ALL,
		Ifindex: int32(c.ifbIndex),
		Handle:  c.plugH,
		Parent:  netlink.HANDLE_ROOT,
	})
	req.AddData(nl.NewRtAttr(nl.TCA_KIND, nl.ZeroTerminated("plug")))
	req.AddData(nl.NewRtAttr(nl.TCA_OPTIONS, plugOptions(action, c.limit)))
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

func (c *netlinkControl) plug(ctx context.Context, action uint32) error {
	return c.plugRequest(ctx, 0, action)
}

func (c *netlinkControl) stats(ctx context.Context) (outbuf.Stats, error) {
	if err := c.deadline(ctx); err != nil {
		return outbuf.Stats{}, err
	}
	link, err := c.h.LinkByIndex(c.ifbIndex)
	if err != nil {
		return outbuf.Stats{}, err
	}
	qs, err := c.h.QdiscList(link)
	if err != nil {
		return outbuf.Stats{}, err
	}
	for _, q := range qs {
		a := q.Attrs()
		if a.Handle != c.plugH || a.Statistics == nil {
			continue
		}
		var st outbuf.Stats
		if s := a.Statistics.Queue; s != nil {
			st.HeldPackets, st.HeldBytes, st.DroppedPackets = uint64(s.Qlen), uint64(s.Backlog), uint64(s.Drops)
		}
		if s := a.Statistics.Basic; s != nil {
			st.ReleasedPackets, st.ReleasedBytes = uint64(s.Packets), s.Bytes
		}
		return st, nil
	}
	return outbuf.Stats{}, errors.New("plug: plug qdisc not found on " + c.ifb)
}

func gone(err error) bool {
	var lnf netlink.LinkNotFoundError
	return err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) ||
		errors.Is(err, unix.EINVAL) || errors.As(err, &lnf)
}

// teardown removes the ingress qdisc (its filter goes with it) and then the
// IFB (its plug and every packet held in it go with it).
func (c *netlinkControl) teardown(ctx context.Context) error {
	var errs []error
	if err := c.deadline(ctx); err != nil {
		return err
	}
	if c.ifIndex != 0 {
		err := c.h.QdiscDel(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: c.ifIndex, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}})
		if !gone(err) {
			errs = append(errs, fmt.Errorf("delete ingress qdisc on %s: %w", c.iface, err))
		}
	}
	if c.ifbIndex != 0 {
		err := c.h.LinkDel(&netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Index: c.ifbIndex, Name: c.ifb}})
		if !gone(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", c.ifb, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	c.h.Close()
	c.sock.Close()
	return nil
}

// setup builds the topology; on failure it removes what it created.
func setup(ctx context.Context, cfg Config, log *zap.Logger) (_ *netlinkControl, err error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// An explicit family: a bare NewHandle() opens every family and
	// panicked in the test VM.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("plug: netlink handle: %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("plug: netlink socket: %w", err)
	}
	_ = s.SetExtAck(true)
	c := &netlinkControl{h: h, sock: &nl.SocketHandle{Socket: s}, iface: cfg.Interface, ifb: cfg.IFB,
		plugH: plugHandle, limit: cfg.LimitBytes, timeout: cfg.Timeout, log: log}
	created := false
	defer func() {
		if err == nil {
			return
		}
		if created {
			tctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
			defer cancel()
			if terr := c.teardown(tctx); terr != nil {
				log.Error("plug: cleanup after failed setup", zap.Error(terr))
				err = fmt.Errorf("%w (cleanup also failed: %v)", err, terr)
				return
			}
		}
		c.h.Close()
		c.sock.Close()
	}()

	if err := c.deadline(ctx); err != nil {
		return nil, err
	}
	link, err := h.LinkByName(cfg.Interface)
	if err != nil {
		return nil, fmt.Errorf("plug: interface %s: %w", cfg.Interface, err)
	}
	qs, err := h.QdiscList(link)
	if err != nil {
		return nil, fmt.Errorf("plug: list qdiscs of %s: %w", cfg.Interface, err)
	}
	var ingress netlink.Qdisc
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS || q.Type() == "ingress" || q.Type() == "clsact" {
			ingress = q
		}
	}
	if ifbLink, err := h.LinkByName(cfg.IFB); err == nil || ingress != nil {
		// A detached Buffer (or a dead process) left this topology, or
		// someone else uses the interface.
		if err := c.takeOver(ctx, link, ingress, ifbLink); err != nil {
			return nil, err
		}
		return c, nil
	}

	// 1. The IFB with its plug, so that nothing is ever redirected into an
	//    unplugged device. The plug starts closed: it holds from now on.
	if err := c.deadline(ctx); err != nil {
		return nil, err
	}
	ifb := &netlink.Ifb{LinkAttrs: netlink.LinkAttrs{Name: cfg.IFB, TxQLen: 32}}
	if err := h.LinkAdd(ifb); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: create ifb %s: %v", ErrNotSupported, cfg.IFB, err)
		}
		return nil, fmt.Errorf("plug: create ifb %s: %w", cfg.IFB, err)
	}
	created = true
	ifbLink, err := h.LinkByName(cfg.IFB)
	if err != nil {
		return nil, fmt.Errorf("plug: find ifb %s: %w", cfg.IFB, err)
	}
	c.ifbIndex = ifbLink.Attrs().Index
	if err := c.plugRequest(ctx, unix.NLM_F_CREATE|unix.NLM_F_EXCL, actionBuffer); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: %v", ErrNotSupported, err)
		}
		return nil, fmt.Errorf("plug: add plug qdisc on %s: %w", cfg.IFB, err)
	}
	if err := c.deadline(ctx); err != nil {
		return nil, err
	}
	if err := h.LinkSetUp(ifbLink); err != nil {
		return nil, fmt.Errorf("plug: set %s up: %w", cfg.IFB, err)
	}

	// 2. Ingress qdisc on the guest interface, 3. the redirect into the IFB.
	if err := c.addIngress(ctx, link); err != nil {
		return nil, err
	}
	c.ifIndex = link.Attrs().Index
	if err := c.addRedirect(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// takeOver adopts the topology a detached Buffer (or a process that died)
// left on the interface, if it is recognisably one: the IFB device
// cfg.IFB with, on the interface, no ingress qdisc or the ingress qdisc
// ffff: holding nothing but this package's u32 redirect to that IFB.
// Anything else is ErrBusy, and left as it is.
//
// The plug is replaced, not reused: a fresh plug qdisc is grafted in as
// the IFB's root in one netlink request, so packets go either into the old
// plug (and are dropped with it) or into the new one (held): nothing
// leaks, and the new Buffer starts from a known state (everything held
// belongs to its first epoch, no closed epoch pending, not passing
// through). The old plug's state cannot be read back: a pending closed
// epoch there would make every later release let out one epoch's worth
// of packets too few (late forever), and a plug left passing through
// (ReleaseAll before Detach) would need a BUFFER anyway. What the old plug
// held is dropped, which is failing closed (TCP retransmits it). Missing
// pieces (ingress qdisc, filter) are added; nothing is torn down, also if
// the takeover fails half-way (the interface stays held).
func (c *netlinkControl) takeOver(ctx context.Context, link netlink.Link, ingress netlink.Qdisc, ifbLink netlink.Link) error {
	busy := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrBusy}, a...)...)
	}
	if ifbLink == nil {
		return busy("%s already has an %s qdisc (and there is no device %s)", c.iface, ingress.Type(), c.ifb)
	}
	if ifbLink.Type() != "ifb" {
		return busy("device %s already exists (a %s, not an ifb)", c.ifb, ifbLink.Type())
	}
	ifbIndex := ifbLink.Attrs().Index
	haveFilter := false
	if ingress != nil {
		if ingress.Type() != "ingress" || ingress.Attrs().Handle != ingressHandle {
			return busy("%s already has an %s qdisc", c.iface, ingress.Type())
		}
		if err := c.deadline(ctx); err != nil {
			return err
		}
		fs, err := c.h.FilterList(link, ingressHandle)
		if err != nil {
			return fmt.Errorf("plug: list ingress filters of %s: %w", c.iface, err)
		}
		for _, f := range fs {
			if !isRedirectTo(f, ifbIndex) {
				return busy("%s's ingress qdisc has a filter that is not a redirect to %s (%s, prio %d)", c.iface, c.ifb, f.Type(), f.Attrs().Priority)
			}
			haveFilter = true
		}
	}

	// 1. A fresh plug, grafted in place of the IFB's root qdisc.
	if err := c.deadline(ctx); err != nil {
		return err
	}
	qs, err := c.h.QdiscList(ifbLink)
	if err != nil {
		return fmt.Errorf("plug: list qdiscs of %s: %w", c.ifb, err)
	}
	c.ifbIndex, c.plugH = ifbIndex, plugHandle
	old := "none"
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_ROOT {
			old = fmt.Sprintf("%s %x:", q.Type(), q.Attrs().Handle>>16)
			if q.Attrs().Handle == plugHandle {
				c.plugH = plugHandleAlt
			}
		}
	}
	// A handle other than the current root's with NLM_F_REPLACE creates a
	// new qdisc and grafts it as the root (the same handle would only
	// change the old plug's options).
	if err := c.plugRequest(ctx, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, actionBuffer); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: %v", ErrNotSupported, err)
		}
		return fmt.Errorf("plug: replace the root qdisc (%s) of %s with a fresh plug: %w", old, c.ifb, err)
	}
	if err := c.deadline(ctx); err != nil {
		return err
	}
	if err := c.h.LinkSetUp(ifbLink); err != nil {
		return fmt.Errorf("plug: set %s up: %w", c.ifb, err)
	}
	// 2. and 3. What a setup interrupted half-way did not add yet.
	if ingress == nil {
		if err := c.addIngress(ctx, link); err != nil {
			return err
		}
	}
	c.ifIndex = link.Attrs().Index
	if !haveFilter {
		if err := c.addRedirect(ctx); err != nil {
			return err
		}
	}
	c.log.Warn("plug: took over the topology a previous buffer left; what its plug held is dropped",
		zap.String("iface", c.iface), zap.String("ifb", c.ifb), zap.String("old_root", old),
		zap.Bool("added_ingress", ingress == nil), zap.Bool("added_filter", !haveFilter))
	return nil
}

// isRedirectTo reports whether f is this package's filter: u32 at
// filterPrio, all protocols, redirecting to ifbIndex with mirred.
func isRedirectTo(f netlink.Filter, ifbIndex int) bool {
	u, ok := f.(*netlink.U32)
	if !ok || u.Priority != filterPrio || u.Protocol != unix.ETH_P_ALL || u.RedirIndex != ifbIndex {
		return false
	}
	for _, a := range u.Actions {
		if m, ok := a.(*netlink.MirredAction); ok && m.MirredAction == netlink.TCA_EGRESS_REDIR && int(m.Ifindex) == ifbIndex {
			return true
		}
	}
	return false
}

// addIngress adds the ingress qdisc ffff: to link.
func (c *netlinkControl) addIngress(ctx context.Context, link netlink.Link) error {
	if err := c.deadline(ctx); err != nil {
		return err
	}
	if err := c.h.QdiscAdd(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: link.Attrs().Index, Handle: ingressHandle, Parent: netlink.HANDLE_INGRESS}}); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: add ingress qdisc: %v", ErrNotSupported, err)
		}
		return fmt.Errorf("plug: add ingress qdisc on %s: %w", c.iface, err)
	}
	return nil
}

// addRedirect adds the filter that matches everything (protocol all: IPv4,
// IPv6, ARP, ...) arriving on the interface and redirects it to the IFB's
// egress, i.e. into the plug.
func (c *netlinkControl) addRedirect(ctx context.Context) error {
	if err := c.deadline(ctx); err != nil {
		return err
	}
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: c.ifIndex,
			Parent:    ingressHandle,
			Priority:  filterPrio,
			Protocol:  unix.ETH_P_ALL,
		},
		// Sel nil: one zero key under TC_U32_TERMINAL, i.e. match all.
		Actions: []netlink.Action{&netlink.MirredAction{
			ActionAttrs:  netlink.ActionAttrs{Action: netlink.TC_ACT_STOLEN},
			MirredAction: netlink.TCA_EGRESS_REDIR,
			Ifindex:      c.ifbIndex,
		}},
	}
	if err := c.h.FilterAdd(f); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: add u32/mirred filter: %v", ErrNotSupported, err)
		}
		return fmt.Errorf("plug: add u32 redirect filter on %s: %w", c.iface, err)
	}
	return nil
}
