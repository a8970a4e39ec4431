#!/usr/bin/env bash
# Builds moat's guest vmlinux from Debian's linux-source package plus
# microvm.config, and caches it outside the clone keyed by a hash of the
# source package version, the fragment and this script.
# Prints the path of the cached vmlinux as the last line of stdout; the
# bzImage of the same build lies beside it.
#
# Environment:
#   MOAT_CACHE_DIR   cache root (default /var/cache/moat)
#   MOAT_KERNEL_SRC  linux-source package name (default linux-source-6.12)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache_root=${MOAT_CACHE_DIR:-/var/cache/moat}
src_pkg=${MOAT_KERNEL_SRC:-linux-source-6.12}
fragment=$here/microvm.config

log() { echo "build-kernel: $*" >&2; }

if ! dpkg-query -W -f='${Status}' "$src_pkg" 2>/dev/null | grep -q 'ok installed'; then
  log "installing $src_pkg and the kernel build dependencies"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "$src_pkg" bc flex bison \
    libelf-dev libssl-dev xz-utils make gcc >&2 \
    || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends \
           "$src_pkg" bc flex bison libelf-dev libssl-dev xz-utils make gcc >&2; }
fi
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")
tarball=$(dpkg -L "$src_pkg" | grep -E '/usr/src/linux-source-.*\.tar\.xz$' | head -n1)
[ -f "$tarball" ] || { log "no source tarball in package $src_pkg"; exit 1; }

key=$( { echo "$src_pkg $src_version"; cat "$fragment" "$0"; } | sha256sum | cut -c1-16)
out_dir=$cache_root/kernel/$key
vmlinux=$out_dir/vmlinux

mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock"
flock 9

if [ -s "$vmlinux" ]; then
  log "cached: $src_pkg $src_version, fragment hash $key"
  echo "$vmlinux"
  exit 0
fi

build_dir=$cache_root/kernel/build-$key
rm -rf "$build_dir"
mkdir -p "$build_dir"
trap 'rm -rf "$build_dir"' EXIT
start=$(date +%s)
log "extracting $tarball"
tar -xJf "$tarball" -C "$build_dir" --strip-components=1

cd "$build_dir"
log "configuring: tinyconfig + $(grep -c '^CONFIG_' "$fragment") options from microvm.config"
make -s ARCH=x86_64 tinyconfig >&2
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m -O . .config "$fragment" >&2
make -s ARCH=x86_64 olddefconfig >&2

# Every option the fragment asks for must have survived olddefconfig:
# a dependency missing from the fragment would silently drop it.
missing=()
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      if ! grep -qxF "$line" .config; then missing+=("$line"); fi ;;
    "# CONFIG_"*" is not set")
      option=${line#\# }; option=${option%% *}
      if grep -q "^$option=" .config; then missing+=("$line"); fi ;;
  esac
done < "$fragment"
if [ ${#missing[@]} -gt 0 ]; then
  log "these options of microvm.config did not take effect (unmet dependencies?):"
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

log "building vmlinux and bzImage with $(nproc) jobs"
make -s ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out_dir"
cp arch/x86/boot/bzImage "$out_dir/bzImage"
cp .config "$out_dir/config"
# vmlinux last: its presence marks a complete cache entry.
cp vmlinux "$out_dir/vmlinux.tmp"
mv "$out_dir/vmlinux.tmp" "$vmlinux"
end=$(date +%s)
log "built in $((end - start)) s: $(stat -c %s "$vmlinux") bytes"
echo "$((end - start))" > "$out_dir/build-seconds"
echo "$vmlinux"
