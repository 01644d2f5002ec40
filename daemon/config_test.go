package daemon

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestConfigTrustDefaults: mutual TLS is the default; plaintext needs
// insecure, and a non-loopback plaintext listener needs it said twice.
func TestConfigTrustDefaults(t *testing.T) {
	c := DefaultConfig()
	if c.TLS.Cert != DefaultTLSCert || c.TLS.Key != DefaultTLSKey || c.TLS.CA != DefaultTLSCA || c.Insecure {
		t.Fatalf("default is not mutual TLS: %+v insecure=%v", c.TLS, c.Insecure)
	}
	c.TLS.Cert = "/nonexistent/host.crt"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "config field tls.cert:") || !strings.Contains(err.Error(), "remusd certs") {
		t.Fatalf("missing certificate: %v", err)
	}
	c = DefaultConfig()
	c.Insecure, c.Listen = true, "127.0.0.1:7788"
	if err := c.Validate(); err != nil {
		t.Fatalf("insecure on loopback refused: %v", err)
	}
	c.Listen = "0.0.0.0:7788"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "insecure_non_loopback") {
		t.Fatalf("insecure on a non-loopback listener: %v", err)
	}
	c.InsecureNonLoopback = true
	if err := c.Validate(); err != nil {
		t.Fatalf("insecure said twice refused: %v", err)
	}
	c = DefaultConfig()
	c.Insecure = true
	c.Peers = []Peer{{Name: "b", Address: "10.0.0.2:7788", VMs: []string{"web"}}}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "peers[0].address") {
		t.Fatalf("insecure to a non-loopback peer: %v", err)
	}
	c.InsecureNonLoopback = true
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		peer  Peer
		field string
	}{
		{Peer{Name: "../x", VMs: []string{"*"}}, "peers[0].name"},
		{Peer{Name: "remusd", VMs: []string{"*"}}, "peers[0].name"},
		{Peer{Name: "b", Address: "nohost", VMs: []string{"*"}}, "peers[0].address"},
		{Peer{Name: "b", VMs: []string{"a/b"}}, "peers[0].vms[0]"},
	} {
		c := DefaultConfig()
		c.Insecure = true
		c.Peers = []Peer{tc.peer}
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "config field "+tc.field+":") {
			t.Errorf("peer %+v: %v (want %s)", tc.peer, err, tc.field)
		}
	}
	c = DefaultConfig()
	c.Insecure = true
	c.Name = "a/../b"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "config field name:") {
		t.Errorf("bad host name: %v", err)
	}
	c = DefaultConfig()
	c.Insecure = true
	c.SimVMs = []SimVM{{Name: "../escape"}}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "sim_vms[0].name") {
		t.Errorf("sim VM name with a path: %v", err)
	}
}

// TestConfigSecondPath: the second heartbeat path's addresses and times
// are validated, each error naming its field.
func TestConfigSecondPath(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.Insecure = true
		c.SecondPath = SecondPathConfig{Listen: "127.0.0.1:7601"}
		c.Peers = []Peer{{Name: "b", Address: "127.0.0.1:7788", VMs: []string{"*"}, SecondPath: "127.0.0.2:7601"}}
		return c
	}
	c := base()
	if err := c.Validate(); err != nil {
		t.Fatalf("valid second path refused: %v", err)
	}
	if iv, to := c.secondPathTimes(); iv != c.HeartbeatInterval.D() || to != c.HeartbeatTimeout.D() {
		t.Fatalf("defaults: %v %v", iv, to)
	}
	for name, tc := range map[string]struct {
		mut   func(*Config)
		field string
	}{
		"hostname listen": {func(c *Config) { c.SecondPath.Listen = "hostb:7601" }, "second_path.listen"},
		"no port":         {func(c *Config) { c.SecondPath.Listen = "127.0.0.1" }, "second_path.listen"},
		"timeout < 3 beats": {func(c *Config) {
			c.SecondPath.Interval, c.SecondPath.Timeout = Duration(time.Second), Duration(2*time.Second)
		}, "second_path.timeout"},
		"timeout over 1m":   {func(c *Config) { c.SecondPath.Timeout = Duration(2 * time.Minute) }, "second_path.timeout"},
		"negative interval": {func(c *Config) { c.SecondPath.Interval = Duration(-time.Second) }, "second_path.interval"},
		"times without listen": {func(c *Config) {
			c.SecondPath.Listen = ""
			c.Peers[0].SecondPath = ""
			c.SecondPath.Timeout = Duration(time.Second)
		}, "second_path.listen"},
		"peer not IP:PORT":     {func(c *Config) { c.Peers[0].SecondPath = "b.example:7601" }, "peers[0].second_path"},
		"peer without listen":  {func(c *Config) { c.SecondPath = SecondPathConfig{} }, "peers[0].second_path"},
		"closed grace > grace": {func(c *Config) { c.TakeoverGraceClosed = c.TakeoverGrace + 1 }, "takeover_grace_closed"},
	} {
		c := base()
		tc.mut(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "config field "+tc.field+":") {
			t.Errorf("%s: %v (want %s)", name, err, tc.field)
		}
	}
}

func TestConfigDiskJournalsFitStaging(t *testing.T) {
	mk := func(disks, journalMiB int) Config {
		c := DefaultConfig()
		c.Insecure = true
		c.DiskJournalMiB = journalMiB
		q := QemuVM{Name: "g", MemoryMiB: 128, Kernel: "/k"}
		for i := range disks {
			q.Disks = append(q.Disks, QemuDisk{ID: fmt.Sprintf("d%d", i), Path: fmt.Sprintf("/img/%d", i), SizeMiB: 64})
		}
		c.QemuVMs = []QemuVM{q}
		return c
	}
	if err := mk(2, 0).Validate(); err != nil {
		t.Fatalf("two disks at the default journal: %v", err)
	}
	if err := mk(3, 0).Validate(); err == nil || !strings.Contains(err.Error(), "disk_journal_mib") {
		t.Fatalf("three disks at the default journal: %v, want refused naming disk_journal_mib", err)
	}
	if err := mk(3, 32).Validate(); err != nil {
		t.Fatalf("three disks at 32 MiB journals: %v", err)
	}
}

func TestConfigDiskImagesDistinct(t *testing.T) {
	c := DefaultConfig()
	c.Insecure = true
	c.QemuVMs = []QemuVM{
		{Name: "a", MemoryMiB: 128, Kernel: "/k", Disks: []QemuDisk{{ID: "disk0", Path: "/img/shared.img", SizeMiB: 64}}},
		{Name: "b", MemoryMiB: 128, Kernel: "/k", Disks: []QemuDisk{{ID: "disk0", Path: "/img/../img/shared.img", SizeMiB: 64}}},
	}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "qemu_vms[1].disks[0].path") {
		t.Fatalf("two VMs on one image: %v", err)
	}
	c.QemuVMs[1].Disks[0].Path = "/img/b.img"
	if err := c.Validate(); err != nil {
		t.Fatalf("distinct images (same disk id in two VMs): %v", err)
	}
}
