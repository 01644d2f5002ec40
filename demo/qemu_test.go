package demo

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestSplitBackend(t *testing.T) {
	for _, c := range []struct {
		args    []string
		backend string
		rest    []string
		err     bool
	}{
		{nil, "sim", nil, false},
		{[]string{"--json"}, "sim", []string{"--json"}, false},
		{[]string{"--backend", "qemu", "--json"}, "qemu", []string{"--json"}, false},
		{[]string{"--json", "-backend=sim", "--duration", "2s"}, "sim", []string{"--json", "--duration", "2s"}, false},
		{[]string{"--backend=xen"}, "", nil, true},
		{[]string{"--backend"}, "", nil, true},
	} {
		b, rest, err := splitBackend(c.args)
		if (err != nil) != c.err || b != c.backend || !slices.Equal(rest, c.rest) {
			t.Errorf("splitBackend(%q) = %q, %q, %v", c.args, b, rest, err)
		}
	}
}

func TestQEMUDemoHelpAndRoot(t *testing.T) {
	var out bytes.Buffer
	err := RunDemo(context.Background(), []string{"--backend", "qemu", "--help"}, &out, nil)
	if err == nil || !strings.Contains(out.String(), "--backend qemu") || !strings.Contains(out.String(), "-takeover") {
		t.Errorf("help: %v\n%s", err, out.String())
	}
	if os.Geteuid() != 0 {
		err := RunDemo(context.Background(), []string{"--backend=qemu"}, &out, nil)
		if err == nil || !strings.Contains(err.Error(), "needs root") {
			t.Errorf("non-root: %v", err)
		}
	}
}
