package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/remusd/remusd/disk"
)

func reqBytes(typ, flags uint16, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 42)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// FuzzCheckRequest: whatever the header, a request the checker lets
// through lies within the export and the payload limit.
func FuzzCheckRequest(f *testing.F) {
	f.Add(reqBytes(cmdRead, 0, 0, 512), uint64(1<<20), uint32(1), false)
	f.Add(reqBytes(cmdWrite, cmdFlagFUA, 1<<20-512, 512), uint64(1<<20), uint32(512), false)
	f.Add(reqBytes(cmdWriteZeroes, cmdFlagNoHole, 0, 1<<30), uint64(1<<20), uint32(1), true)
	f.Add(reqBytes(cmdTrim, 0, ^uint64(0)-1, 2), uint64(1<<20), uint32(1), false)
	f.Add(reqBytes(cmdFlush, 0, 0, 0), uint64(0), uint32(1), false)
	f.Fuzz(func(t *testing.T, hdr []byte, size uint64, minBlock uint32, ro bool) {
		if len(hdr) != requestSize {
			if _, err := parseRequest(hdr); err == nil {
				t.Fatalf("parsed a header of %d bytes", len(hdr))
			}
			return
		}
		r, err := parseRequest(hdr)
		if err != nil {
			return
		}
		if minBlock == 0 || minBlock&(minBlock-1) != 0 || minBlock > 64<<10 {
			minBlock = 1
		}
		size = size &^ uint64(minBlock-1)
		l := limits{size: size, minBlock: minBlock, maxPayload: 32 << 20, readOnly: ro}
		v := l.check(r)
		if r.typ == cmdWrite && v.payload != r.length {
			t.Fatalf("write payload %d, length %d", v.payload, r.length)
		}
		if r.typ != cmdWrite && v.payload != 0 {
			t.Fatalf("payload %d for command %d", v.payload, r.typ)
		}
		if v.disconnect || v.errno != 0 || r.typ == cmdDisc {
			return
		}
		switch r.typ {
		case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
		case cmdFlush:
			if r.offset != 0 || r.length != 0 {
				t.Fatalf("flush with offset/length accepted")
			}
			return
		default:
			t.Fatalf("command %d accepted", r.typ)
		}
		if r.offset > size || uint64(r.length) > size-r.offset {
			t.Fatalf("out of range accepted: %+v size %d", r, size)
		}
		if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > l.maxPayload {
			t.Fatalf("payload over the maximum accepted: %+v", r)
		}
		if ro && r.typ != cmdRead {
			t.Fatalf("change accepted on a read-only export: %+v", r)
		}
		if r.offset%uint64(minBlock) != 0 || r.length%minBlock != 0 {
			t.Fatalf("unaligned accepted: %+v min %d", r, minBlock)
		}
	})
}

// FuzzParseGo: parsed option data re-encodes to the same bytes.
func FuzzParseGo(f *testing.F) {
	f.Add(goData("", infoBlockSize))
	f.Add(goData("vda", infoName, infoDescription, infoBlockSize))
	f.Add([]byte{0, 0, 0, 9, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		g, err := parseGo(data)
		if err != nil {
			return
		}
		if !bytes.Equal(goData(g.name, g.infos...), data) {
			t.Fatalf("%x re-encodes as %x", data, goData(g.name, g.infos...))
		}
	})
}

// handshakeGo is what a client sends to reach transmission.
func handshakeGo() []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
	d := goData("", infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
	return append(b, d...)
}

// FuzzServeConn feeds arbitrary client streams to a connection: it must
// end without panicking or hanging, and every observed change must lie
// within the export.
func FuzzServeConn(f *testing.F) {
	const size = 64 << 10
	hs := handshakeGo()
	seq := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	f.Add(hs)
	f.Add(seq(hs, reqBytes(cmdWrite, 0, 0, 8), []byte("abcdefgh"), reqBytes(cmdRead, 0, 0, 8), reqBytes(cmdDisc, 0, 0, 0)))
	f.Add(seq(hs, reqBytes(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 100, 1000), reqBytes(cmdTrim, 0, 0, size), reqBytes(cmdFlush, 0, 0, 0)))
	f.Add(seq(hs, reqBytes(cmdWrite, 0, size-4, 8), []byte("overflow")))
	f.Add(seq(hs, reqBytes(cmdWrite, 0, 0, 1<<30)))
	f.Add(seq(binary.BigEndian.AppendUint32(nil, 1), binary.BigEndian.AppendUint64(nil, magicIHaveOpt), []byte{0, 0, 0, optList, 0, 0, 0, 0}))
	f.Add(seq(binary.BigEndian.AppendUint32(nil, 1), binary.BigEndian.AppendUint64(nil, magicIHaveOpt), []byte{0, 0, 0, optExportName, 0, 0, 0, 0}, reqBytes(cmdRead, 0, 0, 1)))
	f.Add(seq(binary.BigEndian.AppendUint32(nil, 1), binary.BigEndian.AppendUint64(nil, magicIHaveOpt), []byte{0, 0, 0, 99, 0xff, 0xff, 0xff, 0xff}))
	f.Fuzz(func(t *testing.T, stream []byte) {
		mem := disk.NewMemory(size)
		var bad error
		obs := disk.ObserverFunc(func(_ context.Context, c disk.Change) error {
			if c.Kind != disk.KindFlush && !disk.CheckRange(c.Offset, c.Length, size) {
				bad = io.ErrUnexpectedEOF
			}
			if c.Kind == disk.KindWrite && int64(len(c.Data)) != c.Length {
				bad = io.ErrShortBuffer
			}
			return nil
		})
		srv, err := New(Config{MaxPayload: 1 << 20, MaxInFlightBytes: 2 << 20, HandshakeTimeout: time.Second, ShutdownGrace: time.Second}, mem, obs, nil)
		if err != nil {
			t.Fatal(err)
		}
		client, server := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- srv.ServeConn(context.Background(), server) }()
		go io.Copy(io.Discard, client)
		client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		client.Write(stream)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("connection did not end")
		}
		if bad != nil {
			t.Fatalf("observed an invalid change: %v", bad)
		}
	})
}
