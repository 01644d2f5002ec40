package libvirt

import (
	"os"
	"syscall"
)

// chownLike gives path the owner and group of like. It never follows a
// symbolic link at path: path lies in a directory the QEMU user owns, and
// a compromised QEMU that swapped it for a link to a root file would
// otherwise be given that file (Lchown on a link changes only the link;
// protected_hardlinks stops the same trick with a hard link).
func chownLike(path, like string) error {
	st, err := os.Stat(like)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	return os.Lchown(path, int(sys.Uid), int(sys.Gid))
}
