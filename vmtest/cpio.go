package vmtest

import (
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// cpioWriter writes an initramfs archive in the "newc" format the kernel
// unpacks (Documentation/driver-api/early-userspace/buffer-format.rst).
// Several such archives may be concatenated; the kernel unpacks them in
// order, later ones adding to (or replacing files of) earlier ones.
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	dirs map[string]bool
	err  error
}

func newCPIOWriter(w io.Writer) *cpioWriter {
	return &cpioWriter{w: w, ino: 1, dirs: map[string]bool{"": true, ".": true, "/": true}}
}

const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
)

func (c *cpioWriter) header(name string, mode, size, rmaj, rmin uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	h := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	c.ino++
	buf := append([]byte(h), name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	_, c.err = c.w.Write(buf)
}

func pad4(n int) int { return (4 - n%4) % 4 }

func (c *cpioWriter) data(b []byte) {
	if c.err != nil {
		return
	}
	if _, c.err = c.w.Write(b); c.err != nil {
		return
	}
	_, c.err = c.w.Write(make([]byte, pad4(len(b))))
}

// mkdirAll adds name and its missing parents as directories.
func (c *cpioWriter) mkdirAll(name string) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if c.dirs[name] {
		return
	}
	c.mkdirAll(path.Dir(name))
	c.dirs[name] = true
	c.header(name, modeDir|0o755, 0, 0, 0)
}

// file adds a regular file (parents are created).
func (c *cpioWriter) file(name string, perm uint32, b []byte) {
	c.mkdirAll(path.Dir(name))
	c.header(name, modeReg|perm&0o7777, uint32(len(b)), 0, 0)
	c.data(b)
}

// symlink adds a symbolic link name -> target.
func (c *cpioWriter) symlink(name, target string) {
	c.mkdirAll(path.Dir(name))
	c.header(name, modeLink|0o777, uint32(len(target)), 0, 0)
	c.data([]byte(target))
}

// charDev adds a character device node.
func (c *cpioWriter) charDev(name string, perm, major, minor uint32) {
	c.mkdirAll(path.Dir(name))
	c.header(name, modeChr|perm&0o7777, 0, major, minor)
}

// close writes the trailer.
func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	return c.err
}

// writeTree writes files (archive path -> content) in a stable order.
func (c *cpioWriter) writeTree(files map[string]fileEntry) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		c.file(n, files[n].mode, files[n].data)
	}
}

type fileEntry struct {
	mode uint32
	data []byte
}

// Archive writes a "newc" archive of directories and regular files, for
// an initramfs appended to a base one (as guestimage does). firstInode
// should not collide with the archives it is appended to.
type Archive struct{ c *cpioWriter }

// NewArchive starts an archive on w.
func NewArchive(w io.Writer, firstInode uint32) *Archive {
	c := newCPIOWriter(w)
	c.ino = firstInode
	return &Archive{c: c}
}

// File adds a regular file (and its missing parent directories).
func (a *Archive) File(name string, perm uint32, b []byte) { a.c.file(name, perm, b) }

// Close writes the trailer and reports the first write error.
func (a *Archive) Close() error { return a.c.close() }
