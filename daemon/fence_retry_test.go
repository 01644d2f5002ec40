package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fenceRuns counts the lines the fencing script appended to path.
func fenceRuns(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

// TestFenceAbortNotRetried: with fence.on_failure abort (default), a
// failed fencing command means "not activated, the VM runs nowhere until an
// operator acts" (README). The backup's race is level-triggered (Decision.Race
// "may be true on every evaluation") and backupClaim now adopts the record
// {this host, gen+1} its own first race wrote, so every tick re-runs the
// fencing command and activates once it succeeds.
func TestFenceAbortNotRetried(t *testing.T) {
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	// Fails the first time, succeeds from the second run on.
	script := filepath.Join(dir, "fence.sh")
	body := "#!/bin/sh\necho run >> " + count + "\n[ $(wc -l < " + count + ") -ge 2 ]\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	wp := newWitnessPair(t, func(a, b *Config) {
		b.Fence = FenceConfig{Command: []string{script}, Timeout: Duration(time.Second)}
	})
	wp.stopA()
	wp.stoppedA = true
	deadline := time.Now().Add(20 * time.Second)
	for fenceRuns(t, count) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the fencing command never ran")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	s := vmStatus(t, wp.backup, "vm")
	if n := fenceRuns(t, count); n != 1 || s.Role != RoleBackup {
		t.Fatalf("after a failed fencing command (on_failure abort): fencing ran %d times, backup role %s (want 1 run, still a backup)", n, s.Role)
	}
}

// TestSlowFenceRunsOnce: a fencing command that takes a while (an
// IPMI power-off) and succeeds must run once. raceForVM clears
// v.w.claiming before runFence, so each watchBackups tick during the
// command starts another race, which (adopting its own record) runs the
// command again, concurrently.
func TestSlowFenceRunsOnce(t *testing.T) {
	dir := t.TempDir()
	count := filepath.Join(dir, "count")
	script := filepath.Join(dir, "fence.sh")
	body := "#!/bin/sh\necho run >> " + count + "\nsleep 0.5\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	wp := newWitnessPair(t, func(a, b *Config) {
		b.Fence = FenceConfig{Command: []string{script}, Timeout: Duration(5 * time.Second)}
	})
	wp.stopA()
	wp.stoppedA = true
	waitStatus(t, wp.backup, "vm", func(s VMStatus) bool { return s.Role == RoleActive })
	time.Sleep(time.Second)
	if n := fenceRuns(t, count); n != 1 {
		t.Fatalf("the fencing command ran %d times for one takeover (want 1)", n)
	}
}
