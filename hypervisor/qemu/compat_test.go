package qemu

import (
	"errors"
	"strings"
	"testing"
)

func TestParseConfigStrict(t *testing.T) {
	full := Spec{Name: "web", MemoryMiB: 256, CPUs: 2, Kernel: "/vm/vmlinuz", Initrd: "/vm/initrd", Append: "console=ttyS0",
		MAC: "52:54:00:12:34:56", Machine: "pc-q35-7.2", Accel: "tcg", ExtraArgs: []string{"-device", "virtio-rng-pci"},
		Tap: "tap0", RAMPath: "/dev/shm/r", QMPPath: "/run/q", SerialPath: "/run/s", Binary: "/usr/bin/q"}
	got, err := ParseConfig(full.Config())
	if err != nil {
		t.Fatal(err)
	}
	want := Spec{Name: "web", MemoryMiB: 256, CPUs: 2, MAC: "52:54:00:12:34:56", Machine: "pc-q35-7.2", Accel: "tcg",
		ExtraArgs: []string{"-device", "virtio-rng-pci"}}
	if err := CheckCompatible(got, want); err != nil || got.Kernel != "" || got.Initrd != "" || got.Append != "" ||
		got.Tap != "" || got.RAMPath != "" || got.QMPPath != "" || got.SerialPath != "" || got.Binary != "" {
		t.Fatalf("parsed %+v (%v): boot files and host-local fields must be empty", got, err)
	}
	// A config from before Machine/Accel existed.
	if s, err := ParseConfig([]byte(`{"name":"old","memory_mib":128,"kernel":"/k","initrd":"/i","append":"a","mac":"52:54:00:00:00:01"}`)); err != nil || s.Kernel != "" || s.machine() != "q35" || s.accel() != "tcg" {
		t.Fatalf("old config: %+v, %v", s, err)
	}

	for _, c := range []struct{ json, want string }{
		{`{"name":"x","memory_mib":1,"bogus":1}`, "bogus"},
		{`{"name":"x","memory_mib":1,"tap":"t"}`, "tap"}, // host-local fields never come from the wire
		{`{"name":"x","memory_mib":1,"ram_path":"/etc/shadow"}`, "ram_path"},
		{`{"name":"x","memory_mib":1} {"name":"y"}`, "after the JSON object"},
		{`{"name":"x","memory_mib":1}x`, "after the JSON object"},
		{`[1]`, "parse config"},
		{`null`, "spec Name"},
		{`{"name":"../../etc/x","memory_mib":1}`, "spec Name"},
		{`{"name":"a,b","memory_mib":1}`, "spec Name"},
		{`{"name":"x","memory_mib":0}`, "spec MemoryMiB"},
		{`{"name":"x","memory_mib":2000000}`, "spec MemoryMiB"},
		{`{"name":"x","memory_mib":1.5}`, "memory_mib"},
		{`{"name":"x","memory_mib":1,"cpus":-1}`, "spec CPUs"},
		{`{"name":"x","memory_mib":1,"cpus":256}`, "spec CPUs"},
		{`{"name":"x","memory_mib":1,"mac":"52:54:00:12:34"}`, "spec MAC"},
		{`{"name":"x","memory_mib":1,"mac":"52:54:00:12:34:56,id=x"}`, "spec MAC"},
		{`{"name":"x","memory_mib":1,"mac":"01:00:5e:00:00:01"}`, "multicast"},
		{`{"name":"x","memory_mib":1,"machine":"q35,memory-backend=x"}`, "spec Machine"},
		{`{"name":"x","memory_mib":1,"machine":"pc"}`, "spec Machine"},
		{`{"name":"x","memory_mib":1,"accel":"kvm,kernel-irqchip=off"}`, "spec Accel"},
		{`{"name":"x","memory_mib":1,"extra_args":["a\u0000b"]}`, "spec ExtraArgs[0]"},
		{`{"name":"x","memory_mib":1,"extra_args":["` + strings.Repeat("a", maxExtraArgBytes+1) + `"]}`, "spec ExtraArgs[0]"},
		{`{"name":"x","memory_mib":1,"extra_args":[` + strings.Repeat(`"a",`, maxExtraArgs) + `"a"]}`, "spec ExtraArgs"},
		{`{"name":"x","memory_mib":1,"append":"` + strings.Repeat("a", maxConfigBytes) + `"}`, "at most"},
	} {
		_, err := ParseConfig([]byte(c.json))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.80s: %v, want an error with %q", c.json, err, c.want)
		}
	}
}

func TestCheckCompatible(t *testing.T) {
	base := Spec{Name: "web", MemoryMiB: 256, CPUs: 2, MAC: "52:54:00:12:34:56", ExtraArgs: []string{"-device", "virtio-rng-pci"}}
	for _, c := range []struct {
		name           string
		primary, local func(*Spec)
		want           []string // one per mismatch, in order; nil = compatible
	}{
		{name: "equal"},
		{name: "host-local and boot files ignored",
			primary: func(s *Spec) { s.Kernel, s.Initrd, s.Append = "/a/k", "/a/i", "x" },
			local: func(s *Spec) {
				s.Kernel, s.Append, s.Tap, s.RAMPath, s.QMPPath, s.SerialPath, s.Binary = "/b/k", "y", "rs-web", "/dev/shm/r", "/q", "/s", "/bin/q"
			}},
		{name: "defaults resolved",
			primary: func(s *Spec) { s.CPUs, s.Machine, s.Accel = 1, "", "" },
			local:   func(s *Spec) { s.CPUs, s.Machine, s.Accel, s.MAC = 0, "q35", "tcg", "52:54:00:12:34:56" }},
		{name: "MAC case", local: func(s *Spec) { s.MAC = "52:54:00:AB:CD:EF" }, primary: func(s *Spec) { s.MAC = "52:54:00:ab:cd:ef" }},
		{name: "memory", local: func(s *Spec) { s.MemoryMiB = 128 }, want: []string{"memory_mib: primary 256, this backup 128"}},
		{name: "cpus", primary: func(s *Spec) { s.CPUs = 0 }, want: []string{"cpus: primary 1, this backup 2"}},
		{name: "no NIC here", local: func(s *Spec) { s.MAC = "" }, want: []string{"mac: primary 52:54:00:12:34:56, this backup none (no NIC)"}},
		{name: "no NIC there", primary: func(s *Spec) { s.MAC = "" }, want: []string{"mac: primary none (no NIC), this backup 52:54:00:12:34:56"}},
		{name: "other MAC", primary: func(s *Spec) { s.MAC = "52:54:00:12:34:57" }, want: []string{"mac: primary 52:54:00:12:34:57, this backup 52:54:00:12:34:56"}},
		{name: "machine alias is not a version", primary: func(s *Spec) { s.Machine = "pc-q35-7.2" },
			want: []string{`machine: primary "pc-q35-7.2", this backup "q35"`}},
		{name: "machine version", primary: func(s *Spec) { s.Machine = "pc-q35-7.2" }, local: func(s *Spec) { s.Machine = "pc-q35-6.0" },
			want: []string{`machine: primary "pc-q35-7.2", this backup "pc-q35-6.0"`}},
		{name: "accel", primary: func(s *Spec) { s.Accel = "kvm" }, want: []string{`accel: primary "kvm", this backup "tcg"`}},
		{name: "extra args order", local: func(s *Spec) { s.ExtraArgs = []string{"virtio-rng-pci", "-device"} },
			want: []string{`extra_args: primary ["-device" "virtio-rng-pci"], this backup ["virtio-rng-pci" "-device"]`}},
		{name: "extra args missing", local: func(s *Spec) { s.ExtraArgs = nil },
			want: []string{`extra_args: primary ["-device" "virtio-rng-pci"], this backup none`}},
		{name: "name", primary: func(s *Spec) { s.Name = "db" }, want: []string{`name: primary "db", this backup "web"`}},
		{name: "everything",
			primary: func(s *Spec) {
				s.MemoryMiB, s.CPUs, s.MAC, s.Machine, s.Accel, s.ExtraArgs = 512, 4, "", "pc-q35-7.1", "kvm", nil
			},
			want: []string{"memory_mib: primary 512, this backup 256", "cpus: primary 4, this backup 2", "mac: primary none (no NIC), this backup 52:54:00:12:34:56",
				`machine: primary "pc-q35-7.1", this backup "q35"`, `accel: primary "kvm", this backup "tcg"`, `extra_args: primary none, this backup ["-device" "virtio-rng-pci"]`}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, l := base, base
			p.ExtraArgs, l.ExtraArgs = append([]string(nil), base.ExtraArgs...), append([]string(nil), base.ExtraArgs...)
			if c.primary != nil {
				c.primary(&p)
			}
			if c.local != nil {
				c.local(&l)
			}
			err := CheckCompatible(p, l)
			if c.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var ie *IncompatibleError
			if !errors.As(err, &ie) || !errors.Is(err, ErrIncompatible) {
				t.Fatalf("want an IncompatibleError, got %v", err)
			}
			if len(ie.Mismatches) != len(c.want) {
				t.Fatalf("%d mismatches %v, want %d", len(ie.Mismatches), ie.Mismatches, len(c.want))
			}
			for i, w := range c.want {
				if got := ie.Mismatches[i].String(); got != w {
					t.Errorf("mismatch %d: %q, want %q", i, got, w)
				}
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if !strings.Contains(err.Error(), `VM "web"`) && c.name != "name" {
				t.Errorf("error %q does not name the VM", err)
			}
			t.Log(err)
		})
	}
}
