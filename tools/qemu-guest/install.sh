#!/usr/bin/env bash
# Install what the QEMU guest tests and benchmarks need, when it is missing:
#  - QEMU >= 9 (qemu-system-x86) from bookworm-backports. Bookworm's own QEMU 7.2 cannot
#    be installed beside the qemu-utils from backports some images carry, and 7.2 lacks
#    what the appliance relies on; the backports suite is reached through a private
#    sources list and lists directory, so /etc/apt stays as it is.
#  - busybox-static and cpio, to build the guest's initramfs;
#  - a guest kernel: the vmlinuz of Debian's cloud kernel package, unpacked only
#    (installing the package would pull udev and initramfs-tools onto the host).
# Idempotent; everything it fetches is kept under target/qemu-guest.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/target/qemu-guest"
apt_dir="$out/apt"
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)

apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
	-o "Dir::State::Lists=$apt_dir/lists")

private_apt_update() {
	[ -f "$apt_dir/updated" ] && return
	mkdir -p "$apt_dir/lists/partial"
	cat >"$apt_dir/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
SOURCES
	$SUDO apt-get "${apt_opts[@]}" update -qq
	touch "$apt_dir/updated"
}

qemu_major() {
	command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
	qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

missing=()
[ "$(qemu_major)" -ge 9 ] || missing+=(qemu-system-x86)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
installed busybox-static || missing+=(busybox-static)
installed cpio || missing+=(cpio)
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing (bookworm-backports, private sources list): ${missing[*]}"
	private_apt_update
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${apt_opts[@]}" install -y -qq \
		--no-install-recommends -t bookworm-backports "${missing[@]}" >/dev/null
fi

if ! ls "$out"/vmlinuz >/dev/null 2>&1; then
	private_apt_update
	mkdir -p "$out/kernel"
	cd "$out/kernel"
	# The meta package names the current cloud kernel image package.
	image=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 |
		sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)
	[ -n "$image" ] || { echo "no cloud kernel package found" >&2; exit 1; }
	echo "fetching the guest kernel: $image (vmlinuz only)"
	apt-get "${apt_opts[@]}" download "$image" 2>/dev/null
	dpkg-deb --fsys-tarfile "$image"_*.deb | tar -x -C "$out/kernel" --wildcards './boot/vmlinuz-*'
	cp "$out"/kernel/boot/vmlinuz-* "$out/vmlinuz"
	rm -rf "$out/kernel"
fi
echo "qemu guest prerequisites: QEMU $(qemu_major), kernel $out/vmlinuz"
