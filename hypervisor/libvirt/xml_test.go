package libvirt

import (
	"encoding/xml"
	"errors"
	"strings"
	"testing"
)

const goodXML = `<domain type='qemu' id='3'>
  <name>web</name>
  <memory unit='KiB'>131072</memory>
  <vcpu placement='static'>2</vcpu>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><kernel>/k</kernel><initrd>/i</initrd><cmdline>console=ttyS0</cmdline></os>
  <cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='none'/>
    <controller type='sata' index='0'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <interface type='ethernet'><mac address='52:54:00:AA:00:01'/><target dev='vnet-web'/><model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></interface>
    <serial type='file'><source path='/tmp/s'/><target type='isa-serial' port='0'/></serial>
    <console type='file'><target type='serial' port='0'/></console>
    <input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
</domain>`

func parse(t *testing.T, x string) *Domain {
	t.Helper()
	d := &Domain{name: "web", xml: x}
	if err := xml.Unmarshal([]byte(x), &d.def); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestDomainXML(t *testing.T) {
	d := parse(t, goodXML)
	if err := d.CheckSharedMemory(); err != nil {
		t.Fatal(err)
	}
	if p := d.StandbyProblems(); len(p) != 0 {
		t.Fatalf("problems %q", p)
	}
	s := d.Spec()
	if s.Name != "web" || s.MemoryMiB != 128 || s.CPUs != 2 || s.Kernel != "/k" || s.Initrd != "/i" || s.Append != "console=ttyS0" ||
		s.MAC != "52:54:00:aa:00:01" || s.Tap != "vnet-web" || s.Machine != "pc-q35-7.2" || s.Accel != "" {
		t.Fatalf("spec %+v", s)
	}
	if err := s.ValidateMachine(); err != nil {
		t.Fatal(err)
	}
	if s := parse(t, strings.Replace(goodXML, "type='qemu'", "type='kvm'", 1)).Spec(); s.Accel != "kvm" {
		t.Fatalf("kvm domain: accel %q", s.Accel)
	}
	if err := d.CheckStandby(); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ from, to, want string }{
		{"<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>", "", "no <memoryBacking>"},
		{"<source type='file'/>", "<source type='memfd'/>", `source type "memfd"`},
		{"<access mode='shared'/>", "", "access mode none"},
		{"<access mode='shared'/>", "<access mode='private'/>", `access mode "private"`},
	} {
		err := parse(t, strings.Replace(goodXML, c.from, c.to, 1)).CheckSharedMemory()
		if !errors.Is(err, ErrNotSharedMemory) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), SharedMemoryXML) || !strings.Contains(err.Error(), `"web"`) {
			t.Errorf("%s -> %s: %v", c.from, c.to, err)
		}
	}

	for _, c := range []struct{ from, to, want string }{
		{"slot='0x01'", "slot='0x02'", "0000:00:01.0"},
		{"bus='0x00' slot", "bus='0x01' slot", "0000:00:01.0"},
		{"<model type='virtio'/>", "<model type='e1000'/>", "virtio"},
		{"pc-q35-7.2", "pc-i440fx-7.2", "q35"},
		{"<controller type='usb' index='0' model='none'/>", "<controller type='usb' index='0' model='qemu-xhci'/>", "usb' model='none'"},
		{"<memballoon model='none'/>", "<memballoon model='virtio'/>", "memballoon model='none'"},
		{"<audio id='1' type='none'/>", "<disk type='file'/>", "<disk"},
		{"<audio id='1' type='none'/>", "<controller type='pci' model='pcie-root-port'/>", "pcie-root-port"},
		{"qemu64", "Skylake-Client", "qemu64"},
		{"<memory unit='KiB'>131072</memory>", "<memory unit='KiB'>131073</memory>", "whole number of MiB"},
	} {
		p := parse(t, strings.Replace(goodXML, c.from, c.to, 1)).StandbyProblems()
		if len(p) == 0 || !strings.Contains(strings.Join(p, "\n"), c.want) {
			t.Errorf("%s -> %s: problems %q, want %q", c.from, c.to, p, c.want)
		}
		if err := parse(t, strings.Replace(goodXML, c.from, c.to, 1)).CheckStandby(); !errors.Is(err, ErrStandbyIncompatible) || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "virsh edit web") {
			t.Errorf("%s -> %s: CheckStandby %v", c.from, c.to, err)
		}
	}
}

func TestConfigResolveURI(t *testing.T) {
	for _, c := range []struct{ uri, sock, wantSock, wantURI string }{
		{"", "", DefaultSocket, DefaultURI},
		{"qemu:///system", "", DefaultSocket, "qemu:///system"},
		{"qemu+unix:///system?socket=/tmp/x/libvirt-sock", "", "/tmp/x/libvirt-sock", "qemu:///system"},
		{"", "/tmp/s", "/tmp/s", DefaultURI},
	} {
		s, u, err := Config{URI: c.uri, Socket: c.sock}.resolve()
		if err != nil || s != c.wantSock || u != c.wantURI {
			t.Errorf("%q %q: %q %q %v", c.uri, c.sock, s, u, err)
		}
	}
	if _, _, err := (Config{URI: "qemu+unix:///system?socket=/a", Socket: "/b"}).resolve(); err == nil {
		t.Error("conflicting sockets accepted")
	}
}
