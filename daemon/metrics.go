package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// MetricsScrapeTimeout bounds the status call made on each scrape.
const MetricsScrapeTimeout = 10 * time.Second

type vmMetric struct {
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(*VMStatus) float64
}

// MetricsCollector is a prometheus.Collector that asks a status function
// for every VM's figures on each scrape.
type MetricsCollector struct {
	statusFn func(context.Context) ([]VMStatus, error)
	log      *zap.Logger

	perVM    []vmMetric
	roleInfo *prometheus.Desc
	linkInfo *prometheus.Desc
	statusUp *prometheus.Desc
}

var _ prometheus.Collector = (*MetricsCollector)(nil)

func msToSeconds(v float64) float64 { return v / 1000 }

// NewMetricsCollector returns a collector exporting statusFn's figures.
func NewMetricsCollector(statusFn func(context.Context) ([]VMStatus, error), log *zap.Logger) *MetricsCollector {
	if log == nil {
		log = zap.NewNop()
	}
	vm := []string{"vm"}
	g, c := prometheus.GaugeValue, prometheus.CounterValue
	m := func(name, help string, typ prometheus.ValueType, f func(*VMStatus) float64) vmMetric {
		return vmMetric{desc: prometheus.NewDesc(name, help, vm, nil), typ: typ, value: f}
	}
	return &MetricsCollector{
		statusFn: statusFn,
		log:      log,
		perVM: []vmMetric{
			m("remusd_epoch", "Last captured epoch (primary) or last committed epoch (backup).", g,
				func(s *VMStatus) float64 { return float64(s.Epoch) }),
			m("remusd_acked_epoch", "Last epoch acknowledged by the backup.", g,
				func(s *VMStatus) float64 { return float64(s.AckedEpoch) }),
			m("remusd_epochs_committed_total", "Epochs committed.", c,
				func(s *VMStatus) float64 { return float64(s.EpochsCommitted) }),
			m("remusd_pause_last_seconds", "Guest pause of the last checkpoint.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.PauseMsLast) }),
			m("remusd_pause_p50_seconds", "Median guest pause per checkpoint.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.PauseMsP50) }),
			m("remusd_pause_p99_seconds", "99th percentile guest pause per checkpoint.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.PauseMsP99) }),
			m("remusd_dirty_pages_last", "Dirty pages in the last checkpoint.", g,
				func(s *VMStatus) float64 { return float64(s.DirtyPagesLast) }),
			m("remusd_pages_sent_total", "Pages sent to the backup.", c,
				func(s *VMStatus) float64 { return float64(s.PagesSent) }),
			m("remusd_wire_bytes_sent_total", "Every byte the primary wrote on the replication link: frame prefixes, protobuf headers and payloads of the handshake, epochs and heartbeats.", c,
				func(s *VMStatus) float64 { return float64(s.WireBytesSent) }),
			m("remusd_epoch_wire_bytes_total", "Bytes of the epoch records the primary sent (EpochBegin, PageBatch, DeviceState, EpochEnd), frame and protobuf headers included.", c,
				func(s *VMStatus) float64 { return float64(s.EpochWireBytes) }),
			m("remusd_raw_bytes_total", "Page and device-state bytes of the epochs the primary sent, uncompressed and unframed.", c,
				func(s *VMStatus) float64 { return float64(s.RawBytes) }),
			m("remusd_compression_ratio", "Raw bytes divided by epoch wire bytes, headers included (higher is better).", g,
				func(s *VMStatus) float64 { return s.CompressionRatio }),
			m("remusd_disk_bytes_sent_total", "Disk write data of the epochs the primary sent, uncompressed.", c,
				func(s *VMStatus) float64 { return float64(s.DiskBytesSent) }),
			m("remusd_disk_wire_bytes_total", "Disk records' payloads (DiskWrites, DiskSync) the primary sent, after compression.", c,
				func(s *VMStatus) float64 { return float64(s.DiskWireBytes) }),
			m("remusd_disk_bytes_copied_total", "Disk data the primary copied to the backup in full copies while the guest ran.", c,
				func(s *VMStatus) float64 { return float64(s.DiskBytesCopied) }),
			m("remusd_disk_bytes_applied_total", "Disk write data the backup applied with committed epochs.", c,
				func(s *VMStatus) float64 { return float64(s.DiskBytesApplied) }),
			m("remusd_disk_flushes_total", "Flushes of replica disks the backup made before acknowledging.", c,
				func(s *VMStatus) float64 { return float64(s.DiskFlushes) }),
			m("remusd_pages_received_total", "Pages of the epochs the backup received.", c,
				func(s *VMStatus) float64 { return float64(s.PagesReceived) }),
			m("remusd_wire_bytes_received_total", "Every byte of the frames the backup read from the primary, headers included.", c,
				func(s *VMStatus) float64 { return float64(s.WireBytesReceived) }),
			m("remusd_ack_latency_last_seconds", "Checkpoint-to-acknowledgement latency of the last epoch.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.AckMsLast) }),
			m("remusd_ack_latency_p50_seconds", "Median checkpoint-to-acknowledgement latency.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.AckMsP50) }),
			m("remusd_ack_latency_p99_seconds", "99th percentile checkpoint-to-acknowledgement latency.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.AckMsP99) }),
			m("remusd_output_held", "Guest output packets held awaiting an acknowledgement.", g,
				func(s *VMStatus) float64 { return float64(s.OutputHeld) }),
			m("remusd_output_released_total", "Guest output packets released.", c,
				func(s *VMStatus) float64 { return float64(s.OutputReleased) }),
			m("remusd_output_dropped_total", "Guest output packets dropped.", c,
				func(s *VMStatus) float64 { return float64(s.OutputDropped) }),
			m("remusd_output_hold_repairs_total", "Times the output buffer found its hold on the host undone by someone else (NFQUEUE rules deleted or put behind another rule) and put it back; output may have left unheld before each.", c,
				func(s *VMStatus) float64 { return float64(s.OutputHoldRepairs) }),
			m("remusd_torn_epochs_discarded_total", "Incomplete epochs discarded by the backup.", c,
				func(s *VMStatus) float64 { return float64(s.TornEpochsDiscarded) }),
			m("remusd_reconnects_total", "Replication link reconnections.", c,
				func(s *VMStatus) float64 { return float64(s.Reconnects) }),
			m("remusd_heartbeat_age_seconds", "Time since the last heartbeat from the peer.", g,
				func(s *VMStatus) float64 { return msToSeconds(s.HeartbeatAgeMs) }),
			m("remusd_second_path_last_heard_timestamp_seconds", "When the peer was last heard on the second heartbeat path (Unix time; 0 = never or no second path).", g,
				func(s *VMStatus) float64 { return float64(s.SecondPathLastHeardUnixMs) / 1000 }),
			m("remusd_link_up", "1 if the replication link is up, else 0.", g,
				func(s *VMStatus) float64 {
					if s.Link == LinkUp {
						return 1
					}
					return 0
				}),
			m("remusd_activation_seconds", "Time the replica took to take over (active VMs).", g,
				func(s *VMStatus) float64 { return msToSeconds(s.ActivationMs) }),
			m("remusd_guest_ops_total", "Operations the guest executed (sim backend).", c,
				func(s *VMStatus) float64 { return float64(s.GuestOps) }),
			m("remusd_replication_insecure", "1 if the VM's replication link is plaintext and unauthenticated (config insecure), else 0.", g,
				func(s *VMStatus) float64 {
					if s.Insecure {
						return 1
					}
					return 0
				}),
			m("remusd_links_refused_total", "Links refused before they could change the replica (other identity than its owner, incompatible Hello).", c,
				func(s *VMStatus) float64 { return float64(s.LinksRefused) }),
		},
		roleInfo: prometheus.NewDesc("remusd_role_info", "The VM's role on this daemon (value is always 1).",
			[]string{"vm", "role", "backend"}, nil),
		linkInfo: prometheus.NewDesc("remusd_link_info", "The VM's replication link state (value is always 1).",
			[]string{"vm", "link", "peer"}, nil),
		statusUp: prometheus.NewDesc("remusd_status_up", "1 if the daemon's status could be read for this scrape, else 0.",
			nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *MetricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.perVM {
		ch <- m.desc
	}
	ch <- c.roleInfo
	ch <- c.linkInfo
	ch <- c.statusUp
}

// Collect implements prometheus.Collector.
func (c *MetricsCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), MetricsScrapeTimeout)
	defer cancel()
	st, err := c.statusFn(ctx)
	if err != nil {
		c.log.Warn("metrics: status failed", zap.Error(err))
		ch <- prometheus.MustNewConstMetric(c.statusUp, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.statusUp, prometheus.GaugeValue, 1)
	seen := make(map[string]bool, len(st))
	for i := range st {
		s := &st[i]
		if seen[s.VM] {
			// The registry rejects a scrape with duplicate series.
			c.log.Warn("metrics: duplicate VM in status; skipping", zap.String("vm", s.VM))
			continue
		}
		seen[s.VM] = true
		for _, m := range c.perVM {
			ch <- prometheus.MustNewConstMetric(m.desc, m.typ, m.value(s), s.VM)
		}
		ch <- prometheus.MustNewConstMetric(c.roleInfo, prometheus.GaugeValue, 1, s.VM, s.Role, s.Backend)
		ch <- prometheus.MustNewConstMetric(c.linkInfo, prometheus.GaugeValue, 1, s.VM, s.Link, s.Peer)
	}
}

// NewMetricsHandler returns an http.Handler serving, from a private
// registry, the per-VM figures of statusFn plus Go runtime and process
// metrics.
func NewMetricsHandler(statusFn func(context.Context) ([]VMStatus, error), log *zap.Logger) http.Handler {
	if log == nil {
		log = zap.NewNop()
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		NewMetricsCollector(statusFn, log),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            zap.NewStdLog(log.Named("metrics")),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             MetricsScrapeTimeout + 5*time.Second,
	})
}

// ServeMetrics serves h at /metrics on addr until ctx is done, then
// shuts the server down. A failure to listen is returned at once.
func ServeMetrics(ctx context.Context, addr string, h http.Handler, log *zap.Logger) error {
	if log == nil {
		log = zap.NewNop()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: listen on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", h)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "remusd: metrics at /metrics")
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      MetricsScrapeTimeout + 10*time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          zap.NewStdLog(log.Named("metrics")),
	}
	log.Info("metrics listening", zap.String("addr", ln.Addr().String()))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}
