package daemon

import (
	"fmt"

	"github.com/remusd/remusd/internal/pki"
)

// MeshConfigs makes the given daemons trust each other the way an operator
// pairs hosts: a throw-away CA under dir, a certificate for each config's
// Name (dir/NAME), mutual TLS on, and each config listing the others as
// peers (at their Listen address, if set) from which it accepts replicas
// of any VM. For the demo, the benchmarks and tests; a real installation
// uses `remusd certs` and lists its peers and their VMs explicitly.
func MeshConfigs(dir string, cfgs ...*Config) error {
	var names []string
	for _, c := range cfgs {
		names = append(names, c.Name)
	}
	files, err := pki.Mesh(dir, names...)
	if err != nil {
		return fmt.Errorf("certificates for %v: %w", names, err)
	}
	for _, c := range cfgs {
		c.TLS, c.Insecure, c.InsecureNonLoopback, c.Peers = files[c.Name], false, false, nil
		for _, o := range cfgs {
			if o != c {
				c.Peers = append(c.Peers, Peer{Name: o.Name, Address: o.Listen, VMs: []string{"*"}})
			}
		}
	}
	return nil
}
