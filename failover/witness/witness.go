// Package witness is remusd's witness: an etcd cluster that decides, for
// each protected VM, which host holds its active role. It is the arbiter
// of invariant 3 (one active copy): every transition of a VM's active
// role (the backup activating, the primary going on without its backup,
// a switchover) is a compare-and-swap on one etcd key per VM, so when the
// two sides race exactly one wins, whatever the network does.
//
// The record of VM v lives at <prefix>/vms/<v> as small JSON (holder and
// generation, see Record). The generation is a fencing token: it grows by
// exactly one on every write of the key, and the key is never deleted by
// this package (a protection ended on purpose leaves a released record),
// so tokens never go backwards for a VM name.
//
// Every call has a deadline (Config.OpTimeout). A call that gets no answer
// within it fails with an error wrapping ErrUnreachable; reads are
// linearizable, so a member cut off from its cluster's quorum cannot
// answer them with a stale record (it fails them instead). ErrLost says
// the witness answered and the caller does not hold the VM.
//
// The key must be written only through this package: the guarantees above
// rest on every write being one of its compare-and-swaps.
package witness

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/transport"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Errors the calls wrap; test with errors.Is.
var (
	// ErrUnreachable: no answer from the witness within the deadline (no
	// member reachable, no quorum, or TLS refused). The state of the key
	// is unknown; after a Claim or Release that failed so, the write may
	// or may not have happened (see Claim).
	ErrUnreachable = errors.New("witness unreachable")
	// ErrLost: the witness answered and the caller does not hold the VM
	// (at the generation it named).
	ErrLost = errors.New("witness: not the holder")
	// ErrHeldByOther: Init found the VM held by another host.
	ErrHeldByOther = errors.New("witness: VM held by another host")
	// ErrCorrupt: the key holds a value that is not a valid record (or is
	// too large). Nothing is written over it; an operator must look.
	ErrCorrupt = errors.New("witness: corrupt record")
)

// keepalive of the gRPC connections: gRPC's floor is 10 s; etcd's
// server refuses pings more often than every 5 s.
const (
	keepaliveTime    = 10 * time.Second
	keepaliveTimeout = 5 * time.Second
	// reconnectMaxDelay caps gRPC's reconnection backoff (default 120 s),
	// so a witness that comes back is used again within about half a second.
	reconnectMaxDelay = 500 * time.Millisecond
)

// Witness is a client of the witness cluster. Its methods are safe for
// concurrent use.
type Witness struct {
	cfg       Config
	cli       *clientv3.Client
	log       *zap.Logger
	closeOnce sync.Once
	closeErr  error
}

// Dial validates cfg, loads its TLS files and makes a client of the
// cluster. It does not wait for the cluster: the client connects in the
// background and reconnects on its own, and a witness that is down at
// Dial time only makes the calls fail with ErrUnreachable until it is
// back. ctx is only checked for cancellation. log receives the client's
// warnings and the outcome of every write (nil: no logging).
func Dial(ctx context.Context, cfg Config, log *zap.Logger) (*Witness, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if log == nil {
		log = zap.NewNop()
	}
	tlsCfg, err := cfg.TLS.tlsConfig()
	if err != nil {
		return nil, err
	}
	bo := backoff.DefaultConfig
	bo.BaseDelay = 100 * time.Millisecond
	bo.MaxDelay = reconnectMaxDelay
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            append([]string(nil), cfg.Endpoints...),
		TLS:                  tlsCfg,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    keepaliveTime,
		DialKeepAliveTimeout: keepaliveTimeout,
		Logger:               log.Named("etcd-client").WithOptions(zap.IncreaseLevel(zap.WarnLevel)),
		DialOptions: []grpc.DialOption{
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           bo,
				MinConnectTimeout: cfg.DialTimeout,
			}),
			grpc.WithChainUnaryInterceptor(noteErrors),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("witness: client for %v: %w", cfg.Endpoints, err)
	}
	return &Witness{cfg: cfg, cli: cli, log: log}, nil
}

// Close releases the client's connections. Calls after Close fail.
func (w *Witness) Close() error {
	w.closeOnce.Do(func() { w.closeErr = w.cli.Close() })
	return w.closeErr
}

// Key returns the etcd key of VM vm's record.
func (w *Witness) Key(vm string) string { return w.cfg.Prefix + "/vms/" + vm }

// OpTimeout returns the deadline every call carries.
func (w *Witness) OpTimeout() time.Duration { return w.cfg.OpTimeout }

// Ping checks that the witness answers a linearizable read within the op
// timeout (so that a quorum of members is up and reachable). It reads no
// record.
func (w *Witness) Ping(ctx context.Context) error {
	octx, cancel := w.opCtx(ctx)
	defer cancel()
	if _, err := w.cli.Get(octx, w.cfg.Prefix+"/ping", clientv3.WithCountOnly()); err != nil {
		return w.fail(ctx, octx, "ping", w.cfg.Prefix, err)
	}
	return nil
}

// Get returns VM vm's current record, read linearizably. held reports
// whether it names a holder. When held is false, rec is the zero Record
// (key absent) or a released record (its Generation and Revision set);
// either is a valid prev for Claim.
func (w *Witness) Get(ctx context.Context, vm string) (rec Record, held bool, err error) {
	if err := hypervisor.ValidateVMName(vm); err != nil {
		return Record{}, false, err
	}
	octx, cancel := w.opCtx(ctx)
	defer cancel()
	key := w.Key(vm)
	resp, err := w.cli.Get(octx, key)
	if err != nil {
		return Record{}, false, w.fail(ctx, octx, "get", key, err)
	}
	rec, err = current(key, resp.Kvs)
	if err != nil {
		return Record{}, false, err
	}
	return rec, rec.Held(), nil
}

// Claim makes holder the holder of VM vm if, and only if, the key is still
// exactly as prev (the same etcd revision; prev's zero value means
// "absent"): one etcd transaction writes {holder, prev.Generation+1}. It
// never writes blindly.
//
// It returns (the new record, true) if holder now holds the VM at
// generation prev.Generation+1, and (the current record, false) if
// someone else moved the key first; the current record is then the
// winner's (zero if the key is absent).
//
// Claim is idempotent: if the key already says {holder,
// prev.Generation+1} (for instance because an earlier Claim with the same
// prev was applied but its answer was lost), it returns that record and
// true. This is sound because generations form one chain per key: the
// only record at generation prev.Generation+1 is the successor of prev,
// written by holder.
//
// An error wrapping ErrUnreachable means the outcome is unknown: the
// write may have been applied. The caller must act as the loser (fence,
// stay standby) until a later Claim with the same prev, or a Get, tells
// it the truth. ErrCorrupt: the key holds something else than a record.
func (w *Witness) Claim(ctx context.Context, vm, holder string, prev Record) (Record, bool, error) {
	return w.claim(ctx, vm, holder, prev, false)
}

// ClaimUnprotected is Claim for a primary that will release output no
// replica holds (it runs on without its backup): the record it writes
// says so (Record.Unprotected), and a backup must not take over from it
// until an epoch of that generation has committed on its side.
func (w *Witness) ClaimUnprotected(ctx context.Context, vm, holder string, prev Record) (Record, bool, error) {
	return w.claim(ctx, vm, holder, prev, true)
}

func (w *Witness) claim(ctx context.Context, vm, holder string, prev Record, unprotected bool) (Record, bool, error) {
	if err := checkArgs(vm, holder); err != nil {
		return Record{}, false, err
	}
	if err := checkPrev(prev); err != nil {
		return Record{}, false, err
	}
	octx, cancel := w.opCtx(ctx)
	defer cancel()
	key := w.Key(vm)
	gen := prev.Generation + 1
	rev, cur, err := w.cas(octx, key, prev, encodeRecord(Record{Holder: holder, Generation: gen, Unprotected: unprotected}))
	if err != nil {
		return Record{}, false, w.fail(ctx, octx, "claim", key, err)
	}
	if rev != 0 {
		rec := Record{Holder: holder, Generation: gen, Unprotected: unprotected, Revision: rev}
		w.log.Info("witness claim won", zap.String("vm", vm), zap.String("holder", holder), zap.Uint64("generation", gen), zap.Bool("unprotected", unprotected), zap.Int64("revision", rev))
		return rec, true, nil
	}
	if cur.Held() && cur.Holder == holder && cur.Generation == gen {
		w.log.Info("witness claim already applied", zap.String("vm", vm), zap.String("holder", holder), zap.Uint64("generation", gen))
		return cur, true, nil
	}
	w.log.Info("witness claim lost", zap.String("vm", vm), zap.String("holder", holder), zap.Uint64("prev_generation", prev.Generation), zap.Stringer("current", cur))
	return cur, false, nil
}

// Init is the protect-time registration of holder as VM vm's holder:
//   - key absent: it creates {holder, 1};
//   - key released: it writes {holder, released generation + 1};
//   - key held by holder: it returns that record unchanged (a restarted
//     daemon resumes its protection at the same generation);
//   - key held by another host: it returns that record and an error
//     wrapping ErrHeldByOther; the caller must refuse to protect.
//
// Every write is a compare-and-swap; a racing Init by another host gets
// ErrHeldByOther. Errors wrap ErrUnreachable or ErrCorrupt as for Claim.
func (w *Witness) Init(ctx context.Context, vm, holder string) (Record, error) {
	if err := checkArgs(vm, holder); err != nil {
		return Record{}, err
	}
	octx, cancel := w.opCtx(ctx)
	defer cancel()
	key := w.Key(vm)
	prev := Record{} // try "absent" first, then whatever is there
	for {
		gen := prev.Generation + 1
		rev, cur, err := w.cas(octx, key, prev, encodeRecord(Record{Holder: holder, Generation: gen}))
		if err != nil {
			return Record{}, w.fail(ctx, octx, "init", key, err)
		}
		if rev != 0 {
			rec := Record{Holder: holder, Generation: gen, Revision: rev}
			w.log.Info("witness init", zap.String("vm", vm), zap.String("holder", holder), zap.Uint64("generation", gen), zap.Int64("revision", rev))
			return rec, nil
		}
		switch {
		case cur.Held() && cur.Holder == holder:
			return cur, nil
		case cur.Held():
			return cur, fmt.Errorf("%w: %s names %s at generation %d, not %s", ErrHeldByOther, key, cur.Holder, cur.Generation, holder)
		}
		prev = cur // released, or absent again: swap from there
	}
}

// Confirm checks, with one linearizable read, that VM vm's record still
// names holder at generation gen. It returns nil if so; an error wrapping
// ErrLost if the witness says otherwise (another holder, another
// generation, released, absent); ErrUnreachable if no answer came within
// the op timeout; ErrCorrupt for a bad value. Any error means the caller
// cannot prove it holds the VM.
func (w *Witness) Confirm(ctx context.Context, vm, holder string, gen uint64) error {
	if err := checkArgs(vm, holder); err != nil {
		return err
	}
	rec, held, err := w.Get(ctx, vm)
	if err != nil {
		return err
	}
	if !held || rec.Holder != holder || rec.Generation != gen {
		return fmt.Errorf("%w: %s is %s, not held by %s at generation %d", ErrLost, w.Key(vm), rec, holder, gen)
	}
	return nil
}

// Release ends holder's hold on VM vm on purpose (a protection ended by
// the operator): if the record is {holder, gen} it is replaced, by
// compare-and-swap, with a released record at generation gen+1, so no
// one can Claim from {holder, gen} any more and a later Init continues
// the chain of generations. It returns nil if the VM is released (also if
// it already was, from gen), an error wrapping ErrLost if the record names
// someone or something else, ErrUnreachable (outcome unknown; retrying is
// safe) or ErrCorrupt.
func (w *Witness) Release(ctx context.Context, vm, holder string, gen uint64) error {
	if err := checkArgs(vm, holder); err != nil {
		return err
	}
	octx, cancel := w.opCtx(ctx)
	defer cancel()
	key := w.Key(vm)
	resp, err := w.cli.Get(octx, key)
	if err != nil {
		return w.fail(ctx, octx, "release", key, err)
	}
	cur, err := current(key, resp.Kvs)
	if err != nil {
		return err
	}
	for {
		switch {
		case cur.Released && cur.Generation == gen+1:
			return nil
		case !cur.Held() || cur.Holder != holder || cur.Generation != gen:
			return fmt.Errorf("%w: %s is %s, not held by %s at generation %d", ErrLost, key, cur, holder, gen)
		}
		rev, now, err := w.cas(octx, key, cur, encodeRecord(Record{Generation: gen + 1, Released: true}))
		if err != nil {
			return w.fail(ctx, octx, "release", key, err)
		}
		if rev != 0 {
			w.log.Info("witness release", zap.String("vm", vm), zap.String("holder", holder), zap.Uint64("generation", gen+1), zap.Int64("revision", rev))
			return nil
		}
		cur = now
	}
}

// cas writes value to key if the key is at prev (absent if prev.Revision
// is 0). It returns the revision of the write, or 0 and the key's current
// record if the comparison failed.
func (w *Witness) cas(ctx context.Context, key string, prev Record, value []byte) (int64, Record, error) {
	cmp := clientv3.Compare(clientv3.ModRevision(key), "=", prev.Revision)
	if prev.Revision == 0 {
		cmp = clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	}
	resp, err := w.cli.Txn(ctx).If(cmp).
		Then(clientv3.OpPut(key, string(value))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, Record{}, err
	}
	if resp.Succeeded {
		return resp.Header.Revision, Record{}, nil
	}
	if len(resp.Responses) != 1 || resp.Responses[0].GetResponseRange() == nil {
		return 0, Record{}, fmt.Errorf("witness: %s: unexpected transaction response", key)
	}
	cur, err := current(key, resp.Responses[0].GetResponseRange().Kvs)
	return 0, cur, err
}

// current decodes the result of a read of key: the zero Record if absent.
func current(key string, kvs []*mvccpb.KeyValue) (Record, error) {
	switch len(kvs) {
	case 0:
		return Record{}, nil
	case 1:
		return decode(key, kvs[0].Value, kvs[0].ModRevision)
	}
	return Record{}, fmt.Errorf("witness: %s: read returned %d keys", key, len(kvs))
}

func (w *Witness) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx = context.WithValue(ctx, noteKey{}, new(errNote))
	return context.WithTimeout(ctx, w.cfg.OpTimeout)
}

// errNote keeps the last gRPC error of a call's attempts: the client
// reports a call that timed out as the bare context error, while the
// attempts knew why (connection refused, certificate signed by unknown
// authority, no leader).
type errNote struct {
	mu  sync.Mutex
	err error
}

type noteKey struct{}

func noteErrors(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if n, ok := ctx.Value(noteKey{}).(*errNote); ok && err != nil {
		n.mu.Lock()
		n.err = err
		n.mu.Unlock()
	}
	return err
}

// cause returns the last error an attempt of the call under octx saw.
func cause(octx context.Context) error {
	n, ok := octx.Value(noteKey{}).(*errNote)
	if !ok {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.err
}

// fail wraps an error of an etcd call: ErrUnreachable if no answer came in
// time or the cluster could not serve it; the caller's cancellation as
// such; anything else (e.g. permission denied) as it is.
// ctx is the caller's context, octx the call's.
func (w *Witness) fail(ctx, octx context.Context, op, key string, err error) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("witness %s %s: %w", op, key, err)
	}
	if !unreachable(err) {
		return fmt.Errorf("witness %s %s: %w", op, key, err)
	}
	if c := cause(octx); c != nil && c.Error() != err.Error() {
		if s, ok := status.FromError(c); ok {
			return fmt.Errorf("witness %s %s: %w within %v: %w (last error: %s)", op, key, ErrUnreachable, w.cfg.OpTimeout, err, s.Message())
		}
		return fmt.Errorf("witness %s %s: %w within %v: %w (last error: %v)", op, key, ErrUnreachable, w.cfg.OpTimeout, err, c)
	}
	return fmt.Errorf("witness %s %s: %w within %v: %w", op, key, ErrUnreachable, w.cfg.OpTimeout, err)
}

func unreachable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	code := codes.Unknown
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		code = ee.Code()
	} else if s, ok := status.FromError(err); ok {
		code = s.Code()
	}
	switch code {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted:
		return true
	}
	return false
}

func checkArgs(vm, holder string) error {
	if err := hypervisor.ValidateVMName(vm); err != nil {
		return err
	}
	if err := transport.ValidateHostName(holder); err != nil {
		return fmt.Errorf("witness holder: %w", err)
	}
	return nil
}

// checkPrev refuses a prev that Witness cannot have returned.
func checkPrev(prev Record) error {
	switch {
	case prev.Revision < 0:
		return fmt.Errorf("witness: prev revision %d is negative", prev.Revision)
	case prev.Revision == 0 && prev != (Record{}):
		return fmt.Errorf("witness: prev %+v has no revision but is not the zero record (absent)", prev)
	case prev.Revision > 0 && prev.Generation == 0:
		return fmt.Errorf("witness: prev at revision %d has generation 0", prev.Revision)
	}
	return nil
}
