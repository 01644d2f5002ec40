// Package etcdtest starts a real single-member etcd for tests (see
// package etcdmember), stopped and removed in t.Cleanup.
//
//	srv := etcdtest.Start(t)                 // plaintext on 127.0.0.1
//	srv := etcdtest.Start(t, etcdtest.TLS()) // TLS with client certificates
//	w, err := witness.Dial(ctx, srv.WitnessConfig(), log)
//	srv.Stop(); ...; srv.Restart()           // the witness goes down and comes back
package etcdtest

import (
	"testing"
	"time"

	"github.com/remusd/remusd/failover/witness/etcdmember"
	"go.uber.org/zap"
)

// Server is a running member; see etcdmember.Server for its methods
// (ClientURLs, WitnessConfig, ClientTLS, IssueClient, Stop, Restart).
type Server = etcdmember.Server

// Option changes the member's etcdmember.Options.
type Option func(*etcdmember.Options)

// TLS serves clients over TLS with a throw-away CA and requires client
// certificates (Server.ClientTLS, Server.IssueClient).
func TLS() Option { return func(o *etcdmember.Options) { o.TLS = true } }

// Host makes the member listen on ip instead of 127.0.0.1.
func Host(ip string) Option { return func(o *etcdmember.Options) { o.Host = ip } }

// Logger sends etcd's logs to log (default: none).
func Logger(log *zap.Logger) Option { return func(o *etcdmember.Options) { o.Logger = log } }

// Start starts a member in a temporary directory, fails the test if it
// cannot, and closes it in t.Cleanup. It logs how long the start took.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	var o etcdmember.Options
	for _, opt := range opts {
		opt(&o)
	}
	o.Dir = t.TempDir()
	start := time.Now()
	srv, err := etcdmember.Start(o)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	t.Logf("etcdtest: member at %v ready in %v", srv.ClientURLs(), time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() { srv.Close() })
	return srv
}
