// Package guestsvc is the small TCP service that runs inside a protected
// test guest. Every reply depends on all the state the service has
// accepted (a counter per key, the number of operations and a hash chain
// over every request), so a client can tell whether state it was told
// about was lost or replayed after a failover.
//
// Protocol, one line each way:
//
//	ADD <id> <key> <delta>   →  OK <id> <ops> <value> <chain>
//	GET <key>                →  VAL <key> <value> <ops> <chain>
//	PING                     →  PONG <ops> <chain>
//
// With a log file (SetLog: the guest's disk), three more:
//
//	LOG <id> <word>          →  LOGGED <id> <records>
//	LOGSUM                   →  LOGSUM <records> <sha>
//	FILL <id> <kib>          →  FILLED <id> <bytes>
//	FREEZE                   →  FROZEN
//
// LOG appends the line "<id> <word>\n" to the file and fsyncs it before it
// replies, so a reply means the record is durable on the guest's disk;
// records is the number of lines the file holds then. LOGSUM gives that
// number and the hex SHA-256 (first 16 bytes) of the whole file as read
// back from it. FREEZE syncs every file system and remounts the log's
// read-only (the file system is then clean on the disk: a host can fsck
// the image); later LOGs fail. FILL (a write-heavy load) writes kib KiB
// (1..8192) of pseudo-random data at the next offset of a 16 MiB ring file
// beside the log, fsyncs it, and replies the bytes written so far.
//
// ops is the number of ADDs applied since the service started; chain is
// the hex SHA-256 (first 16 bytes) of the previous chain followed by the
// ADD line as received. A client that is the only writer can predict ops,
// value and chain for every reply (see Model).
package guestsvc

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// State is the service's state.
type State struct {
	mu     sync.Mutex
	values map[string]int64
	ops    uint64
	chain  [16]byte

	log      *os.File // nil: no log commands
	logPath  string
	mount    string // the log's mount point, for FREEZE
	records  uint64
	freeze   func(mount string) error
	logError error // a failed append: later LOGs fail (the file may be torn)
	fill     *os.File
	filled   int64
	fillBuf  []byte
}

// fillRing is the size of FILL's ring file.
const fillRing = 16 << 20

// SetLog enables the log commands on the file at path (created if absent;
// its lines are counted), on the file system mounted at mount. freeze
// remounts mount read-only (nil: FREEZE fails).
func (s *State) SetLog(path, mount string, freeze func(mount string) error) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("guestsvc: open log: %w", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		f.Close()
		return fmt.Errorf("guestsvc: read log: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log, s.logPath, s.mount, s.freeze = f, path, mount, freeze
	s.records = uint64(bytes.Count(b, []byte{'\n'}))
	return nil
}

func (s *State) handleLog(f []string) string {
	if s.log == nil {
		return "ERR no log file"
	}
	switch f[0] {
	case "LOG":
		if len(f) != 3 {
			return "ERR usage: LOG <id> <word>"
		}
		if s.logError != nil {
			return "ERR log failed earlier: " + s.logError.Error()
		}
		if _, err := s.log.WriteString(f[1] + " " + f[2] + "\n"); err != nil {
			s.logError = err
			return "ERR append: " + err.Error()
		}
		if err := s.log.Sync(); err != nil {
			s.logError = err
			return "ERR fsync: " + err.Error()
		}
		s.records++
		return fmt.Sprintf("LOGGED %s %d", f[1], s.records)
	case "LOGSUM":
		b, err := os.ReadFile(s.logPath)
		if err != nil {
			return "ERR read log: " + err.Error()
		}
		sum := sha256.Sum256(b)
		return fmt.Sprintf("LOGSUM %d %s", bytes.Count(b, []byte{'\n'}), hex.EncodeToString(sum[:16]))
	case "FILL":
		if len(f) != 3 {
			return "ERR usage: FILL <id> <kib>"
		}
		kib, err := strconv.Atoi(f[2])
		if err != nil || kib < 1 || kib > 8192 {
			return "ERR kib must be 1..8192"
		}
		if s.logError != nil {
			return "ERR log failed earlier: " + s.logError.Error()
		}
		if s.fill == nil {
			if s.fill, err = os.OpenFile(s.logPath+".fill", os.O_RDWR|os.O_CREATE, 0o644); err != nil {
				return "ERR open fill: " + err.Error()
			}
		}
		n := kib << 10
		if len(s.fillBuf) < n {
			s.fillBuf = make([]byte, n)
		}
		b := s.fillBuf[:n]
		x := uint64(s.filled) | 1
		for i := 0; i+8 <= len(b); i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(b[i:], x)
		}
		off := s.filled % fillRing
		if off+int64(n) > fillRing {
			off = 0
		}
		if _, err := s.fill.WriteAt(b, off); err != nil {
			return "ERR fill: " + err.Error()
		}
		if err := s.fill.Sync(); err != nil {
			return "ERR fsync fill: " + err.Error()
		}
		s.filled += int64(n)
		return fmt.Sprintf("FILLED %s %d", f[1], s.filled)
	case "FREEZE":
		if s.freeze == nil {
			return "ERR cannot freeze"
		}
		// A file open for writing keeps the remount busy.
		if s.logError == nil {
			if err := s.log.Close(); err != nil {
				return "ERR close log: " + err.Error()
			}
			if s.fill != nil {
				s.fill.Close()
			}
			s.logError = errors.New("log closed for FREEZE")
		}
		if err := s.freeze(s.mount); err != nil {
			return "ERR freeze: " + err.Error()
		}
		s.logError = errors.New("frozen")
		return "FROZEN"
	}
	return "ERR unknown command"
}

// NewState returns an empty state.
func NewState() *State { return &State{values: map[string]int64{}} }

// Handle applies one request line (without newline) and returns the reply
// line (without newline).
func (s *State) Handle(line string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return "ERR empty request"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch f[0] {
	case "ADD":
		if len(f) != 4 {
			return "ERR usage: ADD <id> <key> <delta>"
		}
		delta, err := strconv.ParseInt(f[3], 10, 64)
		if err != nil {
			return "ERR bad delta " + strconv.Quote(f[3])
		}
		s.values[f[2]] += delta
		s.ops++
		s.chain = next(s.chain, line)
		return fmt.Sprintf("OK %s %d %d %s", f[1], s.ops, s.values[f[2]], hex.EncodeToString(s.chain[:]))
	case "GET":
		if len(f) != 2 {
			return "ERR usage: GET <key>"
		}
		return fmt.Sprintf("VAL %s %d %d %s", f[1], s.values[f[1]], s.ops, hex.EncodeToString(s.chain[:]))
	case "PING":
		return fmt.Sprintf("PONG %d %s", s.ops, hex.EncodeToString(s.chain[:]))
	case "LOG", "LOGSUM", "FILL", "FREEZE":
		return s.handleLog(f)
	}
	return "ERR unknown command " + strconv.Quote(f[0])
}

func next(chain [16]byte, line string) [16]byte {
	h := sha256.New()
	h.Write(chain[:])
	h.Write([]byte(line))
	var out [16]byte
	copy(out[:], h.Sum(nil))
	return out
}

// Serve accepts connections on ln until ctx is done; all connections share
// one state.
func Serve(ctx context.Context, ln net.Listener, s *State) error {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("guestsvc: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			r := bufio.NewReaderSize(c, 4096)
			w := bufio.NewWriter(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if _, err := w.WriteString(s.Handle(strings.TrimRight(line, "\r\n")) + "\n"); err != nil {
					return
				}
				if r.Buffered() == 0 {
					if err := w.Flush(); err != nil {
						return
					}
				}
			}
		}()
	}
}

// Model is a client's prediction of the service's replies, valid while the
// client is the only writer.
type Model struct {
	ops    uint64
	values map[string]int64
	chain  [16]byte
}

// NewModel starts from an empty service.
func NewModel() *Model { return &Model{values: map[string]int64{}} }

// ErrDiverged means a reply does not match the state the client built up:
// state was lost or replayed.
var ErrDiverged = errors.New("guestsvc: service state diverged from the client's model")

// Add returns the request line for an ADD and the reply the service must
// give.
func (m *Model) Add(id uint64, key string, delta int64) (request, want string) {
	request = fmt.Sprintf("ADD %d %s %d", id, key, delta)
	m.values[key] += delta
	m.ops++
	m.chain = next(m.chain, request)
	return request, fmt.Sprintf("OK %d %d %d %s", id, m.ops, m.values[key], hex.EncodeToString(m.chain[:]))
}

// LogModel is a client's prediction of the log file, valid while the
// client is its only writer and waits for each reply.
type LogModel struct {
	content []byte
	records uint64
	base    uint64 // records in the file before this client's
}

// Log returns the request line for a LOG of word and the reply the
// service must give; Logged records it as durable once that reply came.
func (m *LogModel) Log(id uint64, word string) (request, want string) {
	return fmt.Sprintf("LOG %d %s", id, word), fmt.Sprintf("LOGGED %d %d", id, m.base+m.records+1)
}

// Logged records that the LOG of (id, word) was acknowledged.
func (m *LogModel) Logged(id uint64, word string) {
	m.content = fmt.Appendf(m.content, "%d %s\n", id, word)
	m.records++
}

// Content is what the log file must hold: the acknowledged records.
func (m *LogModel) Content() []byte { return m.content }

// Records is the number of acknowledged records.
func (m *LogModel) Records() uint64 { return m.records }

// Sum is the LOGSUM reply the service must give: exactly the
// acknowledged records, in order, none twice. Only for a client that
// started on an empty log ("" otherwise).
func (m *LogModel) Sum() string {
	if m.base > 0 {
		return ""
	}
	sum := sha256.Sum256(m.content)
	return fmt.Sprintf("LOGSUM %d %s", m.records, hex.EncodeToString(sum[:16]))
}

// Check compares a reply with the predicted one.
func Check(got, want string) error {
	if got != want {
		return fmt.Errorf("%w: got %q, want %q", ErrDiverged, got, want)
	}
	return nil
}
