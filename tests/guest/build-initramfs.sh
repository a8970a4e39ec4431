#!/usr/bin/env bash
# Builds moat's test initramfs: a static busybox and test-init.sh as /init,
# as an uncompressed newc cpio. Prints the path of the image.
#   $1     output path (default: $CARGO_TARGET_DIR or target/, moat-guest/test-initramfs.cpio)
#   $2...  more static executables to put in /bin
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-${CARGO_TARGET_DIR:-$repo/target}/moat-guest/test-initramfs.cpio}
extra=("${@:2}")

busybox=/bin/busybox
# A dynamic executable names its program interpreter (static-pie ones don't).
is_static() { ! readelf -l "$1" 2>/dev/null | grep -q 'program interpreter'; }
if ! [ -x "$busybox" ] || ! is_static "$busybox"; then
  echo "build-initramfs: installing busybox-static" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends busybox-static cpio >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends busybox-static cpio >&2; }
fi
command -v cpio >/dev/null || apt-get install -y -q --no-install-recommends cpio >&2

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging/bin" "$staging/dev" "$staging/proc" "$staging/sys"
cp "$busybox" "$staging/bin/busybox"
ln -s busybox "$staging/bin/sh"
# The kernel opens /dev/console for init's stdio before init can mount
# devtmpfs, so the node must be in the image.
mknod -m 600 "$staging/dev/console" c 5 1
install -m 0755 "$here/test-init.sh" "$staging/init"
for exe in "${extra[@]}"; do
  if ! is_static "$exe"; then
    echo "build-initramfs: $exe is not a static executable" >&2
    exit 1
  fi
  install -m 0755 "$exe" "$staging/bin/$(basename "$exe")"
done

mkdir -p "$(dirname "$out")"
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
