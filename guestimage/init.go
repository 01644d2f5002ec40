package guestimage

// initScript is the guest's /init. /vmtest/modules (from vmtest's base
// archive) lists "path params..." lines, dependencies first.
const initScript = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/ TMPDIR=/tmp
echo "REMUS-GUEST: init started"
while read -r mod params; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$mod" $params || echo "REMUS-GUEST: insmod $mod failed"
done < /vmtest/modules
ip link set lo up
addr= gw= port=7000 disk=
for a in $(cat /proc/cmdline); do
	case "$a" in
	remus.ip=*) addr="${a#remus.ip=}" ;;
	remus.gw=*) gw="${a#remus.gw=}" ;;
	remus.port=*) port="${a#remus.port=}" ;;
	remus.disk=*) disk="${a#remus.disk=}" ;;
	esac
done
if [ -n "$addr" ]; then
	i=0
	while [ ! -e /sys/class/net/eth0 ]; do
		i=$((i+1))
		if [ "$i" -gt 100 ]; then
			echo "REMUS-GUEST-FAILED no eth0 after 10s"
			break
		fi
		sleep 0.1
	done
	ip addr add "$addr" dev eth0 || echo "REMUS-GUEST-FAILED ip addr add $addr"
	ip link set eth0 up || echo "REMUS-GUEST-FAILED eth0 up"
	if [ -n "$gw" ]; then
		ip route add default via "$gw" || echo "REMUS-GUEST-FAILED default route via $gw"
	fi
fi
svcargs=
if [ -n "$disk" ]; then
	i=0
	while [ ! -b "$disk" ]; do
		i=$((i+1))
		if [ "$i" -gt 100 ]; then
			echo "REMUS-GUEST-FAILED no $disk after 10s"
			break
		fi
		sleep 0.1
	done
	mkdir -p /data
	if mount -t ext4 "$disk" /data; then
		svcargs="-log /data/log -mount /data"
		echo "REMUS-GUEST: $disk mounted on /data"
	else
		echo "REMUS-GUEST-FAILED mount $disk"
	fi
fi
hexport=$(printf '%04X' "$port")
run=0
while true; do
	/bin/remus-guestsvc -listen ":$port" $svcargs &
	pid=$!
	while kill -0 "$pid" 2>/dev/null && ! grep -q ":$hexport [0-9A-F]*:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
		sleep 0.05
	done
	if kill -0 "$pid" 2>/dev/null; then
		if [ "$run" = 0 ]; then
			echo "REMUS-GUEST-READY ip=$addr port=$port"
		else
			echo "REMUS-GUEST: remus-guestsvc restarted (state lost)"
		fi
	fi
	wait "$pid"
	echo "REMUS-GUEST: remus-guestsvc exited rc=$?"
	run=$((run+1))
	sleep 1
done
`
