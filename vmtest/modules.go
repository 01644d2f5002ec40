package vmtest

import (
	"bufio"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// normModName maps a module file or name to the kernel's canonical module
// name: base name without .ko[.xz|.zst|.gz], dashes as underscores.
func normModName(s string) string {
	s = filepath.Base(s)
	if i := strings.Index(s, ".ko"); i >= 0 {
		s = s[:i]
	}
	return strings.ReplaceAll(s, "-", "_")
}

// moduleIndex knows where each module of a kernel tree lives and what it
// depends on.
type moduleIndex struct {
	dir   string              // <root>/lib/modules/<version>
	path  map[string]string   // name -> path relative to dir
	deps  map[string][]string // name -> direct dependencies (names), when known from modules.dep
	fromD bool                // deps came from modules.dep
}

func loadModuleIndex(modDir string) (*moduleIndex, error) {
	ix := &moduleIndex{dir: modDir, path: map[string]string{}, deps: map[string][]string{}}
	if f, err := os.Open(filepath.Join(modDir, "modules.dep")); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<16), 1<<20)
		for sc.Scan() {
			mod, rest, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			n := normModName(mod)
			ix.path[n] = mod
			for _, d := range strings.Fields(rest) {
				ix.deps[n] = append(ix.deps[n], normModName(d))
			}
		}
		if err := sc.Err(); err != nil {
			return nil, err
		}
		ix.fromD = len(ix.path) > 0
	}
	if ix.fromD {
		return ix, nil
	}
	// Debian's kernel packages do not ship modules.dep (depmod runs at
	// install time); walk the tree and read each module's .modinfo instead.
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.Contains(d.Name(), ".ko") {
			return nil
		}
		rel, _ := filepath.Rel(modDir, p)
		ix.path[normModName(d.Name())] = rel
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vmtest: index modules in %s: %w", modDir, err)
	}
	if len(ix.path) == 0 {
		return nil, fmt.Errorf("vmtest: no kernel modules under %s", modDir)
	}
	return ix, nil
}

// modinfoDepends reads the "depends=" entry of a module's .modinfo section.
func modinfoDepends(file string) ([]string, error) {
	if strings.HasSuffix(file, ".xz") || strings.HasSuffix(file, ".zst") || strings.HasSuffix(file, ".gz") {
		return nil, fmt.Errorf("vmtest: compressed module %s is not supported", file)
	}
	f, err := elf.Open(file)
	if err != nil {
		return nil, fmt.Errorf("vmtest: %w", err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("vmtest: %s has no .modinfo section", file)
	}
	b, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("vmtest: read .modinfo of %s: %w", file, err)
	}
	for _, kv := range strings.Split(string(b), "\x00") {
		if v, ok := strings.CutPrefix(kv, "depends="); ok {
			var out []string
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					out = append(out, normModName(d))
				}
			}
			return out, nil
		}
	}
	return nil, nil
}

func (ix *moduleIndex) depsOf(name string) ([]string, error) {
	if ix.fromD {
		return ix.deps[name], nil
	}
	if d, ok := ix.deps[name]; ok {
		return d, nil
	}
	d, err := modinfoDepends(filepath.Join(ix.dir, ix.path[name]))
	if err != nil {
		return nil, err
	}
	ix.deps[name] = d
	return d, nil
}

// resolve returns the relative paths of the named modules and all their
// dependencies, dependencies first (the order insmod needs). A name that is
// built into the kernel (modules.builtin) is skipped.
func (ix *moduleIndex) resolve(names []string) ([]string, error) {
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(ix.dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[normModName(l)] = true
		}
	}
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(n string, chain []string) error
	visit = func(n string, chain []string) error {
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("vmtest: module dependency cycle: %s", strings.Join(append(chain, n), " -> "))
		}
		if _, ok := ix.path[n]; !ok {
			if builtin[n] {
				state[n] = 2
				return nil
			}
			return fmt.Errorf("vmtest: module %q not found under %s (needed by %v)", n, ix.dir, chain)
		}
		state[n] = 1
		deps, err := ix.depsOf(n)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := visit(d, append(chain, n)); err != nil {
				return err
			}
		}
		state[n] = 2
		order = append(order, ix.path[n])
		return nil
	}
	for _, n := range names {
		if err := visit(normModName(n), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}
