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

// TestLibvirtTree checks AddLibvirt's files resolve (no boot): libvirtd,
// virsh and the libxl driver with their libraries (the driver's Xen
// libraries from the Xen packages), the CPU map with the TCG model.
func TestLibvirtTree(t *testing.T) {
	ctx := context.Background()
	x, err := FindXen(ctx, "")
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	lv, err := FindLibvirtXen(ctx, "")
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := Dom0Tree(x)
	if err != nil {
		t.Fatal(err)
	}
	if err := AddLibvirt(tree, x, lv); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"usr/sbin/libvirtd", "usr/bin/virsh", LibvirtDriverDir + "/" + LibvirtDriverFile,
		"lib/x86_64-linux-gnu/libvirt.so.0", "lib/x86_64-linux-gnu/libxenlight.so.4.17", "lib/x86_64-linux-gnu/libxlutil.so.4.17",
		"etc/libvirt/libvirtd.conf", "etc/libvirt/libxl.conf", hostCPUMapDir + "/x86_qemu64.xml", hostCPUMapDir + "/" + cpuModelTCGFile} {
		if !tree.Has(want) {
			t.Errorf("libvirt tree lacks %s", want)
		}
	}
	index := string(tree.Files()[strings.TrimPrefix(hostCPUMapDir, "/")+"/index.xml"])
	if !strings.Contains(index, "<include filename='"+cpuModelTCGFile+"'/>") || !strings.Contains(index, "x86_qemu64.xml") {
		t.Errorf("CPU map index:\n%s", index)
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
