package xentest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// A two-host lab is two QEMU machines, each booting Xen with its own dom0,
// whose dom0s each have one NIC joined to the other's by QEMU's socket
// netdev over loopback UDP (UDPNIC). Each dom0 enslaves its NIC to its
// bridge (AddUplink), so the bridges form one layer-2 segment: a guest's
// vif on either host reaches the other dom0 and its guests.

// NICModules are the dom0 modules of UDPNIC's virtio-net NIC (Debian's
// generic kernel has both as modules): Config.Modules.
var NICModules = []string{"virtio_pci", "virtio_net"}

// UDPNIC returns QEMU arguments for a NIC of model device
// ("virtio-net-pci", "e1000") with MAC mac whose frames are sent as UDP
// datagrams from 127.0.0.1:local to 127.0.0.1:remote, and received on
// local. Point-to-point UDP needs no start order (a listen/connect TCP
// pair does: the connecting QEMU exits if nobody listens yet), keeps no
// connection state one machine's death would disturb, and stays on
// loopback.
func UDPNIC(device, mac string, local, remote int) []string {
	return []string{
		"-netdev", fmt.Sprintf("socket,id=uplink,udp=127.0.0.1:%d,localaddr=127.0.0.1:%d", remote, local),
		"-device", fmt.Sprintf("%s,netdev=uplink,mac=%s", device, mac),
	}
}

// AddUplink brings dom0's NIC with MAC mac up and puts it on the bridge
// (SetupNetAddr first). It returns the NIC's name.
func AddUplink(ctx context.Context, mac string) (string, error) {
	var name string
	deadline := time.Now().Add(30 * time.Second)
	for name == "" {
		ifs, _ := filepath.Glob("/sys/class/net/*/address")
		for _, p := range ifs {
			if b, err := os.ReadFile(p); err == nil && strings.EqualFold(strings.TrimSpace(string(b)), mac) {
				name = filepath.Base(filepath.Dir(p))
			}
		}
		if name == "" {
			if time.Now().After(deadline) {
				return "", fmt.Errorf("xentest: no NIC with MAC %s in dom0 (have %v; driver module loaded?)", mac, ifs)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, args := range [][]string{
		{"ip", "link", "set", name, "up"},
		{"brctl", "addif", NetBridge, name},
	} {
		if err := command(ctx, args...); err != nil {
			return "", err
		}
	}
	return name, nil
}

func command(ctx context.Context, args ...string) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("xentest: %v: %w: %s", args, err, out)
	}
	return nil
}

// NetGuestDomainXML returns the libvirt (libxl driver) domain XML of the
// domain NetGuestXL describes: the same PVH machine (128 MiB, one vCPU
// pinned to DomUCPU, the same kernel command line) and the same vif (MAC,
// bridge, script), so that a standby `xl create -p`d from NetGuestXL has
// its memory layout.
func NetGuestDomainXML(name, kernel, ramdisk, script string) string {
	return fmt.Sprintf(`<domain type='xen'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu cpuset='%d'>1</vcpu>
  <os>
    <type arch='x86_64' machine='xenpvh'>xenpvh</type>
    <kernel>%s</kernel>
    <initrd>%s</initrd>
    <cmdline>console=hvc0 rdinit=/init dirtier.printevery=50</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>preserve</on_crash>
  <devices>
    <interface type='bridge'>
      <source bridge='%s'/>
      <mac address='%s'/>
      <script path='%s'/>
    </interface>
  </devices>
</domain>
`, name, DomUCPU, kernel, ramdisk, NetBridge, NetGuestMAC, script)
}

// NetGuestXL returns the xl configuration of a PVH domain name running
// kernel with a BuildNetGuestRamdisk ramdisk and one vif on the bridge
// (NetVifLine with SetupNet's script): 128 MiB, one vCPU pinned to the
// lab's guest pCPU (DomUPin), kept on crash.
func NetGuestXL(name, kernel, ramdisk, script string) string {
	return fmt.Sprintf(`name = %q
type = "pvh"
memory = 128
vcpus = 1
kernel = %q
ramdisk = %q
extra = "console=hvc0 rdinit=/init dirtier.printevery=50"
%s
on_crash = "preserve"
on_reboot = "destroy"
%s
`, name, kernel, ramdisk, NetVifLine(script), DomUPin)
}
