package checkpoint

import (
	"context"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/disk"
	"github.com/remusd/remusd/hypervisor"
	remuspb "github.com/remusd/remusd/proto"
	"github.com/remusd/remusd/transport"
)

// Disks on the primary (issue 11, Remus's "protocol D").
//
// Every protected disk's journal is cut at every checkpoint while the
// guest is paused (BeginPause before Pause, Cut after it). A cut is never
// lost: if the capture fails after it (or the pause fails: the journal is
// cut anyway), it waits in pending and the next captured epoch carries it
// before its own. Each captured epoch keeps what it carried (diskHeld)
// until the backup acknowledges it; a full or resync epoch carries, in
// order, the cuts of every unacknowledged epoch it supersedes and keeps
// them folded into its own record, as it does with dirty pages.
//
// A cut is either the journal's changes (with their data) or, when the
// journal was in tracking mode, a list of dirty blocks, which the capture
// reads from the image while the guest is paused and sends as writes
// (blocks that read back as zeroes as zero changes, so that the replica
// stays sparse). Held cuts keep only extents once the journal switched to
// tracking mode (it stopped accounting for their data), so the data held
// is at most the journals' Limit + overdraft.
//
// When the backup's disks are not known to equal the primary's at its
// committed epoch (a new protection, a replica without this protection,
// or a primary that started or restarted with the guest running), the
// link copies every image while the guest runs (DiskSync records, before
// the first epoch), with its journal tracking from the copy's start: the
// next epoch carries every block changed since, read while paused, so the
// changes made during the copy apply after the copied data, with no gap.
// Cuts taken before the copy began are dropped (the copy supersedes them).

// diskCut is one journal cut of one disk (its Copies says which copy of
// the image it follows: a cut older than the last copy is superseded).
type diskCut struct{ ep disk.Epoch }

// diskRecord is what one captured epoch carried, per disk, in order.
type diskRecord struct {
	epoch uint64
	cuts  [][]diskCut // [disk][cut]
}

// stagedDisk is one disk's changes in a staged epoch, in order. Data of
// writes is owned by the journal's cut or by reads of the image.
type stagedDisk struct {
	id      string
	changes []disk.Change
	bytes   int64
}

// diskState is the primary's disk engine state (engine goroutine, except
// unknown, copyEnc and the journals' own locking).
type diskState struct {
	disks   []hypervisor.Disk
	held    []diskRecord // ascending epochs, unacked
	pending [][]diskCut  // [disk]: cut, not captured yet
	tracks  []uint64     // [disk]: journal.Tracks() when last converted
	// released[d] is the last journal epoch released on disk d.
	released []uint64
}

// guestDisks returns the guest's protected disks, validated.
func guestDisks(g hypervisor.Guest) ([]hypervisor.Disk, error) {
	dg, ok := g.(hypervisor.DiskGuest)
	if !ok {
		return nil, nil
	}
	disks := dg.Disks()
	seen := map[string]bool{}
	for _, d := range disks {
		if err := hypervisor.ValidateVMName(d.ID); err != nil {
			return nil, fmt.Errorf("disk %q: %w", d.ID, err)
		}
		if seen[d.ID] {
			return nil, fmt.Errorf("disk %q listed twice", d.ID)
		}
		seen[d.ID] = true
		if d.Image == nil || d.Journal == nil {
			return nil, fmt.Errorf("disk %q has no image or no journal", d.ID)
		}
	}
	return disks, nil
}

func newDiskState(disks []hypervisor.Disk) *diskState {
	s := &diskState{
		disks:    disks,
		pending:  make([][]diskCut, len(disks)),
		tracks:   make([]uint64, len(disks)),
		released: make([]uint64, len(disks)),
	}
	for i, d := range disks {
		// The engine's first act: until a backup holds the disks, the
		// journals record dirty blocks only and never block the guest.
		d.Journal.Track()
		s.tracks[i] = d.Journal.Tracks()
	}
	return s
}

// hello lists the disks for the backup's check.
func (s *diskState) hello() []*remuspb.DiskInfo {
	var out []*remuspb.DiskInfo
	for _, d := range s.disks {
		out = append(out, &remuspb.DiskInfo{Id: d.ID, Size: uint64(d.Image.Size())})
	}
	return out
}

// beginPause is called before the guest is paused.
func (s *diskState) beginPause() {
	for _, d := range s.disks {
		d.Journal.BeginPause()
	}
}

// cut takes every journal's cut into pending (after the pause, or after a
// failed pause: then the next epoch carries it).
func (s *diskState) cut() {
	for i, d := range s.disks {
		s.pending[i] = append(s.pending[i], diskCut{ep: d.Journal.Cut()})
	}
}

// convert replaces the data of held and pending cuts of disks whose
// journal switched to tracking mode since the last look by the extents
// they touched: the journal no longer accounts for that data.
func (s *diskState) convert() {
	for i, d := range s.disks {
		t := d.Journal.Tracks()
		if t == s.tracks[i] {
			continue
		}
		s.tracks[i] = t
		conv := func(c *diskCut) {
			if c.ep.Tracked {
				return
			}
			var ext []disk.Extent
			for _, ch := range c.ep.Changes {
				if ch.Kind == disk.KindFlush || ch.Length <= 0 {
					continue
				}
				ext = append(ext, disk.Extent{Offset: ch.Offset, Length: ch.Length})
			}
			c.ep = disk.Epoch{Number: c.ep.Number, Tracked: true, Dirty: ext, Copies: c.ep.Copies}
		}
		for r := range s.held {
			for k := range s.held[r].cuts[i] {
				conv(&s.held[r].cuts[i][k])
			}
		}
		for k := range s.pending[i] {
			conv(&s.pending[i][k])
		}
	}
}

// build assembles, with the guest paused, the disk changes epoch carries:
// when fold, every held cut first (a full or resync epoch), then the
// pending cuts; cuts older than the disk's last copy are dropped. It
// records what it carried as the epoch's held record and returns the
// staged changes. Tracked extents are read from the images now.
func (s *diskState) build(ctx context.Context, epoch uint64, fold bool) ([]stagedDisk, error) {
	s.convert()
	rec := diskRecord{epoch: epoch, cuts: make([][]diskCut, len(s.disks))}
	out := make([]stagedDisk, len(s.disks))
	for i, d := range s.disks {
		gen := d.Journal.Copies()
		var cuts []diskCut
		if fold {
			for _, h := range s.held {
				cuts = append(cuts, h.cuts[i]...)
			}
		}
		cuts = append(cuts, s.pending[i]...)
		kept := cuts[:0:0]
		for _, c := range cuts {
			if c.ep.Copies >= gen {
				kept = append(kept, c)
			}
		}
		sd := stagedDisk{id: d.ID}
		for _, c := range kept {
			if !c.ep.Tracked {
				for _, ch := range c.ep.Changes {
					sd.changes = append(sd.changes, ch)
					sd.bytes += int64(len(ch.Data))
				}
				continue
			}
			var err error
			if sd.changes, sd.bytes, err = readExtents(ctx, d.Image, c.ep.Dirty, sd.changes, sd.bytes); err != nil {
				return nil, fmt.Errorf("disk %s: read dirty blocks: %w", d.ID, err)
			}
		}
		rec.cuts[i] = kept
		out[i] = sd
	}
	if fold {
		s.held = s.held[:0]
	}
	for i := range s.pending {
		s.pending[i] = nil
	}
	s.held = append(s.held, rec)
	return out, nil
}

// estimate is about how much write data, and how many changes, the next
// epoch would carry
// (built with fold): journaled data plus every tracked block, held and
// pending cuts and the journals' open epochs (the guest runs: writes
// after this estimate add to it).
func (s *diskState) estimate(fold bool) (bytes, changes int64) {
	s.convert()
	var n, k int64
	add := func(c diskCut, gen uint64) {
		if c.ep.Copies < gen {
			return
		}
		for _, ch := range c.ep.Changes {
			n += int64(len(ch.Data))
		}
		k += int64(len(c.ep.Changes))
		for _, e := range c.ep.Dirty {
			n += e.Length
			k += (e.Length + disk.TrackBlock - 1) / disk.TrackBlock
		}
	}
	for i, d := range s.disks {
		gen := d.Journal.Copies()
		if fold {
			for _, h := range s.held {
				for _, c := range h.cuts[i] {
					add(c, gen)
				}
			}
		}
		for _, c := range s.pending[i] {
			add(c, gen)
		}
		st := d.Journal.Stats()
		n += st.OpenBytes + int64(st.DirtyBlocks)*disk.TrackBlock
		k += st.OpenBytes/disk.ChangeOverhead + int64(st.DirtyBlocks)
	}
	return n, k
}

// readExtents appends the content of ext (clamped to the image) as
// changes: zero blocks as zero changes (no NO_HOLE: the replica may punch
// them), others as writes.
func readExtents(ctx context.Context, img disk.Backend, ext []disk.Extent, out []disk.Change, total int64) ([]disk.Change, int64, error) {
	size := img.Size()
	for _, e := range ext {
		lo, hi := max(e.Offset, 0), min(e.Offset+e.Length, size)
		for off := lo; off < hi; off += disk.TrackBlock {
			n := min(int64(disk.TrackBlock), hi-off)
			b := make([]byte, n)
			if err := img.ReadAt(ctx, b, off); err != nil {
				return out, total, err
			}
			out, total = appendBlock(out, total, b, off)
		}
	}
	return out, total, nil
}

// appendBlock appends block b (read at off) as a write, or as a zero
// change merged with a preceding adjacent one.
func appendBlock(out []disk.Change, total int64, b []byte, off int64) ([]disk.Change, int64) {
	if allZero(b) {
		if n := len(out); n > 0 && out[n-1].Kind == disk.KindZero && out[n-1].Offset+out[n-1].Length == off {
			out[n-1].Length += int64(len(b))
			return out, total
		}
		return append(out, disk.Change{Kind: disk.KindZero, Offset: off, Length: int64(len(b))}), total
	}
	return append(out, disk.Change{Kind: disk.KindWrite, Offset: off, Length: int64(len(b)), Data: b}), total + int64(len(b))
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// dropFailed forgets the held record of an epoch whose capture failed
// after build: its cuts go back to pending, before any newer cut.
func (s *diskState) dropFailed(epoch uint64) {
	n := len(s.held)
	if n == 0 || s.held[n-1].epoch != epoch {
		return
	}
	rec := s.held[n-1]
	s.held = s.held[:n-1]
	for i := range s.pending {
		s.pending[i] = append(rec.cuts[i], s.pending[i]...)
	}
}

// ack drops the records of epochs up to epoch and releases their journal
// epochs.
func (s *diskState) ack(epoch uint64) {
	k := 0
	rel := make([]uint64, len(s.disks))
	for ; k < len(s.held) && s.held[k].epoch <= epoch; k++ {
		for i, cuts := range s.held[k].cuts {
			for _, c := range cuts {
				rel[i] = max(rel[i], c.ep.Number)
			}
		}
	}
	s.held = append(s.held[:0], s.held[k:]...)
	for i, d := range s.disks {
		if rel[i] > s.released[i] {
			s.released[i] = rel[i]
			d.Journal.Release(rel[i])
		}
	}
}

// spill makes the journals switch to tracking mode rather than wait
// while the backup is away (on), or wait for acks again (off).
func (s *diskState) spill(on bool) {
	for _, d := range s.disks {
		d.Journal.SetSpill(on)
	}
	if on {
		s.convert()
	}
}

// track switches every journal to tracking mode now (running
// unprotected: nothing will be acknowledged).
func (s *diskState) track() {
	for _, d := range s.disks {
		d.Journal.Track()
	}
	s.convert()
}

// copyChunk is how much of an image the copy reads at a time.
const copyChunk = 1 << 20

// maxCopyPasses bounds the passes over blocks dirtied during a copy.
const maxCopyPasses = 8

// copyDisks streams every image to the backup while the guest runs
// (DiskSync records), each journal tracking from the copy's start; then,
// as live migration does, it copies again the blocks dirtied meanwhile,
// pass after pass, until what is left fits a quarter of an epoch's disk
// budget (or maxCopyPasses): the first epoch reads the rest while the
// guest is paused. It runs on the link goroutine before the link is
// handed to the engine.
func (p *Primary) copyDisks(ctx context.Context, conn net.Conn, w *transport.Writer) error {
	s := p.disks
	enc := transport.NewDiskEncoder(p.o.Limits)
	start := time.Now()
	var copied int64
	idx := make([]uint32, len(s.disks))
	send := func(i int, changes []disk.Change) error {
		d := s.disks[i]
		st, err := enc.Encode(0, d.ID, idx[i], changes, func(hdr *remuspb.DiskWrites, payload []byte) error {
			_ = conn.SetWriteDeadline(time.Now().Add(p.o.HeartbeatTimeout))
			return w.WriteFrame(transport.KindDiskSync, hdr, payload)
		})
		if err != nil {
			return fmt.Errorf("copy disk %s: %w", d.ID, err)
		}
		idx[i] += uint32(len(changes))
		copied += st.RawBytes
		p.update(func(s *PrimaryStats) { s.DiskBytesCopied += uint64(st.RawBytes) })
		return ctx.Err()
	}
	// Progress for status and the log: image space covered (holes
	// included) of the images' total, logged at every tenth.
	var total, base int64
	for _, d := range s.disks {
		total += d.Image.Size()
	}
	p.update(func(s *PrimaryStats) { s.DiskCopying, s.DiskCopyDone, s.DiskCopyTotal = true, 0, uint64(total) })
	defer p.update(func(s *PrimaryStats) { s.DiskCopying = false })
	tenth := int64(0)
	progress := func(off int64) {
		done := base + off
		p.update(func(s *PrimaryStats) { s.DiskCopyDone = uint64(done) })
		if total > 0 && done*10/total > tenth {
			tenth = done * 10 / total
			p.log.Info("copying the disks to the backup", zap.Int64("done_bytes", done), zap.Int64("total_bytes", total),
				zap.Int64("percent", done*100/total), zap.Int64("data_bytes_sent", copied), zap.Duration("elapsed", time.Since(start)))
		}
	}
	buf := make([]byte, copyChunk)
	for i, d := range s.disks {
		d.Journal.StartCopy()
		size := d.Image.Size()
		// A sparse image says where its data is: holes travel as zero
		// changes without being read.
		finder, _ := d.Image.(disk.DataFinder)
		for off := int64(0); off < size; {
			end := size
			if finder != nil {
				start, dend, ok, err := finder.NextData(ctx, off)
				if err != nil {
					return fmt.Errorf("copy disk %s: %w", d.ID, err)
				}
				if !ok {
					start, dend = size, size
				}
				if start > off {
					if err := send(i, []disk.Change{{Kind: disk.KindZero, Offset: off, Length: start - off}}); err != nil {
						return err
					}
					off = start
				}
				end = dend
			}
			for ; off < end; off += copyChunk {
				n := min(int64(copyChunk), end-off)
				chunk := buf[:n]
				if err := d.Image.ReadAt(ctx, chunk, off); err != nil {
					return fmt.Errorf("copy disk %s: read at %d: %w", d.ID, off, err)
				}
				var changes []disk.Change
				for b := int64(0); b < n; b += disk.TrackBlock {
					changes, _ = appendBlock(changes, 0, chunk[b:min(b+disk.TrackBlock, n)], off+b)
				}
				if err := send(i, changes); err != nil {
					return err
				}
				progress(off + n)
			}
			off = end
			progress(off)
		}
		base += size
	}
	budget := p.o.Limits.WithDefaults().MaxEpochDiskBytes / 4
	passes := 0
	for ; passes < maxCopyPasses; passes++ {
		var dirty int64
		for _, d := range s.disks {
			dirty += int64(d.Journal.Stats().DirtyBlocks) * disk.TrackBlock
		}
		if dirty <= budget {
			break
		}
		for i, d := range s.disks {
			ext := d.Journal.TakeDirty()
			for _, e := range ext {
				changes, _, err := readExtents(ctx, d.Image, []disk.Extent{e}, nil, 0)
				if err != nil {
					return fmt.Errorf("copy disk %s: %w", d.ID, err)
				}
				if err := send(i, changes); err != nil {
					return err
				}
			}
		}
	}
	_ = conn.SetWriteDeadline(time.Time{})
	took := time.Since(start)
	p.update(func(s *PrimaryStats) { s.DiskCopy = took })
	p.log.Info("copied the disks to the backup while the guest ran", zap.Int("disks", len(s.disks)), zap.Int64("data_bytes", copied),
		zap.Int("passes", passes), zap.Duration("took", took))
	return nil
}
