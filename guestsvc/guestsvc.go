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
// ops is the number of ADDs applied since the service started; chain is
// the hex SHA-256 (first 16 bytes) of the previous chain followed by the
// ADD line as received. A client that is the only writer can predict ops,
// value and chain for every reply (see Model).
package guestsvc

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
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

// Check compares a reply with the predicted one.
func Check(got, want string) error {
	if got != want {
		return fmt.Errorf("%w: got %q, want %q", ErrDiverged, got, want)
	}
	return nil
}
