// Package etcdmember runs one throw-away etcd member inside the process
// (etcd's embed package): a witness for tests, the demo and the partition
// trials. It is not a production witness: a real deployment runs a
// three-member etcd cluster of its own (see ../README.md).
//
// Tests use it through package etcdtest, which stops the member in
// t.Cleanup; the demo uses Start and Close directly (this package does not
// import testing).
package etcdmember

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/remusd/remusd/failover/witness"
	"github.com/remusd/remusd/internal/pki"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Options configure a member.
type Options struct {
	// Host is the IP address the member listens on (default 127.0.0.1).
	Host string
	// ClientPort is the client port (0: a free one; the peer port is
	// always chosen free).
	ClientPort int
	// Dir is the data directory; default a temporary directory that
	// Close removes. A given Dir is kept.
	Dir string
	// TLS serves clients over TLS with a throw-away CA (created under the
	// data directory) and requires a client certificate from it: see
	// ClientTLS and IssueClient.
	TLS bool
	// Logger receives etcd's logs (default: none; etcd logs errors such
	// as "server closed" when it stops, which are not failures).
	Logger *zap.Logger
	// StartTimeout bounds the wait for the member to be ready (default
	// 30 s).
	StartTimeout time.Duration
}

// Server is a running (or stopped) member.
type Server struct {
	opts      Options
	dir       string // data and certificates
	removeDir bool
	clientURL url.URL
	peerURL   url.URL
	ca        *pki.CA
	clientTLS witness.TLS
	serverTLS witness.TLS

	mu sync.Mutex
	e  *embed.Etcd // nil when stopped
}

// serverCertName is the CommonName of the member's certificate.
const serverCertName = "etcd-witness"

// Start starts a member and waits until it serves clients.
func Start(opts Options) (*Server, error) {
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	ip := net.ParseIP(opts.Host)
	if ip == nil {
		return nil, fmt.Errorf("etcdmember: host %q is not an IP address", opts.Host)
	}
	if opts.ClientPort < 0 || opts.ClientPort > 65535 {
		return nil, fmt.Errorf("etcdmember: client port %d out of range", opts.ClientPort)
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 30 * time.Second
	}
	s := &Server{opts: opts, dir: opts.Dir}
	if s.dir == "" {
		d, err := os.MkdirTemp("", "remusd-etcd-")
		if err != nil {
			return nil, fmt.Errorf("etcdmember: %w", err)
		}
		s.dir, s.removeDir = d, true
	}
	fail := func(err error) (*Server, error) {
		if s.removeDir {
			os.RemoveAll(s.dir)
		}
		return nil, err
	}
	scheme := "http"
	if opts.TLS {
		scheme = "https"
		ca, err := pki.NewCA("remusd-etcd-test-ca")
		if err != nil {
			return fail(fmt.Errorf("etcdmember: %w", err))
		}
		s.ca = ca
		files, err := ca.IssueFiles(filepath.Join(s.dir, "tls", "server"), serverCertName, pki.HostOptions{IPs: []net.IP{ip}, Force: true})
		if err != nil {
			return fail(fmt.Errorf("etcdmember: server certificate: %w", err))
		}
		s.serverTLS = witness.TLS{Cert: files.Cert, Key: files.Key, CA: files.CA}
		if s.clientTLS, err = s.IssueClient(filepath.Join(s.dir, "tls", "client"), "remusd-client"); err != nil {
			return fail(err)
		}
	}
	// Free ports are found by binding port 0 and closing; another process
	// may take one before etcd binds it, so a start that fails to bind
	// is retried with new ports.
	var err error
	for range 5 {
		var cp, pp int
		cp, pp, err = freePorts(opts.Host)
		if err != nil {
			return fail(err)
		}
		if opts.ClientPort != 0 {
			cp = opts.ClientPort
		}
		hp := func(p int) string { return net.JoinHostPort(opts.Host, strconv.Itoa(p)) }
		s.clientURL = url.URL{Scheme: scheme, Host: hp(cp)}
		s.peerURL = url.URL{Scheme: "http", Host: hp(pp)}
		if err = s.start(); err == nil {
			return s, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
	}
	return fail(err)
}

func freePorts(host string) (int, int, error) {
	var ports [2]int
	var ls [2]net.Listener
	for i := range ls {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			for _, l := range ls[:i] {
				l.Close()
			}
			return 0, 0, fmt.Errorf("etcdmember: find a free port: %w", err)
		}
		ls[i], ports[i] = l, l.Addr().(*net.TCPAddr).Port
	}
	for _, l := range ls {
		l.Close()
	}
	return ports[0], ports[1], nil
}

// start starts etcd on s's data directory and URLs; s.mu held or s not
// yet shared.
func (s *Server) start() error {
	cfg := embed.NewConfig()
	cfg.Name = "witness"
	cfg.Dir = filepath.Join(s.dir, "data")
	cfg.ListenClientUrls = []url.URL{s.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{s.clientURL}
	cfg.ListenPeerUrls = []url.URL{s.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{s.peerURL}
	cfg.InitialCluster = cfg.Name + "=" + s.peerURL.String()
	cfg.InitialClusterToken = "remusd-witness"
	cfg.EnableGRPCGateway = false
	cfg.ListenMetricsUrls = nil
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(s.opts.Logger)
	if s.opts.TLS {
		cfg.ClientTLSInfo.CertFile = s.serverTLS.Cert
		cfg.ClientTLSInfo.KeyFile = s.serverTLS.Key
		cfg.ClientTLSInfo.TrustedCAFile = s.serverTLS.CA
		cfg.ClientTLSInfo.ClientCertAuth = true
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcdmember: start etcd on %s: %w", s.clientURL.String(), err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("etcdmember: etcd on %s failed: %w", s.clientURL.String(), err)
	case <-time.After(s.opts.StartTimeout):
		e.Server.Stop()
		e.Close()
		return fmt.Errorf("etcdmember: etcd on %s not ready after %v", s.clientURL.String(), s.opts.StartTimeout)
	}
	s.e = e
	return nil
}

// ClientURLs returns the member's client URLs (one), the endpoints of a
// witness.Config. They stay the same across Stop and Restart.
func (s *Server) ClientURLs() []string { return []string{s.clientURL.String()} }

// ClientTLS returns the files of a client certificate the member accepts
// (zero without Options.TLS).
func (s *Server) ClientTLS() witness.TLS { return s.clientTLS }

// WitnessConfig returns a witness.Config that reaches the member: its
// endpoints and, with TLS, ClientTLS; the other fields are left to their
// defaults.
func (s *Server) WitnessConfig() witness.Config {
	return witness.Config{Endpoints: s.ClientURLs(), TLS: s.clientTLS}
}

// IssueClient writes a client certificate for name (a host name) signed
// by the member's CA into dir, for a daemon of its own; only with
// Options.TLS.
func (s *Server) IssueClient(dir, name string) (witness.TLS, error) {
	if s.ca == nil {
		return witness.TLS{}, errors.New("etcdmember: the member was started without TLS")
	}
	files, err := s.ca.IssueFiles(dir, name, pki.HostOptions{Force: true})
	if err != nil {
		return witness.TLS{}, fmt.Errorf("etcdmember: client certificate for %s: %w", name, err)
	}
	return witness.TLS{Cert: files.Cert, Key: files.Key, CA: files.CA}, nil
}

// Running reports whether the member is started.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.e != nil
}

// Stop stops the member, keeping its data: clients get no answer (their
// connections are refused) until Restart. Stopping a stopped member does
// nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.e != nil {
		s.e.Close()
		s.e = nil
	}
}

// Restart starts a stopped member again on the same data and URLs (so
// clients reconnect on their own). It fails if the member is running, or
// if another process took one of its ports meanwhile.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.e != nil {
		return errors.New("etcdmember: restart of a running member")
	}
	return s.start()
}

// Close stops the member and removes its temporary data directory.
func (s *Server) Close() error {
	s.Stop()
	if s.removeDir {
		return os.RemoveAll(s.dir)
	}
	return nil
}
