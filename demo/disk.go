package demo

import (
	"context"
	"fmt"
	"time"

	"github.com/remusd/remusd/daemon"
	"github.com/remusd/remusd/guestimage"
	"github.com/remusd/remusd/guestsvc"
	"github.com/remusd/remusd/netlab"
)

// diskProgress is the disk part of a progress line ("" without a disk).
func (q *qrun) diskProgress(st daemon.VMStatus) string {
	if q.logc == nil {
		return ""
	}
	return fmt.Sprintf("  disk: %d records, %d KiB sent", q.logc.Count(), st.DiskBytesSent>>10)
}

// checkDisk ends the disk client after its record in flight and checks,
// on the guest that now runs on the backup, that its log holds exactly
// the acknowledged records; then the guest freezes its file system and
// the backup's image must pass e2fsck and hold the same records.
func (q *qrun) checkDisk(ctx context.Context, res *QEMUResult) {
	if q.logc == nil {
		return
	}
	res.DiskMiB = q.o.diskMiB
	q.logc.Finish()
	select {
	case <-q.logDone:
	case <-time.After(time.Minute):
		res.DiskDetail = "the disk client did not finish its last record within a minute"
		return
	}
	ok, _, _, err := q.logc.State()
	res.DiskRecords = ok
	if err != nil && ctx.Err() == nil {
		res.DiskDetail = fmt.Sprintf("disk client: %v", err)
		return
	}
	m := q.logc.LogModel()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	conn, err := netlab.Dial(cctx, q.clientNS, netlab.GuestIP+":"+qemuPort)
	if err != nil {
		res.DiskDetail = fmt.Sprintf("cannot reach the guest to check its disk: %v", err)
		return
	}
	defer conn.Close()
	sum, err := guestsvc.SumAndFreeze(cctx, conn)
	if err != nil {
		res.DiskDetail = fmt.Sprintf("asking the guest for its log: %v", err)
		return
	}
	if want := m.Sum(); sum != want {
		res.DiskDetail = fmt.Sprintf("the guest's log reads %q, the client expected %q", sum, want)
		return
	}
	if err := guestimage.CheckDisk(cctx, q.diskB, m.Content()); err != nil {
		res.DiskDetail = err.Error()
		return
	}
	res.DiskIntact = true
	res.DiskDetail = fmt.Sprintf("all %d acknowledged records on the backup's disk, once each and in order; e2fsck clean", m.Records())
}
