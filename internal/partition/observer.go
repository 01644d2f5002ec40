package partition

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/netlab"
)

// Msg is one output message of the sim guest.
type Msg struct {
	At    time.Time
	Host  string // the daemon that released it (its output stream's header)
	Epoch uint64 // the epoch it was released for (0: unbuffered)
	Seq   uint64 // the guest's output sequence number (grows by one per message)
	Ops   uint64 // the guest's operation count when it emitted the message
	Conn  int    // which connection carried it (numbered from 1)
}

// Observer sees the sim guest's output twice:
//
//   - released: a daemon sends a sim guest's released output only to a
//     loopback address (a backup refuses a peer's VM whose output points
//     elsewhere), so each host runs a relay on the same loopback port,
//     which records every message the moment its daemon hands it over
//     (the release, in one clock for both hosts), and
//   - received: forwards it over the lab's network to the client, whose
//     listener records what arrives, in arrival order. A cut of a host's
//     path to the client delays or loses its output there, as a network
//     would.
type Observer struct {
	clientLn net.Listener
	relays   []net.Listener
	port     int
	wg       sync.WaitGroup
	ctx      context.Context
	cancel   context.CancelFunc

	mu       sync.Mutex
	released []Msg
	received []Msg
	errs     []string
	conns    map[net.Conn]bool
	next     int
}

// NewObserver starts the client's listener in clientNS and a relay on
// the same loopback port in each of hostNSs.
func NewObserver(clientNS string, hostNSs ...string) (*Observer, error) {
	ctx, cancel := context.WithCancel(context.Background())
	o := &Observer{ctx: ctx, cancel: cancel, conns: map[net.Conn]bool{}}
	var err error
	if o.clientLn, err = netlab.Listen(clientNS, netlab.ClientIP+":0"); err != nil {
		cancel()
		return nil, err
	}
	o.wg.Add(1)
	go o.accept(o.clientLn, func(c net.Conn, id int) { o.readClient(c, id) })
	for try := 0; ; try++ {
		port := 20000 + rand.IntN(30000)
		var lns []net.Listener
		for _, ns := range hostNSs {
			ln, err := netlab.Listen(ns, fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				break
			}
			lns = append(lns, ln)
		}
		if len(lns) == len(hostNSs) {
			o.relays, o.port = lns, port
			break
		}
		for _, ln := range lns {
			ln.Close()
		}
		if try == 20 {
			o.Close()
			return nil, fmt.Errorf("observer: no free loopback port in %v", hostNSs)
		}
	}
	for i, ln := range o.relays {
		ns := hostNSs[i]
		o.wg.Add(1)
		go o.accept(ln, func(c net.Conn, id int) { o.relay(ns, c, id) })
	}
	return o, nil
}

// Addr is the sim guest's output address (the relays' loopback port).
func (o *Observer) Addr() string { return fmt.Sprintf("127.0.0.1:%d", o.port) }

func (o *Observer) accept(ln net.Listener, serve func(net.Conn, int)) {
	defer o.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		o.mu.Lock()
		o.next++
		id := o.next
		o.conns[c] = true
		o.mu.Unlock()
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			defer func() {
				o.mu.Lock()
				delete(o.conns, c)
				o.mu.Unlock()
				c.Close()
			}()
			serve(c, id)
		}()
	}
}

func decode(host string, epoch uint64, msg []byte, id int) Msg {
	m := Msg{At: time.Now(), Host: host, Epoch: epoch, Conn: id}
	if len(msg) >= 8 {
		m.Seq = binary.LittleEndian.Uint64(msg)
	}
	if len(msg) >= 16 {
		m.Ops = binary.LittleEndian.Uint64(msg[8:])
	}
	return m
}

func (o *Observer) noteErr(err error) {
	if err != nil {
		o.mu.Lock()
		o.errs = append(o.errs, err.Error())
		o.mu.Unlock()
	}
}

func (o *Observer) readClient(c net.Conn, id int) {
	o.noteErr(daemon.ReadOutputStream(c, func(host string, epoch uint64, msg []byte) {
		m := decode(host, epoch, msg, id)
		o.mu.Lock()
		o.received = append(o.received, m)
		o.mu.Unlock()
	}))
}

// relay records a daemon's output stream and forwards it to the client
// from host namespace ns. Forwarding never holds the daemon up: beyond a
// queue of 4096 messages it drops, like a congested network.
func (o *Observer) relay(ns string, c net.Conn, id int) {
	type rec struct {
		epoch uint64
		msg   []byte
	}
	q := make(chan rec, 4096)
	var hdr string
	done := make(chan struct{})
	defer func() { close(q); <-done }()
	started := false
	start := func() {
		started = true
		go func() {
			defer close(done)
			var w *bufio.Writer
			var conn net.Conn
			defer func() {
				if conn != nil {
					conn.Close()
				}
			}()
			for r := range q {
				for conn == nil {
					ctx, cancel := context.WithTimeout(o.ctx, time.Second)
					cc, err := netlab.Dial(ctx, ns, o.clientLn.Addr().String())
					cancel()
					if err != nil {
						if o.ctx.Err() != nil {
							return
						}
						continue
					}
					o.mu.Lock()
					o.conns[cc] = true
					o.mu.Unlock()
					conn, w = cc, bufio.NewWriter(cc)
					_, _ = w.WriteString(hdr)
				}
				var h [12]byte
				binary.BigEndian.PutUint64(h[:], r.epoch)
				binary.BigEndian.PutUint32(h[8:], uint32(len(r.msg)))
				_, _ = w.Write(h[:])
				_, _ = w.Write(r.msg)
				if len(q) == 0 {
					if err := w.Flush(); err != nil {
						o.mu.Lock()
						delete(o.conns, conn)
						o.mu.Unlock()
						conn.Close()
						conn = nil
					}
				}
			}
		}()
	}
	err := daemon.ReadOutputStream(&headerTap{r: c, hdr: &hdr}, func(host string, epoch uint64, msg []byte) {
		m := decode(host, epoch, msg, id)
		o.mu.Lock()
		o.released = append(o.released, m)
		o.mu.Unlock()
		if !started {
			start()
		}
		select {
		case q <- rec{epoch, msg}:
		default:
		}
	})
	if !started {
		close(done)
	}
	o.noteErr(err)
}

// headerTap keeps the stream's first line (its header) for re-sending.
type headerTap struct {
	r    net.Conn
	hdr  *string
	done bool
}

func (t *headerTap) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if !t.done && n > 0 {
		for i := 0; i < n; i++ {
			*t.hdr += string(p[i])
			if p[i] == '\n' {
				t.done = true
				break
			}
		}
	}
	return n, err
}

// Released returns every message as the hosts released it, in order.
func (o *Observer) Released() []Msg {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]Msg(nil), o.released...)
}

// Received returns every message the client received, in arrival order.
func (o *Observer) Received() []Msg {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]Msg(nil), o.received...)
}

// Errors lists the output streams that ended malformed.
func (o *Observer) Errors() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.errs...)
}

// Close stops listening, closes every stream and waits (up to 5 s) until
// every reader has ended.
func (o *Observer) Close() {
	o.cancel()
	if o.clientLn != nil {
		o.clientLn.Close()
	}
	for _, ln := range o.relays {
		ln.Close()
	}
	o.mu.Lock()
	for c := range o.conns {
		c.Close()
	}
	o.mu.Unlock()
	done := make(chan struct{})
	go func() { o.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
}
