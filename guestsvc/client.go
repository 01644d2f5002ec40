package guestsvc

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Client keeps one TCP connection to the service and issues requests back
// to back (after an optional think time), checking every reply against
// its model: ADDs (Model), or with ClientOptions.Log LOG records to the
// guest's disk (LogModel), or with FillKiB FILL writes. It is the one
// client loop of the demo, the benchmark and the end-to-end tests.
type Client struct {
	conn    net.Conn
	m       *Model
	log     *LogModel
	fillKiB int
	rng     *rand.Rand

	logAppend bool

	think  atomic.Int64 // bound of the uniform think time, ns (0: none)
	finish atomic.Bool

	mu       sync.Mutex
	replies  []Reply
	err      error
	diverged bool
}

// Reply is one checked reply.
type Reply struct {
	ID  uint64
	At  time.Time     // when it arrived
	Lat time.Duration // request sent → reply
}

// ClientOptions configure NewClient.
type ClientOptions struct {
	// Log sends LOG records (the service needs a log file) instead of ADDs.
	Log bool
	// LogAppend: the log may hold other clients' records; the client
	// reads their number (LOGSUM) before its first record and checks its
	// replies' counts from there (its LogModel's Sum is then "").
	LogAppend bool
	// FillKiB > 0 sends FILL requests of that size (a write-heavy load).
	FillKiB int
	// Seed of the think-time generator (0: 1).
	Seed uint64
}

// RequestTimeout bounds each request: generous, a failover plus TCP
// retransmission fit in it.
const RequestTimeout = 60 * time.Second

// NewClient returns a client on conn; Run drives it.
func NewClient(conn net.Conn, o ClientOptions) *Client {
	c := &Client{conn: conn, m: NewModel(), fillKiB: o.FillKiB, rng: rand.New(rand.NewPCG(max(o.Seed, 1), 2))}
	if o.Log {
		c.log = &LogModel{}
	}
	c.logAppend = o.Log && o.LogAppend
	return c
}

// SetThink makes the client wait uniform [0, d) before each request (0:
// back to back).
func (c *Client) SetThink(d time.Duration) { c.think.Store(int64(d)) }

// Finish makes Run return once the request in flight got its reply.
func (c *Client) Finish() { c.finish.Store(true) }

// LogModel is the client's model of the log (nil without Log). Read it
// only after Run returned.
func (c *Client) LogModel() *LogModel { return c.log }

// Run issues requests until ctx ends, Finish, or a request fails or its
// reply diverges from the model (Err then says which). A request cut
// short by ctx is not an error.
func (c *Client) Run(ctx context.Context) {
	r := bufio.NewReader(c.conn)
	if c.logAppend {
		_ = c.conn.SetDeadline(time.Now().Add(RequestTimeout))
		var got string
		_, err := fmt.Fprintf(c.conn, "LOGSUM\n")
		if err == nil {
			got, err = r.ReadString('\n')
		}
		var n uint64
		if err == nil {
			_, err = fmt.Sscanf(got, "LOGSUM %d", &n)
		}
		if err != nil {
			c.mu.Lock()
			if ctx.Err() == nil {
				c.err = fmt.Errorf("LOGSUM before the first record: %w", err)
			}
			c.mu.Unlock()
			return
		}
		c.log.base = n
	}
	for id := uint64(1); ctx.Err() == nil && !c.finish.Load(); id++ {
		if th := c.think.Load(); th > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(c.rng.Int64N(th))):
			}
		}
		var req, want, word string
		switch {
		case c.log != nil:
			word = "r" + strconv.FormatUint(id*7919%100003, 36)
			req, want = c.log.Log(id, word)
		case c.fillKiB > 0:
			req = fmt.Sprintf("FILL %d %d", id, c.fillKiB)
			want = fmt.Sprintf("FILLED %d %d", id, int64(id)*int64(c.fillKiB)<<10)
		default:
			req, want = c.m.Add(id, "k"+strconv.FormatUint(id%4, 10), int64(id))
		}
		_ = c.conn.SetDeadline(time.Now().Add(RequestTimeout))
		t0 := time.Now()
		var err, cerr error
		if _, err = fmt.Fprintf(c.conn, "%s\n", req); err == nil {
			var got string
			if got, err = r.ReadString('\n'); err == nil {
				cerr = Check(strings.TrimRight(got, "\n"), want)
			}
		}
		now := time.Now()
		c.mu.Lock()
		switch {
		case err != nil && ctx.Err() != nil:
			c.mu.Unlock()
			return
		case err != nil:
			c.err = fmt.Errorf("request %d: %w", id, err)
		case cerr != nil:
			c.err, c.diverged = fmt.Errorf("request %d: %w", id, cerr), true
		}
		if c.err != nil {
			c.mu.Unlock()
			return
		}
		if c.log != nil {
			c.log.Logged(id, word)
		}
		c.replies = append(c.replies, Reply{ID: id, At: now, Lat: now.Sub(t0)})
		c.mu.Unlock()
	}
}

// State is the number of checked replies, the last one's time and id,
// and the error that ended Run (nil while it runs or after a clean end).
func (c *Client) State() (ok int, last time.Time, lastID uint64, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.replies); n > 0 {
		last, lastID = c.replies[n-1].At, c.replies[n-1].ID
	}
	return len(c.replies), last, lastID, c.err
}

// Err is the error that ended Run; Diverged says it was a reply that did
// not match the model (state lost or replayed), not a failed request.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Diverged reports whether Run ended on a reply that did not match.
func (c *Client) Diverged() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.diverged
}

// Count is the number of checked replies.
func (c *Client) Count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.replies)
}

// Replies returns a copy of the replies from index i0 on.
func (c *Client) Replies(i0 int) []Reply {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i0 >= len(c.replies) {
		return nil
	}
	return slices.Clone(c.replies[max(i0, 0):])
}

// MaxGap is the longest time between consecutive replies from reply i0 on,
// counting only gaps that start at or after since (zero: all), and the
// number of replies before it.
func (c *Client) MaxGap(i0 int, since time.Time) (gap time.Duration, after int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := max(i0, 1); i < len(c.replies); i++ {
		if !since.IsZero() && c.replies[i-1].At.Before(since) {
			continue
		}
		if g := c.replies[i].At.Sub(c.replies[i-1].At); g > gap {
			gap, after = g, i
		}
	}
	return gap, after
}

// FirstAfter is the first reply that arrived after t (ok false: none yet).
func (c *Client) FirstAfter(t time.Time) (Reply, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i, _ := slices.BinarySearchFunc(c.replies, t, func(r Reply, t time.Time) int {
		if r.At.After(t) {
			return 1
		}
		return -1
	})
	if i < len(c.replies) {
		return c.replies[i], true
	}
	return Reply{}, false
}

// ErrNoReply is returned by WaitReplies when the client ended first.
var ErrNoReply = errors.New("guestsvc: client ended before the replies came")

// WaitReplies waits until the client has n replies, it ended with an
// error, or ctx ends.
func (c *Client) WaitReplies(ctx context.Context, n int) error {
	for {
		ok, _, _, err := c.State()
		if ok >= n {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %d of %d: %w", ErrNoReply, ok, n, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d replies: %w", ok, n, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// SumAndFreeze asks the service on conn (a connection of its own, not a
// running Client's) for LOGSUM, then FREEZE, and returns the LOGSUM
// reply: the guest's own view of its log, then its file system made
// clean on the disk for a host to check.
func SumAndFreeze(ctx context.Context, conn net.Conn) (string, error) {
	r := bufio.NewReader(conn)
	ask := func(req string) (string, error) {
		dl := time.Now().Add(30 * time.Second)
		if d, ok := ctx.Deadline(); ok && d.Before(dl) {
			dl = d
		}
		_ = conn.SetDeadline(dl)
		if _, err := fmt.Fprintf(conn, "%s\n", req); err != nil {
			return "", fmt.Errorf("guestsvc: %s: %w", req, err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("guestsvc: %s: %w", req, err)
		}
		return strings.TrimRight(got, "\n"), nil
	}
	sum, err := ask("LOGSUM")
	if err != nil {
		return "", err
	}
	got, err := ask("FREEZE")
	if err != nil {
		return sum, err
	}
	if got != "FROZEN" {
		return sum, fmt.Errorf("guestsvc: FREEZE: %q", got)
	}
	return sum, nil
}
