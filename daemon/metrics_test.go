package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape fetches h's /metrics and returns series → value, keyed by the
// series text as exposed ("name{l1=\"v\",...}").
func scrape(t *testing.T, h http.Handler) map[string]float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("scrape: HTTP %d: %s", rec.Code, rec.Body)
	}
	return parseExposition(t, rec.Body.String())
}

func parseExposition(t *testing.T, body string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("bad line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad value in %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func TestMetricsHandler(t *testing.T) {
	st := []VMStatus{
		{
			VM: "web", Role: RolePrimary, Backend: "sim", Peer: "10.0.0.2:7788", Link: LinkUp,
			Epoch: 120, AckedEpoch: 119, EpochsCommitted: 119,
			PauseMsP50: 1.5, PauseMsP99: 4, DirtyPagesLast: 321,
			PagesSent: 5000, WireBytesSent: 1<<20 + 4096, EpochWireBytes: 1 << 20, RawBytes: 4 << 20, CompressionRatio: 4,
			AckMsP50: 2, AckMsP99: 8, OutputHeld: 7, OutputReleased: 1000, OutputDropped: 3, OutputHoldRepairs: 2,
			Reconnects: 2, HeartbeatAgeMs: 50,
		},
		{VM: "db", Role: RoleBackup, Backend: "sim", Link: LinkLost, Epoch: 99, TornEpochsDiscarded: 1, PagesReceived: 4000, WireBytesReceived: 1 << 19},
	}
	h := NewMetricsHandler(func(context.Context) ([]VMStatus, error) { return st, nil }, nil)
	m := scrape(t, h)
	want := map[string]float64{
		`remusd_status_up`:                                          1,
		`remusd_epoch{vm="web"}`:                                    120,
		`remusd_acked_epoch{vm="web"}`:                              119,
		`remusd_epochs_committed_total{vm="web"}`:                   119,
		`remusd_pause_p50_seconds{vm="web"}`:                        0.0015,
		`remusd_pause_p99_seconds{vm="web"}`:                        0.004,
		`remusd_dirty_pages_last{vm="web"}`:                         321,
		`remusd_pages_sent_total{vm="web"}`:                         5000,
		`remusd_wire_bytes_sent_total{vm="web"}`:                    1<<20 + 4096,
		`remusd_epoch_wire_bytes_total{vm="web"}`:                   1 << 20,
		`remusd_pages_received_total{vm="db"}`:                      4000,
		`remusd_wire_bytes_received_total{vm="db"}`:                 1 << 19,
		`remusd_raw_bytes_total{vm="web"}`:                          4 << 20,
		`remusd_compression_ratio{vm="web"}`:                        4,
		`remusd_ack_latency_p50_seconds{vm="web"}`:                  0.002,
		`remusd_ack_latency_p99_seconds{vm="web"}`:                  0.008,
		`remusd_output_held{vm="web"}`:                              7,
		`remusd_output_released_total{vm="web"}`:                    1000,
		`remusd_output_dropped_total{vm="web"}`:                     3,
		`remusd_output_hold_repairs_total{vm="web"}`:                2,
		`remusd_reconnects_total{vm="web"}`:                         2,
		`remusd_heartbeat_age_seconds{vm="web"}`:                    0.05,
		`remusd_link_up{vm="web"}`:                                  1,
		`remusd_link_up{vm="db"}`:                                   0,
		`remusd_epoch{vm="db"}`:                                     99,
		`remusd_torn_epochs_discarded_total{vm="db"}`:               1,
		`remusd_role_info{backend="sim",role="primary",vm="web"}`:   1,
		`remusd_role_info{backend="sim",role="backup",vm="db"}`:     1,
		`remusd_link_info{link="up",peer="10.0.0.2:7788",vm="web"}`: 1,
		`remusd_link_info{link="lost",peer="",vm="db"}`:             1,
	}
	for k, v := range want {
		got, ok := m[k]
		if !ok {
			t.Errorf("missing series %s", k)
			continue
		}
		if diff := got - v; diff > 1e-12 || diff < -1e-12 {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
	// Go and process collectors are registered too.
	if _, ok := m["go_goroutines"]; !ok {
		t.Error("go_goroutines missing")
	}
	if _, ok := m["process_open_fds"]; !ok {
		t.Error("process_open_fds missing")
	}
}

func TestMetricsStatusError(t *testing.T) {
	h := NewMetricsHandler(func(context.Context) ([]VMStatus, error) { return nil, errors.New("down") }, nil)
	m := scrape(t, h)
	if v, ok := m["remusd_status_up"]; !ok || v != 0 {
		t.Errorf("remusd_status_up = %v (present %v), want 0", v, ok)
	}
	for k := range m {
		if strings.HasPrefix(k, "remusd_epoch") {
			t.Errorf("unexpected %s on failed status", k)
		}
	}
}

func TestMetricsDuplicateVM(t *testing.T) {
	st := []VMStatus{{VM: "a", Epoch: 1}, {VM: "a", Epoch: 2}}
	h := NewMetricsHandler(func(context.Context) ([]VMStatus, error) { return st, nil }, nil)
	if m := scrape(t, h); m[`remusd_epoch{vm="a"}`] != 1 {
		t.Errorf("remusd_epoch = %v", m[`remusd_epoch{vm="a"}`])
	}
}

func TestServeMetrics(t *testing.T) {
	// Find a free port, then serve on it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	h := NewMetricsHandler(func(context.Context) ([]VMStatus, error) {
		return []VMStatus{{VM: "x", Epoch: 5}}, nil
	}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeMetrics(ctx, addr, h, nil) }()

	var resp *http.Response
	for i := 0; i < 100; i++ {
		resp, err = http.Get("http://" + addr + "/metrics")
		if err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if m := parseExposition(t, string(body)); m[`remusd_epoch{vm="x"}`] != 5 {
		t.Errorf("remusd_epoch = %v", m[`remusd_epoch{vm="x"}`])
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeMetrics: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeMetrics did not stop")
	}
	// Listening on a taken address fails at once.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	if err := ServeMetrics(context.Background(), busy.Addr().String(), h, nil); err == nil {
		t.Error("ServeMetrics on a busy address succeeded")
	}
}
