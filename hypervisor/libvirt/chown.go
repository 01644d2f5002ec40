package libvirt

import (
	"os"
	"syscall"
)

// chownLike gives path the owner and group of like.
func chownLike(path, like string) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	return os.Chown(path, int(sys.Uid), int(sys.Gid))
}
