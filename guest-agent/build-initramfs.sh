#!/usr/bin/env bash
# Builds the pod VM's initramfs: the static moat-agent as /init and the
# mount points and console node it needs, nothing else, as a gzip'd newc
# cpio. Prints the image's path and size.
#   $1  output path
#   $2  the static moat-agent binary
#   $3  --with-busybox: also a busybox root filesystem at /busybox, for
#       the agent's container tests
set -euo pipefail

out=${1:?output path}
agent=${2:?moat-agent binary}
with_busybox=${3:-}
if readelf -l "$agent" 2>/dev/null | grep -q 'program interpreter'; then
  echo "build-initramfs: $agent is not a static executable" >&2
  exit 1
fi
command -v cpio >/dev/null || apt-get install -y -q --no-install-recommends cpio >&2

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
mkdir -p "$staging"/{dev,proc,sys,tmp,run}
# The kernel opens /dev/console for init's stdio before init can mount
# devtmpfs, so the node must be in the image.
mknod -m 600 "$staging/dev/console" c 5 1
# Stripped: symbols are a third of the binary and nothing in the guest
# reads them.
install -m 0755 -s "$agent" "$staging/init"
if [ "$with_busybox" = --with-busybox ]; then
  rootfs="$staging/busybox"
  mkdir -p "$rootfs"/{bin,proc,sys,dev,tmp,etc,data}
  : >"$rootfs/etc/resolv.conf"
  install -m 0755 /bin/busybox "$rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
  done
elif [ -n "$with_busybox" ]; then
  echo "build-initramfs: unknown option $with_busybox" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) \
  | gzip -9 >"$out.tmp"
mv "$out.tmp" "$out"
echo "$out ($(stat -c %s "$out") bytes)"
