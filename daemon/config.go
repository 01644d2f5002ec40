package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

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

	// TLS, when set, makes the replication link mutually authenticated
	// TLS 1.3: this daemon presents Cert/Key and accepts only peers whose
	// certificates the CA signed. Both daemons of a pair must enable it.
	TLS transport.TLSFiles `json:"tls"`

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

	// Libvirt is where libvirtd listens, for qemu_vms with libvirt set.
	Libvirt libvirt.Config `json:"libvirt"`

	// Standby says how this daemon, as a backup, builds the hot standby
	// QEMU of a protected qemu VM (the machine comes from the primary).
	Standby StandbyConfig `json:"standby"`
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

// DefaultConfig returns a configuration with every default filled in.
func DefaultConfig() Config {
	return Config{
		Name:              "remusd",
		Control:           "/run/remusd/control.sock",
		StateDir:          "/var/lib/remusd",
		EpochInterval:     Duration(25 * time.Millisecond),
		MaxInflight:       1,
		HeartbeatInterval: Duration(100 * time.Millisecond),
		HeartbeatTimeout:  Duration(1 * time.Second),
		AckTimeout:        Duration(2 * time.Second),
		AckTimeoutPolicy:  AckTimeoutHold,
		Takeover:          TakeoverManual,
		DialTimeout:       Duration(2 * time.Second),
		ReconnectBackoff:  Duration(200 * time.Millisecond),
		DeltaCachePages:   16384,
		OutputBuffer:      OutputAuto,
	}
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
	case AckTimeoutHold, AckTimeoutUnprotect:
	default:
		bad("ack_timeout_policy", "%q unknown (want %s|%s)", c.AckTimeoutPolicy, AckTimeoutHold, AckTimeoutUnprotect)
	}
	switch c.Takeover {
	case TakeoverManual, TakeoverAutoUnsafe:
	default:
		bad("takeover", "%q unknown (want %s|%s)", c.Takeover, TakeoverManual, TakeoverAutoUnsafe)
	}
	if c.DialTimeout.D() <= 0 {
		bad("dial_timeout", "must be positive")
	}
	if c.ReconnectBackoff.D() <= 0 {
		bad("reconnect_backoff", "must be positive")
	}
	if c.TLS.Enabled() {
		if err := c.TLS.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("config field %w", err))
		}
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
	}
	errs = append(errs, c.Standby.validate("standby")...)
	errs = append(errs, validateLibvirtConfig(c.Libvirt, "libvirt")...)
	for i, vm := range c.SimVMs {
		f := fmt.Sprintf("sim_vms[%d]", i)
		if vm.Name == "" {
			bad(f+".name", "must be set")
		} else if seen[vm.Name] {
			bad(f+".name", "%q defined twice", vm.Name)
		}
		seen[vm.Name] = true
	}
	return errors.Join(errs...)
}
