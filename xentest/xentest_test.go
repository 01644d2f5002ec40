package xentest

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"
)

func skipUnavailable(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("needs QEMU, busybox-static and Debian's Xen %s packages: %v (run xentest/setup.sh)", XenVersion, err)
	}
}

// TestDom0Tree checks every tool's libraries resolve (no boot).
func TestDom0Tree(t *testing.T) {
	x, err := FindXen(context.Background(), "")
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := Dom0Tree(x)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"lib/x86_64-linux-gnu/libxenctrl.so.4.17", "lib/x86_64-linux-gnu/libgcc_s.so.1", "lib64/ld-linux-x86-64.so.2", "usr/lib/xen-4.17/bin/xl"} {
		if !tree.Has(want) {
			t.Errorf("dom0 tree lacks %s", want)
		}
	}
}

// TestBootDom0 boots Xen and dom0 and checks the toolstack answers.
func TestBootDom0(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Xen under QEMU")
	}
	var console strings.Builder
	res, err := Run(context.Background(), Config{
		Command: []string{"sh", "-c", `xl list && xl info | grep -E '^(xen_version|virt_caps|total_memory)' && xl list | grep -q Domain-0`},
		Timeout: 150 * time.Second,
		Console: &console,
	})
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("verdict %q in %s", res.Verdict, res.Elapsed)
	if !res.Passed || testing.Verbose() && os.Getenv("XENTEST_CONSOLE") != "" {
		t.Logf("console:\n%s", res.Console)
	}
	if !res.Passed {
		t.Fatalf("verdict %q", res.Verdict)
	}
}
