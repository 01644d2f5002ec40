package vmtest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// skipUnavailable skips t when err says a prerequisite is missing.
func skipUnavailable(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrUnavailable) {
		t.Skipf("needs QEMU, busybox-static and %s: %v (run vmtest/setup.sh)", KernelPackage, err)
	}
}

func TestCPIOFormat(t *testing.T) {
	var b bytes.Buffer
	w := newCPIOWriter(&b)
	w.file("a/b/c", 0o644, []byte("hello"))
	w.symlink("a/l", "b/c")
	if err := w.close(); err != nil {
		t.Fatal(err)
	}
	s := b.String()
	for _, want := range []string{"070701", "a\x00", "a/b\x00", "a/b/c\x00", "hello", "TRAILER!!!\x00"} {
		if !strings.Contains(s, want) {
			t.Errorf("archive lacks %q", want)
		}
	}
	if b.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-aligned", b.Len())
	}
	// Parents come before children.
	if strings.Index(s, "a/b\x00") > strings.Index(s, "a/b/c\x00") {
		t.Error("directory a/b written after a/b/c")
	}
}

func TestShellQuote(t *testing.T) {
	if got := shellQuote("it's"); got != `'it'\''s'` {
		t.Fatalf("shellQuote = %s", got)
	}
}

func TestModuleResolveFromModulesDep(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/net/sched/sch_plug.ko:\nkernel/net/sched/act_mirred.ko: kernel/net/sched/x-dep.ko\nkernel/net/sched/x-dep.ko:\n"
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644); err != nil {
		t.Fatal(err)
	}
	ix, err := loadModuleIndex(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ix.resolve([]string{"act-mirred", "sch_plug"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"kernel/net/sched/x-dep.ko", "kernel/net/sched/act_mirred.ko", "kernel/net/sched/sch_plug.ko"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("resolve = %v, want %v", got, want)
	}
	if _, err := ix.resolve([]string{"nope"}); err == nil {
		t.Fatal("resolving a missing module succeeded")
	}
}

// TestRealKernelModules resolves the network modules against the real
// kernel package (its .modinfo, as Debian ships no modules.dep).
func TestRealKernelModules(t *testing.T) {
	k, err := FindKernel(context.Background(), "")
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := loadModuleIndex(k.Modules)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := ix.resolve(NetModules)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s from %s: load order %v", k.Version, k.Source, mods)
	if len(mods) < len(NetModules) {
		t.Fatalf("only %d modules for %v", len(mods), NetModules)
	}
}

// TestBootSmoke boots the VM with the network modules and checks they
// loaded and that a failing command yields FAIL.
func TestBootSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	ctx := context.Background()
	cfg := Config{
		Modules:      NetModules,
		ModuleParams: map[string]string{"ifb": "numifbs=0"},
		Command:      []string{"sh", "-c", `grep -q '^sch_plug ' /proc/modules && grep -q remusd.vmtest=1 /proc/cmdline && [ "$REMUSD_VMTEST" = 1 ] && [ "$X" = "a b" ]`},
		Env:          map[string]string{"X": "a b"},
		Timeout:      90 * time.Second,
	}
	res, err := Run(ctx, cfg)
	skipUnavailable(t, err)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("verdict %q in %s", res.Verdict, res.Elapsed)
	if !res.Passed {
		t.Fatalf("verdict %q; console:\n%s", res.Verdict, res.Console)
	}
	cfg.Command = []string{"false"}
	res, err = Run(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.Passed || !strings.HasPrefix(res.Verdict, "FAIL") {
		t.Fatalf("false gave verdict %q", res.Verdict)
	}
}

func TestArchive(t *testing.T) {
	var b strings.Builder
	a := NewArchive(&b, 1<<20)
	a.File("a/b", 0o644, []byte("xyz"))
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	s := b.String()
	// the directory a, the file a/b, the trailer; padded to 4 bytes
	if len(s)%4 != 0 || !strings.Contains(s, "TRAILER!!!") || strings.Count(s, "070701") != 3 || !strings.Contains(s, "00100000") {
		t.Fatalf("bad archive %q", s)
	}
}
