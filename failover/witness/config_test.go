package witness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "f.pem")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	ok := Config{Endpoints: []string{"10.0.0.1:2379", "10.0.0.2:2379", "etcd3.example:2379"}}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	good := []Config{
		{Endpoints: []string{"http://127.0.0.1:2379"}},
		{Endpoints: []string{"https://a:1", "https://b:2"}, TLS: TLS{CA: file}},
		{Endpoints: []string{"[::1]:2379"}, TLS: TLS{Cert: file, Key: file, CA: file}, Prefix: "/ha/remusd", OpTimeout: time.Second, DialTimeout: 500 * time.Millisecond},
		{Endpoints: []string{"https://a:1"}}, // system roots
	}
	for _, c := range good {
		if err := c.Validate(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
	bad := []struct {
		cfg   Config
		field string
	}{
		{Config{}, "witness.endpoints"},
		{Config{Endpoints: []string{"localhost"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{"a:0"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{"a:http"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{":2379"}}, "empty host"},
		{Config{Endpoints: []string{"unix:///x"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{"http://a:1/v3"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{"http://user@a:1"}}, "witness.endpoints[0]"},
		{Config{Endpoints: []string{"http://a:1", "b:2"}}, "witness.endpoints[1]"},
		{Config{Endpoints: []string{"a:1", "a:1"}}, "listed twice"},
		{Config{Endpoints: []string{"http://a:1"}, TLS: TLS{CA: file}}, "http:// endpoints with witness.tls"},
		{Config{Endpoints: []string{"a:1"}, TLS: TLS{Cert: file, CA: file}}, "cert and key"},
		{Config{Endpoints: []string{"a:1"}, TLS: TLS{CA: filepath.Join(dir, "missing")}}, "witness.tls.ca"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "remusd"}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "/remusd/"}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "/a//b"}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "/a/../b"}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "/a b"}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, Prefix: "/" + strings.Repeat("a", 200)}, "witness.prefix"},
		{Config{Endpoints: []string{"a:1"}, OpTimeout: time.Millisecond}, "witness.op_timeout"},
		{Config{Endpoints: []string{"a:1"}, OpTimeout: -time.Second}, "witness.op_timeout"},
		{Config{Endpoints: []string{"a:1"}, DialTimeout: time.Hour}, "witness.dial_timeout"},
	}
	for _, c := range bad {
		err := c.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%+v: Validate = %v; want an error naming %s", c.cfg, err, c.field)
		}
	}
	// Every bad field is named at once.
	err := Config{Endpoints: []string{"x"}, Prefix: "y", OpTimeout: -1}.Validate()
	for _, f := range []string{"witness.endpoints[0]", "witness.prefix", "witness.op_timeout"} {
		if err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("combined error %v does not name %s", err, f)
		}
	}
}
