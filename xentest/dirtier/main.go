// Command dirtier is the /init of xentest's domU: a static program that
// writes known patterns into guest memory forever, so that a checker in
// dom0 can compare what changed in guest memory with what Xen's
// log-dirty bitmap reports.
//
// It allocates -mib MiB, stamps every page with a header (Magic, page
// index, round), then in round r rewrites the header and one word at a
// round-dependent offset of every page whose index i has
// (i*2654435761 + r*40503) mod -every == 0, sleeping -sleep between
// rounds. With -printevery N > 0 it prints "dirtier: round R" on its
// console every N rounds (a running counter a failover test can watch).
// Flags come from the kernel command line as dirtier.mib=N etc.
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Magic starts every page header.
const Magic = "RMSDIRTY"

func param(cmdline, name string, def int) int {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, "dirtier."+name+"="); ok {
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				return n
			}
		}
	}
	return def
}

func main() {
	cmdline, _ := os.ReadFile("/proc/cmdline") // absent without /proc: defaults
	if len(cmdline) == 0 {
		if err := os.MkdirAll("/proc", 0o755); err == nil {
			_ = mount("proc", "/proc", "proc")
			cmdline, _ = os.ReadFile("/proc/cmdline")
		}
	}
	mib := param(string(cmdline), "mib", 32)
	every := param(string(cmdline), "every", 7)
	sleep := time.Duration(param(string(cmdline), "sleepms", 5)) * time.Millisecond
	printEvery := uint32(param(string(cmdline), "printevery", 0))
	const page = 4096
	buf := make([]byte, mib<<20)
	n := len(buf) / page
	for i := 0; i < n; i++ {
		p := buf[i*page : (i+1)*page]
		copy(p, Magic)
		binary.LittleEndian.PutUint32(p[8:], uint32(i))
		binary.LittleEndian.PutUint32(p[12:], 0)
	}
	fmt.Printf("dirtier: %d pages of %d MiB stamped; every=%d sleep=%s\n", n, mib, every, sleep)
	for r := uint32(1); ; r++ {
		for i := 0; i < n; i++ {
			if (uint64(i)*2654435761+uint64(r)*40503)%uint64(every) != 0 {
				continue
			}
			p := buf[i*page : (i+1)*page]
			binary.LittleEndian.PutUint32(p[12:], r)
			off := 16 + int(r*64)%(page-24)
			binary.LittleEndian.PutUint64(p[off&^7:], uint64(r)<<32|uint64(i))
		}
		if printEvery > 0 && r%printEvery == 0 {
			fmt.Printf("dirtier: round %d\n", r)
		}
		time.Sleep(sleep)
	}
}
