package hypervisor

import (
	"fmt"
	"regexp"
)

// vmNameRE is what a VM name may look like everywhere (wire, CLI, config,
// libvirt): it becomes part of file names (audit log, replica RAM file,
// serial console), QEMU arguments and metric labels, so it must not hold a
// path separator, "..", an option separator or a control character.
var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// VMNamePattern is the pattern ValidateVMName enforces, for error texts
// and documentation.
const VMNamePattern = `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`

// ValidateVMName checks that name is a valid VM name.
func ValidateVMName(name string) error {
	if !vmNameRE.MatchString(name) {
		return fmt.Errorf("VM name %q is not valid: it must match %s (letters, digits, '.', '_', '-'; at most 64 characters; no leading '.', '_' or '-')", name, VMNamePattern)
	}
	return nil
}
