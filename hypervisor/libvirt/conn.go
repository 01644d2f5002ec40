// Package libvirt drives a libvirt-managed QEMU VM as a remusd qemu guest:
// it connects to libvirtd over its unix socket (go-libvirt), finds the
// domain, checks that its RAM is a shared file mapping remusd can map,
// finds that file, and passes QMP through libvirt's monitor passthrough
// (virDomainQemuMonitorCommand) so hypervisor/qemu's Guest runs the
// checkpoint epoch (stop, harvest, save device state, cont) unchanged.
//
// Every libvirt call has a deadline (the context's, else DefaultTimeout).
// go-libvirt calls cannot be cancelled, so a call that misses its deadline
// closes the connection: a libvirtd that hangs is reported, not waited on.
package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
)

// DefaultSocket is libvirtd's read-write socket in system mode.
const DefaultSocket = "/run/libvirt/libvirt-sock"

// DefaultURI is the driver URI opened on the socket.
const DefaultURI = "qemu:///system"

// DefaultTimeout bounds a libvirt call when the context has no deadline.
const DefaultTimeout = 5 * time.Second

// ErrTimeout reports a libvirt call that got no answer in time (the
// connection is closed then).
var ErrTimeout = errors.New("libvirt call timed out")

// ErrDisconnected reports a call on a connection that is closed or lost.
var ErrDisconnected = errors.New("libvirt connection closed")

// Config says where libvirtd is.
type Config struct {
	// Socket is libvirtd's unix socket (default DefaultSocket).
	Socket string `json:"socket"`
	// URI is the driver URI (default qemu:///system). A URI with a
	// ?socket=PATH parameter (qemu+unix:///system?socket=PATH) also sets
	// Socket.
	URI string `json:"uri"`
}

// resolve fills in defaults and takes the socket from the URI (QEMU
// driver).
func (c Config) resolve() (socket, uri string, err error) {
	return c.resolveFor("qemu", DefaultURI, "qemu:///system (or qemu+unix:///system?socket=PATH)", "system", "session")
}

// resolveFor is resolve for the driver whose URI scheme is scheme (bare
// or +unix: the connection is always to the local unix socket, so a
// remote transport, +ssh or +tls, is refused rather than silently
// replaced), the paths it accepts, and def as the default URI.
func (c Config) resolveFor(scheme, def, want string, paths ...string) (socket, uri string, err error) {
	socket, uri = c.Socket, c.URI
	if uri != "" {
		base, query, _ := strings.Cut(uri, "?")
		for _, kv := range strings.Split(query, "&") {
			if k, v, ok := strings.Cut(kv, "="); ok && k == "socket" {
				if socket != "" && socket != v {
					return "", "", fmt.Errorf("libvirt: uri %q names socket %s, config socket %s", uri, v, socket)
				}
				socket = v
			}
		}
		s, path, ok := strings.Cut(base, ":///")
		if !ok || (s != scheme && s != scheme+"+unix") || !slices.Contains(paths, path) {
			return "", "", fmt.Errorf("libvirt: uri %q: want %s (remusd talks to the local libvirtd over its unix socket)", uri, want)
		}
		// Over the socket the driver URI carries no transport.
		uri = scheme + ":///" + path
	}
	if socket == "" {
		socket = DefaultSocket
	}
	if uri == "" {
		uri = def
	}
	return socket, uri, nil
}

// Conn is a connection to libvirtd. Safe for concurrent use.
type Conn struct {
	l      *golibvirt.Libvirt
	socket string
	uri    string // the driver opened: qemu:///system, xen:///system

	mu     sync.Mutex
	conn   net.Conn // the socket, closed on a timeout
	broken error    // set once the connection is unusable
	closed bool
}

// unixDialer dials libvirtd's socket with a deadline and keeps the conn so
// a timed-out call can close it.
type unixDialer struct {
	c       *Conn
	timeout time.Duration
}

func (d unixDialer) Dial() (net.Conn, error) {
	conn, err := net.DialTimeout("unix", d.c.socket, d.timeout)
	if err != nil {
		return nil, err
	}
	d.c.mu.Lock()
	d.c.conn = conn
	d.c.mu.Unlock()
	return conn, nil
}

// Dial connects to libvirtd and opens the QEMU driver.
func Dial(ctx context.Context, cfg Config) (*Conn, error) {
	socket, uri, err := cfg.resolve()
	if err != nil {
		return nil, err
	}
	return dial(ctx, socket, uri)
}

// dial connects to libvirtd's socket and opens the driver uri.
func dial(ctx context.Context, socket, uri string) (*Conn, error) {
	c := &Conn{socket: socket, uri: uri}
	timeout := DefaultTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("libvirt: connect %s: %w", socket, context.DeadlineExceeded)
	}
	c.l = golibvirt.NewWithDialer(unixDialer{c: c, timeout: timeout})
	if err := c.call(ctx, "connect "+socket+" ("+uri+")", func() error {
		return c.l.ConnectToURI(golibvirt.ConnectURI(uri))
	}); err != nil {
		return nil, err
	}
	return c, nil
}

// Socket returns the socket path this connection uses.
func (c *Conn) Socket() string { return c.socket }

// URI returns the driver URI this connection opened (qemu:///system,
// xen:///system).
func (c *Conn) URI() string { return c.uri }

// Disconnected is closed when the connection is lost or closed.
func (c *Conn) Disconnected() <-chan struct{} { return c.l.Disconnected() }

// Close ends the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	if c.broken == nil {
		c.broken = ErrDisconnected
	}
	conn := c.conn
	c.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- c.l.Disconnect() }()
	select {
	case err := <-done:
		return err
	case <-time.After(DefaultTimeout):
		if conn != nil {
			conn.Close()
		}
		return fmt.Errorf("libvirt: disconnect from %s: %w", c.socket, ErrTimeout)
	}
}

// call runs fn (one go-libvirt call, named what in errors) with ctx's
// deadline or DefaultTimeout. On a timeout the connection is closed (the
// call cannot be abandoned otherwise) and every later call fails.
func (c *Conn) call(ctx context.Context, what string, fn func() error) error {
	c.mu.Lock()
	broken := c.broken
	c.mu.Unlock()
	if broken != nil {
		return fmt.Errorf("libvirt: %s: %w", what, broken)
	}
	timeout := DefaultTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	if timeout <= 0 {
		return fmt.Errorf("libvirt: %s: %w", what, context.DeadlineExceeded)
	}
	done := make(chan error, 1)
	go func() { done <- fn() }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("libvirt: %s: %w", what, err)
		}
		return nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.Canceled) {
			// A cancelled caller (unprotect, shutdown) must not cost the
			// connection: a go-libvirt call cannot be abandoned without
			// closing it. Let the call finish, within its time budget.
			select {
			case <-done:
				return fmt.Errorf("libvirt: %s: %w", what, ctx.Err())
			case <-t.C:
			}
		}
		c.fail(fmt.Errorf("%w: %s abandoned: %w", ErrDisconnected, what, ctx.Err()))
		return fmt.Errorf("libvirt: %s: %w (connection to %s closed)", what, ctx.Err(), c.socket)
	case <-t.C:
		c.fail(fmt.Errorf("%w after %s timed out", ErrDisconnected, what))
		return fmt.Errorf("libvirt: %s: %w after %v (libvirtd hung? connection to %s closed)", what, ErrTimeout, timeout.Round(time.Millisecond), c.socket)
	}
}

// fail marks the connection unusable and closes the socket.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken == nil {
		c.broken = err
	}
	if c.conn != nil {
		c.conn.Close()
	}
}

// LibvirtVersion returns libvirtd's version ("9.0.0").
func (c *Conn) LibvirtVersion(ctx context.Context) (string, error) {
	var v uint64
	err := c.call(ctx, "ConnectGetLibVersion", func() (err error) {
		v, err = c.l.ConnectGetLibVersion()
		return err
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d.%d.%d", v/1000000, v/1000%1000, v%1000), nil
}
