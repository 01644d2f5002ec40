package sim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"

	"github.com/remusd/remusd/hypervisor"
)

// Defaults applied by Config.WithDefaults to zero-valued fields.
const (
	DefaultMemoryBytes = 64 << 20
	DefaultWorkload    = "uniform"
	DefaultRate        = 20000
	DefaultSeed        = 1
	DefaultOutputEvery = 64

	// Disabled, stored in Rate or OutputEvery, means "none" (no writes, no
	// output). Zero means "use the default" for those fields, so a negative
	// value is how "none" survives WithDefaults and a Marshal round trip.
	Disabled = -1

	// maxMemoryBytes bounds a simulated guest (1 TiB) to catch nonsense
	// configurations before they allocate.
	maxMemoryBytes = 1 << 40
)

// workload kinds, in the order their index is stored in device state.
var workloads = [...]string{"uniform", "hotset", "sequential", "sparse", "idle"}

const (
	wlUniform = iota
	wlHotset
	wlSequential
	wlSparse
	wlIdle
)

// Config describes a simulated guest. Zero values mean "default" (see
// WithDefaults); the guest's behaviour (memory content after N ops) is a
// pure function of MemoryBytes, Workload, Seed and OutputEvery. Rate only
// decides how fast ops run.
type Config struct {
	// MemoryBytes is the guest RAM size: a positive multiple of
	// hypervisor.PageSize. Default 64 MiB.
	MemoryBytes int64 `json:"memory_bytes"`
	// Workload is uniform, hotset, sequential, sparse or idle. Default
	// uniform.
	Workload string `json:"workload"`
	// Rate is the number of page writes per second while running.
	// Default 20000; negative (Disabled) means no writes at all.
	Rate int `json:"rate"`
	// Seed seeds initial memory and the workload PRNG. Default 1.
	Seed uint64 `json:"seed"`
	// OutputEvery emits one output message every OutputEvery ops.
	// Default 64; negative (Disabled) means no output.
	OutputEvery int `json:"output_every"`
	// DiskBytes, if positive, gives the guest one protected disk
	// ("disk0") of this size (a multiple of 4096, at most 1 GiB): every op
	// writes its op count at the disk's offset 0 and at byte 16 of page 0
	// (the same step), and every fourth op one more change (a write, trim,
	// zeroes or a flush) derived from the op count. 0: no disk.
	DiskBytes int64 `json:"disk_bytes,omitempty"`
}

// DiskID is the id of the simulated guest's disk.
const DiskID = "disk0"

// maxDiskBytes bounds a simulated disk.
const maxDiskBytes = 1 << 30

// WithDefaults returns c with zero-valued fields set to their defaults. It
// is idempotent.
func (c Config) WithDefaults() Config {
	if c.MemoryBytes == 0 {
		c.MemoryBytes = DefaultMemoryBytes
	}
	if c.Workload == "" {
		c.Workload = DefaultWorkload
	}
	if c.Rate == 0 {
		c.Rate = DefaultRate
	}
	if c.Seed == 0 {
		c.Seed = DefaultSeed
	}
	if c.OutputEvery == 0 {
		c.OutputEvery = DefaultOutputEvery
	}
	return c
}

// Validate checks c after applying defaults. Errors name the offending field.
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if c.MemoryBytes < 0 || c.MemoryBytes%hypervisor.PageSize != 0 || c.MemoryBytes > maxMemoryBytes {
		errs = append(errs, fmt.Errorf("sim: memory_bytes %d invalid (want a positive multiple of %d, at most %d)",
			c.MemoryBytes, hypervisor.PageSize, int64(maxMemoryBytes)))
	}
	if c.DiskBytes < 0 || c.DiskBytes%4096 != 0 || c.DiskBytes > maxDiskBytes || (c.DiskBytes > 0 && c.DiskBytes < 2*diskSector) {
		errs = append(errs, fmt.Errorf("sim: disk_bytes %d invalid (want 0 or a multiple of 4096 up to %d)", c.DiskBytes, int64(maxDiskBytes)))
	}
	if workloadIndex(c.Workload) < 0 {
		errs = append(errs, fmt.Errorf("sim: workload %q unknown (want uniform|hotset|sequential|sparse|idle)", c.Workload))
	}
	if c.OutputEvery > math.MaxInt32 {
		errs = append(errs, fmt.Errorf("sim: output_every %d too large (at most %d)", c.OutputEvery, math.MaxInt32))
	}
	return errors.Join(errs...)
}

// Marshal encodes c as JSON, for the replication handshake.
func (c Config) Marshal() []byte {
	b, err := json.Marshal(c)
	if err != nil { // cannot happen: only plain fields
		panic(fmt.Sprintf("sim: marshal config: %v", err))
	}
	return b
}

// ParseConfig decodes a Config produced by Marshal and validates it.
// Unknown fields are rejected.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("sim: parse config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

func workloadIndex(name string) int {
	for i, w := range workloads {
		if w == name {
			return i
		}
	}
	return -1
}

// rate returns the effective op rate (0 = no ops).
func (c Config) rate() int { return max(c.Rate, 0) }

// outputEvery returns the effective output period (0 = no output).
func (c Config) outputEvery() uint64 { return uint64(max(c.OutputEvery, 0)) }
