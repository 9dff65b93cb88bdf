#!/usr/bin/env bash
# Build the test guest's initramfs (busybox + the static workload) beside the kernel
# install.sh fetched: target/qemu-guest/{vmlinuz,initramfs.cpio.gz}. Rebuilt only when
# the workload's sources change. Prints the directory on success.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/target/qemu-guest"
[ -f "$out/vmlinuz" ] || { echo "no guest kernel: run tools/qemu-guest/install.sh (make deps)" >&2; exit 2; }
command -v cpio >/dev/null || { echo "cpio missing: run make deps" >&2; exit 2; }
busybox=/bin/busybox
! ldd "$busybox" >/dev/null 2>&1 || { echo "$busybox is not static: install busybox-static (make deps)" >&2; exit 2; }

stamp=$(cat "$0" "$root"/tools/qemu-guest/src/*.rs "$root/tools/qemu-guest/Cargo.toml" | sha256sum | cut -c1-16)
if [ -f "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/initramfs.stamp" 2>/dev/null)" = "$stamp" ]; then
	echo "$out"
	exit 0
fi

# The workload linked statically against glibc, in a target directory of its own so
# the workspace's normal (dynamic) build of it is not relinked back and forth.
CARGO_TARGET_DIR="$out/cargo" cargo rustc --quiet --release -p dwcp-qemu-guest \
	--bin dwcp-guest-workload --manifest-path "$root/Cargo.toml" -- -C target-feature=+crt-static >&2

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree"/{bin,dev,proc,sys}
cp "$busybox" "$tree/bin/busybox"
cp "$out/cargo/release/dwcp-guest-workload" "$tree/bin/"
cat >"$tree/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
exec </dev/console >/dev/console 2>&1
echo "dwcp-guest: init"
# The workload runs for the guest's life; should it ever end, say so and stay up.
/bin/dwcp-guest-workload
echo "dwcp-guest: workload exited with $?"
while true; do /bin/busybox sleep 3600; done
INIT
chmod +x "$tree/init"
# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$tree/dev/console" c 5 1 2>/dev/null || true
(cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initramfs.cpio.gz.new"
mv "$out/initramfs.cpio.gz.new" "$out/initramfs.cpio.gz"
echo "$stamp" >"$out/initramfs.stamp"
echo "$out"
