package guestimage

import (
	"fmt"
	"io"
	"path"
	"strings"
)

// cpioWriter writes a "newc" archive the kernel unpacks on top of the
// archives before it (vmtest's writer is not exported; this one only needs
// directories and regular files).
type cpioWriter struct {
	w    io.Writer
	ino  uint32
	dirs map[string]bool
	err  error
}

const (
	modeDir = 0o040000
	modeReg = 0o100000
)

func pad4(n int) int { return (4 - n%4) % 4 }

func (c *cpioWriter) header(name string, mode, size uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	nlink := uint32(1)
	if mode&0o170000 == modeDir {
		nlink = 2
	}
	h := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	c.ino++
	buf := append([]byte(h), name...)
	buf = append(buf, 0)
	buf = append(buf, make([]byte, pad4(len(buf)))...)
	_, c.err = c.w.Write(buf)
}

func (c *cpioWriter) data(b []byte) {
	if c.err != nil {
		return
	}
	if _, c.err = c.w.Write(b); c.err != nil {
		return
	}
	_, c.err = c.w.Write(make([]byte, pad4(len(b))))
}

func (c *cpioWriter) mkdirAll(name string) {
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	if name == "" || name == "." || c.dirs[name] {
		return
	}
	c.mkdirAll(path.Dir(name))
	c.dirs[name] = true
	c.header(name, modeDir|0o755, 0)
}

func (c *cpioWriter) file(name string, perm uint32, b []byte) {
	c.mkdirAll(path.Dir(name))
	c.header(name, modeReg|perm&0o7777, uint32(len(b)))
	c.data(b)
}

func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0)
	return c.err
}
