package xen

import (
	"errors"
	"fmt"
	"regexp"
)

// ErrNoDomain is returned (wrapped) when no domain of the given name or id
// exists on this host.
var ErrNoDomain = errors.New("xen: no such domain")

// DomainStatus is what DomainState reports about a domain.
type DomainStatus struct {
	Paused, Shutdown, Dying bool
	// Suspended: shut down for a suspend (a cooperative checkpoint the
	// guest entered and nobody resumed yet).
	Suspended      bool
	ShutdownReason uint32
	// CPUTimeNs is the CPU time the domain used: 0 for a domain created
	// paused (`xl create -p`) that never ran, e.g. a standby.
	CPUTimeNs uint64
}

// NeverRan reports whether the domain is paused and has never run: what
// a standby (`xl create -p`) looks like until it is activated.
func (s DomainStatus) NeverRan() bool { return s.Paused && s.CPUTimeNs == 0 && !s.Shutdown }

// Vif is one network interface of a domain as dom0 sees it.
type Vif struct {
	DevID int    // the guest's device number (eth<DevID> in a Linux guest)
	Name  string // the backend interface in dom0 (vifDOMID.DEVID or the configured vifname)
	MAC   string // the guest's address, lower case ("" if xenstore has none)
}

var (
	ifNameRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,15}$`)
	macRE    = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`)
)

// Config is what Guest.Config returns (JSON).
type Config struct {
	DomID     uint32    `json:"domid"`
	Type      string    `json:"type"`  // "pvh" or "hvm"
	Pages     int       `json:"pages"` // NumPages
	Segments  []Segment `json:"segments"`
	MaxPages  uint64    `json:"max_pages"`
	MaxVCPUID uint32    `json:"max_vcpu_id"`
	Version   string    `json:"xen_version"`
}

// ValidDomainName checks a domain name as remusd accepts one: 1-64
// letters, digits, '.', '_' or '-', starting with a letter or digit.
func ValidDomainName(name string) error {
	if !domainNameRE.MatchString(name) {
		return fmt.Errorf("xen: domain name %q: want 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}
