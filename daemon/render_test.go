package daemon

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestRenderStatusEmpty(t *testing.T) {
	var b bytes.Buffer
	if err := RenderStatus(&b, nil); err != nil {
		t.Fatal(err)
	}
	if b.String() != "no VMs\n" {
		t.Errorf("got %q", b.String())
	}
}

func TestRenderStatusTable(t *testing.T) {
	st := []VMStatus{
		{VM: "web", Role: RolePrimary, Link: LinkUp, OutBuf: "held", Epoch: 120, AckedEpoch: 119,
			PauseMsP50: 1.25, PauseMsP99: 12.5, DirtyPagesLast: 321, WireBytesSent: 3 << 20,
			CompressionRatio: 3.2, AckMsP50: 2.5},
		{VM: "db", Role: RoleBackup, Link: LinkLost, Epoch: 99, LastError: "heartbeat timeout"},
	}
	var b bytes.Buffer
	if err := RenderStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 4 {
		t.Fatalf("want header, 2 rows and an error line, got:\n%s", out)
	}
	for _, h := range []string{"VM", "ROLE", "LINK", "OUTBUF", "EPOCH", "ACKED", "PAUSE p50/p99 ms", "DIRTY", "WIRE BYTES", "RATIO", "ACK p50 ms"} {
		if !strings.Contains(lines[0], h) {
			t.Errorf("header lacks %q: %s", h, lines[0])
		}
	}
	// Sorted by name: db first.
	if f := strings.Fields(lines[1]); f[0] != "db" || f[1] != "backup" || f[2] != "lost" || f[3] != "-" || f[4] != "99" {
		t.Errorf("db row = %q", lines[1])
	}
	wantWeb := []string{"web", "primary", "up", "held", "120", "119", "1.25/12.5", "321", "3.0", "MiB", "out", "3.20x", "2.50"}
	if f := strings.Fields(lines[2]); strings.Join(f, " ") != strings.Join(wantWeb, " ") {
		t.Errorf("web row = %q, want fields %q", lines[2], wantWeb)
	}
	if lines[3] != "db: last error: heartbeat timeout" {
		t.Errorf("error line = %q", lines[3])
	}
	// Columns line up: every row's EPOCH starts where the header's does.
	col := strings.Index(lines[0], "EPOCH")
	for _, l := range lines[1:3] {
		if l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("misaligned row %q", l)
		}
	}
	if st[0].VM != "web" {
		t.Error("RenderStatus reordered its input")
	}
}

func TestRenderStatusJSON(t *testing.T) {
	var b bytes.Buffer
	if err := RenderStatusJSON(&b, nil); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(b.String()) != "{\n  \"vms\": []\n}" {
		t.Errorf("empty: %q", b.String())
	}
	st := []VMStatus{{VM: "web", Role: RolePrimary, Epoch: 7, CompressionRatio: 2.5}}
	b.Reset()
	if err := RenderStatusJSON(&b, st); err != nil {
		t.Fatal(err)
	}
	var got struct {
		VMs []VMStatus `json:"vms"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.VMs) != 1 || got.VMs[0] != st[0] {
		t.Errorf("round trip = %+v", got.VMs)
	}
	if !strings.Contains(b.String(), "\n  \"vms\": [\n    {") {
		t.Errorf("not indented:\n%s", b.String())
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[uint64]string{
		0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB",
		20 << 20: "20.0 MiB", 3 << 30: "3.0 GiB", 1 << 40: "1.0 TiB",
	} {
		if got := HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestRenderStatusTrustNotes(t *testing.T) {
	var b strings.Builder
	st := []VMStatus{
		{VM: "web", Role: RoleBackup, PeerName: "hostA", LinksRefused: 3, OutputHoldRepairs: 2, Insecure: true},
		{VM: "db", Role: RoleStopped, StoppedWhy: "it was primary here"},
	}
	if err := RenderStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"web: replica owned by hostA", "web: 3 links refused", "web: output hold undone by another tool 2 times", "db: not running here: it was primary here", "INSECURE"} {
		if !strings.Contains(out, want) {
			t.Errorf("status table lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	_ = RenderStatus(&b, st[1:])
	if strings.Contains(b.String(), "INSECURE") {
		t.Errorf("INSECURE shown for a secure daemon:\n%s", b.String())
	}
}

func TestRenderStatusDiskCopyProgress(t *testing.T) {
	var b strings.Builder
	st := []VMStatus{{VM: "web", Role: RolePrimary, DiskCopying: true, DiskCopyDoneBytes: 16 << 20, DiskCopyTotalBytes: 64 << 20}}
	if err := RenderStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "copying its disks to the backup: 16.0 of 64.0 MiB (25%)") {
		t.Fatalf("no copy progress in:\n%s", b.String())
	}
	b.Reset()
	st[0].DiskCopying = false
	if err := RenderStatus(&b, st); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "copying") {
		t.Fatalf("copy progress shown after the copy:\n%s", b.String())
	}
}

// TestActivationStartedAt: the activation's start is its end less its
// length; a side that never activated has none.
func TestActivationStartedAt(t *testing.T) {
	if at := (VMStatus{}).ActivationStartedAt(); !at.IsZero() {
		t.Fatalf("no activation: %v, want zero", at)
	}
	s := VMStatus{ActivatedAtUnixMs: 1_800_000_000_250, ActivationMs: 12.5}
	want := time.UnixMilli(1_800_000_000_250).Add(-12500 * time.Microsecond)
	if at := s.ActivationStartedAt(); !at.Equal(want) {
		t.Fatalf("ActivationStartedAt = %v, want %v", at, want)
	}
}
