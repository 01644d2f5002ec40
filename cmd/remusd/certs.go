package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/remusd/remusd/internal/pki"
	"github.com/remusd/remusd/transport"
)

// Default locations of `remusd certs`.
const (
	defaultCADir  = "/etc/remusd/ca"
	defaultTLSDir = "/etc/remusd/tls"
)

var certsCommand = &command{
	name: "certs", args: "init|host [flags] [args]",
	summary: "create the CA and host certificates for mutual TLS between daemons",
	desc: `Creates what mutual TLS between remusd daemons needs: one certificate
authority (CA), and one certificate per host signed by it. A host's
certificate names its identity (the certificate's CommonName), which is
how its peers know it; use the host's remusd 'name' for it.

Subcommands:
  init         create a CA (ca.crt, ca.key) in --dir
  host NAME    issue a certificate for host NAME and write the bundle that
               host needs (ca.crt, host.crt, host.key) into --out

Run 'remusd certs SUBCOMMAND --help' for a subcommand's flags. Keep the CA
directory (its ca.key) on an administration host; copy each host's bundle
to that host only.`,
	run: runCerts,
}

var certsSubcommands = []*command{
	{
		name: "certs init", args: "[--dir DIR] [--name NAME] [--validity D] [--force]",
		summary: "create a CA",
		desc: `Creates a certificate authority: writes DIR/ca.crt (mode 0644) and DIR/ca.key
(0600), creating DIR with mode 0700. Existing files are left alone unless
--force is given.`,
		run: runCertsInit,
	},
	{
		name: "certs host", args: "NAME [--ca-dir DIR] [--out DIR] [--dns NAME]... [--ip ADDR]... [--validity D] [--force]",
		summary: "issue a host certificate",
		desc: `Issues a certificate for the host NAME (its identity: the certificate's
CommonName, also its first DNS name) signed by the CA in --ca-dir, and
writes the bundle that host needs into --out: ca.crt, host.crt (0644) and
host.key (0600), creating --out with mode 0700. Copy that directory to host
NAME as /etc/remusd/tls, and set that daemon's config "name" to NAME.
NAME must match ` + transport.HostNamePattern + `. Existing files are left alone
unless --force is given.`,
		run: runCertsHost,
	},
}

func runCerts(ctx context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		return usageError(stderr, c, "missing subcommand (init or host)")
	}
	switch args[0] {
	case "-h", "-help", "--help":
		printCommandHelp(stdout, c, nil)
		return exitOK
	}
	for _, sc := range certsSubcommands {
		if sc.name == c.name+" "+args[0] {
			return sc.run(ctx, sc, args[1:], stdout, stderr)
		}
	}
	return usageError(stderr, c, "unknown subcommand %q (want init or host)", args[0])
}

// dnsList is a repeatable DNS name flag.
type dnsList []string

func (l *dnsList) String() string { return strings.Join(*l, ",") }

func (l *dnsList) Set(s string) error {
	if err := pki.ValidateDNSName(s); err != nil {
		return err
	}
	*l = append(*l, s)
	return nil
}

// ipList is a repeatable IP address flag.
type ipList []net.IP

func (l *ipList) String() string { return "" }

func (l *ipList) Set(s string) error {
	ip := net.ParseIP(s)
	if ip == nil {
		return fmt.Errorf("%q is not an IP address", s)
	}
	*l = append(*l, ip)
	return nil
}

// certsFailure reports a failed certs operation; an existing file gets a
// hint about --force.
func certsFailure(c *command, err error, stderr io.Writer) int {
	fmt.Fprintf(stderr, "remusd %s: %v\n", c.name, err)
	switch {
	case errors.Is(err, fs.ErrExist):
		fmt.Fprintf(stderr, "Nothing was written. Use --force to replace the existing files.\n")
	case c.name == "certs host" && errors.Is(err, fs.ErrNotExist):
		fmt.Fprintf(stderr, "Is --ca-dir right? 'remusd certs init' creates a CA.\n")
	}
	return exitFailure
}

func runCertsInit(_ context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	dir := fs.String("dir", defaultCADir, "write the CA into `DIR`")
	name := fs.String("name", "remusd-ca", "the CA's `NAME` (its certificate's CommonName)")
	validity := fs.Duration("validity", pki.DefaultCAValidity, "the CA is valid for `D`")
	force := fs.Bool("force", false, "overwrite an existing CA")
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, nil, stderr); !ok {
		return code
	}
	if *validity <= 0 {
		return usageError(stderr, c, "--validity must be positive")
	}
	if err := pki.ValidateCAName(*name); err != nil {
		return usageError(stderr, c, "--name: %v", err)
	}
	if *dir == "" {
		return usageError(stderr, c, "--dir must not be empty")
	}
	if err := pki.InitCA(*dir, *name, *validity, *force); err != nil {
		return certsFailure(c, err, stderr)
	}
	certPath := filepath.Join(*dir, pki.CACertFile)
	cert, err := pki.ReadCertificate(certPath)
	if err != nil {
		return certsFailure(c, err, stderr)
	}
	fmt.Fprintf(stdout, "wrote %s (CA %q, valid until %s)\n", certPath, cert.Subject.CommonName, cert.NotAfter.Format(time.DateOnly))
	fmt.Fprintf(stdout, "wrote %s (the CA's private key: keep it secret, on this host only)\n", filepath.Join(*dir, pki.CAKeyFile))
	fmt.Fprintf(stdout, "next: for each remusd host, run 'remusd certs host NAME --ca-dir %s --out DIR' with NAME = that daemon's config name\n", *dir)
	return exitOK
}

func runCertsHost(_ context.Context, c *command, args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet(c.name)
	caDir := fs.String("ca-dir", defaultCADir, "`DIR` of the CA (from 'remusd certs init')")
	out := fs.String("out", defaultTLSDir, "write the host's bundle into `DIR`")
	var dns dnsList
	fs.Var(&dns, "dns", "also valid for DNS `NAME` (repeatable)")
	var ips ipList
	fs.Var(&ips, "ip", "also valid for IP `ADDR` (repeatable)")
	validity := fs.Duration("validity", pki.DefaultHostValidity, "the certificate is valid for `D` (never beyond the CA)")
	force := fs.Bool("force", false, "overwrite existing files in --out")
	pos, code, done := parse(c, fs, args, stdout, stderr)
	if done {
		return code
	}
	if code, ok := wantArgs(c, pos, []string{"NAME"}, stderr); !ok {
		return code
	}
	name := pos[0]
	if err := transport.ValidateHostName(name); err != nil {
		return usageError(stderr, c, "%v", err)
	}
	if *validity <= 0 {
		return usageError(stderr, c, "--validity must be positive")
	}
	if *out == "" || *caDir == "" {
		return usageError(stderr, c, "--out and --ca-dir must not be empty")
	}
	files, err := pki.IssueHost(*caDir, name, *out, pki.HostOptions{DNS: dns, IPs: ips, Validity: *validity, Force: *force})
	if err != nil {
		return certsFailure(c, err, stderr)
	}
	cert, err := pki.ReadCertificate(files.Cert)
	if err != nil {
		return certsFailure(c, err, stderr)
	}
	fmt.Fprintf(stdout, "wrote %s (the CA's certificate)\n", files.CA)
	fmt.Fprintf(stdout, "wrote %s (identity %q, valid until %s)\n", files.Cert, name, cert.NotAfter.Format(time.DateOnly))
	fmt.Fprintf(stdout, "wrote %s (the host's private key)\n", files.Key)
	fmt.Fprintf(stdout, "next: copy %s to host %s as %s (directory 0700, host.key 0600), and set that daemon's config \"name\" to %q\n",
		*out, name, defaultTLSDir, name)
	return exitOK
}
