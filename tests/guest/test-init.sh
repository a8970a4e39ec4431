#!/bin/busybox sh
# /init of moat's test initramfs. It reports what the guest sees on the
# console, writes the boot-time marker, and ends the VM.
# Kernel parameters without dots reach it as environment variables:
#   moat_mode=report (default) | bench | block-write | block-read | vsock
#     bench prints only the first line; block-write fills the first
#     moat_block_mib MiB (default 64) of /dev/vda with random data and
#     prints its SHA-256, and tries to write /dev/vdb (read-only);
#     block-read prints the SHA-256 of the same range; vsock runs the
#     guest half of the vsock scenario (see vmm/tests/virtio.rs) with
#     moat_vsock_mib MiB (default 256) bulk transfers
#   moat_exit=reboot (default) | poweroff
echo "MOAT_GUEST init started"
/bin/busybox mkdir -p /proc /sys /dev /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

if [ "${moat_mode:-report}" = report ]; then
  echo "MOAT_GUEST uname: $(uname -a)"
  echo "MOAT_GUEST cmdline: $(cat /proc/cmdline)"
  echo "MOAT_GUEST vcpus: $(grep -c '^processor' /proc/cpuinfo)"
  echo "MOAT_GUEST cpus online: $(cat /sys/devices/system/cpu/online)"
  echo "MOAT_GUEST memtotal_kib: $(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  dmesg | grep -o 'BIOS-e820: .*usable' | sed 's/^/MOAT_GUEST /'
  echo "MOAT_GUEST clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
  for dev in /sys/bus/virtio/devices/*; do
    [ -e "$dev" ] && echo "MOAT_GUEST virtio: $(basename "$dev") device $(cat "$dev/device")"
  done
  # /dev/hwrng exists whenever the kernel has hw_random; "none" means no device.
  rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo none)
  if [ "$rng" != none ]; then
    echo "MOAT_GUEST hwrng source: $rng"
    echo "MOAT_GUEST hwrng bytes: $(head -c 65536 /dev/hwrng | wc -c)"
    echo "MOAT_GUEST hwrng distinct reads: $(head -c 32 /dev/hwrng | md5sum | cut -c1-8) $(head -c 32 /dev/hwrng | md5sum | cut -c1-8)"
  fi
fi

block_bytes=$(( ${moat_block_mib:-64} * 1048576 ))
case "${moat_mode:-report}" in
  block-write)
    echo "MOAT_GUEST vda serial: $(cat /sys/block/vda/serial)"
    mkdir -p /tmp
    head -c "$block_bytes" /dev/urandom > /tmp/data
    echo "MOAT_GUEST vda sha256: $(sha256sum < /tmp/data | cut -d' ' -f1)"
    dd if=/tmp/data of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo "MOAT_GUEST vda written"
    rm /tmp/data
    echo "MOAT_GUEST vdb ro: $(cat /sys/block/vdb/ro)"
    if echo data | dd of=/dev/vdb 2>/dev/null; then
      echo "MOAT_GUEST vdb write: succeeded"
    else
      echo "MOAT_GUEST vdb write: refused"
    fi
    ;;
  block-read)
    echo "MOAT_GUEST vda sha256: $(head -c "$block_bytes" /dev/vda | sha256sum | cut -d' ' -f1)"
    ;;
  vsock)
    bulk=$(( ${moat_vsock_mib:-256} * 1048576 ))
    vsock-guest echo-server 5000 &
    vsock-guest sink 5001 &
    sink_pid=$!
    vsock-guest send 6000 "$bulk" 42
    vsock-guest echo-clients 6001 100 65536
    vsock-guest refused 6999
    wait "$sink_pid"
    # The host's last connection says it is done with the guest's servers.
    vsock-guest sink 5002 >/dev/null
    ;;
esac

# Boot-time marker: value 123 to port 0x3f0 (1008).
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
echo "MOAT_GUEST init done"

case "${moat_exit:-reboot}" in
  poweroff) poweroff -f ;;
  *) reboot -f ;;
esac
