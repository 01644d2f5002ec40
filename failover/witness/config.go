package witness

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Defaults of Config's optional fields.
const (
	DefaultPrefix      = "/remusd"
	DefaultDialTimeout = 2 * time.Second
	DefaultOpTimeout   = 2 * time.Second
)

// Limits of Config's timeouts: shorter is not a network round trip,
// longer is not a witness a failover can wait for.
const (
	minTimeout = 10 * time.Millisecond
	maxTimeout = time.Minute
)

// Config says how to reach the witness: an etcd cluster.
type Config struct {
	// Endpoints are the client URLs of the etcd members, all of them in
	// production (three members for a pair of hosts: any two answer).
	// Each is "host:port", "http://host:port" or "https://host:port";
	// all use the same form. With TLS set, "http://" is refused.
	Endpoints []string

	// TLS is the client side of etcd's own TLS (its --cert-file /
	// --trusted-ca-file / --client-cert-auth); zero means plaintext.
	TLS TLS

	// Prefix is the key prefix (DefaultPrefix if empty): the record of VM
	// v lives at Prefix + "/vms/" + v. Absolute, no trailing slash.
	Prefix string

	// DialTimeout bounds one connection attempt to one member (TCP and
	// TLS handshake); DefaultDialTimeout if zero. Dial itself never waits
	// for the cluster.
	DialTimeout time.Duration

	// OpTimeout is the deadline of every call of Witness (a shorter
	// deadline of the caller's context wins); DefaultOpTimeout if zero.
	// A call that gets no answer within it fails with ErrUnreachable.
	OpTimeout time.Duration
}

// TLS names the PEM files of the etcd client's TLS. CA alone verifies the
// members (server-only TLS); Cert and Key add a client certificate (etcd
// with --client-cert-auth). A member's certificate must name the host of
// its endpoint (a DNS name, or an IP address SAN for an endpoint given by
// address): gRPC verifies it against that, so there is no server-name
// override. A host's replication bundle (transport.TLSFiles) serves when
// the same CA signs the etcd members' certificates.
type TLS struct {
	Cert string
	Key  string
	CA   string
}

// Enabled reports whether TLS is configured.
func (t TLS) Enabled() bool { return t.Cert != "" || t.Key != "" || t.CA != "" }

// withDefaults returns c with its zero optional fields set.
func (c Config) withDefaults() Config {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.OpTimeout == 0 {
		c.OpTimeout = DefaultOpTimeout
	}
	return c
}

// prefixRE: "/" followed by segments of safe characters separated by
// single slashes; no trailing slash.
var prefixRE = regexp.MustCompile(`^(/[A-Za-z0-9._-]+)+$`)

// Validate checks c (its zero optional fields standing for their
// defaults) and names every bad field in the error. It checks that the
// TLS files exist, not that they hold valid PEM (Dial does).
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if len(c.Endpoints) == 0 {
		bad("witness.endpoints: at least one etcd endpoint is required")
	}
	scheme := ""
	seen := map[string]bool{}
	for i, ep := range c.Endpoints {
		s, err := checkEndpoint(ep)
		if err != nil {
			bad("witness.endpoints[%d] %q: %v", i, ep, err)
			continue
		}
		if i > 0 && s != scheme {
			bad("witness.endpoints[%d] %q: mixes %s with %s endpoints; use one form for all", i, ep, schemeName(s), schemeName(scheme))
		}
		if i == 0 {
			scheme = s
		}
		if seen[ep] {
			bad("witness.endpoints[%d] %q: listed twice", i, ep)
		}
		seen[ep] = true
	}
	if c.TLS.Enabled() && scheme == "http" {
		bad("witness.endpoints: http:// endpoints with witness.tls configured; use https:// or host:port")
	}

	if c.TLS.Enabled() {
		if (c.TLS.Cert == "") != (c.TLS.Key == "") {
			bad("witness.tls: cert and key must be set together")
		}
		for _, f := range []struct{ field, path string }{{"cert", c.TLS.Cert}, {"key", c.TLS.Key}, {"ca", c.TLS.CA}} {
			if f.path == "" {
				continue
			}
			if _, err := os.Stat(f.path); err != nil {
				bad("witness.tls.%s: %v", f.field, err)
			}
		}
	}

	if !prefixRE.MatchString(c.Prefix) || len(c.Prefix) > 128 {
		bad("witness.prefix %q: must be an absolute key path like %q: segments of letters, digits, '.', '_', '-' after single slashes, no trailing slash, at most 128 bytes", c.Prefix, DefaultPrefix)
	} else {
		for _, seg := range strings.Split(c.Prefix[1:], "/") {
			if seg == "." || seg == ".." {
				bad("witness.prefix %q: holds a %q segment", c.Prefix, seg)
				break
			}
		}
	}

	for _, d := range []struct {
		field string
		v     time.Duration
	}{{"dial_timeout", c.DialTimeout}, {"op_timeout", c.OpTimeout}} {
		if d.v < minTimeout || d.v > maxTimeout {
			bad("witness.%s %v: must be between %v and %v", d.field, d.v, minTimeout, maxTimeout)
		}
	}
	return errors.Join(errs...)
}

// checkEndpoint checks one endpoint and returns its form: "http",
// "https" or "" (host:port).
func checkEndpoint(ep string) (string, error) {
	hostport := ep
	scheme := ""
	if strings.Contains(ep, "://") {
		u, err := url.Parse(ep)
		if err != nil {
			return "", err
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return "", fmt.Errorf("scheme %q: must be http or https", u.Scheme)
		}
		if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return "", errors.New("must be scheme://host:port, nothing more")
		}
		scheme, hostport = u.Scheme, u.Host
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", fmt.Errorf("not host:port: %v", err)
	}
	if host == "" {
		return "", errors.New("empty host")
	}
	if strings.ContainsAny(host, " \t/\\") {
		return "", fmt.Errorf("host %q is not valid", host)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("port %q: must be 1-65535", port)
	}
	return scheme, nil
}

func schemeName(s string) string {
	if s == "" {
		return "host:port"
	}
	return s + "://"
}

// tlsConfig loads the TLS files; nil if TLS is not configured.
func (t TLS) tlsConfig() (*tls.Config, error) {
	if !t.Enabled() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if t.Cert != "" {
		cert, err := tls.LoadX509KeyPair(t.Cert, t.Key)
		if err != nil {
			return nil, fmt.Errorf("witness.tls: load certificate %s / key %s: %w", t.Cert, t.Key, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if t.CA != "" {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return nil, fmt.Errorf("witness.tls.ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("witness.tls.ca: %s holds no PEM certificate", t.CA)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}
