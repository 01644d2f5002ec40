package sdnotify

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

func TestNotify(t *testing.T) {
	t.Setenv(Socket, "")
	if sent, err := Notify("READY=1"); sent || err != nil {
		t.Fatalf("without %s: sent %v, err %v", Socket, sent, err)
	}
	for _, abstract := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "notify.sock")
		name, env := path, path
		if abstract {
			name, env = "\x00remusd-test-"+filepath.Base(t.TempDir()), ""
			env = "@" + name[1:]
		}
		ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv(Socket, env)
		if sent, err := Notify("READY=1\nSTATUS=serving"); !sent || err != nil {
			t.Fatalf("abstract %v: sent %v, err %v", abstract, sent, err)
		}
		buf := make([]byte, 256)
		_ = ln.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err := ln.ReadFromUnix(buf)
		if err != nil || string(buf[:n]) != "READY=1\nSTATUS=serving" {
			t.Fatalf("abstract %v: got %q, %v", abstract, buf[:n], err)
		}
		ln.Close()
	}
	t.Setenv(Socket, "relative/path")
	if _, err := Notify("READY=1"); err == nil {
		t.Fatal("a relative socket path was accepted")
	}
}
