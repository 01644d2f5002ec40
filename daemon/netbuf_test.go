package daemon

import (
	"context"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/remusd/remusd/outbuf"
)

func TestChooseOutputBuffer(t *testing.T) {
	plugOK := outbuf.ProbeResult{Kind: "plug"}
	nfq := outbuf.ProbeResult{Kind: "nfqueue", Reason: "sch_plug unavailable: Specified qdisc kind is unknown"}
	none := outbuf.ProbeResult{Kind: "none", Reason: "sch_plug unavailable; NFQUEUE unavailable"}
	cases := []struct {
		mode    string
		probe   outbuf.ProbeResult
		kind    string
		unsafe  bool
		wantErr string
	}{
		{OutputAuto, plugOK, "plug", false, ""},
		{OutputAuto, nfq, "nfqueue", false, ""},
		{OutputAuto, none, "", false, "refusing to protect; set output_buffer: none-unsafe"},
		{OutputPlug, nfq, "", false, "cannot create a plug qdisc (sch_plug unavailable"},
		{OutputNFQueue, plugOK, "nfqueue", false, ""},
		{OutputNFQueue, none, "", false, "NFQUEUE is unavailable"},
		{OutputNoneUnsafe, none, "none", true, ""},
		{"bogus", plugOK, "", false, `output_buffer "bogus" unknown`},
	}
	for _, c := range cases {
		kind, unsafe, err := chooseOutputBuffer(c.mode, c.probe)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("%s/%s: err %v, want %q", c.mode, c.probe.Kind, err, c.wantErr)
			}
			continue
		}
		if err != nil || kind != c.kind || unsafe != c.unsafe {
			t.Errorf("%s/%s: got %q unsafe=%v err=%v, want %q unsafe=%v", c.mode, c.probe.Kind, kind, unsafe, err, c.kind, c.unsafe)
		}
	}
}

func TestOpenNetBufferUnsafePassesThrough(t *testing.T) {
	b, err := openNetBuffer(context.Background(), "none", netBufferSpec{Interface: "tap0"}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Checkpoint(1); err != nil {
		t.Fatal(err)
	}
	if _, err := openNetBuffer(context.Background(), "carrier-pigeon", netBufferSpec{}, zap.NewNop()); err == nil {
		t.Fatal("unknown kind accepted")
	}
}

func TestConfigRejectsUnknownOutputBuffer(t *testing.T) {
	c := DefaultConfig()
	c.OutputBuffer = "maybe"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "output_buffer") {
		t.Fatalf("got %v", err)
	}
}
