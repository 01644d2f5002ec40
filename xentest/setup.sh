#!/bin/sh
# Fetches what xentest needs on a Debian 12 machine without installing a
# hypervisor or a kernel on it: vmtest's prerequisites (QEMU, busybox-static),
# libxen-dev (headers for building hypervisor/xen with -tags xen), the host's
# libvirtd and virsh (libvirt-daemon, libvirt-clients: copied into dom0 by
# xentest.Config.Libvirt), and the .debs of Xen 4.17, its tools and libraries,
# the generic kernel (a Xen dom0) and libvirt's libxl driver
# (libvirt-daemon-driver-xen, at the version of the host's libvirt-daemon)
# downloaded into $REMUSD_VMTEST_CACHE/xen/debs (default
# ~/.cache/remusd/vmtest/xen/debs), unpacked by xentest on first use.
# Usage: sh xentest/setup.sh      (as root; idempotent)
set -eu
here=$(dirname "$0")
sh "$here/../vmtest/setup.sh"
export DEBIAN_FRONTEND=noninteractive
dpkg -s libxen-dev >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends libxen-dev
dpkg -s libvirt-daemon libvirt-clients >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends libvirt-daemon libvirt-clients
cache="${REMUSD_VMTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remusd/vmtest}"
kpkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n1)
mkdir -p "$cache/xen/debs"
cd "$cache/xen/debs"
for p in xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common libxenmisc4.17 \
	libxenstore4 libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 \
	libxentoollog1 libxentoolcore1 libxenhypfs1 libxendevicemodel1 libyajl2 xenstore-utils "$kpkg"; do
	ls "${p}_"*.deb >/dev/null 2>&1 || apt-get download -q "$p"
done
lv=$(dpkg-query -W -f='${Version}' libvirt-daemon)
ls "libvirt-daemon-driver-xen_$(echo "$lv" | sed 's/:/%3a/')_amd64.deb" >/dev/null 2>&1 || apt-get download -q "libvirt-daemon-driver-xen=$lv"
ls -l
