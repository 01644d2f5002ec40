// Package heartbeat is remusd's second heartbeat path: small UDP datagrams
// between peer daemons on an address of their own, independent of the
// replication link. A replication link that is lost while the second path
// still carries a primary's heartbeats is not the loss of the primary: the
// backup does not race for its VMs (issue 9, item 5).
//
// A datagram says who sends it, which VMs it runs as primary, and a
// sequence number, and is authenticated with HMAC-SHA256 under a key both
// daemons derived from their latest mutual-TLS replication connection
// (tls.ConnectionState.ExportKeyingMaterial): no extra secret to
// configure, and a stranger who can send to the port cannot make a dead
// primary look alive (which would hold off its takeover). A key outlives
// the connection it came from, which is the point: the second path must
// work while the replication link is down. Sequence numbers only grow per
// key, so a captured datagram cannot be replayed.
//
// Without TLS (the daemon's insecure mode) datagrams carry no MAC and are
// believed when they come from the peer's configured address.
package heartbeat

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// Wire format (all integers big-endian):
//
//	magic "RMHB" | version 1 | flags (bit 0: authenticated)
//	| len(sender) u8 | sender | key id [8] | seq u64
//	| n VMs u8 | n × (len u8 | name) | MAC [32] (authenticated only)
const (
	magic   = "RMHB"
	version = 1
	flagMAC = 1

	// MaxDatagram bounds a datagram, sent or received.
	MaxDatagram = 1200
	// MaxName bounds a host or VM name.
	MaxName = 64
	// KeySize is the size of a derived key.
	KeySize = 32
	// keysPerPeer bounds the keys kept for one peer.
	keysPerPeer = 8
	macSize     = sha256.Size
	// exporterLabel is the TLS exporter label the keys are derived with.
	exporterLabel = "EXPORTER-remusd-second-path-v1"
)

// KeyID names a key without revealing it.
type KeyID [8]byte

// Key is a derived heartbeat key.
type Key struct {
	ID    KeyID
	bytes [KeySize]byte
}

// KeyFromTLS derives the heartbeat key of a completed TLS connection; both
// ends of the connection derive the same key.
func KeyFromTLS(cs tls.ConnectionState) (Key, error) {
	b, err := cs.ExportKeyingMaterial(exporterLabel, nil, KeySize)
	if err != nil {
		return Key{}, fmt.Errorf("heartbeat: derive key: %w", err)
	}
	return newKey(b), nil
}

func newKey(b []byte) Key {
	var k Key
	copy(k.bytes[:], b)
	id := sha256.Sum256(append([]byte("remusd key id\x00"), b...))
	copy(k.ID[:], id[:])
	return k
}

// Beat is one decoded datagram.
type Beat struct {
	Sender string
	KeyID  KeyID
	Seq    uint64
	VMs    []string
	// Authenticated: the MAC checked out under the sender's key.
	Authenticated bool
}

// Errors a datagram can be refused with.
var (
	ErrMalformed = errors.New("heartbeat: malformed datagram")
	ErrBadMAC    = errors.New("heartbeat: authentication failed")
	ErrNoKey     = errors.New("heartbeat: no key for this sender and key id")
	ErrReplay    = errors.New("heartbeat: sequence number not newer (replay)")
)

// Encode builds datagrams carrying vms (split over several when they do
// not fit in one); key nil sends them unauthenticated. Names must be
// 1..MaxName bytes.
func Encode(sender string, key *Key, seq func() uint64, vms []string) ([][]byte, error) {
	if len(sender) == 0 || len(sender) > MaxName {
		return nil, fmt.Errorf("heartbeat: sender name of %d bytes", len(sender))
	}
	for _, v := range vms {
		if len(v) == 0 || len(v) > MaxName {
			return nil, fmt.Errorf("heartbeat: VM name of %d bytes", len(v))
		}
	}
	var out [][]byte
	for first := true; first || len(vms) > 0; first = false {
		b := make([]byte, 0, MaxDatagram)
		b = append(b, magic...)
		flags := byte(0)
		if key != nil {
			flags |= flagMAC
		}
		b = append(b, version, flags, byte(len(sender)))
		b = append(b, sender...)
		if key != nil {
			b = append(b, key.ID[:]...)
		} else {
			b = append(b, make([]byte, len(KeyID{}))...)
		}
		b = binary.BigEndian.AppendUint64(b, seq())
		countAt := len(b)
		b = append(b, 0)
		room := MaxDatagram - macSize
		n := 0
		for len(vms) > 0 && n < 255 && len(b)+1+len(vms[0]) <= room {
			b = append(b, byte(len(vms[0])))
			b = append(b, vms[0]...)
			vms = vms[1:]
			n++
		}
		b[countAt] = byte(n)
		if key != nil {
			m := hmac.New(sha256.New, key.bytes[:])
			m.Write(b)
			b = m.Sum(b)
		}
		out = append(out, b)
	}
	return out, nil
}

// parse decodes a datagram without checking its MAC; mac is the MAC's
// bytes and signed what it covers.
func parse(b []byte) (bt Beat, signed, mac []byte, err error) {
	if len(b) > MaxDatagram || len(b) < len(magic)+3 || string(b[:len(magic)]) != magic {
		return bt, nil, nil, ErrMalformed
	}
	p := len(magic)
	if b[p] != version || b[p+1]&^flagMAC != 0 {
		return bt, nil, nil, fmt.Errorf("%w: version %d flags %#x", ErrMalformed, b[p], b[p+1])
	}
	authed := b[p+1]&flagMAC != 0
	end := len(b)
	if authed {
		if end < macSize {
			return bt, nil, nil, ErrMalformed
		}
		end -= macSize
		mac = b[end:]
	}
	body := b[:end]
	p += 2
	str := func() (string, bool) {
		if p >= len(body) {
			return "", false
		}
		n := int(body[p])
		p++
		if n == 0 || n > MaxName || p+n > len(body) {
			return "", false
		}
		s := string(body[p : p+n])
		p += n
		return s, true
	}
	var ok bool
	if bt.Sender, ok = str(); !ok {
		return bt, nil, nil, ErrMalformed
	}
	if p+len(KeyID{})+8+1 > len(body) {
		return bt, nil, nil, ErrMalformed
	}
	copy(bt.KeyID[:], body[p:])
	p += len(KeyID{})
	bt.Seq = binary.BigEndian.Uint64(body[p:])
	p += 8
	n := int(body[p])
	p++
	for range n {
		v, ok := str()
		if !ok {
			return bt, nil, nil, ErrMalformed
		}
		bt.VMs = append(bt.VMs, v)
	}
	if p != len(body) {
		return bt, nil, nil, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(body)-p)
	}
	bt.Authenticated = authed
	return bt, body, mac, nil
}

// Keyring holds, per peer, the keys of its latest connections (bounded)
// and the newest sequence number seen under each; it is safe for
// concurrent use.
type Keyring struct {
	mu    sync.Mutex
	peers map[string]*peerKeys
}

type peerKeys struct {
	keys []Key // oldest first; the last is the newest
	seen map[KeyID]*window
}

// window is a replay window: the newest sequence number seen and which of
// the 64 below it were (datagrams of one burst may arrive reordered).
type window struct {
	top  uint64
	bits uint64 // bit i: top-1-i seen
}

// accept records seq and reports whether it is new.
func (w *window) accept(seq uint64) bool {
	switch {
	case seq > w.top:
		shift := seq - w.top
		if shift >= 64 {
			w.bits = 0
		} else {
			w.bits = w.bits<<shift | 1<<(shift-1)
		}
		w.top = seq
		return true
	case seq == w.top || w.top-seq > 64:
		return false
	default:
		bit := uint64(1) << (w.top - seq - 1)
		if w.bits&bit != 0 {
			return false
		}
		w.bits |= bit
		return true
	}
}

// NewKeyring returns an empty keyring.
func NewKeyring() *Keyring { return &Keyring{peers: map[string]*peerKeys{}} }

// Add records k as peer's newest key (the oldest of more than
// keysPerPeer is forgotten).
func (r *Keyring) Add(peer string, k Key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pk := r.peers[peer]
	if pk == nil {
		pk = &peerKeys{seen: map[KeyID]*window{}}
		r.peers[peer] = pk
	}
	for i, old := range pk.keys {
		if old.ID == k.ID {
			pk.keys = append(pk.keys[:i], pk.keys[i+1:]...)
			break
		}
	}
	pk.keys = append(pk.keys, k)
	if len(pk.keys) > keysPerPeer {
		delete(pk.seen, pk.keys[0].ID)
		pk.keys = pk.keys[1:]
	}
}

// Newest returns peer's newest key.
func (r *Keyring) Newest(peer string) (Key, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pk := r.peers[peer]
	if pk == nil || len(pk.keys) == 0 {
		return Key{}, false
	}
	return pk.keys[len(pk.keys)-1], true
}

// Verify decodes datagram b and checks it: authenticated under one of
// peer keys of its sender with a newer sequence number than any before
// under that key, or one of the 64 below the newest not seen yet (it
// then records the number). It does not check who the
// sender is allowed to be; the caller does.
func (r *Keyring) Verify(b []byte) (Beat, error) {
	bt, signed, mac, err := parse(b)
	if err != nil {
		return bt, err
	}
	if !bt.Authenticated {
		return bt, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	pk := r.peers[bt.Sender]
	if pk == nil {
		return bt, ErrNoKey
	}
	var key *Key
	for i := range pk.keys {
		if pk.keys[i].ID == bt.KeyID {
			key = &pk.keys[i]
		}
	}
	if key == nil {
		return bt, ErrNoKey
	}
	m := hmac.New(sha256.New, key.bytes[:])
	m.Write(signed)
	if !hmac.Equal(m.Sum(nil), mac) {
		return bt, ErrBadMAC
	}
	w := pk.seen[bt.KeyID]
	if w == nil {
		w = &window{}
		pk.seen[bt.KeyID] = w
	}
	if bt.Seq == 0 || !w.accept(bt.Seq) {
		return bt, ErrReplay
	}
	return bt, nil
}
