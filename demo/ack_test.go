package demo

import "testing"

func TestAckedBefore(t *testing.T) {
	acks := firstAcks([]auditLine{{Epoch: 3, UnixNs: 300}, {Epoch: 5, UnixNs: 500}, {Epoch: 4, UnixNs: 450}, {Epoch: 7, UnixNs: 480}})
	for _, c := range []struct {
		epoch uint64
		at    int64
		want  bool
	}{
		{1, 300, true},  // covered by the ack of 3
		{1, 299, false}, // released before any ack
		{4, 450, true},
		{5, 480, true},   // the ack of 7 came first
		{6, 479, false},  // before the ack of 7
		{8, 1000, false}, // never acked
	} {
		if got := ackedBefore(acks, c.epoch, c.at); got != c.want {
			t.Errorf("epoch %d at %d: acked before = %v, want %v", c.epoch, c.at, got, c.want)
		}
	}
}
