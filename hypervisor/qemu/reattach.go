package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"

	"go.uber.org/zap"

	"github.com/remusd/remusd/internal/peercred"
)

// Reattach drives a QEMU that an earlier remusd launched (Launch, or a
// replica's standby that Activate turned into the running guest) and left
// running when it stopped or died: QEMU does not depend on the process
// that started it (see startProcess), so a restarted daemon picks its
// guests up again from what it recorded about them.
//
// spec is the spec the QEMU was launched with, host-local paths included
// (QMPPath, RAMPath, SerialPath, LogPath; the restarted daemon rebuilds it
// from its configuration or its records). pid is the process id the
// earlier Guest.Pid reported; 0 takes it from the QMP socket. Reattach
// refuses the QEMU if the process serving spec.QMPPath is not pid, if
// QEMU's name (query-name) is not spec.Name, or if the RAM file is not
// spec.MemoryMiB.
//
// The returned guest is remusd's own, as a launched one: Pid reports pid,
// Close quits QEMU (QMP quit; SIGKILL through a pidfd, which cannot reach
// a recycled pid, if it has not exited within a few seconds) and removes
// the QMP socket and the RAM file; Detach leaves QEMU running, for the
// next restart. Its run state is QEMU's (Paused: a daemon that died in
// the middle of an epoch leaves the guest paused). Dirty tracking starts
// afresh: the next HarvestDirty reports every page, unless Rebaseline
// runs first. log may be nil.
func Reattach(ctx context.Context, spec Spec, pid int, log *zap.Logger) (*Guest, error) {
	return ReattachWithDisks(ctx, spec, pid, DiskOptions{}, log)
}

// ReattachWithDisks is Reattach with the options of spec.Disks' servers
// (the journal bound the daemon is configured with).
func ReattachWithDisks(ctx context.Context, spec Spec, pid int, dopts DiskOptions, log *zap.Logger) (*Guest, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	if pid < 0 {
		return nil, fmt.Errorf("qemu: reattach %q: pid %d", spec.Name, pid)
	}
	fail := func(err error) error { return fmt.Errorf("qemu: reattach %q: %w", spec.Name, err) }
	q, err := DialQMP(ctx, spec.QMPPath)
	if err != nil {
		return nil, fail(err)
	}
	ok := false
	defer func() {
		if !ok {
			q.Close()
		}
	}()
	peer, err := q.peerPid()
	if err != nil {
		return nil, fail(err)
	}
	if pid == 0 {
		pid = peer
	} else if peer != pid {
		return nil, fail(fmt.Errorf("QMP socket %s is served by pid %d, not %d", spec.QMPPath, peer, pid))
	}
	p, err := adoptProcess(pid, spec.LogFile())
	if err != nil {
		return nil, fail(err)
	}
	defer func() {
		if !ok {
			p.release()
		}
	}()
	// QEMU answering now, after the pidfd was opened, proves that the
	// pidfd names the QMP server and not a process that recycled its pid.
	var name struct {
		Name string `json:"name"`
	}
	if err := q.Execute(ctx, "query-name", nil, &name); err != nil {
		return nil, fail(err)
	}
	if name.Name != spec.Name {
		return nil, fail(fmt.Errorf("QEMU pid %d on %s is VM %q", pid, spec.QMPPath, name.Name))
	}
	ram, err := mapRAM(spec.RAMPath, spec.MemoryBytes(), false)
	if err != nil {
		return nil, fail(err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	// Serve the disks again: QEMU's NBD client has been retrying
	// (reconnect-delay) since the previous daemon went away.
	dopts.Create = false
	disks, err := startDisks(spec, dopts, log)
	if err != nil {
		ram.unmap()
		return nil, fail(err)
	}
	g, err := newGuest(ctx, spec, q, ram, p, log)
	if err != nil {
		disks.close()
		ram.unmap()
		return nil, fail(err)
	}
	ok = true
	g.disks = disks
	g.removeRAM = true
	g.log.Info("qemu guest re-attached", zap.Int("pid", pid), zap.String("version", g.version), zap.Bool("paused", g.paused))
	return g, nil
}

// peerPid returns the process id of the QMP server (SO_PEERCRED of the
// unix socket: the process that listens on it).
func (q *QMP) peerPid() (int, error) {
	uc, ok := q.conn.(*net.UnixConn)
	if !ok {
		return 0, errors.New("QMP connection is not a unix socket")
	}
	cred, err := peercred.Of(uc)
	if err != nil {
		return 0, fmt.Errorf("QMP %w", err)
	}
	if cred.Pid <= 0 {
		return 0, errors.New("QMP peer credentials carry no pid")
	}
	return int(cred.Pid), nil
}
