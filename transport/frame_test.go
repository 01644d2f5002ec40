package transport

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	remuspb "github.com/remusd/remusd/proto"
	"google.golang.org/protobuf/proto"
)

// sampleFrames returns one frame of every kind.
func sampleFrames() []Frame {
	return []Frame{
		{KindHello, &remuspb.Hello{ProtocolVersion: 1, VmName: "vm", ProtectionId: "p", MemoryBytes: 1 << 20, PageSize: 4096, Backend: "sim"}, nil},
		{KindWelcome, &remuspb.Welcome{ProtocolVersion: 1, CommittedEpoch: 7}, nil},
		{KindEpochBegin, &remuspb.EpochBegin{Epoch: 8, BaseEpoch: 7, PageCount: 2}, nil},
		{KindPageBatch, &remuspb.PageBatch{Epoch: 8, Pfns: []uint64{1, 2}, Encodings: []byte{2, 2}, Lengths: []uint32{0, 0}}, nil},
		{KindPageBatch, &remuspb.PageBatch{Epoch: 8, Pfns: []uint64{3}, Encodings: []byte{1}, Lengths: []uint32{4}}, []byte("abcd")},
		{KindDeviceState, &remuspb.DeviceState{Epoch: 8}, []byte("device")},
		{KindEpochEnd, &remuspb.EpochEnd{Epoch: 8, PageCount: 3, Digest: 99}, nil},
		{KindAck, &remuspb.Ack{Epoch: 8}, nil},
		{KindHeartbeat, &remuspb.Heartbeat{Seq: 1, Role: "primary"}, nil},
		{KindActivate, &remuspb.Activate{Reason: "operator"}, nil},
		{KindGoodbye, &remuspb.Goodbye{}, nil},
	}
}

func encodeFrames(t testing.TB, frames []Frame) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, f := range frames {
		if err := w.WriteFrame(f.Kind, f.Header, f.Payload); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestFrameRoundTrip(t *testing.T) {
	frames := sampleFrames()
	wire := encodeFrames(t, frames)
	r := NewReader(bytes.NewReader(wire), DefaultLimits())
	for _, want := range frames {
		got, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("%v: %v", want.Kind, err)
		}
		if got.Kind != want.Kind || !proto.Equal(got.Header, want.Header) || !bytes.Equal(got.Payload, want.Payload) {
			t.Errorf("got %v %v %q, want %v %v %q", got.Kind, got.Header, got.Payload, want.Kind, want.Header, want.Payload)
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("at end: %v, want io.EOF", err)
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("sticky EOF: %v", err)
	}
}

func TestKindString(t *testing.T) {
	if KindPageBatch.String() != "PageBatch" || Kind(77).String() != "Kind(77)" || KindGoodbye.String() != "Goodbye" {
		t.Error(KindPageBatch, Kind(77), KindGoodbye)
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter(io.Discard)
	if err := w.WriteFrame(Kind(0), nil, nil); err == nil {
		t.Error("kind 0 accepted")
	}
	if err := w.WriteFrame(KindAck, &remuspb.Hello{}, nil); err == nil {
		t.Error("mismatched header accepted")
	}
	if err := w.WriteFrame(KindAck, &remuspb.Ack{}, []byte{1}); err == nil {
		t.Error("payload on Ack accepted")
	}
	if err := w.WriteFrame(KindAck, nil, nil); err != nil {
		t.Errorf("nil header: %v", err)
	}
}

type countWriter struct {
	mu     sync.Mutex
	writes [][]byte
}

func (c *countWriter) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes = append(c.writes, bytes.Clone(b))
	return len(b), nil
}

// TestWriterConcurrent: concurrent writers, one Write per frame, frames intact.
func TestWriterConcurrent(t *testing.T) {
	cw := &countWriter{}
	w := NewWriter(cw)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				if err := w.WriteFrame(KindDeviceState, &remuspb.DeviceState{Epoch: uint64(g)}, bytes.Repeat([]byte{byte(i)}, 1000)); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if len(cw.writes) != 400 {
		t.Fatalf("%d writes, want 400", len(cw.writes))
	}
	r := NewReader(bytes.NewReader(bytes.Join(cw.writes, nil)), Limits{})
	for range 400 {
		f, err := r.ReadFrame()
		if err != nil || f.Kind != KindDeviceState || len(f.Payload) != 1000 {
			t.Fatalf("%v %v", f.Kind, err)
		}
	}
}

func TestWriterStickyError(t *testing.T) {
	a, b := Pipe()
	b.Close()
	w := NewWriter(a)
	if err := w.WriteFrame(KindAck, &remuspb.Ack{}, nil); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("write to closed peer: %v", err)
	}
	if err := w.WriteFrame(KindAck, &remuspb.Ack{}, nil); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("sticky: %v", err)
	}
}

// rawFrame builds a frame by hand.
func rawFrame(bodyLen uint32, kind byte, hdrLen uint32, rest []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, bodyLen)
	b = append(b, kind)
	b = binary.BigEndian.AppendUint32(b, hdrLen)
	return append(b, rest...)
}

func TestReaderMalformed(t *testing.T) {
	ack, _ := proto.Marshal(&remuspb.Ack{Epoch: 3})
	valid := encodeFrames(t, []Frame{{KindPageBatch, &remuspb.PageBatch{Epoch: 1}, bytes.Repeat([]byte{1}, 100)}})
	lim := DefaultLimits()
	tests := []struct {
		name      string
		wire      []byte
		lim       Limits
		msg       string
		truncated bool
	}{
		{"oversize", rawFrame(99999999, 7, 0, nil), lim, "frame body 99999999 bytes exceeds limit 67108864", false},
		{"short body", rawFrame(4, 7, 0, nil), lim, "frame body 4 bytes is shorter than the minimum 5", false},
		{"unknown kind", rawFrame(5, 77, 0, nil), lim, "unknown frame kind 77", false},
		{"kind zero", rawFrame(5, 0, 0, nil), lim, "unknown frame kind 0", false},
		{"header over limit", rawFrame(100, byte(KindAck), 50, nil), Limits{MaxHeader: 10}, "Ack header 50 bytes exceeds limit 10", false},
		{"header over body", rawFrame(10, byte(KindAck), 6, nil), lim, "Ack header 6 bytes exceeds frame body 10 bytes", false},
		{"payload on header-only kind", rawFrame(5+uint32(len(ack))+1, byte(KindAck), uint32(len(ack)), append(ack, 0)), lim, "Ack frame carries a 1-byte payload", false},
		{"garbage header", rawFrame(5+3, byte(KindAck), 3, []byte{0xff, 0xff, 0xff}), lim, "bad Ack header (3 bytes)", false},
		{"wrong wire type", rawFrame(5+2, byte(KindAck), 2, []byte{0x0a, 0x05}), lim, "bad Ack header", false},
		{"device state limit", rawFrame(5+0+100, byte(KindDeviceState), 0, nil), Limits{MaxDeviceState: 99}, "device state 100 bytes exceeds limit 99", false},
		{"batch pages limit", encodeFrames(t, []Frame{{KindPageBatch, &remuspb.PageBatch{Pfns: make([]uint64, 10)}, nil}}), Limits{MaxBatchPages: 9}, "PageBatch of 10 pages exceeds limit 9", false},
		{"truncated length", []byte{0, 0}, lim, "truncated frame length (2 of 4 bytes)", true},
		{"truncated prefix", []byte{0, 0, 0, 9, 4}, lim, "truncated frame: got 1 of 9 body bytes", true},
		{"truncated body", valid[:len(valid)-10], lim, "truncated PageBatch frame: got", true},
		{"truncated at header", valid[:11], lim, "truncated PageBatch frame: got", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.wire), tc.lim)
			_, err := r.ReadFrame()
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("err %v, want ErrMalformed", err)
			}
			var fe *FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("err %T is not *FrameError", err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("err %q does not contain %q", err, tc.msg)
			}
			if got := errors.Is(err, io.ErrUnexpectedEOF); got != tc.truncated {
				t.Errorf("errors.Is(err, io.ErrUnexpectedEOF) = %v", got)
			}
			if _, err2 := r.ReadFrame(); err2 != err {
				t.Errorf("error not sticky: %v", err2)
			}
		})
	}
}

func TestReaderCleanEOF(t *testing.T) {
	r := NewReader(bytes.NewReader(nil), DefaultLimits())
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("empty stream: %v", err)
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestReaderIOError(t *testing.T) {
	boom := errors.New("boom")
	_, err := NewReader(errReader{boom}, DefaultLimits()).ReadFrame()
	if !errors.Is(err, boom) || errors.Is(err, ErrMalformed) {
		t.Fatalf("err %v: want wrapped boom, not ErrMalformed", err)
	}
}

// TestReaderLargeFrame checks the incremental body growth.
func TestReaderLargeFrame(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), (3<<20)/16+3)
	wire := encodeFrames(t, []Frame{{KindDeviceState, &remuspb.DeviceState{Epoch: 1}, payload}, {KindAck, &remuspb.Ack{}, nil}})
	r := NewReader(bytes.NewReader(wire), DefaultLimits())
	f, err := r.ReadFrame()
	if err != nil || !bytes.Equal(f.Payload, payload) {
		t.Fatalf("large frame: %v", err)
	}
	if f, err := r.ReadFrame(); err != nil || f.Kind != KindAck {
		t.Fatalf("after large frame: %v %v", f.Kind, err)
	}
}

// crossCounter counts the bytes read through it.
type crossCounter struct {
	r io.Reader
	n int
}

func (c *crossCounter) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += n
	return n, err
}

// TestByteCountsMatchTheWire: the Writer's and Reader's counts are the
// bytes that crossed the connection, frame prefixes and protobuf headers
// included, and the observer sees every frame at its full size.
func TestByteCountsMatchTheWire(t *testing.T) {
	a, b := net.Pipe()
	frames := sampleFrames()
	w := NewWriter(a)
	var observed int
	sizes := map[Kind]int{}
	w.Observe(func(k Kind, n int) { observed += n; sizes[k] += n })
	go func() {
		defer a.Close()
		for _, f := range frames {
			if err := w.WriteFrame(f.Kind, f.Header, f.Payload); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	cc := &crossCounter{r: b}
	crossed, err := io.ReadAll(cc)
	if err != nil {
		t.Fatal(err)
	}
	want := 0
	wantKind := map[Kind]int{}
	for _, f := range frames {
		n := FramePrefixSize + proto.Size(f.Header) + len(f.Payload)
		want += n
		wantKind[f.Kind] += n
	}
	if len(crossed) != want || cc.n != want {
		t.Fatalf("%d bytes crossed the pipe, frames should take %d", len(crossed), want)
	}
	if got := w.BytesWritten(); got != uint64(want) {
		t.Errorf("BytesWritten = %d, %d bytes crossed the pipe (frame prefixes or headers missed?)", got, want)
	}
	if observed != want {
		t.Errorf("observer saw %d bytes, %d crossed the pipe", observed, want)
	}
	for k, n := range wantKind {
		if sizes[k] != n {
			t.Errorf("observer: %v frames %d bytes, want %d", k, sizes[k], n)
		}
	}
	r := NewReader(bytes.NewReader(crossed), DefaultLimits())
	for range frames {
		if _, err := r.ReadFrame(); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.BytesRead(); got != uint64(want) {
		t.Errorf("BytesRead = %d after every frame, want %d", got, want)
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("at end: %v", err)
	}
	// A truncated frame counts what arrived.
	r = NewReader(bytes.NewReader(crossed[:20]), DefaultLimits())
	if _, err := r.ReadFrame(); err == nil {
		t.Fatal("truncated frame read")
	}
	if r.BytesRead() != 20 {
		t.Errorf("BytesRead = %d after a truncated frame, want the 20 bytes read", r.BytesRead())
	}
}

func TestEpochRecordKinds(t *testing.T) {
	for k := Kind(0); k <= KindGoodbye+1; k++ {
		want := k == KindEpochBegin || k == KindPageBatch || k == KindDeviceState || k == KindEpochEnd
		if k.IsEpochRecord() != want {
			t.Errorf("%v.IsEpochRecord() = %v", k, !want)
		}
	}
}
