package etcdmember

import (
	"os"
	"testing"
)

func TestLifecycle(t *testing.T) {
	if _, err := Start(Options{Host: "localhost"}); err == nil {
		t.Fatal("Start accepted a host name instead of an IP address")
	}
	s, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := s.dir
	if !s.Running() || len(s.ClientURLs()) != 1 {
		t.Fatalf("running %v, URLs %v", s.Running(), s.ClientURLs())
	}
	if err := s.Restart(); err == nil {
		t.Error("Restart of a running member succeeded")
	}
	if _, err := s.IssueClient(t.TempDir(), "hostA"); err == nil {
		t.Error("IssueClient without TLS succeeded")
	}
	s.Stop()
	s.Stop()
	if s.Running() {
		t.Error("running after Stop")
	}
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("temporary directory %s left behind: %v", dir, err)
	}
}
