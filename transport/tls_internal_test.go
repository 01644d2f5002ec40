package transport

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"strings"
	"testing"
)

// TestIdentityOf: a certificate's identity is its CommonName, and only a
// valid host name is an identity (a CA may have signed anything).
func TestIdentityOf(t *testing.T) {
	for cn, want := range map[string]string{
		"backup":      "",
		"":            "no CommonName",
		"bad name":    "is not valid",
		"../etc":      "is not valid",
		"-rf":         "is not valid",
		"x\x00y":      "is not valid",
		"backup.lan.": "",
	} {
		id, err := identityOf(&x509.Certificate{Subject: pkix.Name{CommonName: cn}})
		switch {
		case want == "" && (err != nil || id != cn):
			t.Errorf("%q: got %q, %v", cn, id, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%q: got %q, %v; want an error containing %q", cn, id, err, want)
		}
	}
}
