//go:build !xen

package xen

import (
	"context"

	"go.uber.org/zap"
)

// Options configure Open.
type Options struct {
	Name   string
	Logger *zap.Logger
}

// Guest is the Xen guest type; without the "xen" build tag it cannot be
// opened.
type Guest struct{}

// Open returns ErrNotBuilt: this binary was built without the "xen" tag.
func Open(ctx context.Context, domid uint32, opts Options) (*Guest, error) {
	return nil, ErrNotBuilt
}
