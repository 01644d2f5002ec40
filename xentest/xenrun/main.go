// Command xenrun boots xentest's Xen + dom0 under QEMU and runs a shell
// command in dom0, printing the serial console: for trying things by hand.
//
//	go run ./xentest/xenrun -f /host/file:/dom0/path ... 'xl info; xl list'
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/remusd/remusd/vmtest"
	"github.com/remusd/remusd/xentest"
)

type files []vmtest.File

func (f *files) String() string { return fmt.Sprint(*f) }
func (f *files) Set(s string) error {
	src, dst, ok := strings.Cut(s, ":")
	if !ok {
		return fmt.Errorf("want SRC:DST, got %q", s)
	}
	*f = append(*f, vmtest.File{Src: src, Dst: dst, Mode: 0o755})
	return nil
}

func main() {
	var fs files
	flag.Var(&fs, "f", "host file to put into dom0, SRC:DST (repeatable)")
	dirtier := flag.String("dirtier", "", "build the dirtier domU initramfs and put it at this dom0 path")
	timeout := flag.Duration("timeout", 300*time.Second, "whole run")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: xenrun [-f SRC:DST]... 'shell command'")
		os.Exit(2)
	}
	if *dirtier != "" {
		tmp, err := os.MkdirTemp("", "xenrun-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer os.RemoveAll(tmp)
		p := tmp + "/domU.cpio"
		if err := xentest.BuildDirtierRamdisk(context.Background(), p); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fs = append(fs, vmtest.File{Src: p, Dst: *dirtier, Mode: 0o644})
	}
	res, err := xentest.Run(context.Background(), xentest.Config{
		Files: fs, Command: []string{"sh", "-c", flag.Arg(0)}, Timeout: *timeout, Console: os.Stdout,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("verdict %q in %s\n", res.Verdict, res.Elapsed)
	if !res.Passed {
		os.Exit(1)
	}
}
