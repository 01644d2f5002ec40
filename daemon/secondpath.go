package daemon

// The second heartbeat path (issue 9, item 5; failover/heartbeat): each
// daemon sends its peers, every second_path.interval, a UDP datagram
// naming the VMs it runs as primary with that peer as backup,
// authenticated under a key from their latest mutual-TLS replication
// connection. A backup that still hears its primary there does not
// consider it lost when the replication link goes (no race for the
// witness record, no automatic takeover, `remusd failover` refused
// without --force). A primary whose replication link ends sends one at
// once, so that a backup which saw the link close learns within a round
// trip, inside takeover_grace_closed, that the primary lives.

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/failover/heartbeat"
)

// startSecondPath binds the second path's socket (nil, nil when none is
// configured); Run serves it.
func (d *Daemon) startSecondPath() (*heartbeat.Endpoint, error) {
	if d.cfg.SecondPath.Listen == "" {
		return nil, nil
	}
	var peers []heartbeat.Peer
	for _, p := range d.cfg.Peers {
		if p.SecondPath == "" {
			continue
		}
		ap, err := netip.ParseAddrPort(p.SecondPath)
		if err != nil {
			return nil, fmt.Errorf("peers %s second_path: %w", p.Name, err) // validated already
		}
		peers = append(peers, heartbeat.Peer{Name: p.Name, Addr: ap})
		if host, _, err := net.SplitHostPort(p.Address); err == nil && host == ap.Addr().String() {
			d.log.Warn("the second path to a peer uses its replication address: it is not independent of the replication link",
				zap.String("peer", p.Name), zap.String("address", p.SecondPath))
		}
	}
	interval, _ := d.cfg.secondPathTimes()
	e, err := heartbeat.Listen(heartbeat.Options{
		Self: d.cfg.Name, Listen: d.cfg.SecondPath.Listen, Peers: peers, Interval: interval,
		Keys: d.hbKeys, Insecure: d.cfg.Insecure,
		VMs: d.secondPathVMs, OnBeat: d.onSecondPathBeat, Log: d.log.Named("second-path"),
	})
	if err != nil {
		return nil, fmt.Errorf("second path: %w", err)
	}
	d.log.Info("second heartbeat path", zap.String("listen", e.Addr().String()), zap.Int("peers", len(peers)))
	return e, nil
}

// learnLinkKey records the second-path key of a replication connection
// with peer (both ends derive the same one).
func (d *Daemon) learnLinkKey(peer string, cs tls.ConnectionState) {
	k, err := heartbeat.KeyFromTLS(cs)
	if err != nil {
		d.log.Warn("no second-path key from the replication connection", zap.String("peer", peer), zap.Error(err))
		return
	}
	d.hbKeys.Add(peer, k)
}

// identifiedConn is a dialled mutual-TLS connection with the identity its
// handshake verified (the client side's ConnectionState has no verified
// chains: remusd verifies identities itself).
type identifiedConn struct {
	net.Conn
	identity string
}

// secondPathVMs lists the VMs this daemon runs as primary with peer as
// their backup and has not fenced.
func (d *Daemon) secondPathVMs(peer string) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []string
	for _, v := range d.vms {
		if v.role == RolePrimary && v.primary != nil && v.w.view != WitnessFenced && !v.w.paused && d.backupName(v) == peer {
			out = append(out, v.name)
		}
	}
	return out
}

// backupName is the identity of v's backup: the configured peer it was
// protected to, else the identity its link authenticated, else the
// configured peer at the address dialled. d.mu held.
func (d *Daemon) backupName(v *vm) string {
	if v.peerName != "" {
		return v.peerName
	}
	if id, _ := v.linkPeer.Load().(string); id != "" {
		return id
	}
	for _, p := range d.cfg.Peers {
		if p.Address != "" && p.Address == v.peer {
			return p.Name
		}
	}
	return ""
}

// onSecondPathBeat records peer's heartbeat for the replicas it owns here.
func (d *Daemon) onSecondPathBeat(peer string, vms []string, at time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, name := range vms {
		v := d.vms[name]
		if v == nil || v.role != RoleBackup || v.backup == nil || v.backup.Owner() != peer {
			continue
		}
		v.altHeard = at
	}
}

// primaryLinkDown tells the backup at once, on the second path, that this
// primary lives although its replication link ended.
func (d *Daemon) primaryLinkDown(v *vm) {
	d.mu.Lock()
	hb, peer := d.hb, d.backupName(v)
	d.mu.Unlock()
	if hb != nil && peer != "" {
		hb.Kick(peer)
	}
}

// secondPathAlive reports whether v's primary was heard on the second
// path within its timeout. d.mu held.
func (d *Daemon) secondPathAlive(v *vm) bool {
	_, timeout := d.cfg.secondPathTimes()
	return d.hb != nil && !v.altHeard.IsZero() && time.Since(v.altHeard) < timeout
}

// runSecondPath serves the second path until ctx ends.
func (d *Daemon) runSecondPath(ctx context.Context, hb *heartbeat.Endpoint) {
	if err := hb.Run(ctx); err != nil {
		d.log.Error("second path stopped", zap.Error(err))
	}
}
