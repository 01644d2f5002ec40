//go:build !xen

package xen

import "context"

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
