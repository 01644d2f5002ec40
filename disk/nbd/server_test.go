package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
)

const testSize = 1 << 20

func TestConfigValidate(t *testing.T) {
	bad := []Config{
		{MinBlockSize: 3},
		{MinBlockSize: 128 << 10},
		{PreferredBlockSize: 256},
		{MinBlockSize: 8192, PreferredBlockSize: 4096},
		{MaxPayload: 64 << 20},
		{MaxPayload: 1024},
		{MaxInFlightBytes: 1 << 20},
		{MaxConns: -1},
		{Name: "a\x00b"},
	}
	for _, c := range bad {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil", c)
		}
	}
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
}

func TestGoReportsExportAndBlockSize(t *testing.T) {
	sock, _ := startServer(t, Config{Name: "vda", Description: "guest disk"}, disk.NewMemory(testSize), nil)
	c := dial(t, sock, clientFixedNewstyle)
	infos, final := c.goReplies(optInfo, goData("vda", infoName, infoDescription, infoBlockSize, 999))
	if final.typ != repAck {
		t.Fatalf("NBD_OPT_INFO: %#x", final.typ)
	}
	got := map[uint16][]byte{}
	for _, i := range infos {
		got[binary.BigEndian.Uint16(i.data)] = i.data[2:]
	}
	exp := got[infoExport]
	if len(exp) != 10 || binary.BigEndian.Uint64(exp) != testSize {
		t.Fatalf("NBD_INFO_EXPORT %x", exp)
	}
	wantFlags := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagWriteZeroes | tflagCanMultiConn)
	if f := binary.BigEndian.Uint16(exp[8:]); f != wantFlags {
		t.Errorf("transmission flags %#x, want %#x", f, wantFlags)
	}
	bs := got[infoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs[0:]) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
		t.Errorf("NBD_INFO_BLOCK_SIZE %x", bs)
	}
	if string(got[infoName]) != "vda" || string(got[infoDescription]) != "guest disk" {
		t.Errorf("name %q description %q", got[infoName], got[infoDescription])
	}
	// After INFO the client may still GO (by the default name).
	_, final = c.goReplies(optGo, goData(""))
	if final.typ != repAck {
		t.Fatalf("NBD_OPT_GO: %#x", final.typ)
	}
	if errno, _ := c.do(cmdRead, 0, 0, 512, nil); errno != 0 {
		t.Fatalf("read: errno %d", errno)
	}
}

func TestOptionErrors(t *testing.T) {
	sock, _ := startServer(t, Config{Name: "vda"}, disk.NewMemory(testSize), nil)
	c := dial(t, sock, clientFixedNewstyle|clientNoZeroes)
	cases := []struct {
		name string
		opt  uint32
		data []byte
		want uint32
	}{
		{"unknown option with data", 0x4242, bytes.Repeat([]byte{7}, 1000), repErrUnsup},
		{"STARTTLS", optStartTLS, nil, repErrUnsup},
		{"structured replies", optStructuredReply, nil, repErrUnsup},
		{"metadata context", 10, goData("vda"), repErrUnsup},
		{"LIST with data", optList, []byte{1}, repErrInvalid},
		{"GO unknown export", optGo, goData("vdb"), repErrUnknown},
		{"GO too short", optGo, []byte{0, 0, 0}, repErrInvalid},
		{"GO name past end", optGo, append(binary.BigEndian.AppendUint32(nil, 100), 0, 0), repErrInvalid},
		{"GO info count past end", optGo, append(goData("vda"), 0, 1)[:4+3], repErrInvalid},
		{"GO trailing bytes", optGo, append(goData("vda"), 0), repErrInvalid},
		{"GO name with NUL", optGo, goData("v\x00a"), repErrInvalid},
		{"INFO too big", optInfo, make([]byte, MaxOptionData+1), repErrTooBig},
	}
	for _, tc := range cases {
		c.sendOpt(tc.opt, tc.data)
		r := c.readOptReply()
		if r.opt != tc.opt || r.typ != tc.want {
			t.Errorf("%s: reply opt %d type %#x, want %#x", tc.name, r.opt, r.typ, tc.want)
		}
	}
	// "GO info count past end" above: count says 1, data holds 0 bytes of it.
	// The connection is still in the handshake and usable.
	c.sendOpt(optList, nil)
	if r := c.readOptReply(); r.typ != repServer || binary.BigEndian.Uint32(r.data) != 3 || string(r.data[4:]) != "vda" {
		t.Fatalf("LIST: %#x %q", r.typ, r.data)
	}
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("LIST end: %#x", r.typ)
	}
	c.sendOpt(optAbort, nil)
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("ABORT: %#x", r.typ)
	}
	c.expectClosed()
}

func TestExportNameOption(t *testing.T) {
	sock, _ := startServer(t, Config{Name: "vda"}, disk.NewMemory(testSize), nil)
	for _, noZeroes := range []bool{false, true} {
		cf := uint32(clientFixedNewstyle)
		if noZeroes {
			cf |= clientNoZeroes
		}
		c := dial(t, sock, cf)
		c.sendOpt(optExportName, []byte("vda"))
		b := make([]byte, 10)
		c.read(b)
		if binary.BigEndian.Uint64(b) != testSize {
			t.Fatalf("size %x", b)
		}
		if !noZeroes {
			z := make([]byte, 124)
			c.read(z)
			if !bytes.Equal(z, make([]byte, 124)) {
				t.Fatalf("padding not zero")
			}
		}
		if errno, _ := c.do(cmdWrite, 0, 0, 4, []byte("abcd")); errno != 0 {
			t.Fatalf("write: %d", errno)
		}
	}
	// An unknown name cannot be refused with an error: hard disconnect.
	c := dial(t, sock, clientFixedNewstyle)
	c.sendOpt(optExportName, []byte("nope"))
	c.expectClosed()
}

func TestHandshakeViolationsDisconnect(t *testing.T) {
	sock, _ := startServer(t, Config{}, disk.NewMemory(testSize), nil)
	c := dial(t, sock, 1<<5) // unknown client flag
	c.expectClosed()

	c = dial(t, sock, clientFixedNewstyle)
	c.write(make([]byte, 16)) // bad option magic
	c.expectClosed()
}

func TestHandshakeTimeout(t *testing.T) {
	sock, _ := startServer(t, Config{HandshakeTimeout: 200 * time.Millisecond}, disk.NewMemory(testSize), nil)
	c := dial(t, sock, clientFixedNewstyle)
	c.expectClosed() // said nothing more
}

func TestCommands(t *testing.T) {
	mem := disk.NewMemory(testSize)
	rec := &recorder{}
	sock, _ := startServer(t, Config{}, mem, rec)
	c := connect(t, sock)
	if c.size != testSize {
		t.Fatalf("size %d", c.size)
	}
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	if errno, _ := c.do(cmdWrite, 0, 4096, uint32(len(data)), data); errno != 0 {
		t.Fatalf("write: %d", errno)
	}
	errno, got := c.do(cmdRead, 0, 4096, uint32(len(data)), nil)
	if errno != 0 || !bytes.Equal(got, data) {
		t.Fatalf("read back: errno %d, equal %v", errno, bytes.Equal(got, data))
	}
	f0 := mem.Flushes()
	if errno, _ := c.do(cmdWrite, cmdFlagFUA, 0, 3, []byte("xyz")); errno != 0 || mem.Flushes() != f0+1 {
		t.Fatalf("FUA write: errno %d, flushes %d→%d", errno, f0, mem.Flushes())
	}
	if errno, _ := c.do(cmdFlush, 0, 0, 0, nil); errno != 0 || mem.Flushes() != f0+2 {
		t.Fatalf("flush: errno %d, flushes %d", errno, mem.Flushes())
	}
	if errno, _ := c.do(cmdTrim, 0, 4096, 4096, nil); errno != 0 {
		t.Fatalf("trim: %d", errno)
	}
	if errno, _ := c.do(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 8192, 100, nil); errno != 0 {
		t.Fatalf("write zeroes: %d", errno)
	}
	// Zero-length requests succeed and change nothing.
	for _, typ := range []uint16{cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes} {
		if errno, _ := c.do(typ, 0, testSize, 0, nil); errno != 0 {
			t.Errorf("zero-length command %d at the end: %d", typ, errno)
		}
	}
	want := append([]byte("xyz"), make([]byte, 4096-3+4096+100)...)
	want = append(want, data[4096+100:]...)
	if img := mem.Bytes(); !bytes.Equal(img[:len(want)], want) {
		t.Fatalf("image differs")
	}
	kinds := []disk.Kind{}
	for _, ch := range rec.list() {
		kinds = append(kinds, ch.Kind)
	}
	wantKinds := []disk.Kind{disk.KindWrite, disk.KindWrite, disk.KindFlush, disk.KindTrim, disk.KindZero}
	if len(kinds) != len(wantKinds) {
		t.Fatalf("observed %v, want %v", kinds, wantKinds)
	}
	for i := range kinds {
		if kinds[i] != wantKinds[i] {
			t.Fatalf("observed %v, want %v", kinds, wantKinds)
		}
	}
	ch := rec.list()
	if !ch[1].FUA || string(ch[1].Data) != "xyz" || !ch[4].NoHole || ch[4].Offset != 8192 || ch[4].Length != 100 {
		t.Errorf("changes %+v", ch[1:])
	}
	c.sendReq(cmdDisc, 0, 1, 0, 0, nil)
	c.expectClosed()
}

func TestRequestErrors(t *testing.T) {
	mem := disk.NewMemory(testSize)
	rec := &recorder{}
	sock, _ := startServer(t, Config{MaxPayload: 1 << 20, MaxInFlightBytes: 2 << 20}, mem, rec)
	c := connect(t, sock)
	cases := []struct {
		name    string
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload bool
		want    uint32
	}{
		{"read past end", cmdRead, 0, testSize - 512, 1024, false, errInval},
		{"read offset past end", cmdRead, 0, testSize + 1, 0, false, errInval},
		{"read offset overflow", cmdRead, 0, math.MaxUint64 - 10, 512, false, errInval},
		{"read over max payload", cmdRead, 0, 0, 1<<20 + 1, false, errInval},
		{"write past end", cmdWrite, 0, testSize - 512, 1024, true, errNoSpc},
		{"write offset overflow", cmdWrite, 0, math.MaxUint64 - 100, 512, true, errNoSpc},
		{"write unknown flag", cmdWrite, 1 << 9, 0, 512, true, errInval},
		{"write NO_HOLE", cmdWrite, cmdFlagNoHole, 0, 512, true, errInval},
		{"read DF (not negotiated)", cmdRead, cmdFlagDF, 0, 512, false, errInval},
		{"zeroes FAST_ZERO (not advertised)", cmdWriteZeroes, cmdFlagFastZero, 0, 512, false, errInval},
		{"zeroes past end", cmdWriteZeroes, 0, testSize, 1, false, errNoSpc},
		{"trim past end", cmdTrim, 0, 1, testSize, false, errInval},
		{"flush with offset", cmdFlush, 0, 1, 0, false, errInval},
		{"flush with length", cmdFlush, 0, 0, 1, false, errInval},
		{"cache", cmdCache, 0, 0, 512, false, errInval},
		{"block status", 7, 0, 0, 512, false, errInval},
		{"unknown command", 0x77, 0, 0, 0, false, errInval},
	}
	for _, tc := range cases {
		var p []byte
		if tc.payload {
			p = bytes.Repeat([]byte{0xee}, int(tc.length))
		}
		if errno, _ := c.do(tc.typ, tc.flags, tc.off, tc.length, p); errno != tc.want {
			t.Errorf("%s: errno %d, want %d", tc.name, errno, tc.want)
		}
	}
	// Nothing reached the image or the observer, and the connection works.
	if len(rec.list()) != 0 || !bytes.Equal(mem.Bytes(), make([]byte, testSize)) {
		t.Fatalf("a refused request changed something")
	}
	if errno, _ := c.do(cmdWrite, 0, 0, 2, []byte("ok")); errno != 0 {
		t.Fatalf("write after errors: %d", errno)
	}
	// Trim and write zeroes may be longer than the max payload.
	if errno, _ := c.do(cmdWriteZeroes, 0, 0, testSize, nil); errno != 0 {
		t.Fatalf("zero whole export: %d", errno)
	}
}

func TestProtocolViolationsDisconnect(t *testing.T) {
	sock, _ := startServer(t, Config{MaxPayload: 1 << 20, MaxInFlightBytes: 2 << 20}, disk.NewMemory(testSize), nil)
	c := connect(t, sock)
	c.sendReq(cmdWrite, 0, 1, 0, 1<<20+1, nil) // payload over the maximum: not read
	c.expectClosed()

	c = connect(t, sock)
	c.write(bytes.Repeat([]byte{0x25}, requestSize)) // bad request magic
	c.expectClosed()
}

func TestReadOnly(t *testing.T) {
	sock, _ := startServer(t, Config{ReadOnly: true}, disk.NewMemory(testSize), nil)
	c := connect(t, sock)
	if c.tflags&tflagReadOnly == 0 {
		t.Fatalf("flags %#x lack READ_ONLY", c.tflags)
	}
	for _, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var p []byte
		if typ == cmdWrite {
			p = make([]byte, 512)
		}
		if errno, _ := c.do(typ, 0, 0, 512, p); errno != errPerm {
			t.Errorf("command %d: errno %d, want EPERM", typ, errno)
		}
	}
	if errno, _ := c.do(cmdRead, 0, 0, 512, nil); errno != 0 {
		t.Fatalf("read: %d", errno)
	}
}

func TestMinBlockSize(t *testing.T) {
	sock, _ := startServer(t, Config{MinBlockSize: 512}, disk.NewMemory(testSize), nil)
	c := dial(t, sock, clientFixedNewstyle)
	infos, final := c.goReplies(optGo, goData(""))
	if final.typ != repErrBlockSize {
		t.Fatalf("GO without NBD_INFO_BLOCK_SIZE: %#x", final.typ)
	}
	if len(infos) < 2 {
		t.Fatalf("no block size info before the error")
	}
	c = connect(t, sock)
	if errno, _ := c.do(cmdRead, 0, 100, 512, nil); errno != errInval {
		t.Errorf("unaligned read: %d", errno)
	}
	if errno, _ := c.do(cmdWrite, 0, 0, 100, make([]byte, 100)); errno != errInval {
		t.Errorf("unaligned write: %d", errno)
	}
	if errno, _ := c.do(cmdWrite, 0, 512, 512, make([]byte, 512)); errno != 0 {
		t.Errorf("aligned write: %d", errno)
	}
}

// TestObservedOrderReplaysImage: several connections write concurrently;
// replaying the observed changes in order onto an empty image gives the
// server's image exactly.
func TestObservedOrderReplaysImage(t *testing.T) {
	mem := disk.NewMemory(64 << 10)
	rec := &recorder{}
	sock, _ := startServer(t, Config{}, mem, rec)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := connect(t, sock)
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			// Pipeline 200 overlapping requests, then collect replies.
			const n = 200
			for i := range n {
				off := uint64(rng.IntN(60 << 10))
				l := uint32(1 + rng.IntN(4096))
				switch rng.IntN(4) {
				case 0:
					c.sendReq(cmdWriteZeroes, 0, uint64(i), off, l, nil)
				case 1:
					c.sendReq(cmdTrim, 0, uint64(i), off, l, nil)
				default:
					c.sendReq(cmdWrite, 0, uint64(i), off, l, bytes.Repeat([]byte{byte(w*50 + i%50 + 1)}, int(l)))
				}
			}
			for range n {
				if errno, _ := c.readReply(); errno != 0 {
					t.Errorf("errno %d", errno)
				}
			}
		}()
	}
	wg.Wait()
	replay := disk.NewMemory(64 << 10)
	ctx := context.Background()
	for _, ch := range rec.list() {
		switch ch.Kind {
		case disk.KindWrite:
			replay.WriteAt(ctx, ch.Data, ch.Offset)
		case disk.KindTrim, disk.KindZero:
			replay.WriteZeroes(ctx, ch.Offset, ch.Length, false)
		}
	}
	if len(rec.list()) != 800 {
		t.Fatalf("observed %d changes, want 800", len(rec.list()))
	}
	if !bytes.Equal(replay.Bytes(), mem.Bytes()) {
		t.Fatalf("replayed changes differ from the image")
	}
}

// gate is an observer that blocks until released.
type gate struct {
	calls chan disk.Change
	open  chan struct{}
}

func (g *gate) Observe(ctx context.Context, c disk.Change) error {
	g.calls <- c
	select {
	case <-g.open:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestObserverBackpressure: a blocked observer withholds the reply, and
// with a small in-flight budget the server stops reading further requests.
func TestObserverBackpressure(t *testing.T) {
	g := &gate{calls: make(chan disk.Change, 100), open: make(chan struct{})}
	sock, _ := startServer(t, Config{MaxPayload: 4096, PreferredBlockSize: 4096, MaxInFlightBytes: 4096 + requestOverhead}, disk.NewMemory(testSize), g)
	c := connect(t, sock)
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range 50 {
			b := binary.BigEndian.AppendUint32(nil, magicRequest)
			b = binary.BigEndian.AppendUint16(b, 0)
			b = binary.BigEndian.AppendUint16(b, cmdWrite)
			b = binary.BigEndian.AppendUint64(b, uint64(i))
			b = binary.BigEndian.AppendUint64(b, uint64(i)*4096)
			b = binary.BigEndian.AppendUint32(b, 4096)
			if _, err := c.nc.Write(append(b, make([]byte, 4096)...)); err != nil {
				return
			}
		}
	}()
	<-g.calls
	select {
	case ch := <-g.calls:
		t.Fatalf("a second change (%v at %d) was observed while the first was blocked", ch.Kind, ch.Offset)
	case <-time.After(300 * time.Millisecond):
	}
	c.nc.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	var b [1]byte
	if n, _ := c.r.Read(b[:]); n != 0 {
		t.Fatalf("a reply was sent while the observer blocked")
	}
	c.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
	close(g.open)
	for i := range 50 {
		errno, cookie := c.readReply()
		if errno != 0 || cookie != uint64(i) {
			t.Fatalf("reply %d: errno %d cookie %d", i, errno, cookie)
		}
	}
	<-sent
}

func TestShutdownClosesConnections(t *testing.T) {
	before := runtime.NumGoroutine()
	srv, err := New(Config{}, disk.NewMemory(testSize), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	sock := t.TempDir() + "/s"
	ln, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	c := connect(t, sock)
	half := dial(t, sock, clientFixedNewstyle) // still in the handshake
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
	c.expectClosed()
	half.expectClosed()
	// Every goroutine the server started has ended.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMaxConns(t *testing.T) {
	sock, _ := startServer(t, Config{MaxConns: 1}, disk.NewMemory(testSize), nil)
	c := connect(t, sock)
	c2 := testClientRaw(t, sock)
	c2.expectClosed()
	if errno, _ := c.do(cmdRead, 0, 0, 1, nil); errno != 0 {
		t.Fatal(errno)
	}
}

// testClientRaw connects without reading the greeting.
func testClientRaw(t *testing.T, sock string) *testClient {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &testClient{t: t, nc: nc, r: bufio.NewReader(nc)}
}

// TestJournalEndToEnd: a client pipelines writes into a server whose
// observer is a small Journal, while an "engine" cuts epochs, applies them
// to a replica and releases them after a delay (the backup's ack). The
// guest is slowed (Observe blocks), the journal stays within its limit
// plus its pause overdraft although this client, unlike QEMU, keeps
// sending during the pause (past the overdraft it tracks dirty blocks),
// and the replica equals the image.
func TestJournalEndToEnd(t *testing.T) {
	const size = 1 << 20
	cfg := Config{MaxPayload: 64 << 10, MaxInFlightBytes: 128 << 10}
	limit := int64(256 << 10)
	j, err := disk.NewJournal(disk.JournalConfig{Limit: limit, MaxWrite: int64(cfg.MaxPayload), InFlight: 2}, 1)
	if err != nil {
		t.Fatal(err)
	}
	mem := disk.NewMemory(size)
	sock, _ := startServer(t, cfg, mem, j)
	replica := disk.NewMemory(size)
	ctx := context.Background()
	apply := func(e disk.Epoch) {
		// Past the pause overdraft (this client keeps sending) the journal
		// tracks dirty blocks instead: read them from the image, as the
		// engine does (here the image may be newer than the cut; the
		// next epochs apply on top of it).
		for _, x := range e.Dirty {
			b := make([]byte, min(x.Offset+x.Length, size)-x.Offset)
			mem.ReadAt(ctx, b, x.Offset)
			replica.WriteAt(ctx, b, x.Offset)
		}
		for _, c := range e.Changes {
			switch c.Kind {
			case disk.KindWrite:
				replica.WriteAt(ctx, c.Data, c.Offset)
			case disk.KindTrim, disk.KindZero:
				replica.WriteZeroes(ctx, c.Offset, c.Length, false)
			}
		}
	}
	stop := make(chan struct{})
	engineDone := make(chan struct{})
	var maxUsed int64
	go func() {
		defer close(engineDone)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			j.BeginPause()
			e := j.Cut()
			maxUsed = max(maxUsed, j.Stats().Used)
			apply(e)
			time.Sleep(10 * time.Millisecond) // the round trip to the backup
			j.Release(e.Number)
		}
	}()
	c := connect(t, sock)
	rng := rand.New(rand.NewPCG(3, 4))
	const n = 400
	go func() {
		for i := range n {
			l := 1 + rng.IntN(64<<10)
			off := rng.IntN(size - l)
			if i%10 == 9 {
				c.sendReq(cmdWriteZeroes, 0, uint64(i), uint64(off), uint32(l), nil)
				continue
			}
			c.sendReq(cmdWrite, 0, uint64(i), uint64(off), uint32(l), bytes.Repeat([]byte{byte(i)}, l))
		}
	}()
	for range n {
		if errno, _ := c.readReply(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	close(stop)
	<-engineDone
	j.BeginPause()
	apply(j.Cut())
	if !bytes.Equal(replica.Bytes(), mem.Bytes()) {
		t.Fatalf("replica differs from the image")
	}
	s := j.Stats()
	if s.Blocked == 0 {
		t.Errorf("the journal never applied backpressure: %+v", s)
	}
	if maxUsed > limit+s.Overdraft {
		t.Errorf("journal held %d bytes, limit %d + overdraft %d", maxUsed, limit, s.Overdraft)
	}
	t.Logf("journal: %d writes waited %v in total; max held %d of %d", s.Blocked, s.BlockedTotal, maxUsed, limit)
}

// TestClientNotReadingIsBounded: a client that pipelines reads and never
// reads the replies gets only MaxInFlightBytes of them in flight; the
// server then stops reading its requests.
func TestClientNotReadingIsBounded(t *testing.T) {
	const size = 64 << 20
	cfg := Config{MaxPayload: 1 << 20, MaxInFlightBytes: 4<<20 + 4*requestOverhead}
	sock, _ := startServer(t, cfg, disk.NewMemory(size), nil)
	c := connect(t, sock)
	before := runtime.NumGoroutine()
	sent := make(chan int, 1)
	go func() {
		n := 0
		defer func() { sent <- n }()
		c.nc.SetWriteDeadline(time.Now().Add(2 * time.Second))
		for i := range 2000 {
			if _, err := c.nc.Write(reqBytes(cmdRead, 0, uint64(i%64)<<20, 1<<20)); err != nil {
				return
			}
			n++
		}
	}()
	n := <-sent
	if n == 2000 {
		t.Fatalf("the server read all 2000 requests (2000 MiB of replies) from a client that reads nothing")
	}
	if g := runtime.NumGoroutine() - before; g > 8 {
		t.Fatalf("%d more goroutines with replies stuck (budget allows 4)", g)
	}
	t.Logf("the server stopped reading after at most %d requests", n)
}
