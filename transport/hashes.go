package transport

import (
	"encoding/binary"
	"fmt"

	remuspb "github.com/remusd/remusd/proto"
)

// ReplicaHashesPerFrame is how many page hashes one ReplicaHashes record
// carries at most (128 KiB of payload).
const ReplicaHashesPerFrame = 16384

// WriteReplicaHashes sends the PageHash of every page of mem (a replica's
// memory) as ReplicaHashes records, in pfn order.
func WriteReplicaHashes(w *Writer, mem []byte, pageSize int) error {
	pages := len(mem) / pageSize
	buf := make([]byte, 0, 8*min(pages, ReplicaHashesPerFrame))
	for first := 0; first < pages; first += ReplicaHashesPerFrame {
		n := min(ReplicaHashesPerFrame, pages-first)
		buf = buf[:0]
		for p := first; p < first+n; p++ {
			buf = binary.LittleEndian.AppendUint64(buf, PageHash(mem[p*pageSize:(p+1)*pageSize]))
		}
		if err := w.WriteFrame(KindReplicaHashes, &remuspb.ReplicaHashes{FirstPfn: uint64(first), Count: uint32(n)}, buf); err != nil {
			return fmt.Errorf("send replica hashes at pfn %d: %w", first, err)
		}
	}
	return nil
}

// ReadReplicaHashes reads the ReplicaHashes records that cover numPages
// pages into dst (which must have numPages entries). Every record is
// checked: it must continue where the previous one ended, carry at most
// ReplicaHashesPerFrame hashes, stay within numPages and hold exactly
// 8 bytes per hash; anything else wraps ErrMalformed.
func ReadReplicaHashes(r *Reader, dst []uint64) error {
	numPages := len(dst)
	for next := 0; next < numPages; {
		f, err := r.ReadFrame()
		if err != nil {
			return fmt.Errorf("read replica hashes at pfn %d: %w", next, err)
		}
		h, ok := f.Header.(*remuspb.ReplicaHashes)
		if !ok {
			return &FrameError{Kind: f.Kind, Reason: fmt.Sprintf("expected ReplicaHashes at pfn %d, got %v", next, f.Kind)}
		}
		switch {
		case h.FirstPfn != uint64(next):
			return &FrameError{Kind: f.Kind, Reason: fmt.Sprintf("replica hashes start at pfn %d, expected %d", h.FirstPfn, next)}
		case h.Count == 0 || h.Count > ReplicaHashesPerFrame:
			return &FrameError{Kind: f.Kind, Reason: fmt.Sprintf("replica hashes record of %d hashes (limit %d)", h.Count, ReplicaHashesPerFrame)}
		case uint64(h.Count) > uint64(numPages-next):
			return &FrameError{Kind: f.Kind, Reason: fmt.Sprintf("replica hashes run past the guest's %d pages", numPages)}
		case len(f.Payload) != 8*int(h.Count):
			return &FrameError{Kind: f.Kind, Reason: fmt.Sprintf("replica hashes payload of %d bytes for %d hashes", len(f.Payload), h.Count)}
		}
		for i := 0; i < int(h.Count); i++ {
			dst[next+i] = binary.LittleEndian.Uint64(f.Payload[8*i:])
		}
		next += int(h.Count)
	}
	return nil
}
