package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/remusd/remusd/disk"
)

// testClient is a minimal NBD client that speaks the protocol byte by byte,
// so tests can also send what a well-behaved client never would.
type testClient struct {
	t      *testing.T
	nc     net.Conn
	r      *bufio.Reader
	size   uint64
	tflags uint16
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

// startServer serves backend on a unix socket until the test ends.
func startServer(t *testing.T, cfg Config, backend disk.Backend, obs disk.Observer) (sock string, srv *Server) {
	t.Helper()
	srv, err := New(cfg, backend, obs, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return sock, srv
}

// dial connects and reads the greeting, then sends client flags.
func dial(t *testing.T, sock string, cflags uint32) *testClient {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	c := &testClient{t: t, nc: nc, r: bufio.NewReader(nc)}
	var g [18]byte
	c.read(g[:])
	if binary.BigEndian.Uint64(g[0:]) != magicNBD || binary.BigEndian.Uint64(g[8:]) != magicIHaveOpt {
		t.Fatalf("greeting %x", g)
	}
	if hf := binary.BigEndian.Uint16(g[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", hf)
	}
	c.write(binary.BigEndian.AppendUint32(nil, cflags))
	return c
}

func (c *testClient) read(b []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *testClient) readOptReply() optReply {
	c.t.Helper()
	var h [20]byte
	c.read(h[:])
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	n := binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		c.t.Fatalf("option reply of %d bytes", n)
	}
	r.data = make([]byte, n)
	c.read(r.data)
	return r
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// goReplies sends NBD_OPT_GO/INFO and collects replies up to the final one.
func (c *testClient) goReplies(opt uint32, data []byte) (infos []optReply, final optReply) {
	c.t.Helper()
	c.sendOpt(opt, data)
	for {
		r := c.readOptReply()
		if r.opt != opt {
			c.t.Fatalf("reply to option %d, want %d", r.opt, opt)
		}
		if r.typ != repInfo {
			return infos, r
		}
		infos = append(infos, r)
	}
}

// connect dials and enters transmission with NBD_OPT_GO.
func connect(t *testing.T, sock string) *testClient {
	t.Helper()
	c := dial(t, sock, clientFixedNewstyle|clientNoZeroes)
	infos, final := c.goReplies(optGo, goData("", infoBlockSize))
	if final.typ != repAck {
		t.Fatalf("NBD_OPT_GO: reply %#x %q", final.typ, final.data)
	}
	for _, i := range infos {
		if binary.BigEndian.Uint16(i.data) == infoExport {
			c.size = binary.BigEndian.Uint64(i.data[2:])
			c.tflags = binary.BigEndian.Uint16(i.data[10:])
		}
	}
	return c
}

func (c *testClient) sendReq(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	c.write(append(b, payload...))
}

// readReply reads a simple reply header.
func (c *testClient) readReply() (errno uint32, cookie uint64) {
	c.t.Helper()
	var h [16]byte
	c.read(h[:])
	if m := binary.BigEndian.Uint32(h[0:]); m != magicSimpleRep {
		c.t.Fatalf("reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
}

// do sends one request and waits for its reply (and read data).
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	c.sendReq(typ, flags, 0xc0ffee, off, length, payload)
	errno, cookie := c.readReply()
	if cookie != 0xc0ffee {
		c.t.Fatalf("cookie %#x", cookie)
	}
	var data []byte
	if typ == cmdRead && errno == 0 {
		data = make([]byte, length)
		c.read(data)
	}
	return errno, data
}

// expectClosed checks that the server closed the connection.
func (c *testClient) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	_, err := c.r.Read(b[:])
	if err == nil {
		c.t.Fatalf("connection still open")
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("connection still open (read timed out)")
	}
}

// recorder is an Observer that keeps copies of every change.
type recorder struct {
	mu      sync.Mutex
	changes []disk.Change
}

func (r *recorder) Observe(_ context.Context, c disk.Change) error {
	c.Data = append([]byte(nil), c.Data...)
	r.mu.Lock()
	r.changes = append(r.changes, c)
	r.mu.Unlock()
	return nil
}

func (r *recorder) list() []disk.Change {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]disk.Change(nil), r.changes...)
}
