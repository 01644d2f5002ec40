package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol constants, from NetworkBlockDevice/nbd doc/proto.md.
const (
	magicNBD       = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt  = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  = 0x3e889045565a9
	magicRequest   = 0x25609513
	magicSimpleRep = 0x67446698

	// handshake flags (server) and client flags
	flagFixedNewstyle   = 1 << 0
	flagNoZeroes        = 1 << 1
	clientFixedNewstyle = 1 << 0
	clientNoZeroes      = 1 << 1

	// transmission flags
	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendFUA      = 1 << 3
	tflagSendTrim     = 1 << 5
	tflagWriteZeroes  = 1 << 6
	tflagCanMultiConn = 1 << 8

	// options
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8

	// option replies
	repAck          = 1
	repServer       = 2
	repInfo         = 3
	repErrUnsup     = 1<<31 + 1
	repErrPolicy    = 1<<31 + 2
	repErrInvalid   = 1<<31 + 3
	repErrUnknown   = 1<<31 + 6
	repErrShutdown  = 1<<31 + 7
	repErrBlockSize = 1<<31 + 8
	repErrTooBig    = 1<<31 + 9

	// NBD_INFO types
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3

	// commands
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6

	// command flags
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagFastZero = 1 << 4

	// errors
	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errShutdown = 108

	// maxString is the spec's bound on export names and other strings.
	maxString = 4096
	// requestSize is the size of a (compact) request header.
	requestSize = 28
	// optHeaderSize is the size of an option header (magic, option, length).
	optHeaderSize = 16
)

// errProtocol marks a violation after which the stream cannot be trusted:
// the server initiates a hard disconnect.
var errProtocol = errors.New("nbd: protocol violation")

// request is a transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// parseRequest decodes a request header; a wrong magic is a protocol
// violation.
func parseRequest(b []byte) (request, error) {
	if len(b) != requestSize {
		return request{}, fmt.Errorf("%w: request header of %d bytes", errProtocol, len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("%w: request magic %#x", errProtocol, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		cookie: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// limits are what a request is checked against.
type limits struct {
	size       uint64 // export size
	minBlock   uint32 // power of two; 1 = no alignment
	maxPayload uint32
	readOnly   bool
}

// verdict is the outcome of checking a request before anything is
// allocated or touched for it.
type verdict struct {
	errno uint32 // 0: carry it out; else reply with this error
	// payload is the number of bytes that follow the header on the wire
	// (WRITE only) and must be read (or discarded) whatever errno is.
	payload uint32
	// disconnect: hard disconnect instead of replying (a WRITE whose
	// payload exceeds the maximum: the spec's denial-of-service clause).
	disconnect bool
}

// check validates r against l. It never allocates.
func (l limits) check(r request) verdict {
	v := verdict{}
	if r.typ == cmdWrite {
		v.payload = r.length
		if r.length > l.maxPayload {
			v.disconnect = true
			return v
		}
	}
	allowed := uint16(cmdFlagFUA) // valid on every command once SEND_FUA is advertised
	switch r.typ {
	case cmdRead, cmdWrite, cmdTrim:
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
	case cmdFlush:
		if r.offset != 0 || r.length != 0 {
			v.errno = errInval
			return v
		}
	case cmdDisc:
		return v
	default: // CACHE, BLOCK_STATUS (not advertised), unknown
		v.errno = errInval
		return v
	}
	if r.flags&^allowed != 0 {
		v.errno = errInval
		return v
	}
	if r.typ == cmdFlush {
		return v
	}
	if r.typ == cmdRead && r.length > l.maxPayload {
		v.errno = errInval // a simple reply cannot carry it
		return v
	}
	if l.readOnly && r.typ != cmdRead {
		v.errno = errPerm
		return v
	}
	if m := uint64(l.minBlock); m > 1 && (r.offset%m != 0 || uint64(r.length)%m != 0) {
		v.errno = errInval
		return v
	}
	if r.offset > l.size || uint64(r.length) > l.size-r.offset {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			v.errno = errNoSpc
		} else {
			v.errno = errInval
		}
		return v
	}
	return v
}

// goRequest is the data of NBD_OPT_INFO / NBD_OPT_GO.
type goRequest struct {
	name  string
	infos []uint16
}

// errInvalidOption means the option's data is malformed: reply
// NBD_REP_ERR_INVALID.
var errInvalidOption = errors.New("nbd: invalid option data")

// parseGo decodes NBD_OPT_INFO / NBD_OPT_GO data: 32-bit name length, name,
// 16-bit count, count 16-bit info types; the lengths must add up exactly.
func parseGo(data []byte) (goRequest, error) {
	if len(data) < 6 {
		return goRequest{}, fmt.Errorf("%w: %d bytes", errInvalidOption, len(data))
	}
	n := binary.BigEndian.Uint32(data[0:4])
	if uint64(n) > uint64(len(data)-6) || n > maxString {
		return goRequest{}, fmt.Errorf("%w: name length %d in %d bytes", errInvalidOption, n, len(data))
	}
	name := data[4 : 4+n]
	rest := data[4+n:]
	count := int(binary.BigEndian.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*count {
		return goRequest{}, fmt.Errorf("%w: %d info requests in %d bytes", errInvalidOption, count, len(rest))
	}
	if err := checkString(name); err != nil {
		return goRequest{}, err
	}
	g := goRequest{name: string(name), infos: make([]uint16, count)}
	for i := range count {
		g.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return g, nil
}

// checkString applies the spec's rule for strings: no NUL, at most 4096
// bytes.
func checkString(b []byte) error {
	if len(b) > maxString {
		return fmt.Errorf("%w: string of %d bytes", errInvalidOption, len(b))
	}
	for _, c := range b {
		if c == 0 {
			return fmt.Errorf("%w: NUL in string", errInvalidOption)
		}
	}
	return nil
}

// appendOptReply appends an option reply header and data.
func appendOptReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// appendSimpleReply appends a simple reply header.
func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimpleRep)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}
