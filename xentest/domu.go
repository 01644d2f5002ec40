package xentest

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/remusd/remusd/vmtest"
)

// Where DomUFiles puts the dirtier guest's kernel and initramfs in dom0.
const (
	DomUKernel  = "/vmtest/domU-vmlinuz"
	DomURamdisk = "/vmtest/domU.cpio"
)

// DomUFiles returns the files a dom0 needs to boot dirtier guests: the
// Debian cloud kernel vmtest uses (at DomUKernel) and an initramfs whose
// /init is the dirtier (at DomURamdisk, built into dir). The error wraps
// ErrUnavailable when the kernel cannot be found or fetched.
func DomUFiles(ctx context.Context, cacheDir, dir string) ([]vmtest.File, error) {
	k, err := vmtest.FindKernel(ctx, cacheDir)
	if err != nil {
		return nil, fmt.Errorf("xentest: the domU's kernel: %w", err)
	}
	rd := filepath.Join(dir, "domU.cpio")
	if err := BuildDirtierRamdisk(ctx, rd); err != nil {
		return nil, err
	}
	return []vmtest.File{{Src: k.Image, Dst: DomUKernel, Mode: 0o644}, {Src: rd, Dst: DomURamdisk, Mode: 0o644}}, nil
}

// LabMemory returns dom0's memory and the QEMU machine's (MiB, as Config's
// Dom0Mem and Memory want them) for guests of up to guestMiB: the defaults
// (1024M of 2048) up to 128 MiB; above, dom0 gets room for a process
// holding two guest-sized buffers (staging and a copy) besides its own
// working set, and the machine room for the guest besides dom0 and Xen.
func LabMemory(guestMiB int) (dom0, machine string) {
	if guestMiB <= 128 {
		return "", ""
	}
	d := 768 + 3*guestMiB
	return fmt.Sprintf("%dM", d), fmt.Sprint(d + guestMiB + 768)
}

// DomUNetRamdisk is where NetDomUFiles puts the network guest's
// initramfs in dom0.
const DomUNetRamdisk = "/vmtest/domU-net.cpio"

// NetDomUFiles returns the files a dom0 needs to boot the network guest
// (BuildNetGuestRamdisk, at NetGuestIP): the kernel (at DomUKernel) and
// its initramfs (at DomUNetRamdisk, built into dir). The error wraps
// ErrUnavailable when the kernel cannot be found or fetched.
func NetDomUFiles(ctx context.Context, cacheDir, dir string) (kernel, ramdisk vmtest.File, err error) {
	k, err := vmtest.FindKernel(ctx, cacheDir)
	if err != nil {
		return kernel, ramdisk, fmt.Errorf("xentest: the domU's kernel: %w", err)
	}
	rd := filepath.Join(dir, "domU-net.cpio")
	if err := BuildNetGuestRamdisk(ctx, cacheDir, k, rd, NetGuestIP+"/24"); err != nil {
		return kernel, ramdisk, err
	}
	return vmtest.File{Src: k.Image, Dst: DomUKernel, Mode: 0o644}, vmtest.File{Src: rd, Dst: DomUNetRamdisk, Mode: 0o644}, nil
}
