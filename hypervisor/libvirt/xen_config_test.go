package libvirt

import (
	"strings"
	"testing"
)

func TestConfigValidateXen(t *testing.T) {
	for _, c := range []Config{
		{},
		{URI: "xen:///system"},
		{Socket: "/run/lv/sock"},
		{URI: "xen+unix:///system?socket=/run/lv/sock"},
	} {
		if err := c.ValidateXen(); err != nil {
			t.Errorf("%+v: %v", c, err)
		}
	}
	for _, tc := range []struct {
		c    Config
		want string
	}{
		{Config{URI: "qemu:///system"}, "want xen:///system"},
		{Config{URI: "xen:///session"}, "want xen:///system"},
		{Config{Socket: "run/sock"}, "absolute"},
		{Config{URI: "xen+unix:///system?socket=rel"}, "absolute"},
		{Config{URI: "xen+unix:///system?socket=/a", Socket: "/b"}, "names socket"},
		// A remote transport would silently become the local socket.
		{Config{URI: "xen+ssh:///system"}, "local libvirtd"},
		{Config{URI: "xen+tls:///system"}, "local libvirtd"},
		{Config{Socket: "/run/lv/so\nck"}, "absolute"},
	} {
		if err := tc.c.ValidateXen(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want an error with %q", tc.c, err, tc.want)
		}
	}
}
