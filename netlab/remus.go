package netlab

import "context"

// The Remus topology's fixed addresses.
const (
	ClientIP = "10.77.0.2"
	GuestIP  = "10.77.0.10"
	GuestMAC = "52:54:00:77:00:10"
	HostAIP  = "10.77.0.101"
	HostBIP  = "10.77.0.102"
	// WitnessIP is the witness host's address (an etcd member on a third
	// host, as in production).
	WitnessIP = "10.77.0.103"
	// Prefix is the subnet's prefix length.
	Prefix = "/24"
	// BridgeA and BridgeB are the host bridges the guest's taps join.
	BridgeA = "brA"
	BridgeB = "brB"
)

// Remus is the primary/backup test topology: a client, a primary host (A)
// and a backup host (B), each in its own network namespace, joined by a
// switch bridge (namespace S). Each host has a bridge holding its uplink
// and, once a daemon attaches it, the guest's tap; both taps carry the
// same guest MAC, so the guest's address moves with it on failover.
//
//	client 10.77.0.2 — sw0 — brA 10.77.0.101 (tapA: guest 10.77.0.10)
//	                      |— brB 10.77.0.102 (tapB: standby)
//	                      \— witness 10.77.0.103 (W)
type Remus struct {
	*Lab
	Client, A, B, S, W string
}

// NewRemus builds the topology (prefix: up to 3 characters naming the
// user, e.g. "rq"). On error everything created is removed.
func NewRemus(ctx context.Context, prefix string) (*Remus, error) {
	l, err := New(prefix)
	if err != nil {
		return nil, err
	}
	n := &Remus{Lab: l}
	if err := n.build(ctx); err != nil {
		_ = l.Close()
		return nil, err
	}
	return n, nil
}

func (n *Remus) build(ctx context.Context) error {
	var err error
	for _, p := range []struct {
		dst  *string
		role string
	}{{&n.Client, "c"}, {&n.A, "a"}, {&n.B, "b"}, {&n.S, "s"}, {&n.W, "w"}} {
		if *p.dst, err = n.AddNetns(ctx, p.role); err != nil {
			return err
		}
	}
	steps := []func() error{
		func() error { return Bridge(ctx, n.S, "sw0") },
		func() error { return Veth(ctx, n.S, "sc", n.Client, "eth0") },
		func() error { return Veth(ctx, n.S, "sa", n.A, "up0") },
		func() error { return Veth(ctx, n.S, "sb", n.B, "up0") },
		func() error { return Veth(ctx, n.S, "sw", n.W, "eth0") },
		func() error { return Addr(ctx, n.Client, "eth0", ClientIP+Prefix) },
		func() error { return Addr(ctx, n.W, "eth0", WitnessIP+Prefix) },
		func() error { return Attach(ctx, n.S, "sw", "sw0") },
		func() error { return Attach(ctx, n.S, "sc", "sw0") },
		func() error { return Attach(ctx, n.S, "sa", "sw0") },
		func() error { return Attach(ctx, n.S, "sb", "sw0") },
	}
	for _, h := range []struct{ ns, br, ip string }{{n.A, BridgeA, HostAIP}, {n.B, BridgeB, HostBIP}} {
		steps = append(steps,
			func() error { return Bridge(ctx, h.ns, h.br) },
			func() error { return Attach(ctx, h.ns, "up0", h.br) },
			func() error { return Addr(ctx, h.ns, h.br, h.ip+Prefix) },
			func() error { return EnableBridgeNetfilter(ctx, h.ns) },
		)
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return err
		}
	}
	return nil
}
