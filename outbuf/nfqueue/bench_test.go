package nfqueue

import (
	"context"
	"encoding/binary"
	"net"
	"sort"
	"sync"
	"testing"
	"time"
)

// BenchmarkNFQueueLatency sends b.N UDP datagrams from the guest to the
// client through the buffer while an epoch goroutine checkpoints every
// 25 ms and releases the epoch at once (an instant ack: what remains is the
// cost of holding output, ~half an epoch on average, plus the queue path).
//
//   - paced: 5000 packets/s; reports the added latency per packet
//     (mean-ms, p99-ms, max-ms) compared with the same path unbuffered
//     (base-mean-ms, measured first in the same topology).
//   - flood: the guest sends as fast as it can; reports packets/s received
//     by the client (sustained through one agent goroutine) and drops.
func BenchmarkNFQueueLatency(b *testing.B) {
	b.Run("paced", func(b *testing.B) { benchLatency(b, 200*time.Microsecond) })
	b.Run("flood", func(b *testing.B) { benchLatency(b, 0) })
}

func benchLatency(b *testing.B, gap time.Duration) {
	tp := newTopo(b)
	base := time.Now()
	var send, recv *net.UDPConn
	inNS(b, tp.client, func() (err error) {
		recv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(clientV4), Port: 9200})
		return err
	})
	inNS(b, tp.guest, func() (err error) {
		send, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.ParseIP(clientV4), Port: 9200})
		return err
	})
	defer send.Close()
	defer recv.Close()
	_ = recv.SetReadBuffer(32 << 20)
	_ = send.SetWriteBuffer(4 << 20)

	// trial sends n datagrams (paced by gap) and returns the latencies
	// received and the time from first send to last receipt.
	trial := func(n int, during func(stop <-chan struct{})) ([]time.Duration, time.Duration) {
		lat := make([]time.Duration, 0, n)
		var last time.Time
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 64)
			for len(lat) < n {
				_ = recv.SetReadDeadline(time.Now().Add(time.Second))
				m, err := recv.Read(buf)
				if err != nil {
					return // timeout: the rest was dropped
				}
				now := time.Since(base)
				if m >= 8 {
					lat = append(lat, now-time.Duration(binary.LittleEndian.Uint64(buf)))
					last = time.Now()
				}
			}
		}()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		if during != nil {
			wg.Add(1)
			go func() { defer wg.Done(); during(stop) }()
		}
		start := time.Now()
		pkt := make([]byte, 64)
		next := start
		for i := 0; i < n; i++ {
			if gap > 0 {
				next = next.Add(gap)
				if d := time.Until(next); d > 0 {
					time.Sleep(d)
				}
			}
			binary.LittleEndian.PutUint64(pkt, uint64(time.Since(base)))
			_, _ = send.Write(pkt)
		}
		<-done
		close(stop)
		wg.Wait()
		return lat, last.Sub(start)
	}

	baseN := min(b.N, 2000)
	baseLat, _ := trial(baseN, nil)

	sizeQ, sizeRB := SizeFor(200000, 25*time.Millisecond, 25*time.Millisecond)
	buf, err := New(context.Background(), Config{
		QueueNum: 12, Interface: tp.port, Bridged: true,
		MaxQueueLen: sizeQ, ReadBufferBytes: sizeRB,
		NetnsPath: nsPath(tp.host),
	}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer buf.Close()
	epochs := func(stop <-chan struct{}) {
		tick := time.NewTicker(25 * time.Millisecond)
		defer tick.Stop()
		for e := uint64(1); ; e++ {
			select {
			case <-stop:
				_ = buf.ReleaseAll()
				return
			case <-tick.C:
			}
			if err := buf.Checkpoint(e); err != nil {
				b.Error(err)
				return
			}
			if err := buf.Release(e); err != nil {
				b.Error(err)
				return
			}
		}
	}
	b.ResetTimer()
	lat, el := trial(b.N, epochs)
	b.StopTimer()

	st := buf.Stats()
	b.ReportMetric(float64(len(lat))/el.Seconds(), "pkts/s")
	b.ReportMetric(float64(b.N-len(lat)), "lost")
	b.ReportMetric(float64(st.DroppedPackets), "qdrops")
	if gap > 0 && len(lat) > 0 {
		bm := mean(baseLat)
		m := mean(lat)
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
		b.ReportMetric(ms(p50-bm), "p50-ms")
		b.ReportMetric(ms(m-bm), "mean-ms")
		b.ReportMetric(ms(p99-bm), "p99-ms")
		b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
		b.ReportMetric(ms(bm), "base-mean-ms")
	}
}

func mean(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	var s time.Duration
	for _, x := range d {
		s += x
	}
	return s / time.Duration(len(d))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
