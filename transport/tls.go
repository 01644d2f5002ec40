package transport

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFiles names the PEM files of one side of a mutually authenticated
// replication link: its own certificate and key, and the CA that signs its
// peers' certificates.
type TLSFiles struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
	CA   string `json:"ca"`
	// ServerName is the name the primary expects in the backup's
	// certificate ("" = the host part of the peer address).
	ServerName string `json:"server_name,omitempty"`
}

// Enabled reports whether TLS is configured.
func (f TLSFiles) Enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// Validate checks that all three files are named and readable.
func (f TLSFiles) Validate() error {
	var errs []error
	for _, p := range []struct{ field, path string }{{"cert", f.Cert}, {"key", f.Key}, {"ca", f.CA}} {
		if p.path == "" {
			errs = append(errs, fmt.Errorf("tls.%s: must be set when TLS is configured", p.field))
			continue
		}
		if _, err := os.Stat(p.path); err != nil {
			errs = append(errs, fmt.Errorf("tls.%s: %w", p.field, err))
		}
	}
	return errors.Join(errs...)
}

func (f TLSFiles) load() (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("tls: load certificate %s / key %s: %w", f.Cert, f.Key, err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("tls: read CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return tls.Certificate{}, nil, fmt.Errorf("tls: CA file %s holds no PEM certificate", f.CA)
	}
	return cert, pool, nil
}

// ServerConfig is the backup's side: it presents its certificate and
// requires a client certificate signed by the CA.
func (f TLSFiles) ServerConfig() (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}, nil
}

// ClientConfig is the primary's side: it presents its certificate and
// verifies the backup's against the CA and serverName.
func (f TLSFiles) ClientConfig(serverName string) (*tls.Config, error) {
	cert, pool, err := f.load()
	if err != nil {
		return nil, err
	}
	if f.ServerName != "" {
		serverName = f.ServerName
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
	}, nil
}
