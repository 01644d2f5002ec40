package hypervisor

import "testing"

func TestValidateVMName(t *testing.T) {
	for _, ok := range []string{"web", "a", "vm-1.prod_2", "A0", "x123456789012345678901234567890123456789012345678901234567890123"} {
		if err := ValidateVMName(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "../x", "a/b", "..", ".hidden", "-rf", "_x", "a b", "a,b", "a\nb", "a\x00", "é",
		"x1234567890123456789012345678901234567890123456789012345678901234"} {
		if err := ValidateVMName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
