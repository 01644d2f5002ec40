#!/bin/sh
# Installs what vmtest needs on a Debian 12 machine (CI or a developer's)
# and fetches the kernel package into the vmtest cache without installing
# it as this machine's kernel:
#   qemu-system-x86  (qemu-system-x86_64, run with -accel tcg)
#   busybox-static   (/bin/busybox for the initramfs)
#   linux-image-*-cloud-amd64 .deb, the package linux-image-cloud-amd64
#                    depends on (has sch_plug, ifb, veth, act_mirred, cls_u32,
#                    sch_ingress as modules), downloaded with apt-get download
#                    into $REMUSD_VMTEST_CACHE/debs (default
#                    ~/.cache/remusd/vmtest/debs) and extracted on first use.
# Usage: sh vmtest/setup.sh      (as root; idempotent)
set -eu
cache="${REMUSD_VMTEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remusd/vmtest}"
need=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"
if ! { [ -x /bin/busybox ] && ! grep -q 'ld-linux' /bin/busybox 2>/dev/null; }; then
	need="$need busybox-static"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if [ -n "$need" ]; then
	apt-get install -y -qq --no-install-recommends $need
fi
pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n1)
[ -n "$pkg" ] || { echo "vmtest/setup.sh: apt-cache knows no linux-image-cloud-amd64" >&2; exit 1; }
mkdir -p "$cache/debs"
if ! ls "$cache/debs/${pkg}_"*.deb >/dev/null 2>&1; then
	(cd "$cache/debs" && apt-get download -q "$pkg")
fi
ls -l "$cache/debs"
