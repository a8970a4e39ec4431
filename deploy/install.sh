#!/usr/bin/env bash
# install.sh: puts moat in place on a node (what `make install` runs).
#
#   deploy/install.sh VMM SHIM KERNEL INITRAMFS VIRTIOFSD
#
# Binaries go to $PREFIX/bin (containerd finds containerd-shim-moat-v2 on
# its PATH), virtiofsd to $PREFIX/libexec/moat, the guest kernel and
# initramfs to $PREFIX/share/moat. /etc/moat/config.toml is written from
# shim/config.example.toml with these paths unless it exists (then it is
# left alone and the new one goes beside it as config.toml.new). The
# runtime goes into containerd's config through an imported file. $DESTDIR
# prefixes every path, for packaging.
set -euo pipefail
vmm=$1 shim=$2 kernel=$3 initramfs=$4 virtiofsd=$5
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
bin=$PREFIX/bin libexec=$PREFIX/libexec/moat share=$PREFIX/share/moat
install -D -m 0755 "$vmm" "$DESTDIR$bin/moat-vmm"
install -D -m 0755 "$shim" "$DESTDIR$bin/containerd-shim-moat-v2"
install -D -m 0755 "$virtiofsd" "$DESTDIR$libexec/virtiofsd"
install -D -m 0644 "$kernel" "$DESTDIR$share/vmlinux"
install -D -m 0644 "$initramfs" "$DESTDIR$share/agent-initramfs.cpio.gz"
echo "install: moat-vmm and containerd-shim-moat-v2 in $bin, virtiofsd in $libexec, guest in $share"

config=$(sed -e "s|^vmm = .*|vmm = \"$bin/moat-vmm\"|" \
	-e "s|^kernel = .*|kernel = \"$share/vmlinux\"|" \
	-e "s|^initramfs = .*|initramfs = \"$share/agent-initramfs.cpio.gz\"|" \
	-e "s|^virtiofsd = .*|virtiofsd = \"$libexec/virtiofsd\"|" \
	"$here/../shim/config.example.toml")
mkdir -p "$DESTDIR/etc/moat"
if [ -e "$DESTDIR/etc/moat/config.toml" ]; then
	echo "$config" >"$DESTDIR/etc/moat/config.toml.new"
	echo "install: /etc/moat/config.toml exists, left alone; this install's is /etc/moat/config.toml.new"
else
	echo "$config" >"$DESTDIR/etc/moat/config.toml"
	echo "install: wrote /etc/moat/config.toml"
fi

# containerd: version 2 configs (1.6, 1.7) import conf.d/*.toml.
version=$(containerd --version 2>/dev/null | awk '{print $3}' || true)
case $version in
2.*) snippet=moat-v2.x.toml ;;
*) snippet=moat-v1.6.toml ;;
esac
mkdir -p "$DESTDIR/etc/containerd/conf.d"
install -m 0644 "$here/containerd/$snippet" "$DESTDIR/etc/containerd/conf.d/moat.toml"
main=$DESTDIR/etc/containerd/config.toml
import='/etc/containerd/conf.d/*.toml'
if [ ! -e "$main" ]; then
	printf 'version = %s\nimports = ["%s"]\n' "$([ "$snippet" = moat-v2.x.toml ] && echo 3 || echo 2)" "$import" >"$main"
	echo "install: wrote $main importing $import"
elif grep -q '^imports' "$main"; then
	if grep -q "conf.d" "$main"; then
		echo "install: $main imports conf.d already"
	else
		echo "install: $main has its own imports line: add \"$import\" to it, or paste deploy/containerd/$snippet in" >&2
	fi
else
	# imports must come before the first table.
	sed -i "0,/^\[/s||imports = [\"$import\"]\n\n[|" "$main"
	grep -q '^imports' "$main" || echo "imports = [\"$import\"]" >>"$main"
	echo "install: $main now imports $import"
fi
echo "install: restart containerd, then: ctr run --runtime io.containerd.moat.v2 IMAGE ID CMD"
echo "install: Kubernetes: kubectl apply -f deploy/kubernetes/runtimeclass.yaml"
