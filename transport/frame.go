// Package transport carries the remusd replication link: framed records
// (a length-prefixed protobuf header plus an optional raw payload), the
// page-delta codec that turns an epoch's dirty pages into PageBatch frames
// and back, the epoch digest, and an in-memory connection with fault hooks
// for tests.
//
// Everything read from the wire is checked against limits before it is used
// or allocated for; every such failure wraps ErrMalformed.
package transport

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	remuspb "github.com/remusd/remusd/proto"
	"google.golang.org/protobuf/proto"
)

// ErrMalformed is wrapped by every error caused by malformed input from the
// wire (frames, headers, page batches).
var ErrMalformed = errors.New("transport: malformed input")

// Kind identifies the record type carried by a frame, and with it the
// protobuf message type of its header.
type Kind uint8

// Frame kinds. The header of each kind is the remuspb message of the same
// name, except KindPreload, whose header is a PageBatch. Only
// KindPageBatch, KindPreload, KindDeviceState and KindReplicaHashes frames
// carry a payload.
const (
	KindHello Kind = 1 + iota
	KindWelcome
	KindEpochBegin
	KindPageBatch
	KindDeviceState
	KindEpochEnd
	KindAck
	KindHeartbeat
	KindActivate
	KindGoodbye
	KindReplicaHashes
	KindActivated
	// KindPreload streams guest memory into a replica that holds nothing
	// yet, while the guest runs, before the first epoch (PageBatch header,
	// epoch 0).
	KindPreload
	// KindDiskWrites carries disk changes of an epoch (DiskWrites header,
	// the writes' data as payload), after its page batches.
	KindDiskWrites
	// KindDiskSync carries a disk image copied while the guest runs,
	// before a link's first epoch (DiskWrites header, epoch 0).
	KindDiskSync
)

var kindNames = [...]string{
	KindHello:       "Hello",
	KindWelcome:     "Welcome",
	KindEpochBegin:  "EpochBegin",
	KindPageBatch:   "PageBatch",
	KindDeviceState: "DeviceState",
	KindEpochEnd:    "EpochEnd",
	KindAck:         "Ack",
	KindHeartbeat:   "Heartbeat",
	KindActivate:    "Activate",
	KindGoodbye:     "Goodbye",

	KindReplicaHashes: "ReplicaHashes",
	KindActivated:     "Activated",
	KindPreload:       "Preload",
	KindDiskWrites:    "DiskWrites",
	KindDiskSync:      "DiskSync",
}

// Valid reports whether k is a known frame kind.
func (k Kind) Valid() bool { return k >= KindHello && k <= KindDiskSync }

// String returns the name of the kind ("PageBatch"), or "Kind(77)" for an
// unknown kind.
func (k Kind) String() string {
	if k.Valid() {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// HasPayload reports whether frames of kind k may carry a payload.
func (k Kind) HasPayload() bool {
	return k == KindPageBatch || k == KindPreload || k == KindDeviceState || k == KindReplicaHashes ||
		k == KindDiskWrites || k == KindDiskSync
}

// IsEpochRecord reports whether frames of kind k belong to an epoch's
// stream: EpochBegin, PageBatch, DiskWrites, DeviceState and EpochEnd,
// and Preload and DiskSync (memory and disks streamed ahead of the first).
func (k Kind) IsEpochRecord() bool {
	return k >= KindEpochBegin && k <= KindEpochEnd || k == KindPreload || k == KindDiskWrites || k == KindDiskSync
}

// NewHeader returns a new, empty header message of the type kind k carries,
// or nil if k is unknown.
func (k Kind) NewHeader() proto.Message {
	switch k {
	case KindHello:
		return new(remuspb.Hello)
	case KindWelcome:
		return new(remuspb.Welcome)
	case KindEpochBegin:
		return new(remuspb.EpochBegin)
	case KindPageBatch, KindPreload:
		return new(remuspb.PageBatch)
	case KindDeviceState:
		return new(remuspb.DeviceState)
	case KindEpochEnd:
		return new(remuspb.EpochEnd)
	case KindAck:
		return new(remuspb.Ack)
	case KindHeartbeat:
		return new(remuspb.Heartbeat)
	case KindActivate:
		return new(remuspb.Activate)
	case KindGoodbye:
		return new(remuspb.Goodbye)
	case KindReplicaHashes:
		return new(remuspb.ReplicaHashes)
	case KindActivated:
		return new(remuspb.Activated)
	case KindDiskWrites, KindDiskSync:
		return new(remuspb.DiskWrites)
	}
	return nil
}

// headerMatches reports whether hdr is of the message type kind k carries.
func headerMatches(k Kind, hdr proto.Message) bool {
	switch hdr.(type) {
	case *remuspb.Hello:
		return k == KindHello
	case *remuspb.Welcome:
		return k == KindWelcome
	case *remuspb.EpochBegin:
		return k == KindEpochBegin
	case *remuspb.PageBatch:
		return k == KindPageBatch || k == KindPreload
	case *remuspb.DeviceState:
		return k == KindDeviceState
	case *remuspb.EpochEnd:
		return k == KindEpochEnd
	case *remuspb.Ack:
		return k == KindAck
	case *remuspb.Heartbeat:
		return k == KindHeartbeat
	case *remuspb.Activate:
		return k == KindActivate
	case *remuspb.Goodbye:
		return k == KindGoodbye
	case *remuspb.ReplicaHashes:
		return k == KindReplicaHashes
	case *remuspb.Activated:
		return k == KindActivated
	case *remuspb.DiskWrites:
		return k == KindDiskWrites || k == KindDiskSync
	}
	return false
}

// Frame layout: uint32 BE bodyLen | uint8 kind | uint32 BE hdrLen | hdr | payload,
// where bodyLen = 1 + 4 + hdrLen + len(payload).
const (
	lenSize    = 4
	bodyPrefix = 5 // kind + hdrLen
	prefixSize = lenSize + bodyPrefix
)

// FramePrefixSize is the fixed part of every frame on the wire (body
// length, kind, header length): a frame occupies FramePrefixSize +
// protobuf header + payload bytes.
const FramePrefixSize = prefixSize

// Limits bounds what a Reader (and a Decoder) accepts from the wire.
type Limits struct {
	// MaxFrame bounds bodyLen (kind, header length, header and payload).
	// Default 64 MiB.
	MaxFrame int
	// MaxHeader bounds the protobuf header. Default 1 MiB.
	MaxHeader int
	// MaxBatchPages bounds the number of pages of one PageBatch. Default 4096.
	MaxBatchPages int
	// MaxDeviceState bounds the payload of a DeviceState frame. Default 64 MiB
	// (the frame must also fit MaxFrame).
	MaxDeviceState int
	// MaxDiskBatchChanges bounds the changes of one DiskWrites record.
	// Default 4096.
	MaxDiskBatchChanges int
	// MaxDiskBatchBytes bounds the write data of one DiskWrites record
	// (its raw_length, after decompression). Default 48 MiB: one NBD
	// write of the largest payload (32 MiB) fits.
	MaxDiskBatchBytes int
	// MaxEpochDiskBytes bounds the disk data one epoch carries (all
	// disks): what the backup stages for it besides its pages. The
	// primary must keep its journals' limits (plus overdraft) below it.
	// Default 512 MiB.
	MaxEpochDiskBytes int64
	// MaxEpochDiskChanges bounds the disk changes of one epoch. Default
	// 1 << 20.
	MaxEpochDiskChanges int
}

// DefaultLimits returns the default limits.
func DefaultLimits() Limits {
	return Limits{
		MaxFrame:       64 << 20,
		MaxHeader:      1 << 20,
		MaxBatchPages:  4096,
		MaxDeviceState: 64 << 20,

		MaxDiskBatchChanges: 4096,
		MaxDiskBatchBytes:   48 << 20,
		MaxEpochDiskBytes:   512 << 20,
		MaxEpochDiskChanges: 1 << 20,
	}
}

// withDefaults replaces zero or negative fields by their defaults.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxFrame <= 0 {
		l.MaxFrame = d.MaxFrame
	}
	if l.MaxHeader <= 0 {
		l.MaxHeader = d.MaxHeader
	}
	if l.MaxBatchPages <= 0 {
		l.MaxBatchPages = d.MaxBatchPages
	}
	if l.MaxDeviceState <= 0 {
		l.MaxDeviceState = d.MaxDeviceState
	}
	if l.MaxDiskBatchChanges <= 0 {
		l.MaxDiskBatchChanges = d.MaxDiskBatchChanges
	}
	if l.MaxDiskBatchBytes <= 0 {
		l.MaxDiskBatchBytes = d.MaxDiskBatchBytes
	}
	if l.MaxEpochDiskBytes <= 0 {
		l.MaxEpochDiskBytes = d.MaxEpochDiskBytes
	}
	if l.MaxEpochDiskChanges <= 0 {
		l.MaxEpochDiskChanges = d.MaxEpochDiskChanges
	}
	if l.MaxFrame > math.MaxUint32 {
		l.MaxFrame = math.MaxUint32
	}
	return l
}

// FrameError describes a malformed or truncated frame. It matches
// ErrMalformed with errors.Is, and unwraps to Err (io.ErrUnexpectedEOF for a
// truncated frame, the protobuf error for a bad header).
type FrameError struct {
	Kind   Kind   // kind of the frame, 0 if not yet known
	Reason string // what is wrong, e.g. "unknown frame kind 77"
	Err    error  // underlying error, may be nil
}

// Error implements error.
func (e *FrameError) Error() string {
	if e.Err != nil {
		return "transport: " + e.Reason + ": " + e.Err.Error()
	}
	return "transport: " + e.Reason
}

// Unwrap returns the underlying error.
func (e *FrameError) Unwrap() error { return e.Err }

// Is reports whether target is ErrMalformed.
func (e *FrameError) Is(target error) bool { return target == ErrMalformed }

// Frame is one record read from the wire.
type Frame struct {
	Kind Kind
	// Header is the decoded header, of the concrete type for Kind
	// (*remuspb.PageBatch for KindPageBatch, ...). It is freshly allocated
	// for every frame and owned by the caller.
	Header proto.Message
	// Payload is the raw payload (PageBatch and DeviceState only). It is
	// only valid until the next ReadFrame call.
	Payload []byte
}

// Writer writes frames to a stream. It is safe for concurrent use: each
// frame is assembled in a reused buffer and handed to the underlying writer
// in ONE Write call, under a mutex, so frames never interleave and fault
// hooks (FaultConn) see whole frames.
//
// It counts every byte it hands to the stream: the 9-byte frame prefix,
// the protobuf header and the payload (BytesWritten, and per frame through
// an observer set with Observe).
type Writer struct {
	mu      sync.Mutex
	w       io.Writer
	buf     []byte
	err     error // sticky: after a failed write the stream is unusable
	observe func(kind Kind, n int)
	written atomic.Uint64
}

// NewWriter returns a Writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// BytesWritten is the number of bytes the Writer has handed to its stream
// so far, frame prefixes and protobuf headers included (for a failed
// write, the part the stream accepted).
func (w *Writer) BytesWritten() uint64 { return w.written.Load() }

// Observe sets f to be called after every frame written, with the frame's
// kind and the bytes the stream accepted for it (the whole frame, prefix
// and header included; fewer if the write failed). f runs with the
// Writer's lock held: it must be quick and must not write to w.
func (w *Writer) Observe(f func(kind Kind, n int)) {
	w.mu.Lock()
	w.observe = f
	w.mu.Unlock()
}

// WriteFrame writes one frame. hdr must be the message type of kind (nil
// means an empty header); payload must be empty unless kind is PageBatch or
// DeviceState. After a write error every later call returns that error (a
// partial frame may have been written).
func (w *Writer) WriteFrame(kind Kind, hdr proto.Message, payload []byte) error {
	if !kind.Valid() {
		return fmt.Errorf("transport: write frame: unknown frame kind %d", uint8(kind))
	}
	if hdr != nil && !headerMatches(kind, hdr) {
		return fmt.Errorf("transport: write %v frame: header type %T does not match", kind, hdr)
	}
	if len(payload) > 0 && !kind.HasPayload() {
		return fmt.Errorf("transport: write %v frame: kind carries no payload (%d bytes given)", kind, len(payload))
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return w.err
	}
	b := append(w.buf[:0], make([]byte, prefixSize)...)
	if hdr != nil {
		var err error
		b, err = proto.MarshalOptions{}.MarshalAppend(b, hdr)
		if err != nil {
			return fmt.Errorf("transport: marshal %v header: %w", kind, err)
		}
	}
	hdrLen := len(b) - prefixSize
	bodyLen := uint64(bodyPrefix) + uint64(hdrLen) + uint64(len(payload))
	if bodyLen > math.MaxUint32 {
		return fmt.Errorf("transport: write %v frame: body %d bytes too large", kind, bodyLen)
	}
	binary.BigEndian.PutUint32(b[0:4], uint32(bodyLen))
	b[4] = byte(kind)
	binary.BigEndian.PutUint32(b[5:9], uint32(hdrLen))
	b = append(b, payload...)
	if cap(b) <= 4<<20 { // keep a reasonably sized buffer for reuse
		w.buf = b[:0]
	} else {
		w.buf = nil
	}
	n, err := w.w.Write(b)
	n = max(0, min(n, len(b)))
	w.written.Add(uint64(n))
	if w.observe != nil && n > 0 {
		w.observe(kind, n)
	}
	if err != nil {
		w.err = fmt.Errorf("transport: write %v frame: %w", kind, err)
		return w.err
	}
	return nil
}

// Reader reads frames from a stream through a large bufio.Reader. It is
// not safe for concurrent use, except BytesRead.
type Reader struct {
	br   *bufio.Reader
	lim  Limits
	pre  [prefixSize]byte
	buf  []byte
	err  error // sticky
	read atomic.Uint64
}

// readerBufSize is the bufio buffer size of a Reader.
const readerBufSize = 1 << 20

// NewReader returns a Reader on r enforcing lim (zero fields take their
// defaults from DefaultLimits).
func NewReader(r io.Reader, lim Limits) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, readerBufSize), lim: lim.withDefaults()}
}

// Limits returns the limits the reader enforces.
func (r *Reader) Limits() Limits { return r.lim }

// SetLimits changes the limits for the frames read from now on (e.g. a
// listener reads a peer's Hello under small limits, then, once the peer
// is accepted, the replication limits apply).
func (r *Reader) SetLimits(lim Limits) { r.lim = lim.withDefaults() }

// BytesRead is the number of bytes of frames the Reader has consumed so
// far: frame prefixes, protobuf headers and payloads (of a truncated
// frame, what arrived). Bytes buffered ahead of the next frame are not
// counted. Safe to call concurrently with ReadFrame.
func (r *Reader) BytesRead() uint64 { return r.read.Load() }

// full is io.ReadFull on the buffered stream, counting what it consumed.
func (r *Reader) full(b []byte) (int, error) {
	n, err := io.ReadFull(r.br, b)
	r.read.Add(uint64(n))
	return n, err
}

// ReadFrame reads the next frame. It returns io.EOF only on a clean end of
// stream at a frame boundary. Malformed or truncated frames give a
// *FrameError (errors.Is(err, ErrMalformed); truncation also matches
// io.ErrUnexpectedEOF). Other I/O errors (deadlines, closed connections)
// are returned wrapped, and are not ErrMalformed. Any error is sticky.
func (r *Reader) ReadFrame() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.readFrame()
	if err != nil {
		r.err = err
	}
	return f, err
}

func (r *Reader) readFrame() (Frame, error) {
	n, err := r.full(r.pre[:lenSize])
	if err != nil {
		if n == 0 && err == io.EOF {
			return Frame{}, io.EOF
		}
		return Frame{}, r.ioErr(0, fmt.Sprintf("truncated frame length (%d of 4 bytes)", n), err)
	}
	bodyLen := binary.BigEndian.Uint32(r.pre[:lenSize])
	if bodyLen < bodyPrefix {
		return Frame{}, &FrameError{Reason: fmt.Sprintf("frame body %d bytes is shorter than the minimum 5", bodyLen)}
	}
	if uint64(bodyLen) > uint64(r.lim.MaxFrame) {
		return Frame{}, &FrameError{Reason: fmt.Sprintf("frame body %d bytes exceeds limit %d", bodyLen, r.lim.MaxFrame)}
	}
	n, err = r.full(r.pre[lenSize:])
	if err != nil {
		return Frame{}, r.ioErr(0, fmt.Sprintf("truncated frame: got %d of %d body bytes", n, bodyLen), noEOF(err))
	}
	kind := Kind(r.pre[4])
	if !kind.Valid() {
		return Frame{}, &FrameError{Reason: fmt.Sprintf("unknown frame kind %d", uint8(kind))}
	}
	hdrLen := binary.BigEndian.Uint32(r.pre[5:9])
	if uint64(hdrLen) > uint64(r.lim.MaxHeader) {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("%v header %d bytes exceeds limit %d", kind, hdrLen, r.lim.MaxHeader)}
	}
	if hdrLen > bodyLen-bodyPrefix {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("%v header %d bytes exceeds frame body %d bytes", kind, hdrLen, bodyLen)}
	}
	payLen := int(bodyLen - bodyPrefix - hdrLen)
	if payLen > 0 && !kind.HasPayload() {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("%v frame carries a %d-byte payload, kind allows none", kind, payLen)}
	}
	if kind == KindDeviceState && payLen > r.lim.MaxDeviceState {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("device state %d bytes exceeds limit %d", payLen, r.lim.MaxDeviceState)}
	}
	rest := int(bodyLen - bodyPrefix)
	body, got, err := r.readBody(rest)
	if err != nil {
		return Frame{}, r.ioErr(kind, fmt.Sprintf("truncated %v frame: got %d of %d body bytes", kind, got+bodyPrefix, bodyLen), noEOF(err))
	}
	hdr := kind.NewHeader()
	if err := proto.Unmarshal(body[:hdrLen], hdr); err != nil {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("bad %v header (%d bytes)", kind, hdrLen), Err: err}
	}
	if pb, ok := hdr.(*remuspb.PageBatch); ok && len(pb.Pfns) > r.lim.MaxBatchPages {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("PageBatch of %d pages exceeds limit %d", len(pb.Pfns), r.lim.MaxBatchPages)}
	}
	if dw, ok := hdr.(*remuspb.DiskWrites); ok && (len(dw.Kinds) > r.lim.MaxDiskBatchChanges || len(dw.Offsets) > r.lim.MaxDiskBatchChanges || len(dw.Lengths) > r.lim.MaxDiskBatchChanges) {
		return Frame{}, &FrameError{Kind: kind, Reason: fmt.Sprintf("DiskWrites of %d changes exceeds limit %d", max(len(dw.Kinds), len(dw.Offsets), len(dw.Lengths)), r.lim.MaxDiskBatchChanges)}
	}
	var payload []byte
	if payLen > 0 {
		payload = body[hdrLen:]
	}
	return Frame{Kind: kind, Header: hdr, Payload: payload}, nil
}

// readBody reads n bytes into the reused buffer, growing it in steps of at
// most 1 MiB as data actually arrives (a peer announcing a huge frame does
// not make us allocate it up front).
func (r *Reader) readBody(n int) ([]byte, int, error) {
	if cap(r.buf) >= n {
		b := r.buf[:n]
		got, err := r.full(b)
		return b, got, err
	}
	const step = 1 << 20
	b := r.buf[:0]
	for len(b) < n {
		k := min(n-len(b), step)
		b = slices.Grow(b, k)
		got, err := r.full(b[len(b) : len(b)+k])
		b = b[:len(b)+got]
		if err != nil {
			r.buf = b[:0]
			return b, len(b), err
		}
	}
	r.buf = b[:0]
	return b, n, nil
}

// ioErr classifies a read error: an unexpected EOF is a truncated (malformed)
// frame; anything else is an I/O error passed through.
func (r *Reader) ioErr(kind Kind, reason string, err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return &FrameError{Kind: kind, Reason: reason, Err: io.ErrUnexpectedEOF}
	}
	return fmt.Errorf("transport: read frame: %w", err)
}

// noEOF turns io.EOF (stream ended inside a frame) into io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// WithDefaults returns l with zero or negative fields replaced by their
// defaults, as a Reader applies them.
func (l Limits) WithDefaults() Limits { return l.withDefaults() }
