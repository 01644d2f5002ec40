package libvirt

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestChownLikeDoesNotFollowLinks: a link put where the socket was must
// not hand its target to the QEMU user.
func TestChownLikeDoesNotFollowLinks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to change owners")
	}
	dir := t.TempDir()
	like := filepath.Join(dir, "ram")
	target := filepath.Join(dir, "secret")
	link := filepath.Join(dir, "sock")
	for _, p := range []string{like, target} {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(like, 4242, 4242); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := chownLike(link, like); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(target)
	if err != nil {
		t.Fatal(err)
	}
	if uid := st.Sys().(*syscall.Stat_t).Uid; uid != 0 {
		t.Fatalf("the link's target was given to uid %d", uid)
	}
}
