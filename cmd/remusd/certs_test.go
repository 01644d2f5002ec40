package main

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remusd/remusd/internal/pki"
)

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestCertsInitAndHost(t *testing.T) {
	root := t.TempDir()
	caDir, out := filepath.Join(root, "ca"), filepath.Join(root, "backup-tls")
	code, stdout, stderr := runCLI(t, "certs", "init", "--dir", caDir, "--name", "test-ca", "--validity", "24h")
	if code != exitOK {
		t.Fatalf("certs init: exit %d, stderr %q", code, stderr)
	}
	for _, want := range []string{filepath.Join(caDir, "ca.crt"), filepath.Join(caDir, "ca.key"), "remusd certs host NAME"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("certs init output lacks %q:\n%s", want, stdout)
		}
	}
	for p, want := range map[string]os.FileMode{caDir: 0o700, filepath.Join(caDir, "ca.crt"): 0o644, filepath.Join(caDir, "ca.key"): 0o600} {
		if m := fileMode(t, p); m != want {
			t.Errorf("%s: mode %v, want %v", p, m, want)
		}
	}

	code, stdout, stderr = runCLI(t, "certs", "host", "backup", "--ca-dir", caDir, "--out", out,
		"--dns", "backup.example.org", "--ip", "192.0.2.7", "--ip", "::1", "--validity", "1h")
	if code != exitOK {
		t.Fatalf("certs host: exit %d, stderr %q", code, stderr)
	}
	for _, want := range []string{filepath.Join(out, "ca.crt"), filepath.Join(out, "host.crt"), filepath.Join(out, "host.key"),
		"copy " + out + " to host backup as /etc/remusd/tls", `"name" to "backup"`} {
		if !strings.Contains(stdout, want) {
			t.Errorf("certs host output lacks %q:\n%s", want, stdout)
		}
	}
	for p, want := range map[string]os.FileMode{out: 0o700, filepath.Join(out, "ca.crt"): 0o644,
		filepath.Join(out, "host.crt"): 0o644, filepath.Join(out, "host.key"): 0o600} {
		if m := fileMode(t, p); m != want {
			t.Errorf("%s: mode %v, want %v", p, m, want)
		}
	}
	ca, err := pki.ReadCertificate(filepath.Join(caDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	host, err := pki.ReadCertificate(filepath.Join(out, "host.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := host.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("host certificate does not verify against the CA: %v", err)
	}
	if host.Subject.CommonName != "backup" || strings.Join(host.DNSNames, ",") != "backup,backup.example.org" || len(host.IPAddresses) != 2 {
		t.Errorf("host certificate CN %q DNS %v IPs %v", host.Subject.CommonName, host.DNSNames, host.IPAddresses)
	}
	if d := time.Until(host.NotAfter); d > time.Hour || d < 59*time.Minute {
		t.Errorf("host certificate valid for %v more, want 1h", d)
	}
	// The bundle works as the daemon's TLS configuration.
	if _, err := pki.BundleFiles(out).ServerConfig(); err != nil {
		t.Fatal(err)
	}
}

func TestCertsRefuseOverwrite(t *testing.T) {
	root := t.TempDir()
	caDir, out := filepath.Join(root, "ca"), filepath.Join(root, "tls")
	if code, _, stderr := runCLI(t, "certs", "init", "--dir", caDir); code != exitOK {
		t.Fatalf("certs init: %d %q", code, stderr)
	}
	key, _ := os.ReadFile(filepath.Join(caDir, "ca.key"))
	code, _, stderr := runCLI(t, "certs", "init", "--dir", caDir)
	if code != exitFailure || !strings.Contains(stderr, "refusing to overwrite "+filepath.Join(caDir, "ca.crt")) || !strings.Contains(stderr, "--force") {
		t.Fatalf("second init: exit %d, stderr %q", code, stderr)
	}
	if after, _ := os.ReadFile(filepath.Join(caDir, "ca.key")); string(after) != string(key) {
		t.Fatal("refused init changed ca.key")
	}
	if code, _, stderr := runCLI(t, "certs", "host", "h1", "--ca-dir", caDir, "--out", out); code != exitOK {
		t.Fatalf("certs host: %d %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "certs", "host", "h2", "--ca-dir", caDir, "--out", out)
	if code != exitFailure || !strings.Contains(stderr, "refusing to overwrite") || !strings.Contains(stderr, "--force") {
		t.Fatalf("second host: exit %d, stderr %q", code, stderr)
	}
	if c, _ := pki.ReadCertificate(filepath.Join(out, "host.crt")); c == nil || c.Subject.CommonName != "h1" {
		t.Fatal("refused host changed host.crt")
	}
	if code, _, stderr := runCLI(t, "certs", "host", "h2", "--ca-dir", caDir, "--out", out, "--force"); code != exitOK {
		t.Fatalf("forced host: %d %q", code, stderr)
	}
	if c, _ := pki.ReadCertificate(filepath.Join(out, "host.crt")); c == nil || c.Subject.CommonName != "h2" {
		t.Fatal("forced host left host.crt")
	}
	if code, _, stderr := runCLI(t, "certs", "init", "--dir", caDir, "--force"); code != exitOK {
		t.Fatalf("forced init: %d %q", code, stderr)
	}
}

func TestCertsErrors(t *testing.T) {
	root := t.TempDir()
	caDir := filepath.Join(root, "ca")
	if code, _, stderr := runCLI(t, "certs", "init", "--dir", caDir); code != exitOK {
		t.Fatalf("certs init: %d %q", code, stderr)
	}
	out := filepath.Join(root, "out")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"certs"}, exitUsage, "missing subcommand"},
		{[]string{"certs", "renew"}, exitUsage, `unknown subcommand "renew"`},
		{[]string{"certs", "host", "--ca-dir", caDir, "--out", out}, exitUsage, "missing NAME argument"},
		{[]string{"certs", "host", "../etc", "--ca-dir", caDir, "--out", out}, exitUsage, `host name "../etc" is not valid: it must match`},
		{[]string{"certs", "host", "a b", "--ca-dir", caDir, "--out", out}, exitUsage, `host name "a b" is not valid`},
		{[]string{"certs", "host", "-x", "--ca-dir", caDir, "--out", out}, exitUsage, "flag provided but not defined"},
		{[]string{"certs", "host", "h", "--ca-dir", caDir, "--out", out, "--ip", "nope"}, exitUsage, `"nope" is not an IP address`},
		{[]string{"certs", "host", "h", "--ca-dir", caDir, "--out", out, "--dns", "bad name"}, exitUsage, `DNS name "bad name" is not valid`},
		{[]string{"certs", "host", "h", "--ca-dir", caDir, "--out", out, "--validity", "-1h"}, exitUsage, "--validity must be positive"},
		{[]string{"certs", "host", "h", "extra", "--ca-dir", caDir, "--out", out}, exitUsage, `unexpected argument "extra"`},
		{[]string{"certs", "host", "h", "--ca-dir", filepath.Join(root, "none"), "--out", out}, exitFailure, "certs init"},
		{[]string{"certs", "init", "--dir", filepath.Join(root, "ca2"), "--validity", "0s"}, exitUsage, "--validity must be positive"},
		{[]string{"certs", "init", "--dir", filepath.Join(root, "ca2"), "--name", ""}, exitUsage, "CA name is empty"},
	} {
		code, _, stderr := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d (want %d), stderr %q lacks %q", tc.args, code, tc.code, stderr, tc.want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("a refused certs host created its output directory")
	}
}

func TestCertsHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"certs", "--help"}, []string{"Usage: remusd certs init|host", "host NAME"}},
		{[]string{"help", "certs"}, []string{"Usage: remusd certs init|host"}},
		{[]string{"certs", "init", "--help"}, []string{"Usage: remusd certs init", "--dir DIR", "--name NAME", "--validity D", "(default /etc/remusd/ca)", "--force"}},
		{[]string{"certs", "host", "-h"}, []string{"Usage: remusd certs host NAME", "--ca-dir DIR", "--out DIR", "--dns NAME", "--ip ADDR", "--validity D", "(default /etc/remusd/tls)"}},
	} {
		code, stdout, stderr := runCLI(t, tc.args...)
		if code != exitOK {
			t.Errorf("%q: exit %d, stderr %q", tc.args, code, stderr)
		}
		for _, w := range tc.want {
			if !strings.Contains(stdout, w) {
				t.Errorf("%q: output lacks %q:\n%s", tc.args, w, stdout)
			}
		}
	}
}
