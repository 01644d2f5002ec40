//go:build !xen

package xen

import (
	"context"

	"github.com/remusd/remusd/dirtymap"
	"github.com/remusd/remusd/hypervisor"
)

// Guest is the Xen guest type; without the "xen" build tag it cannot be
// opened.
type Guest struct{}

// Open returns ErrNotBuilt: this binary was built without the "xen" tag.
func Open(ctx context.Context, domid uint32, opts Options) (*Guest, error) {
	return nil, ErrNotBuilt
}

// Standby is the Xen standby type; without the "xen" build tag it cannot
// be created.
type Standby struct{}

// NewStandby returns ErrNotBuilt: this binary was built without the "xen"
// tag.
func NewStandby(ctx context.Context, opts StandbyOptions) (*Standby, error) {
	return nil, ErrNotBuilt
}

// DomainID returns ErrNotBuilt: this binary was built without the "xen"
// tag.
func DomainID(ctx context.Context, xl, name string) (uint32, error) { return 0, ErrNotBuilt }

// WaitSuspendable needs the xen build tag.
func WaitSuspendable(ctx context.Context, domid uint32) error { return ErrNotBuilt }

// DomainHandle returns ErrNotBuilt.
func DomainHandle(ctx context.Context, domid uint32) ([16]byte, error) {
	return [16]byte{}, ErrNotBuilt
}

// PauseDomain returns ErrNotBuilt.
func PauseDomain(ctx context.Context, domid uint32) error { return ErrNotBuilt }

// UnpauseDomain returns ErrNotBuilt.
func UnpauseDomain(ctx context.Context, domid uint32) error { return ErrNotBuilt }

// DomainState returns ErrNotBuilt.
func DomainState(ctx context.Context, domid uint32) (DomainStatus, error) {
	return DomainStatus{}, ErrNotBuilt
}

// Disks returns ErrNotBuilt.
func Disks(ctx context.Context, domid uint32) ([]string, error) { return nil, ErrNotBuilt }

// FrontendDevices returns ErrNotBuilt.
func FrontendDevices(ctx context.Context, domid uint32) ([]string, error) { return nil, ErrNotBuilt }

// Vifs returns ErrNotBuilt.
func Vifs(ctx context.Context, domid uint32) ([]Vif, error) { return nil, ErrNotBuilt }

// The methods below exist so that code holding a Guest or a Standby
// builds without the tag; none can be reached (nothing returns one).

func (g *Guest) Name() string                    { return "" }
func (g *Guest) Backend() string                 { return BackendName }
func (g *Guest) BackendVersion() string          { return "" }
func (g *Guest) Config() []byte                  { return nil }
func (g *Guest) NumPages() int                   { return 0 }
func (g *Guest) Pause(ctx context.Context) error { return ErrNotBuilt }
func (g *Guest) Resume(ctx context.Context) error {
	return ErrNotBuilt
}
func (g *Guest) HarvestDirty(ctx context.Context, dst *dirtymap.Bitmap) error { return ErrNotBuilt }
func (g *Guest) Memory() []byte                                               { return nil }
func (g *Guest) SaveDeviceState(ctx context.Context, dst []byte) ([]byte, error) {
	return dst, ErrNotBuilt
}
func (g *Guest) Close() error   { return nil }
func (g *Guest) DomID() uint32  { return 0 }
func (g *Guest) Tracking() bool { return false }

func (s *Standby) NumPages() int                                          { return 0 }
func (s *Standby) Memory() []byte                                         { return nil }
func (s *Standby) CommitDeviceState(epoch uint64, state []byte) error     { return ErrNotBuilt }
func (s *Standby) Activate(ctx context.Context) (hypervisor.Guest, error) { return nil, ErrNotBuilt }
func (s *Standby) Close() error                                           { return nil }
func (s *Standby) DomID() uint32                                          { return 0 }
func (s *Standby) Managed() bool                                          { return false }
func (s *Standby) BackendVersion() string                                 { return "" }
func (s *Standby) LastActivation() ActivationInfo                         { return ActivationInfo{} }

// Create returns ErrNotBuilt.
func Create(ctx context.Context, xl, configPath, domain string) (uint32, error) {
	return 0, ErrNotBuilt
}

// Destroy returns ErrNotBuilt.
func Destroy(ctx context.Context, xl string, domid uint32) error { return ErrNotBuilt }

// Recovered returns "".
func (g *Guest) Recovered() string { return "" }

// PauseNow returns ErrNotBuilt.
func (g *Guest) PauseNow(ctx context.Context) error { return ErrNotBuilt }

// UnpauseNow returns ErrNotBuilt.
func (g *Guest) UnpauseNow(ctx context.Context) error { return ErrNotBuilt }

// Release returns nil.
func (g *Guest) Release() error { return nil }

// Paused returns false.
func (g *Guest) Paused() bool { return false }

// PVH returns false.
func (g *Guest) PVH() bool { return false }

// DomainName returns ErrNotBuilt.
func DomainName(ctx context.Context, domid uint32) (string, error) { return "", ErrNotBuilt }
