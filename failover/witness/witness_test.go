package witness_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/failover/witness/etcdtest"
	"github.com/remusd/remusd/internal/pki"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

func dial(t *testing.T, cfg witness.Config) *witness.Witness {
	t.Helper()
	w, err := witness.Dial(context.Background(), cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { w.Close() })
	return w
}

// rawPut writes a value to a key behind the witness's back.
func rawPut(t *testing.T, srv *etcdtest.Server, key, value string) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: srv.ClientURLs(), Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, key, value); err != nil {
		t.Fatal(err)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestWitness runs the independent cases against one member, each on its
// own VM name.
func TestWitness(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := srv.WitnessConfig()
	a, b := dial(t, cfg), dial(t, cfg)

	t.Run("Init", func(t *testing.T) {
		ctx := ctxT(t)
		rec, err := a.Init(ctx, "vm-init", "hostA")
		if err != nil || rec.Holder != "hostA" || rec.Generation != 1 || rec.Revision == 0 {
			t.Fatalf("Init absent = %v, %v; want hostA at 1", rec, err)
		}
		again, err := a.Init(ctx, "vm-init", "hostA")
		if err != nil || again != rec {
			t.Fatalf("Init same holder = %v, %v; want %v unchanged", again, err, rec)
		}
		other, err := b.Init(ctx, "vm-init", "hostB")
		if !errors.Is(err, witness.ErrHeldByOther) || other != rec {
			t.Fatalf("Init other holder = %v, %v; want %v and ErrHeldByOther", other, err, rec)
		}
		t.Logf("Init by another holder: %v", err)
		got, held, err := b.Get(ctx, "vm-init")
		if err != nil || !held || got != rec {
			t.Fatalf("Get = %v, %v, %v; want %v", got, held, err, rec)
		}
	})

	t.Run("GetAbsent", func(t *testing.T) {
		rec, held, err := a.Get(ctxT(t), "vm-absent")
		if err != nil || held || rec != (witness.Record{}) {
			t.Fatalf("Get absent = %v, %v, %v", rec, held, err)
		}
	})

	t.Run("ClaimRace", func(t *testing.T) {
		// Three clients race Claim from the same prev every round: exactly
		// one wins, the generation grows by one, the losers get the
		// winner's record.
		ctx := ctxT(t)
		clients := []*witness.Witness{a, b, dial(t, cfg)}
		holders := []string{"hostA", "hostB", "hostC"}
		const rounds = 200
		prev := witness.Record{}
		wins := make([]int, len(clients))
		for round := range rounds {
			type result struct {
				rec witness.Record
				won bool
				err error
			}
			res := make([]result, len(clients))
			var start, done sync.WaitGroup
			start.Add(1)
			for i, w := range clients {
				done.Go(func() {
					start.Wait()
					rec, won, err := w.Claim(ctx, "vm-race", holders[i], prev)
					res[i] = result{rec, won, err}
				})
			}
			start.Done()
			done.Wait()
			winner := -1
			for i, r := range res {
				if r.err != nil {
					t.Fatalf("round %d: client %d: %v", round, i, r.err)
				}
				if r.won {
					if winner >= 0 {
						t.Fatalf("round %d: clients %d and %d both won from %v", round, winner, i, prev)
					}
					winner = i
				}
			}
			if winner < 0 {
				t.Fatalf("round %d: nobody won from %v: %+v", round, prev, res)
			}
			w := res[winner].rec
			if w.Holder != holders[winner] || w.Generation != prev.Generation+1 || w.Revision <= prev.Revision {
				t.Fatalf("round %d: winner's record %v after %v", round, w, prev)
			}
			for i, r := range res {
				if i != winner && r.rec != w {
					t.Fatalf("round %d: loser %d got %v, winner wrote %v", round, i, r.rec, w)
				}
			}
			wins[winner]++
			prev = w
		}
		if prev.Generation != rounds {
			t.Fatalf("generation %d after %d rounds", prev.Generation, rounds)
		}
		t.Logf("wins per client over %d rounds: %v", rounds, wins)
	})

	t.Run("ClaimStalePrev", func(t *testing.T) {
		ctx := ctxT(t)
		r1, err := a.Init(ctx, "vm-stale", "hostA")
		if err != nil {
			t.Fatal(err)
		}
		r2, won, err := b.Claim(ctx, "vm-stale", "hostB", r1)
		if err != nil || !won || r2.Generation != 2 {
			t.Fatalf("Claim from current = %v, %v, %v", r2, won, err)
		}
		// hostA still believes r1.
		cur, won, err := a.Claim(ctx, "vm-stale", "hostA", r1)
		if err != nil || won || cur != r2 {
			t.Fatalf("Claim from stale prev = %v, %v, %v; want lost with %v", cur, won, err, r2)
		}
		// Claiming "absent" when the key exists loses too.
		cur, won, err = a.Claim(ctx, "vm-stale", "hostA", witness.Record{})
		if err != nil || won || cur != r2 {
			t.Fatalf("Claim from absent = %v, %v, %v; want lost with %v", cur, won, err, r2)
		}
		// A fake prev at the right generation but another revision loses.
		fake := r2
		fake.Revision++
		if cur, won, err = a.Claim(ctx, "vm-stale", "hostA", fake); err != nil || won {
			t.Fatalf("Claim from fake prev = %v, %v, %v", cur, won, err)
		}
	})

	t.Run("ClaimIdempotent", func(t *testing.T) {
		ctx := ctxT(t)
		r1, err := a.Init(ctx, "vm-idem", "hostA")
		if err != nil {
			t.Fatal(err)
		}
		r2, won, err := b.Claim(ctx, "vm-idem", "hostB", r1)
		if err != nil || !won {
			t.Fatal(won, err)
		}
		// The same claim again (its answer lost, say): still won, same record.
		again, won, err := b.Claim(ctx, "vm-idem", "hostB", r1)
		if err != nil || !won || again != r2 {
			t.Fatalf("repeated Claim = %v, %v, %v; want %v won", again, won, err, r2)
		}
		// Once the key moved on, the old claim is lost.
		r3, won, err := a.Claim(ctx, "vm-idem", "hostA", r2)
		if err != nil || !won {
			t.Fatal(won, err)
		}
		if cur, won, err := b.Claim(ctx, "vm-idem", "hostB", r1); err != nil || won || cur != r3 {
			t.Fatalf("Claim from superseded prev = %v, %v, %v; want lost with %v", cur, won, err, r3)
		}
	})

	t.Run("ConfirmAfterTakeover", func(t *testing.T) {
		ctx := ctxT(t)
		r1, err := a.Init(ctx, "vm-confirm", "hostA")
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Confirm(ctx, "vm-confirm", "hostA", r1.Generation); err != nil {
			t.Fatalf("Confirm of the holder: %v", err)
		}
		if _, won, err := b.Claim(ctx, "vm-confirm", "hostB", r1); err != nil || !won {
			t.Fatal(won, err)
		}
		err = a.Confirm(ctx, "vm-confirm", "hostA", r1.Generation)
		if !errors.Is(err, witness.ErrLost) || errors.Is(err, witness.ErrUnreachable) {
			t.Fatalf("Confirm after takeover = %v; want ErrLost", err)
		}
		t.Logf("Confirm after takeover: %v", err)
		if err := b.Confirm(ctx, "vm-confirm", "hostB", r1.Generation); !errors.Is(err, witness.ErrLost) {
			t.Fatalf("Confirm at an old generation = %v; want ErrLost", err)
		}
		if err := b.Confirm(ctx, "vm-confirm", "hostB", r1.Generation+1); err != nil {
			t.Fatalf("Confirm of the new holder: %v", err)
		}
		if err := a.Confirm(ctx, "vm-nothing", "hostA", 1); !errors.Is(err, witness.ErrLost) {
			t.Fatalf("Confirm of an absent key = %v; want ErrLost", err)
		}
	})

	t.Run("ReleaseKeepsGenerations", func(t *testing.T) {
		ctx := ctxT(t)
		r1, err := a.Init(ctx, "vm-release", "hostA")
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Release(ctx, "vm-release", "hostB", r1.Generation); !errors.Is(err, witness.ErrLost) {
			t.Fatalf("Release by a non-holder = %v; want ErrLost", err)
		}
		if err := a.Release(ctx, "vm-release", "hostA", r1.Generation); err != nil {
			t.Fatalf("Release: %v", err)
		}
		if err := a.Release(ctx, "vm-release", "hostA", r1.Generation); err != nil {
			t.Fatalf("repeated Release: %v", err)
		}
		rel, held, err := a.Get(ctx, "vm-release")
		if err != nil || held || !rel.Released || rel.Generation != 2 {
			t.Fatalf("Get after Release = %v, %v, %v", rel, held, err)
		}
		// A claim from before the release cannot succeed.
		if _, won, err := b.Claim(ctx, "vm-release", "hostB", r1); err != nil || won {
			t.Fatalf("Claim from before the release = %v, %v", won, err)
		}
		if err := a.Confirm(ctx, "vm-release", "hostA", r1.Generation); !errors.Is(err, witness.ErrLost) {
			t.Fatalf("Confirm after Release = %v; want ErrLost", err)
		}
		// Protecting again continues the chain: no token ever repeats.
		r3, err := b.Init(ctx, "vm-release", "hostB")
		if err != nil || r3.Holder != "hostB" || r3.Generation != 3 {
			t.Fatalf("Init after Release = %v, %v; want hostB at 3", r3, err)
		}
	})

	t.Run("CorruptValues", func(t *testing.T) {
		ctx := ctxT(t)
		cases := map[string]string{
			"notjson":      "hello",
			"empty":        "",
			"noversion":    `{"holder":"hostA","generation":1}`,
			"version2":     `{"v":2,"holder":"hostA","generation":1}`,
			"badholder":    `{"v":1,"holder":"../etc","generation":1}`,
			"noholder":     `{"v":1,"generation":1}`,
			"generation0":  `{"v":1,"holder":"hostA","generation":0}`,
			"negativegen":  `{"v":1,"holder":"hostA","generation":-1}`,
			"releasedname": `{"v":1,"holder":"hostA","generation":3,"released":true}`,
			"trailing":     `{"v":1,"holder":"hostA","generation":1} {}`,
			"oversized":    `{"v":1,"holder":"hostA","generation":1,"pad":"` + strings.Repeat("x", 2000) + `"}`,
		}
		for name, value := range cases {
			vm := "vm-corrupt-" + name
			rawPut(t, srv, a.Key(vm), value)
			_, _, err := a.Get(ctx, vm)
			if !errors.Is(err, witness.ErrCorrupt) || !strings.Contains(err.Error(), a.Key(vm)) {
				t.Errorf("%s: Get = %v; want ErrCorrupt naming the key", name, err)
				continue
			}
			t.Logf("%s: %v", name, err)
			if err := a.Confirm(ctx, vm, "hostA", 1); !errors.Is(err, witness.ErrCorrupt) {
				t.Errorf("%s: Confirm = %v; want ErrCorrupt", name, err)
			}
			if _, err := a.Init(ctx, vm, "hostA"); !errors.Is(err, witness.ErrCorrupt) {
				t.Errorf("%s: Init = %v; want ErrCorrupt", name, err)
			}
			if _, won, err := a.Claim(ctx, vm, "hostA", witness.Record{}); won || !errors.Is(err, witness.ErrCorrupt) {
				t.Errorf("%s: Claim = %v, %v; want ErrCorrupt", name, won, err)
			}
			if err := a.Release(ctx, vm, "hostA", 1); !errors.Is(err, witness.ErrCorrupt) {
				t.Errorf("%s: Release = %v; want ErrCorrupt", name, err)
			}
		}
		// Unknown fields are a compatible extension: read.
		rawPut(t, srv, a.Key("vm-extra"), `{"v":1,"holder":"hostA","generation":4,"note":"x"}`)
		if rec, held, err := a.Get(ctx, "vm-extra"); err != nil || !held || rec.Holder != "hostA" || rec.Generation != 4 {
			t.Errorf("record with an unknown field = %v, %v, %v", rec, held, err)
		}
	})

	t.Run("BadArguments", func(t *testing.T) {
		ctx := ctxT(t)
		if _, _, err := a.Get(ctx, "../x"); err == nil {
			t.Error("Get accepted a bad VM name")
		}
		if _, err := a.Init(ctx, "vm-args", "bad host"); err == nil {
			t.Error("Init accepted a bad holder")
		}
		bad := []witness.Record{
			{Holder: "hostA", Generation: 1}, // no revision, not zero
			{Holder: "hostA", Revision: 5},   // generation 0
			{Holder: "hostA", Generation: 1, Revision: -1},
		}
		for _, prev := range bad {
			if _, _, err := a.Claim(ctx, "vm-args", "hostA", prev); err == nil {
				t.Errorf("Claim accepted prev %+v", prev)
			}
		}
	})

	t.Run("Latency", func(t *testing.T) {
		ctx := ctxT(t)
		const n = 300
		prev, err := a.Init(ctx, "vm-latency", "hostA")
		if err != nil {
			t.Fatal(err)
		}
		claims := make([]time.Duration, 0, n)
		for range n {
			start := time.Now()
			rec, won, err := a.Claim(ctx, "vm-latency", "hostA", prev)
			claims = append(claims, time.Since(start))
			if err != nil || !won {
				t.Fatal(won, err)
			}
			prev = rec
		}
		confirms := make([]time.Duration, 0, n)
		for range n {
			start := time.Now()
			if err := a.Confirm(ctx, "vm-latency", "hostA", prev.Generation); err != nil {
				t.Fatal(err)
			}
			confirms = append(confirms, time.Since(start))
		}
		t.Logf("Claim round trip over %d calls: %s", n, quantiles(claims))
		t.Logf("Confirm round trip over %d calls: %s", n, quantiles(confirms))
	})
}

func quantiles(d []time.Duration) string {
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[int(p*float64(len(s)-1))].Round(time.Microsecond) }
	return fmt.Sprintf("p50 %v, p90 %v, p99 %v, max %v", q(0.5), q(0.9), q(0.99), s[len(s)-1].Round(time.Microsecond))
}

// TestUnreachable stops the member: every call returns, within the op
// timeout and some slack, an error wrapping ErrUnreachable; after
// Restart, calls work again and the records are still there.
func TestUnreachable(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := srv.WitnessConfig()
	cfg.OpTimeout = 500 * time.Millisecond
	w := dial(t, cfg)
	ctx := ctxT(t)
	rec, err := w.Init(ctx, "vm1", "hostA")
	if err != nil {
		t.Fatal(err)
	}

	srv.Stop()
	calls := []struct {
		name string
		call func(context.Context) error
	}{
		{"Get", func(ctx context.Context) error { _, _, err := w.Get(ctx, "vm1"); return err }},
		{"Confirm", func(ctx context.Context) error { return w.Confirm(ctx, "vm1", "hostA", rec.Generation) }},
		{"Claim", func(ctx context.Context) error { _, _, err := w.Claim(ctx, "vm1", "hostB", rec); return err }},
		{"Init", func(ctx context.Context) error { _, err := w.Init(ctx, "vm2", "hostA"); return err }},
		{"Release", func(ctx context.Context) error { return w.Release(ctx, "vm1", "hostA", rec.Generation) }},
		{"Ping", func(ctx context.Context) error { return w.Ping(ctx) }},
	}
	for _, c := range calls {
		// Liveness: the call must return; a generous bound catches a hang
		// without turning the op timeout into a timed assertion.
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- c.call(context.Background()) }()
		select {
		case err := <-done:
			took := time.Since(start)
			if !errors.Is(err, witness.ErrUnreachable) || errors.Is(err, witness.ErrLost) {
				t.Errorf("%s with the member down = %v; want ErrUnreachable", c.name, err)
			}
			t.Logf("%s with the member down failed after %v (op timeout %v): %v", c.name, took.Round(time.Millisecond), cfg.OpTimeout, err)
		case <-time.After(cfg.OpTimeout + 10*time.Second):
			t.Fatalf("%s with the member down did not return", c.name)
		}
	}

	// The caller's cancellation is not unreachability.
	cctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, _, err := w.Get(cctx, "vm1"); !errors.Is(err, context.Canceled) || errors.Is(err, witness.ErrUnreachable) {
		t.Errorf("Get cancelled by the caller = %v; want context.Canceled", err)
	}
	// A caller's deadline shorter than the op timeout is one.
	dctx, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if _, _, err := w.Get(dctx, "vm1"); !errors.Is(err, witness.ErrUnreachable) {
		t.Errorf("Get past the caller's deadline = %v; want ErrUnreachable", err)
	}

	restart := time.Now()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	ready := time.Since(restart)
	for {
		err := w.Confirm(ctx, "vm1", "hostA", rec.Generation)
		if err == nil {
			break
		}
		if !errors.Is(err, witness.ErrUnreachable) {
			t.Fatalf("Confirm after restart: %v", err)
		}
		if ctx.Err() != nil {
			t.Fatal("the client never reconnected")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("after Restart: member ready in %v, client's first success %v after the restart began",
		ready.Round(time.Millisecond), time.Since(restart).Round(time.Millisecond))
	if _, won, err := w.Claim(ctx, "vm1", "hostB", rec); err != nil || !won {
		t.Fatalf("Claim after restart = %v, %v", won, err)
	}
}

// TestDialWhileDown: a witness that is down when the daemon starts only
// makes calls fail until it is back.
func TestDialWhileDown(t *testing.T) {
	srv := etcdtest.Start(t)
	srv.Stop()
	cfg := srv.WitnessConfig()
	cfg.OpTimeout = 300 * time.Millisecond
	w := dial(t, cfg)
	if err := w.Ping(context.Background()); !errors.Is(err, witness.ErrUnreachable) {
		t.Fatalf("Ping with the member down = %v", err)
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	for w.Ping(ctx) != nil {
		if ctx.Err() != nil {
			t.Fatal("never reached the member")
		}
	}
}

func TestTLS(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.TLS())
	ctx := ctxT(t)
	cfg := srv.WitnessConfig()
	if !strings.HasPrefix(cfg.Endpoints[0], "https://") {
		t.Fatalf("TLS member endpoint %s", cfg.Endpoints[0])
	}
	w := dial(t, cfg)
	rec, err := w.Init(ctx, "vm1", "hostA")
	if err != nil {
		t.Fatalf("Init over TLS: %v", err)
	}
	// A daemon's own client certificate from the member's CA works too.
	own, err := srv.IssueClient(filepath.Join(t.TempDir(), "hostB"), "hostB")
	if err != nil {
		t.Fatal(err)
	}
	cfgB := cfg
	cfgB.TLS = own
	if _, won, err := dial(t, cfgB).Claim(ctx, "vm1", "hostB", rec); err != nil || !won {
		t.Fatalf("Claim with hostB's certificate = %v, %v", won, err)
	}

	// A bundle from another CA: the member's certificate does not verify
	// (and the member refuses the client's).
	other, err := pki.NewCA("other-ca")
	if err != nil {
		t.Fatal(err)
	}
	files, err := other.IssueFiles(t.TempDir(), "hostC", pki.HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		name string
		tls  witness.TLS
	}{
		{"wrong CA", witness.TLS{Cert: files.Cert, Key: files.Key, CA: files.CA}},
		{"right CA, no client certificate", witness.TLS{CA: srv.ClientTLS().CA}},
		{"right CA, client certificate from another CA", witness.TLS{Cert: files.Cert, Key: files.Key, CA: srv.ClientTLS().CA}},
	}
	for _, c := range bad {
		cfgX := cfg
		cfgX.TLS = c.tls
		cfgX.OpTimeout = 300 * time.Millisecond
		start := time.Now()
		_, _, err := dial(t, cfgX).Get(ctx, "vm1")
		if !errors.Is(err, witness.ErrUnreachable) {
			t.Errorf("%s: Get = %v; want ErrUnreachable", c.name, err)
		}
		t.Logf("%s: failed after %v: %v", c.name, time.Since(start).Round(time.Millisecond), err)
	}

	// The member's certificate names 127.0.0.1, not localhost.
	byName := cfg
	byName.Endpoints = []string{strings.Replace(cfg.Endpoints[0], "127.0.0.1", "localhost", 1)}
	byName.OpTimeout = 300 * time.Millisecond
	if _, _, err := dial(t, byName).Get(ctx, "vm1"); !errors.Is(err, witness.ErrUnreachable) {
		t.Errorf("endpoint host not in the member's certificate: Get = %v; want ErrUnreachable", err)
	} else {
		t.Logf("endpoint host not in the member's certificate: %v", err)
	}

	// Plaintext against the TLS member fails the same way.
	plain := witness.Config{Endpoints: []string{strings.TrimPrefix(cfg.Endpoints[0], "https://")}, OpTimeout: 300 * time.Millisecond}
	if _, _, err := dial(t, plain).Get(ctx, "vm1"); !errors.Is(err, witness.ErrUnreachable) {
		t.Errorf("plaintext to a TLS member: Get = %v; want ErrUnreachable", err)
	}
}
