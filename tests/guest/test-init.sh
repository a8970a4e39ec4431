#!/bin/busybox sh
# /init of moat's test initramfs. It reports what the guest sees on the
# console, writes the boot-time marker, and ends the VM.
# Kernel parameters without dots reach it as environment variables:
#   moat_mode=report (default) | bench | block-write | block-read | vsock | net |
#     devbench | hostile | wait
#     bench prints only the first line; block-write fills the first
#     moat_block_mib MiB (default 64) of /dev/vda with random data and
#     prints its SHA-256, and tries to write /dev/vdb (read-only);
#     block-read prints the SHA-256 of the same range; vsock runs the
#     guest half of the vsock scenario (see vmm/tests/virtio.rs) with
#     moat_vsock_mib MiB (default 256) bulk transfers; net gives eth0
#     10.0.2.2/24, pings the host at 10.0.2.1 and moves moat_net_mib MiB
#     (default 256) over TCP each way (see vmm/tests/virtio.rs); devbench
#     runs the guest half of bench-devices (tests/src/bin/bench-devices.rs);
#     fs mounts the virtio-fs share tagged moat_fs_ctl (default ctl) at
#     /ctl and runs the scenario's guest half from it, /ctl/guest.sh (see
#     vmm/tests/fs.rs and tests/src/bin/bench-fs.rs); hostile runs
#     hostile-guest's floods (see vmm/tests/hostile.rs); wait reports, then
#     sleeps until the host stops the VM
#   moat_exit=reboot (default) | poweroff | panic (init exits: the kernel
#     panics with "Attempted to kill init!")
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
  echo "MOAT_GUEST cpu flags: $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
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
    guest-tool echo-server 5000 &
    guest-tool sink 5001 &
    sink_pid=$!
    guest-tool send 6000 "$bulk" 42
    guest-tool echo-clients 6001 100 65536
    guest-tool refused 6999
    wait "$sink_pid"
    # The host's last connection says it is done with the guest's servers.
    guest-tool sink 5002 >/dev/null
    ;;
  net)
    bulk=$(( ${moat_net_mib:-256} * 1048576 ))
    ip link set lo up
    ip addr add 10.0.2.2/24 dev eth0
    ip link set eth0 up
    echo "MOAT_GUEST eth0 mac: $(cat /sys/class/net/eth0/address)"
    # One ping at a time, each given 20 s: after the last of `ping -c 3`,
    # busybox waits only about twice the largest round trip seen (at least
    # 1 s) for its reply, and a nested guest under TCG can be slower than
    # that without any frame being lost.
    stats=/sys/class/net/eth0/statistics
    dropped_before=$(cat $stats/tx_dropped)
    replies=0
    for _ in 1 2 3; do
      ping -c 1 -W 20 10.0.2.1 >/dev/null && replies=$((replies + 1))
    done
    echo "MOAT_GUEST ping: 3 packets transmitted, $replies packets received"
    echo "MOAT_GUEST ping tx_dropped: $dropped_before before, $(cat $stats/tx_dropped) after"
    guest-tool tcp-sink 7001 &
    sink_pid=$!
    guest-tool tcp-send 10.0.2.1:7000 "$bulk" 42
    wait "$sink_pid"
    echo "MOAT_GUEST eth0 rx dropped+errors: $(( $(cat $stats/rx_dropped) + $(cat $stats/rx_errors) ))"
    echo "MOAT_GUEST eth0 counters: $(cd $stats && for f in *; do v=$(cat "$f"); [ "$v" = 0 ] || printf '%s=%s ' "$f" "$v"; done)"
    ;;
  devbench)
    bulk=$(( ${moat_bulk_mib:-128} * 1048576 ))
    ip link set lo up
    ip addr add 10.0.2.2/24 dev eth0
    ip link set eth0 up
    guest-tool blk-bench /dev/vda "${moat_disk_mib:-256}" "${moat_rand_secs:-10}"
    guest-tool sink 5001
    guest-tool send 6000 "$bulk" 42
    guest-tool tcp-sink 7001
    guest-tool tcp-send 10.0.2.1:7000 "$bulk" 42
    ;;
  fs)
    mkdir -p /ctl /tmp
    mount -t tmpfs tmpfs /tmp
    if mount -t virtiofs "${moat_fs_ctl:-ctl}" /ctl; then
      sh /ctl/guest.sh
    else
      echo "MOAT_GUEST fs: cannot mount the control share ${moat_fs_ctl:-ctl}"
    fi
    ;;
  hostile)
    # The hostile guest of vmm/tests/hostile.rs: floods of vsock connects
    # to the host's idle listener on moat_hostile_port, then the device
    # driven raw, then the console; its reports are in the console file.
    port=${moat_hostile_port:-7000}
    hostile-guest connect-flood "$port" "${moat_hostile_conns:-4000}" "${moat_hostile_hold:-10}"
    hostile-guest raw-flood "$port" "${moat_hostile_secs:-20}"
    echo "MOAT_GUEST hostile floods: done"
    hostile-guest console-spam "${moat_hostile_spam_secs:-30}"
    ;;
  wait)
    echo "MOAT_GUEST waiting"
    while :; do sleep 3600; done
    ;;
esac

# Boot-time marker: value 123 to port 0x3f0 (1008).
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
echo "MOAT_GUEST init done"

case "${moat_exit:-reboot}" in
  poweroff) poweroff -f ;;
  panic) exit 1 ;;
  *) reboot -f ;;
esac
