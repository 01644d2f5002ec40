package daemon

import "testing"

// securePeers pairs the configs with MeshConfigs.
func securePeers(t *testing.T, cfgs ...*Config) {
	t.Helper()
	if err := MeshConfigs(t.TempDir(), cfgs...); err != nil {
		t.Fatal(err)
	}
}

func boolp(b bool) *bool { return &b }
