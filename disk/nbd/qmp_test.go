package nbd

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// testQMP is a minimal QMP client for the measurement tests (package
// hypervisor/qemu serves its disks with this package, so its QMP client
// cannot be imported here).
type testQMP struct {
	c net.Conn
	r *bufio.Reader
}

func dialTestQMP(ctx context.Context, path string) (*testQMP, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	q := &testQMP{c: c, r: bufio.NewReader(c)}
	if _, err := q.read(ctx); err != nil { // greeting
		c.Close()
		return nil, err
	}
	if err := q.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *testQMP) read(ctx context.Context) (map[string]json.RawMessage, error) {
	dl := time.Now().Add(30 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	_ = q.c.SetReadDeadline(dl)
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		return nil, fmt.Errorf("qmp: read: %w", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return nil, fmt.Errorf("qmp: %w: %q", err, line)
	}
	return m, nil
}

// Execute runs cmd with args and decodes its return value into out.
func (q *testQMP) Execute(ctx context.Context, cmd string, args any, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}
	for {
		m, err := q.read(ctx)
		if err != nil {
			return err
		}
		if _, ok := m["event"]; ok {
			continue
		}
		if e, ok := m["error"]; ok {
			return fmt.Errorf("qmp: %s: %s", cmd, e)
		}
		if r, ok := m["return"]; ok {
			if out != nil {
				return json.Unmarshal(r, out)
			}
			return nil
		}
	}
}

func (q *testQMP) Close() error { return q.c.Close() }
