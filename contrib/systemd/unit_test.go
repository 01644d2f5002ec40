// Package systemd holds remusd's systemd unit; this test keeps it honest.
package systemd

import (
	"bufio"
	"os"
	"strings"
	"testing"
)

// TestUnit checks the settings remusd's restart guarantees depend on.
func TestUnit(t *testing.T) {
	f, err := os.Open("remusd.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, "[") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("malformed line %q", line)
		}
		got[k] = v
	}
	for k, want := range map[string]string{
		"Type":             "notify",  // remusd sends READY=1
		"KillMode":         "process", // guests outlive the daemon
		"KillSignal":       "SIGTERM", // the orderly shutdown
		"ExecStart":        "/usr/local/bin/remusd serve --config /etc/remusd/remusd.json",
		"RuntimeDirectory": "remusd", // /run/remusd/control.sock
		"StateDirectory":   "remusd", // /var/lib/remusd
	} {
		if got[k] != want {
			t.Errorf("%s=%q, want %q", k, got[k], want)
		}
	}
}
