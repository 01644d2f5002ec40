// Package disk is the block seam of a protected guest: a Backend holds the
// guest's disk image, and an Observer sees every change made to it, in the
// order the changes were applied, so that the checkpoint engine can put the
// writes of epoch N into epoch N's stream (Remus's "protocol D", issue 11).
//
// The guest reaches the Backend through a server that remusd controls on
// the primary (disk/nbd); QEMU's own block layer is the client.
//
// # Capture and epochs
//
// A server calls Observer.Observe after a change has been applied to the
// Backend and before it replies to the guest. Changes are serialised: the
// Backend call and the Observe call of one change happen under one lock, so
// the observer sees changes in exactly the order the image received them.
// Because QEMU drains every in-flight request when it stops the guest
// (vm_stop → bdrv_drain_all), every write whose completion the guest can
// have seen when it is paused for epoch N has been observed before the
// checkpoint of epoch N is cut.
//
// # Backpressure
//
// Observe may block: an observer whose bounded buffer is full simply does
// not return until space is free, which withholds the reply and stalls the
// guest's I/O (it does not fail it). Blocking must never wait for the cut
// of the open epoch, though: stopping the guest waits for the requests in
// flight, so a write blocked until the next checkpoint would deadlock the
// checkpoint. Journal implements the rule: it blocks only until acknowledged
// epochs free space, and while the engine pauses the guest (BeginPause …
// Cut) it admits an overdraft sized for what QEMU can have in flight.
//
// The NBD server applies one connection's changes in the order they
// arrive, on the connection's reader: an observer that blocks stops that
// connection from reading further requests.
package disk

import (
	"context"
	"errors"
	"fmt"
)

// Backend is a disk image of a fixed size. Offsets and lengths passed to it
// have been checked by the caller: 0 <= off, off+len <= Size().
type Backend interface {
	// Size is the image size in bytes; it does not change.
	Size() int64
	// ReadAt fills p from off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off (not necessarily durable until Flush).
	WriteAt(ctx context.Context, p []byte, off int64) error
	// Trim discards [off, off+length): afterwards the range reads back as
	// zeroes (implementations that cannot discard write zeroes), so that a
	// replica that applies the same trim stays identical.
	Trim(ctx context.Context, off, length int64) error
	// WriteZeroes zeroes [off, off+length). With noHole the range stays
	// allocated; without it the range may become a hole.
	WriteZeroes(ctx context.Context, off, length int64, noHole bool) error
	// Flush returns when every change that completed before the call is
	// durable (fdatasync or equivalent).
	Flush(ctx context.Context) error
	// Close releases the image.
	Close() error
}

// DataFinder is implemented by Backends that know where their data is
// (a sparse file): a copy of the image skips the rest, which reads as
// zeroes.
type DataFinder interface {
	// NextData returns the first extent [start, end) at or after off that
	// may hold data (ok false: none up to the end of the image). What
	// lies between off and start reads as zeroes.
	NextData(ctx context.Context, off int64) (start, end int64, ok bool, err error)
}

// Kind is the kind of a Change.
type Kind uint8

// Kinds of Change.
const (
	KindWrite Kind = iota + 1 // Data written at Offset
	KindTrim                  // [Offset, Offset+Length) discarded (reads back as zeroes)
	KindZero                  // [Offset, Offset+Length) zeroed
	KindFlush                 // every change observed before it is durable on the image
)

func (k Kind) String() string {
	switch k {
	case KindWrite:
		return "write"
	case KindTrim:
		return "trim"
	case KindZero:
		return "zero"
	case KindFlush:
		return "flush"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Change is one completed change of the image.
type Change struct {
	Kind   Kind
	Offset int64
	Length int64
	// Data is what KindWrite wrote (len(Data) == Length). It aliases the
	// server's request buffer and is valid only during Observe: an observer
	// that keeps it must copy it.
	Data []byte
	// FUA: the guest asked for this change to be durable before its reply.
	// The server flushes the Backend after Observe returns.
	FUA bool
	// NoHole (KindZero): the guest asked that the range stay allocated.
	NoHole bool
}

// Observer receives the changes of an image in the order they were applied.
type Observer interface {
	// Observe is called after c was applied to the Backend and before the
	// guest is told. It may block to apply backpressure (see the package
	// documentation); ctx ends when the server stops (not when the client
	// goes away: the change is on the image and must still be observed).
	// An error fails the request with EIO: the change is on the local image
	// but the observer does not have it, so protection must treat it as
	// broken.
	Observe(ctx context.Context, c Change) error
}

// ObserverFunc adapts a function to Observer.
type ObserverFunc func(ctx context.Context, c Change) error

// Observe calls f.
func (f ObserverFunc) Observe(ctx context.Context, c Change) error { return f(ctx, c) }

// ErrClosed is returned by a Backend used after Close.
var ErrClosed = errors.New("disk: closed")

// CheckRange reports whether [off, off+length) lies within size, without
// overflow.
func CheckRange(off, length, size int64) bool {
	return off >= 0 && length >= 0 && off <= size && length <= size-off
}
