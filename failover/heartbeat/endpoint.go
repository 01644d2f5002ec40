package heartbeat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Peer is a daemon this endpoint exchanges heartbeats with.
type Peer struct {
	Name string
	// Addr is the peer's second-path address: datagrams go there, and only
	// datagrams from its IP are believed.
	Addr netip.AddrPort
}

// Options configure an Endpoint.
type Options struct {
	// Self is this daemon's name (the sender in its datagrams).
	Self string
	// Listen is the UDP address to bind.
	Listen string
	Peers  []Peer
	// Interval between heartbeats to each peer.
	Interval time.Duration
	// Keys holds the peers' keys. Insecure: send and accept datagrams
	// without a MAC (the daemon runs without TLS); otherwise nothing is
	// sent to a peer without a key and unauthenticated datagrams are
	// refused.
	Keys     *Keyring
	Insecure bool
	// VMs returns the VMs this daemon runs as primary with peer as
	// their backup (listed in each heartbeat to it).
	VMs func(peer string) []string
	// OnBeat is called for every accepted heartbeat (on the receive
	// goroutine; keep it short).
	OnBeat func(peer string, vms []string, at time.Time)
	Log    *zap.Logger
	Now    func() time.Time
}

// Endpoint sends heartbeats to its peers and receives theirs on one UDP
// socket.
type Endpoint struct {
	o    Options
	conn *net.UDPConn
	kick chan string

	mu      sync.Mutex
	heard   map[string]time.Time
	refused map[string]uint64 // by reason
	seq     uint64
}

// Listen binds the endpoint's socket; Run then serves it.
func Listen(o Options) (*Endpoint, error) {
	if o.Interval <= 0 {
		return nil, errors.New("heartbeat: interval must be positive")
	}
	if o.Keys == nil {
		o.Keys = NewKeyring()
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.VMs == nil {
		o.VMs = func(string) []string { return nil }
	}
	ap, err := netip.ParseAddrPort(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("heartbeat: listen address %q: %w", o.Listen, err)
	}
	conn, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return nil, fmt.Errorf("heartbeat: %w", err)
	}
	return &Endpoint{o: o, conn: conn, kick: make(chan string, 16), heard: map[string]time.Time{}, refused: map[string]uint64{},
		seq: uint64(o.Now().UnixNano())}, nil
}

// Addr is the bound address.
func (e *Endpoint) Addr() net.Addr { return e.conn.LocalAddr() }

// Keys is the endpoint's keyring.
func (e *Endpoint) Keys() *Keyring { return e.o.Keys }

// LastHeard is when the last accepted heartbeat from peer arrived (zero:
// never).
func (e *Endpoint) LastHeard(peer string) time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.heard[peer]
}

// Refused counts refused datagrams by reason.
func (e *Endpoint) Refused() map[string]uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]uint64, len(e.refused))
	for k, v := range e.refused {
		out[k] = v
	}
	return out
}

// Kick sends a heartbeat to peer now (e.g. the moment its replication
// link ended, so that it hears at once that this daemon lives).
func (e *Endpoint) Kick(peer string) {
	select {
	case e.kick <- peer:
	default:
	}
}

// Run sends and receives until ctx ends, then closes the socket.
func (e *Endpoint) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.receive()
	}()
	defer func() {
		e.conn.Close()
		<-done
	}()
	t := time.NewTicker(e.o.Interval)
	defer t.Stop()
	e.sendAll()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			e.sendAll()
		case name := <-e.kick:
			for _, p := range e.o.Peers {
				if p.Name == name {
					e.send(p)
				}
			}
		}
	}
}

func (e *Endpoint) nextSeq() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	return e.seq
}

func (e *Endpoint) sendAll() {
	for _, p := range e.o.Peers {
		e.send(p)
	}
}

func (e *Endpoint) send(p Peer) {
	var key *Key
	if !e.o.Insecure {
		k, ok := e.o.Keys.Newest(p.Name)
		if !ok {
			return // no replication connection with it yet: nothing to sign with
		}
		key = &k
	}
	dgs, err := Encode(e.o.Self, key, e.nextSeq, e.o.VMs(p.Name))
	if err != nil {
		e.o.Log.Warn("second path: cannot encode a heartbeat", zap.String("peer", p.Name), zap.Error(err))
		return
	}
	to := net.UDPAddrFromAddrPort(p.Addr)
	for _, b := range dgs {
		_ = e.conn.SetWriteDeadline(e.o.Now().Add(e.o.Interval))
		if _, err := e.conn.WriteToUDP(b, to); err != nil {
			e.o.Log.Debug("second path: send failed", zap.String("peer", p.Name), zap.Error(err))
			return
		}
	}
}

func (e *Endpoint) refuse(reason string) {
	e.mu.Lock()
	e.refused[reason]++
	e.mu.Unlock()
}

func (e *Endpoint) receive() {
	buf := make([]byte, MaxDatagram+1)
	for {
		n, from, err := e.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		bt, err := e.o.Keys.Verify(buf[:n])
		switch {
		case errors.Is(err, ErrMalformed):
			e.refuse("malformed")
			continue
		case errors.Is(err, ErrNoKey):
			e.refuse("no_key")
			continue
		case errors.Is(err, ErrBadMAC):
			e.refuse("bad_mac")
			continue
		case errors.Is(err, ErrReplay):
			e.refuse("replay")
			continue
		case err != nil:
			e.refuse("error")
			continue
		}
		if !bt.Authenticated && !e.o.Insecure {
			e.refuse("unauthenticated")
			continue
		}
		known := false
		for _, p := range e.o.Peers {
			if p.Name == bt.Sender && p.Addr.Addr().Unmap() == from.Addr().Unmap() {
				known = true
			}
		}
		if !known {
			e.refuse("unknown_sender")
			continue
		}
		now := e.o.Now()
		e.mu.Lock()
		e.heard[bt.Sender] = now
		e.mu.Unlock()
		if e.o.OnBeat != nil {
			e.o.OnBeat(bt.Sender, bt.VMs, now)
		}
	}
}
