package daemon

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/remusd/remusd/hypervisor/sim"
)

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("daemon: marshal %T: %v", v, err))
	}
	return b
}

func unmarshalStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

// SimState is what the audit log records of a sim guest's device state.
type SimState struct {
	Ops       uint64 `json:"ops"`
	OutputSeq uint64 `json:"output_seq"`
}

func simInfo(dev []byte) *SimState {
	info, err := sim.DecodeDeviceState(dev)
	if err != nil {
		return nil
	}
	return &SimState{Ops: info.Ops, OutputSeq: info.OutputSeq}
}

// auditRecord is one line of a VM's audit log (StateDir/VM.ROLE.log).
type auditRecord struct {
	Event   string    `json:"event"` // capture, ack (primary); commit, activate (backup)
	Epoch   uint64    `json:"epoch"`
	Pages   int       `json:"pages,omitempty"`
	PauseMs float64   `json:"pause_ms,omitempty"`
	Sim     *SimState `json:"sim,omitempty"`
	// MemoryXXH and DeviceXXH are xxhash64 of the whole replica memory and
	// device state at activation.
	MemoryXXH uint64 `json:"memory_xxh,omitempty"`
	DeviceXXH uint64 `json:"device_xxh,omitempty"`
	UnixNs    int64  `json:"unix_ns"`
}

// auditLog appends JSON lines, one write(2) each, so that a line is on
// disk (in the page cache) even if the process is killed right after.
type auditLog struct {
	mu  sync.Mutex
	f   *os.File
	log *zap.Logger
}

// AuditPath is where a VM's audit log for a role lives.
func AuditPath(stateDir, vm, role string) string {
	return filepath.Join(stateDir, vm+"."+role+".log")
}

// openAudit opens a VM's audit log for a role, starting it anew unless
// keep (a resumed protection appends to its log).
func openAudit(stateDir, vm, role string, log *zap.Logger, keep ...bool) *auditLog {
	flags := os.O_CREATE | os.O_WRONLY | os.O_APPEND
	if len(keep) == 0 || !keep[0] {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(AuditPath(stateDir, vm, role), flags, 0o600)
	if err != nil {
		log.Error("audit log unavailable", zap.Error(err))
		return &auditLog{log: log}
	}
	return &auditLog{f: f, log: log}
}

func (a *auditLog) record(r auditRecord) {
	if a == nil || a.f == nil {
		return
	}
	r.UnixNs = time.Now().UnixNano()
	b := append(mustJSON(r), '\n')
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, err := a.f.Write(b); err != nil {
		a.log.Warn("audit log write failed", zap.Error(err))
	}
}

func (a *auditLog) close() {
	if a != nil && a.f != nil {
		a.f.Close()
	}
}

// OutputMagic starts every output stream a daemon sends to a sim VM's
// output address: "REMUSD-OUTPUT <host> <vm>\n", then records of
// [epoch u64 BE][length u32 BE][message].
const OutputMagic = "REMUSD-OUTPUT"

// outputSink carries a sim guest's released output to its output address,
// standing in for the network. It never blocks the guest: beyond its
// queue, messages are dropped (as a congested network would).
//
// It delivers what one release handed it in one write, and never delivers
// released output (epoch > 0) that waited in it longer than maxAge: a
// daemon stopped (SIGSTOP, a starved host) between an ack and the
// delivery may, by the time it runs again, have been declared lost by its
// backup, and output it let go then would leave beside the new primary's.
// Dropping it is a network's loss, which the guest's protocols recover
// from; the new primary's state includes it. (A real output buffer, plug
// or NFQUEUE, hands its packets to the kernel in the releasing call.)
type outputSink struct {
	addr, host, vm string
	maxAge         time.Duration
	log            *zap.Logger
	ch             chan sinkRecord
	done           chan struct{}
	once           sync.Once
	dropped        atomic.Uint64
	stale          atomic.Uint64
}

type sinkRecord struct {
	at    time.Time // when it was queued (monotonic)
	epoch uint64
	b     []byte
}

// sinkBatch bounds the bytes one write carries.
const sinkBatch = 256 << 10

func newOutputSink(addr, host, vm string, maxAge time.Duration, log *zap.Logger) *outputSink {
	s := &outputSink{addr: addr, host: host, vm: vm, maxAge: maxAge, log: log, ch: make(chan sinkRecord, 1<<14), done: make(chan struct{})}
	if addr != "" {
		go s.run()
	}
	return s
}

func (s *outputSink) send(epoch uint64, msg []byte) {
	if s.addr == "" {
		return
	}
	rec := make([]byte, 12+len(msg))
	binary.BigEndian.PutUint64(rec, epoch)
	binary.BigEndian.PutUint32(rec[8:], uint32(len(msg)))
	copy(rec[12:], msg)
	select {
	case s.ch <- sinkRecord{at: time.Now(), epoch: epoch, b: rec}:
	default:
		s.dropped.Add(1)
	}
}

func (s *outputSink) run() {
	var conn net.Conn
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	var batch []byte
	for {
		var first sinkRecord
		select {
		case <-s.done:
			return
		case first = <-s.ch:
		}
		for conn == nil {
			c, err := net.DialTimeout("tcp", s.addr, time.Second)
			if err == nil {
				_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
				if _, err = fmt.Fprintf(c, "%s %s %s\n", OutputMagic, s.host, s.vm); err == nil {
					conn = c
					break
				}
				c.Close()
			}
			s.log.Debug("output sink unreachable", zap.String("addr", s.addr), zap.Error(err))
			select {
			case <-s.done:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
		// Everything queued now goes in one write, checked for age just
		// before it.
		recs := []sinkRecord{first}
		size := len(first.b)
	drain:
		for size < sinkBatch {
			select {
			case r := <-s.ch:
				recs = append(recs, r)
				size += len(r.b)
			default:
				break drain
			}
		}
		batch = batch[:0]
		now := time.Now()
		var stale uint64
		for _, r := range recs {
			if r.epoch > 0 && s.maxAge > 0 && now.Sub(r.at) > s.maxAge {
				stale++
				continue
			}
			batch = append(batch, r.b...)
		}
		if stale > 0 {
			s.stale.Add(stale)
			s.log.Warn("dropped released output that waited too long to be delivered (this daemon was stopped or starved: its backup may have taken over)", zap.String("vm", s.vm), zap.Uint64("messages", stale), zap.Duration("max_age", s.maxAge))
		}
		if len(batch) == 0 {
			continue
		}
		_ = conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write(batch); err != nil {
			s.dropped.Add(uint64(len(recs)) - stale)
			conn.Close()
			conn = nil
		}
	}
}

func (s *outputSink) close() { s.once.Do(func() { close(s.done) }) }

// ReadOutputStream reads one sim VM output stream (see OutputMagic) and
// calls fn for every message, with the sending host's name and the epoch
// the message was released for (0 when unbuffered). It returns when the
// stream ends or is malformed (a message over 1 MiB).
func ReadOutputStream(rd io.Reader, fn func(host string, epoch uint64, msg []byte)) error {
	r := bufio.NewReader(rd)
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("output stream: header: %w", err)
	}
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != OutputMagic {
		return fmt.Errorf("output stream: bad header %q", strings.TrimSpace(line))
	}
	host := f[1]
	var hdr [12]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("output stream from %s: %w", host, err)
		}
		n := binary.BigEndian.Uint32(hdr[8:])
		if n > 1<<20 {
			return fmt.Errorf("output stream from %s: message of %d bytes", host, n)
		}
		msg := make([]byte, n)
		if _, err := io.ReadFull(r, msg); err != nil {
			return fmt.Errorf("output stream from %s: %w", host, err)
		}
		fn(host, binary.BigEndian.Uint64(hdr[:8]), msg)
	}
}
