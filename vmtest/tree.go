package vmtest

import (
	"debug/elf"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// Tree is a set of files and symbolic links to add to a base initramfs
// (BuildInitramfs): archive paths without a leading slash.
type Tree struct {
	files map[string]fileEntry
	links map[string]string
}

// NewTree returns an empty tree.
func NewTree() *Tree {
	return &Tree{files: map[string]fileEntry{}, links: map[string]string{}}
}

func treePath(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

// AddFile adds (or replaces) a regular file.
func (t *Tree) AddFile(name string, perm uint32, data []byte) {
	t.files[treePath(name)] = fileEntry{perm, data}
}

// AddHostFile adds the host file src as name, following symbolic links;
// perm 0 keeps src's permission bits.
func (t *Tree) AddHostFile(name, src string, perm uint32) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	if perm == 0 {
		fi, err := os.Stat(src)
		if err != nil {
			return fmt.Errorf("vmtest: %w", err)
		}
		perm = uint32(fi.Mode().Perm())
	}
	t.AddFile(name, perm, b)
	return nil
}

// Symlink adds a symbolic link name -> target.
func (t *Tree) Symlink(name, target string) { t.links[treePath(name)] = target }

// Has reports whether name is a file or link of the tree.
func (t *Tree) Has(name string) bool {
	n := treePath(name)
	_, f := t.files[n]
	_, l := t.links[n]
	return f || l
}

// LibDir is where AddELF puts shared libraries (Debian's multiarch
// directory, which the dynamic loader searches without a cache).
const LibDir = "lib/x86_64-linux-gnu"

// AddELF adds the dynamically linked program or library src as name,
// together with its ELF interpreter and every shared library it needs
// (DT_NEEDED, recursively), looked up in libDirs in order and placed in
// LibDir. Libraries loaded with dlopen are not found this way (glibc's
// libgcc_s.so.1 for pthread_cancel is one): add them with AddLib.
func (t *Tree) AddELF(name, src string, libDirs []string) error {
	if err := t.AddHostFile(name, src, 0); err != nil {
		return err
	}
	return t.addDeps(src, libDirs)
}

// AddLib adds the shared library named lib (e.g. "libgcc_s.so.1") found in
// libDirs, with its dependencies, to LibDir.
func (t *Tree) AddLib(lib string, libDirs []string) error {
	if t.Has(LibDir + "/" + lib) {
		return nil
	}
	p, err := findLib(lib, libDirs)
	if err != nil {
		return err
	}
	if err := t.AddHostFile(LibDir+"/"+lib, p, 0o755); err != nil {
		return err
	}
	return t.addDeps(p, libDirs)
}

func (t *Tree) addDeps(src string, libDirs []string) error {
	f, err := elf.Open(src)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return fmt.Errorf("vmtest: interpreter of %s: %w", src, err)
		}
		interp := strings.TrimRight(string(b), "\x00")
		if !t.Has(interp) {
			if err := t.AddHostFile(interp, interp, 0o755); err != nil {
				return err
			}
		}
	}
	libs, err := f.ImportedLibraries()
	if err != nil {
		return fmt.Errorf("vmtest: libraries of %s: %w", src, err)
	}
	for _, l := range libs {
		if err := t.AddLib(l, libDirs); err != nil {
			return fmt.Errorf("%w (needed by %s)", err, src)
		}
	}
	return nil
}

func findLib(lib string, dirs []string) (string, error) {
	for _, d := range dirs {
		p := filepath.Join(d, lib)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("vmtest: shared library %s not found in %v", lib, dirs)
}

// HostLibDirs are the host's library directories (Debian multiarch).
var HostLibDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"}

// Files returns the tree's regular files: archive path -> content.
func (t *Tree) Files() map[string][]byte {
	m := make(map[string][]byte, len(t.files))
	for n, e := range t.files {
		m[n] = e.data
	}
	return m
}
