package xen

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"go.uber.org/zap"
)

// Options configure Open.
type Options struct {
	// Name is the VM's name as the operator knows it (default "domid-N").
	Name string
	// Logger receives the backend's logs (default: none).
	Logger *zap.Logger
	// Cooperative makes every checkpoint suspend the guest the way Xen's
	// Remus does: Pause first asks the guest to suspend itself
	// (SuspendCooperative: it quiesces its PV frontends and stops in its
	// suspend hypercall) and then pauses it; Resume cancels the suspend
	// (xc_domain_resume fast: the hypercall returns 1, the guest carries
	// on with its devices connected) and unpauses. The state saved while
	// suspended is what a standby can be activated from: there the same
	// hypercall returns 0 and the guest runs its resume path (re-maps
	// shared_info, re-registers vcpu_info, rebinds its event channels and
	// timers, reconnects its frontends to the new host's backends). A bare
	// pause leaves all that bound to this host's Xen.
	Cooperative bool
	// SuspendTimeout bounds each cooperative suspend (default 30 s; the
	// caller's deadline applies if it is earlier): a guest that does not
	// suspend in time fails that checkpoint instead of stalling the epoch
	// loop. Under TCG on a busy machine suspends took up to 6.3 s.
	SuspendTimeout time.Duration
	// Recover takes over a domain a dead remusd left in the middle of a
	// checkpoint (the daemon's restart path): Open then accepts a domain
	// shut down with reason suspend, and adopts that suspend and a pause
	// reference it finds (the one the dead daemon's Pause took) as its
	// own: the guest stays stopped until Resume cancels the suspend
	// (xc_domain_resume fast) and drops the pause (xc_domain_unpause), so
	// the caller decides when it may run. Xen cannot tell whose pause
	// reference it is: an operator's `xl pause` is adopted too, while a
	// second reference keeps the domain paused. Guest.Recovered says what
	// was adopted. Without Recover, Open refuses a suspended domain
	// (ErrLeftSuspended) and leaves a paused one paused (not adopted).
	Recover bool
}

// StandbyOptions configure NewStandby. Everything here comes from the
// backup's own configuration, never from the primary.
type StandbyOptions struct {
	// Name is the VM's name as the operator knows it (for logs).
	Name string
	// ConfigPath is the backup host's xl configuration file of the VM
	// (absolute path of a regular file). The standby is created from it
	// with `xl create -p`, so it has the memory size, type and devices
	// this host gives the VM. Unused (and not required) with Manager.
	ConfigPath string
	// Manager, if set, creates, unpauses and destroys the standby's
	// domain instead of xl: the toolstack that owns this host's definition
	// of the VM (libvirt's libxl driver), so that it knows the domain and
	// its state throughout.
	Manager DomainManager
	// DomainName names the standby domain (overrides the file's name=,
	// so that a standby and the VM's primary can share a host in tests).
	// Letters, digits, '.', '_' and '-', at most 64, starting with a
	// letter or digit.
	DomainName string
	// XL is the xl binary (default "xl", looked up in PATH).
	XL string
	// Type is the domain type the standby must have: "pvh" (the default
	// and the only one accepted). An HVM guest's emulated devices live in
	// its device model (QEMU), whose state the standby does not receive
	// yet: activated, it would come up without them. A standby of another
	// type is destroyed and refused.
	Type string
	// CreateTimeout bounds creating the standby (`xl create -p` or
	// Manager.CreatePaused) and mapping it (default 90 s); DestroyTimeout
	// bounds destroying it (default 30 s).
	CreateTimeout, DestroyTimeout time.Duration
	Logger                        *zap.Logger
}

// source names where the standby's domain comes from (for messages).
func (o *StandbyOptions) source() string {
	if o.Manager != nil {
		return o.Manager.String()
	}
	return o.ConfigPath
}

// DomainManager is a toolstack that owns a standby's domain (see
// StandbyOptions.Manager). Each call has ctx's deadline.
type DomainManager interface {
	// CreatePaused creates the standby's domain from this host's
	// definition of the VM, paused before it ever ran, and returns its
	// domid.
	CreatePaused(ctx context.Context) (uint32, error)
	// Unpause lets domain domid run (activation), if it is still the
	// standby's domain.
	Unpause(ctx context.Context, domid uint32) error
	// Destroy destroys domain domid, if it is still the standby's domain.
	Destroy(ctx context.Context, domid uint32) error
	// String names the manager and the domain for messages ("libvirt
	// domain web").
	String() string
}

var domainNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Validate checks the options and fills in defaults.
func (o *StandbyOptions) Validate() error {
	if o.Name == "" {
		o.Name = o.DomainName
	}
	if !domainNameRE.MatchString(o.DomainName) {
		return fmt.Errorf("xen: standby: domain name %q: want 1-64 letters, digits, '.', '_' or '-'", o.DomainName)
	}
	if o.Manager == nil {
		if o.ConfigPath == "" || !filepath.IsAbs(o.ConfigPath) {
			return fmt.Errorf("xen: standby: config path %q is not absolute", o.ConfigPath)
		}
		fi, err := os.Stat(o.ConfigPath)
		if err != nil {
			return fmt.Errorf("xen: standby: config: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("xen: standby: config %s is not a regular file", o.ConfigPath)
		}
	}
	switch o.Type {
	case "":
		o.Type = "pvh"
	case "pvh":
	case "hvm":
		return fmt.Errorf("xen: standby: type hvm is not supported yet: the device model's (QEMU's) state of an HVM guest is not replicated, so an activated standby would lose its emulated devices; use a PVH guest")
	default:
		return fmt.Errorf("xen: standby: type %q: want pvh", o.Type)
	}
	if o.XL == "" {
		o.XL = "xl"
	}
	if o.CreateTimeout <= 0 {
		o.CreateTimeout = 90 * time.Second
	}
	if o.DestroyTimeout <= 0 {
		o.DestroyTimeout = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	return nil
}

// ActivationInfo describes a standby's activation.
type ActivationInfo struct {
	Epoch     uint64
	Suspended bool          // the state was taken with the guest suspended
	Context   time.Duration // xc_domain_hvm_setcontext
	Unpause   time.Duration
	Total     time.Duration
}

var errStandbyDone = errors.New("standby already activated or closed")
