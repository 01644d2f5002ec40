package daemon

import (
	"strings"
	"testing"
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
