package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/remusd/remusd/hypervisor/qemu"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/remusd/remusd/failover/watchdog"
	"github.com/remusd/remusd/hypervisor"
	"github.com/remusd/remusd/hypervisor/libvirt"
	"github.com/remusd/remusd/transport"
)

// Duration is a time.Duration that reads and writes as "25ms" in JSON.
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("bad duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}

// Takeover modes.
const (
	// TakeoverManual: the backup reports a lost primary; an operator runs
	// `remusd failover`. The safe default until a witness is configured.
	TakeoverManual = "manual"
	// TakeoverAutoUnsafe: the backup activates its replica when the
	// replication link falls silent. Unsafe under a network partition
	// (both copies may run); an explicit opt-in.
	TakeoverAutoUnsafe = "auto-unsafe"
	// TakeoverAuto: with a witness, the backup races for the VM's witness
	// record when its primary is lost and activates only if it wins. The
	// default when a witness is configured.
	TakeoverAuto = "auto"
)

// Fencing-hook failure policies.
const (
	// FenceAbort: a fencing command that fails (or times out) stops the
	// takeover: the backup holds the VM's record but does not start it.
	FenceAbort = "abort"
	// FenceProceed: activate anyway (the witness already guarantees that
	// the old primary cannot release output any more).
	FenceProceed = "proceed"
)

// Ack-timeout policies on the primary.
const (
	// AckTimeoutHold keeps holding output (clients see a stall) while the
	// primary keeps trying to reach the backup.
	AckTimeoutHold = "hold"
	// AckTimeoutUnprotect releases held output and runs unprotected,
	// logged loudly, until the backup is back.
	AckTimeoutUnprotect = "unprotect"
)

// Config is a daemon's configuration: a JSON file and/or flags.
type Config struct {
	// Name identifies this host in logs and status.
	Name string `json:"name"`
	// Listen is the replication address peers connect to ("" = this
	// daemon accepts no replicas).
	Listen string `json:"listen"`
	// Control is the path of the local control socket (mode 0600).
	Control string `json:"control"`
	// Metrics is the address of the Prometheus /metrics endpoint ("" = off).
	Metrics string `json:"metrics"`
	// StateDir holds per-VM audit logs (captured, acknowledged, committed
	// and activated epochs).
	StateDir string `json:"state_dir"`

	EpochInterval Duration `json:"epoch_interval"`
	MaxInflight   int      `json:"max_inflight"`

	HeartbeatInterval Duration `json:"heartbeat_interval"`
	HeartbeatTimeout  Duration `json:"heartbeat_timeout"`
	AckTimeout        Duration `json:"ack_timeout"`
	AckTimeoutPolicy  string   `json:"ack_timeout_policy"`
	Takeover          string   `json:"takeover"`
	DialTimeout       Duration `json:"dial_timeout"`
	ReconnectBackoff  Duration `json:"reconnect_backoff"`

	// TLS is the replication link's mutual TLS 1.3 (the default): this
	// daemon presents Cert/Key and accepts only peers whose certificates
	// the CA signed and whose identity (the certificate's name) is one of
	// Peers. `remusd certs init` and `remusd certs host NAME` create them.
	TLS transport.TLSFiles `json:"tls"`
	// Insecure runs the replication link in plaintext, without
	// authentication: a peer is then who its Hello says it is. Only on a
	// loopback listener, unless InsecureNonLoopback is set as well.
	Insecure bool `json:"insecure"`
	// InsecureNonLoopback allows Insecure on a non-loopback listener and
	// towards non-loopback peers (the operator says so twice).
	InsecureNonLoopback bool `json:"insecure_non_loopback"`
	// Peers are the daemons this one talks to, by certificate identity:
	// the backups it may protect VMs to and the primaries it accepts
	// replicas from (only of the VMs listed).
	Peers []Peer `json:"peers"`
	// ReplicaBudgetMiB bounds the memory of all replicas this daemon keeps
	// as a backup (0 = half of the host's memory).
	ReplicaBudgetMiB int `json:"replica_budget_mib"`
	// DiskJournalMiB bounds, per protected disk, the writes a primary keeps
	// until the backup acknowledges their epoch (default 64). A guest that
	// writes faster than the link waits for acks: its epochs grow longer
	// and its writes slow down, the buffer does not grow.
	DiskJournalMiB int `json:"disk_journal_mib"`
	// DiskSync (backup, default true) makes every replica disk an epoch
	// changed durable (fdatasync) before the epoch is acknowledged.
	// false is faster and unsafe: a crash of the backup's host (not just
	// its daemon) can lose acknowledged writes, and a failover after that
	// resumes a guest whose disk lacks writes its clients were told about.
	DiskSync *bool `json:"disk_sync,omitempty"`
	// RestartGrace is how long a backup keeps waiting for a primary whose
	// daemon said it restarts before its silence counts as a lost primary.
	RestartGrace Duration `json:"restart_grace"`

	// OutputBuffer selects how a VM's network output is held: auto (plug
	// where the kernel has it, else NFQUEUE), plug, nfqueue, or
	// none-unsafe (no output commit; an explicit, logged choice).
	OutputBuffer string `json:"output_buffer"`

	// DeltaCachePages bounds the primary's cache of last-sent page copies
	// used for XOR deltas (pages of 4 KiB).
	DeltaCachePages int `json:"delta_cache_pages"`

	// SimVMs are simulated guests this daemon runs (sim backend).
	SimVMs []SimVM `json:"sim_vms"`

	// QemuVMs are QEMU guests this daemon launches or attaches to at start
	// (qemu backend, role local until protected).
	QemuVMs []QemuVM `json:"qemu_vms"`

	// XenVMs are Xen domains of this host (xen backend, built with -tags
	// xen): on a primary, domains the daemon finds running and protects;
	// on a backup, how it creates their standbys (daemon/xen.go).
	XenVMs []XenVM `json:"xen_vms,omitempty"`
	// Xen holds the Xen backend's settings.
	Xen XenConfig `json:"xen,omitempty"`

	// Libvirt is where libvirtd listens, for qemu_vms with libvirt set.
	Libvirt libvirt.Config `json:"libvirt"`

	// Standby says how this daemon, as a backup, builds the hot standby
	// QEMU of a protected qemu VM.
	Standby StandbyConfig `json:"standby"`

	// Witness is the etcd cluster that decides which host holds each
	// protected VM (nil: none; automatic takeover is then off unless
	// takeover is auto-unsafe).
	Witness *WitnessConfig `json:"witness,omitempty"`
	// TakeoverGrace is how long a backup waits, once its primary is lost,
	// before it races for the witness record: a living primary claims
	// first, so that a blip does not move the VM.
	TakeoverGrace Duration `json:"takeover_grace"`
	// TakeoverGraceClosed replaces TakeoverGrace when the primary's side
	// closed the link (EOF, reset): a living primary sees that close at
	// the same moment and claims at once, so the backup need only give it
	// a few witness round trips.
	TakeoverGraceClosed Duration `json:"takeover_grace_closed"`
	// FenceAfter: a primary that has neither its backup's acks nor the
	// witness for this long pauses its guest (it cannot prove it still
	// holds the VM; the backup may be taking over).
	FenceAfter Duration `json:"fence_after"`
	// Fence is an optional STONITH command the winner of a takeover runs
	// before it activates.
	Fence FenceConfig `json:"fence"`
	// SecondPath is the second heartbeat path (off unless listen is set).
	SecondPath SecondPathConfig `json:"second_path"`
	// Watchdog is the last resort against a hung daemon (see
	// daemon/watchdog.go and package failover/watchdog).
	Watchdog WatchdogConfig `json:"watchdog"`
}

// SecondPathConfig is the second heartbeat path: UDP datagrams between the
// daemons on addresses of their own (ideally another network than the
// replication link's), authenticated under a key from their latest mutual
// TLS connection. A backup whose replication link is lost while the
// primary's second-path heartbeats still arrive does not consider the
// primary lost (failover/heartbeat).
type SecondPathConfig struct {
	// Listen is this daemon's UDP IP:PORT ("" = no second path).
	Listen string `json:"listen,omitempty"`
	// Interval and Timeout default to heartbeat_interval and
	// heartbeat_timeout.
	Interval Duration `json:"interval,omitempty"`
	Timeout  Duration `json:"timeout,omitempty"`
}

// interval and timeout with their defaults applied.
func (c *Config) secondPathTimes() (interval, timeout time.Duration) {
	interval, timeout = c.SecondPath.Interval.D(), c.SecondPath.Timeout.D()
	if interval == 0 {
		interval = c.HeartbeatInterval.D()
	}
	if timeout == 0 {
		timeout = c.HeartbeatTimeout.D()
	}
	return interval, timeout

}

// WatchdogConfig is the watchdog section of the configuration.
type WatchdogConfig struct {
	// Enabled starts (or joins) the watchdog process; default: on when a
	// witness is configured and there are qemu_vms or xen_vms.
	Enabled *bool `json:"enabled,omitempty"`
	// Timeout bounds how long a hung daemon's protected guest may run on:
	// every pet vouches for at most this long (default fence_after, or
	// heartbeat_timeout if that is longer).
	Timeout Duration `json:"timeout,omitempty"`
}

// watchdogEnabled is the effective setting.
func (c Config) watchdogEnabled() bool {
	if c.Watchdog.Enabled != nil {
		return *c.Watchdog.Enabled
	}
	return c.Witness != nil && (len(c.QemuVMs) > 0 || len(c.XenVMs) > 0)
}

// watchdogTimeout is the effective timeout.
func (c Config) watchdogTimeout() time.Duration {
	if c.Watchdog.Timeout != 0 {
		return c.Watchdog.Timeout.D()
	}
	return max(c.FenceAfter.D(), c.HeartbeatTimeout.D())
}

// WitnessConfig is the witness section of the configuration.
type WitnessConfig struct {
	// Endpoints are the etcd members' client URLs (all of them).
	Endpoints []string `json:"endpoints"`
	// TLS is etcd's own client TLS (cert, key, ca; empty: plaintext).
	TLS struct {
		Cert string `json:"cert,omitempty"`
		Key  string `json:"key,omitempty"`
		CA   string `json:"ca,omitempty"`
	} `json:"tls"`
	Prefix      string   `json:"prefix,omitempty"`
	DialTimeout Duration `json:"dial_timeout,omitempty"`
	OpTimeout   Duration `json:"op_timeout,omitempty"`
}

// FenceConfig is an optional fencing (STONITH) hook.
type FenceConfig struct {
	// Command is the program and its arguments; "%vm" and "%host" in an
	// argument are replaced by the VM's name and the host being fenced
	// (the old primary's name). Empty: no fencing command.
	Command []string `json:"command,omitempty"`
	// Timeout bounds the command (default 10 s).
	Timeout Duration `json:"timeout,omitempty"`
	// OnFailure is abort (default) or proceed.
	OnFailure string `json:"on_failure,omitempty"`
}

// takeover is the effective takeover mode: auto with a witness, manual
// without, unless configured.
func (c Config) takeover() string {
	if c.Takeover != "" {
		return c.Takeover
	}
	if c.Witness != nil {
		return TakeoverAuto
	}
	return TakeoverManual
}

// ackTimeoutPolicy is the effective policy: with a witness the primary
// runs on unprotected once it has won the VM's record (losing the backup
// never takes the service down); without one it holds.
func (c Config) ackTimeoutPolicy() string {
	if c.AckTimeoutPolicy != "" {
		return c.AckTimeoutPolicy
	}
	if c.Witness != nil {
		return AckTimeoutUnprotect
	}
	return AckTimeoutHold
}

// SimVM describes one simulated guest.
type SimVM struct {
	Name        string `json:"name"`
	MemoryBytes int64  `json:"memory_bytes"`
	Workload    string `json:"workload"`
	Rate        int    `json:"rate"`
	Seed        uint64 `json:"seed"`
	OutputEvery int    `json:"output_every"`
	// Output is a TCP address the guest's released output is sent to
	// ("" = output is counted and discarded).
	Output string `json:"output"`
}

// Peer is another remusd this daemon talks to.
type Peer struct {
	// Name is the peer's identity: the name in its certificate (and its
	// daemon's configured name).
	Name string `json:"name"`
	// Address is the peer's replication HOST:PORT ("" = it is never
	// dialled by name; `remusd protect VM --peer NAME` needs it).
	Address string `json:"address"`
	// VMs lists the VMs this daemon accepts replicas of from the peer
	// ("*" = any VM name).
	VMs []string `json:"vms"`
	// SecondPath is the peer's second-path heartbeat IP:PORT ("" = none).
	SecondPath string `json:"second_path,omitempty"`
}

// accepts reports whether the peer may protect vm to this daemon.
func (p Peer) accepts(vm string) bool {
	for _, v := range p.VMs {
		if v == "*" || v == vm {
			return true
		}
	}
	return false
}

// Default locations of the replication link's certificates, as
// `remusd certs host NAME` writes them (its --out).
const (
	DefaultTLSDir  = "/etc/remusd/tls"
	DefaultTLSCert = DefaultTLSDir + "/host.crt"
	DefaultTLSKey  = DefaultTLSDir + "/host.key"
	DefaultTLSCA   = DefaultTLSDir + "/ca.crt"
)

// DefaultConfig returns a configuration with every default filled in.
func DefaultConfig() Config {
	return Config{
		Name:                "remusd",
		Control:             "/run/remusd/control.sock",
		StateDir:            "/var/lib/remusd",
		EpochInterval:       Duration(25 * time.Millisecond),
		MaxInflight:         1,
		HeartbeatInterval:   Duration(100 * time.Millisecond),
		HeartbeatTimeout:    Duration(1 * time.Second),
		AckTimeout:          Duration(2 * time.Second),
		TakeoverGrace:       Duration(150 * time.Millisecond),
		TakeoverGraceClosed: Duration(30 * time.Millisecond),
		FenceAfter:          Duration(3 * time.Second),
		DialTimeout:         Duration(2 * time.Second),
		ReconnectBackoff:    Duration(200 * time.Millisecond),
		DeltaCachePages:     16384,
		OutputBuffer:        OutputAuto,
		TLS:                 transport.TLSFiles{Cert: DefaultTLSCert, Key: DefaultTLSKey, CA: DefaultTLSCA},
		RestartGrace:        Duration(time.Minute),
	}
}

// isLoopbackAddr reports whether HOST:PORT names a loopback address (or
// localhost).
func isLoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// LoadConfigFile reads a JSON config file over the defaults. Unknown
// fields are an error (a typo must not silently fall back to a default).
func LoadConfigFile(path string, into *Config) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Validate checks the configuration as a whole and names every bad field.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("config field %s: %s", field, fmt.Sprintf(format, a...)))
	}
	if c.Control == "" {
		bad("control", "must name the control socket path")
	}
	if c.StateDir == "" {
		bad("state_dir", "must be set")
	}
	if c.EpochInterval.D() < time.Millisecond || c.EpochInterval.D() > 10*time.Second {
		bad("epoch_interval", "%v out of range [1ms, 10s]", c.EpochInterval.D())
	}
	if c.MaxInflight < 1 || c.MaxInflight > 64 {
		bad("max_inflight", "%d out of range [1, 64]", c.MaxInflight)
	}
	if c.HeartbeatInterval.D() <= 0 {
		bad("heartbeat_interval", "must be positive, got %v", c.HeartbeatInterval.D())
	} else if c.HeartbeatTimeout.D() < 3*c.HeartbeatInterval.D() {
		bad("heartbeat_timeout", "%v must cover at least 3 heartbeat intervals (heartbeat_interval %v)",
			c.HeartbeatTimeout.D(), c.HeartbeatInterval.D())
	}
	if c.AckTimeout.D() < c.EpochInterval.D() {
		bad("ack_timeout", "%v must be at least one epoch_interval (%v)", c.AckTimeout.D(), c.EpochInterval.D())
	}
	switch c.AckTimeoutPolicy {
	case "", AckTimeoutHold, AckTimeoutUnprotect:
	default:
		bad("ack_timeout_policy", "%q unknown (want %s|%s)", c.AckTimeoutPolicy, AckTimeoutHold, AckTimeoutUnprotect)
	}
	switch c.Takeover {
	case "", TakeoverManual, TakeoverAutoUnsafe:
	case TakeoverAuto:
		if c.Witness == nil {
			bad("takeover", "auto needs a witness (config witness); without one use manual, or auto-unsafe if two copies under a partition are acceptable")
		}
	default:
		bad("takeover", "%q unknown (want %s|%s|%s)", c.Takeover, TakeoverAuto, TakeoverManual, TakeoverAutoUnsafe)
	}
	if w := c.Witness; w != nil {
		if err := w.witnessConfig().Validate(); err != nil {
			bad("witness", "%v", err)
		}
	}
	if c.TakeoverGrace.D() < 0 || c.TakeoverGrace.D() > time.Minute {
		bad("takeover_grace", "%v out of range [0, 1m]", c.TakeoverGrace.D())
	}
	if c.TakeoverGraceClosed.D() < 0 || c.TakeoverGraceClosed.D() > c.TakeoverGrace.D() {
		bad("takeover_grace_closed", "%v out of range [0, takeover_grace %v]", c.TakeoverGraceClosed.D(), c.TakeoverGrace.D())
	}
	if c.FenceAfter.D() <= 0 {
		bad("fence_after", "must be positive")
	}
	if f := c.Fence; len(f.Command) > 0 || f.OnFailure != "" || f.Timeout != 0 {
		if len(f.Command) == 0 {
			bad("fence.command", "must be set with fence.timeout or fence.on_failure")
		} else if !filepath.IsAbs(f.Command[0]) {
			bad("fence.command", "%q: the program must be an absolute path", f.Command[0])
		}
		switch f.OnFailure {
		case "", FenceAbort, FenceProceed:
		default:
			bad("fence.on_failure", "%q unknown (want %s|%s)", f.OnFailure, FenceAbort, FenceProceed)
		}
		if f.Timeout.D() < 0 {
			bad("fence.timeout", "must not be negative")
		}
	}
	errs = append(errs, c.validateWatchdog()...)
	if c.DialTimeout.D() <= 0 {
		bad("dial_timeout", "must be positive")
	}
	if c.ReconnectBackoff.D() <= 0 {
		bad("reconnect_backoff", "must be positive")
	}
	if err := transport.ValidateHostName(c.Name); err != nil {
		bad("name", "%v", err)
	}
	switch {
	case c.Insecure:
		if c.Listen != "" && !isLoopbackAddr(c.Listen) && !c.InsecureNonLoopback {
			bad("insecure", "plaintext replication on the non-loopback listener %s: anyone who reaches it is trusted; set insecure_non_loopback too if you mean it, or use tls (remusd certs)", c.Listen)
		}
	case !c.TLS.Enabled():
		bad("tls", "must name cert, key and ca (mutual TLS is required; `remusd certs init` and `remusd certs host %s` create them), or set insecure for plaintext on loopback", c.Name)
	default:
		for _, f := range []struct{ field, path string }{{"cert", c.TLS.Cert}, {"key", c.TLS.Key}, {"ca", c.TLS.CA}} {
			if f.path == "" {
				bad("tls."+f.field, "must be set when tls is configured")
			} else if _, err := os.Stat(f.path); err != nil {
				bad("tls."+f.field, "%v (create the files with `remusd certs init` and `remusd certs host %s`, or set insecure for plaintext on loopback)", err, c.Name)
			}
		}
	}
	if c.InsecureNonLoopback && !c.Insecure {
		bad("insecure_non_loopback", "only meaningful with insecure")
	}
	peerNames := map[string]bool{}
	for i, p := range c.Peers {
		f := fmt.Sprintf("peers[%d]", i)
		if err := transport.ValidateHostName(p.Name); err != nil {
			bad(f+".name", "%v", err)
		} else if peerNames[p.Name] {
			bad(f+".name", "%q listed twice", p.Name)
		} else if p.Name == c.Name {
			bad(f+".name", "%q is this daemon's own name", p.Name)
		}
		peerNames[p.Name] = true
		if p.Address != "" {
			if _, _, err := net.SplitHostPort(p.Address); err != nil {
				bad(f+".address", "%q is not HOST:PORT: %v", p.Address, err)
			} else if c.Insecure && !c.InsecureNonLoopback && !isLoopbackAddr(p.Address) {
				bad(f+".address", "%q is not a loopback address: plaintext (insecure) replication to it needs insecure_non_loopback too", p.Address)
			}
		}
		if p.SecondPath != "" {
			if _, err := netip.ParseAddrPort(p.SecondPath); err != nil {
				bad(f+".second_path", "%q is not IP:PORT: %v", p.SecondPath, err)
			} else if c.SecondPath.Listen == "" {
				bad(f+".second_path", "needs this daemon's own second_path.listen")
			}
		}
		for j, v := range p.VMs {
			if v == "*" {
				continue
			}
			if err := hypervisor.ValidateVMName(v); err != nil {
				bad(fmt.Sprintf("%s.vms[%d]", f, j), "%v", err)
			}
		}
	}
	if sp := c.SecondPath; sp.Listen != "" || sp.Interval != 0 || sp.Timeout != 0 {
		if _, err := netip.ParseAddrPort(sp.Listen); err != nil {
			bad("second_path.listen", "%q is not IP:PORT: %v", sp.Listen, err)
		}
		iv, to := c.secondPathTimes()
		switch {
		case iv <= 0:
			bad("second_path.interval", "must be positive, got %v", iv)
		case to < 3*iv:
			bad("second_path.timeout", "%v must cover at least 3 intervals (%v)", to, iv)
		case to > time.Minute:
			bad("second_path.timeout", "%v is over 1m", to)
		}
	}
	if c.DiskJournalMiB < 0 || c.DiskJournalMiB > 1<<16 {
		bad("disk_journal_mib", "%d out of range [0, 65536] (0 = 64)", c.DiskJournalMiB)
	} else if c.DiskJournalMiB != 0 && c.DiskJournalMiB < 4 {
		bad("disk_journal_mib", "%d: at least 4 (two of the largest writes the disk server admits)", c.DiskJournalMiB)
	}
	if c.ReplicaBudgetMiB < 0 {
		bad("replica_budget_mib", "must not be negative (0 = half of the host's memory)")
	}
	if c.RestartGrace.D() < 0 {
		bad("restart_grace", "must not be negative")
	}
	switch c.OutputBuffer {
	case OutputAuto, OutputPlug, OutputNFQueue, OutputNoneUnsafe:
	default:
		bad("output_buffer", "%q unknown (want %s|%s|%s|%s)", c.OutputBuffer, OutputAuto, OutputPlug, OutputNFQueue, OutputNoneUnsafe)
	}
	if c.DeltaCachePages < 0 {
		bad("delta_cache_pages", "must not be negative")
	}
	seen := map[string]bool{}
	for i, q := range c.QemuVMs {
		f := fmt.Sprintf("qemu_vms[%d]", i)
		if q.Name != "" && seen[q.Name] {
			bad(f+".name", "%q defined twice", q.Name)
		}
		seen[q.Name] = true
		errs = append(errs, q.validate(f)...)
		if n := int64(len(q.Disks)); n > 0 {
			// Each journal may hold its bound plus the pause allowance;
			// together they must fit the disk part of one epoch a backup
			// stages (or protect would be refused).
			per := c.diskJournalBytes()
			if per == 0 {
				per = qemu.DefaultDiskJournalBytes
			}
			if need := n * (per + qemu.DiskPauseAllowance); need > replicaDiskStaging {
				bad(f+".disks", "%d disks of disk_journal_mib %d need %d MiB of a backup's %d MiB staging per epoch (each journal plus %d MiB of writes in flight at a pause): lower disk_journal_mib",
					n, per>>20, need>>20, replicaDiskStaging>>20, qemu.DiskPauseAllowance>>20)
			}
		}
	}
	// Two entries must not share a disk image: each would serve (and a
	// backup would create over) the other's disk.
	images := map[string]string{}
	for i, q := range c.QemuVMs {
		for k, d := range q.Disks {
			f := fmt.Sprintf("qemu_vms[%d].disks[%d].path", i, k)
			p := filepath.Clean(d.Path)
			if other, ok := images[p]; ok {
				bad(f, "%q is also %s", d.Path, other)
			}
			images[p] = f
		}
	}
	domains := map[string]string{}
	for i, x := range c.XenVMs {
		f := fmt.Sprintf("xen_vms[%d]", i)
		if x.Name != "" && seen[x.Name] {
			bad(f+".name", "%q defined twice", x.Name)
		}
		seen[x.Name] = true
		if other, ok := domains[x.domain()]; ok {
			bad(f+".domain", "%q is also %s's domain", x.domain(), other)
		}
		domains[x.domain()] = f
		errs = append(errs, x.validate(f)...)
	}
	errs = append(errs, c.Xen.validate("xen")...)
	errs = append(errs, c.Standby.validate("standby")...)
	errs = append(errs, validateLibvirtConfig(c.Libvirt, "libvirt")...)
	for i, vm := range c.SimVMs {
		f := fmt.Sprintf("sim_vms[%d]", i)
		if err := hypervisor.ValidateVMName(vm.Name); err != nil {
			bad(f+".name", "%v", err)
		} else if seen[vm.Name] {
			bad(f+".name", "%q defined twice", vm.Name)
		}
		seen[vm.Name] = true
	}
	return errors.Join(errs...)
}

// maxWatchdogTimeout bounds watchdog.timeout.
const maxWatchdogTimeout = time.Hour

func (c Config) validateWatchdog() []error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("config field watchdog.%s: %s", field, fmt.Sprintf(format, a...)))
	}
	w := c.Watchdog
	if t := w.Timeout.D(); t != 0 && (t < 100*time.Millisecond || t > maxWatchdogTimeout) {
		bad("timeout", "%v out of range [100ms, %v] (0: fence_after)", t, maxWatchdogTimeout)
	}
	if !c.watchdogEnabled() {
		return errs
	}
	if w.Enabled != nil && len(c.QemuVMs) == 0 && len(c.XenVMs) == 0 {
		bad("enabled", "the watchdog stops QEMU guests and Xen domains and neither qemu_vms nor xen_vms are configured")
	}
	if t := c.watchdogTimeout(); len(errs) == 0 && t < c.HeartbeatTimeout.D() {
		bad("timeout", "%v is shorter than heartbeat_timeout %v: a heartbeat late by less than the link's timeout would stop the guest", t, c.HeartbeatTimeout.D())
	}
	if c.StateDir != "" {
		if p := filepath.Join(c.StateDir, watchdog.SocketName); len(p) > 107 {
			bad("enabled", "its socket %s would be longer than a unix socket path may be (107): shorten state_dir", p)
		}
	}
	return errs
}

// diskSync is DiskSync with its default (true).
func (c Config) diskSync() bool { return c.DiskSync == nil || *c.DiskSync }

// diskJournalBytes is DiskJournalMiB in bytes (0: the backend's default).
func (c Config) diskJournalBytes() int64 { return int64(c.DiskJournalMiB) << 20 }
