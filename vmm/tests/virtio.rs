//! moat-vmm's virtio devices driven by the real Linux drivers of a guest
//! booted through the KVM test harness.

mod common;

use common::{guest_vmlinux, kvm_run, test_initramfs, test_initramfs_with, test_tool, vmm_binary};

#[test]
fn virtio_rng_feeds_the_guest_hwrng() {
    let initramfs = test_initramfs("virtio-rng");
    let vmm = vmm_binary();
    let kernel = guest_vmlinux();
    let run = kvm_run(&[
        vmm.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--rng",
        "--append",
        "quiet",
    ]);
    let all = run.describe();
    assert_eq!(run.code, 0, "{all}");
    let cmdline = run.guest_value("cmdline").unwrap_or_default();
    assert!(
        cmdline.ends_with("virtio_mmio.device=4K@0xd0000000:5"),
        "{all}"
    );
    assert_eq!(
        run.guest_value("virtio"),
        Some("virtio0 device 0x0004"),
        "{all}"
    );
    assert_eq!(
        run.guest_value("hwrng source"),
        Some("virtio_rng.0"),
        "{all}"
    );
    assert_eq!(run.guest_value("hwrng bytes"), Some("65536"), "{all}");
    let reads: Vec<&str> = run
        .guest_value("hwrng distinct reads")
        .unwrap_or_default()
        .split(' ')
        .collect();
    assert!(
        reads.len() == 2 && reads[0] != reads[1],
        "two reads differ\n{all}"
    );
}

#[test]
fn virtio_blk_64mib_survives_a_vm_restart_and_read_only_disk_refuses_writes() {
    let initramfs = test_initramfs("virtio-blk");
    // One harness run, two VMs: the images live in the harness VM's
    // throwaway filesystem, so both boots and the host-side hash of the
    // image happen in the same script.
    let script = format!(
        r#"set -e
        truncate -s 128M /tmp/data.img; truncate -s 8M /tmp/ro.img
        boot() {{ {vmm} --kernel {kernel} --initramfs {initramfs} --memory 256 "$@"; }}
        boot --block id=data-disk,path=/tmp/data.img --block id=ro-disk,path=/tmp/ro.img,readonly \
             --append "quiet moat_mode=block-write"
        boot --block id=data-disk,path=/tmp/data.img --append "quiet moat_mode=block-read"
        echo "image sha256: $(head -c 67108864 /tmp/data.img | sha256sum | cut -d' ' -f1)"
        echo "read-only image untouched: $(cmp -s /tmp/ro.img /dev/zero -n 8388608 && echo yes || echo no)""#,
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "{all}");
    assert_eq!(
        run.guest_value("vda serial"),
        Some("data-disk"),
        "GET_ID reaches the guest\n{all}"
    );
    let hashes: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("MOAT_GUEST vda sha256: ")
        })
        .collect();
    assert_eq!(
        hashes.len(),
        2,
        "written, then read back after a restart\n{all}"
    );
    assert_eq!(hashes[0].len(), 64, "{all}");
    assert_eq!(
        hashes[0], hashes[1],
        "data read back after the restart\n{all}"
    );
    let image = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("image sha256: "));
    assert_eq!(image, Some(hashes[0]), "data reached the image file\n{all}");
    assert_eq!(run.guest_value("vdb ro"), Some("1"), "{all}");
    assert_eq!(run.guest_value("vdb write"), Some("refused"), "{all}");
    assert!(
        run.stdout.contains("read-only image untouched: yes"),
        "{all}"
    );
}

/// Shell functions of the transfer scenarios. `dump_vm WHY` asks the
/// running moat-vmm (PID in /tmp/vm.pid) for its devices' state (SIGUSR1:
/// ring indexes and flags, pending frames, interrupts raised) when a host
/// tool reports a failed or stalled transfer; `guard_vm PID` gives the VM
/// 300 s, far below kvm-run's 600, then dumps its state and stops it, so
/// that a stuck guest is diagnosed instead of timing the harness out.
const VM_WATCHDOG: &str = r#"dump_vm() {
            echo "$1: asking moat-vmm for its device state" >&2
            kill -USR1 "$(cat /tmp/vm.pid)" 2>/dev/null; sleep 1
            # What KVM did meanwhile: exits by kind over two seconds.
            mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
            kvm_stats() { cd /sys/kernel/debug/kvm 2>/dev/null && for f in exits io_exits mmio_exits \
                irq_exits halt_exits signal_exits pf_taken pf_fixed pf_spurious pf_emulate \
                insn_emulation irq_injections nmi_injections; do printf '%s=%s ' $f "$(cat $f 2>/dev/null)"; done; }
            echo "KVM stats: $(kvm_stats)" >&2; sleep 2; echo "KVM stats 2 s later: $(kvm_stats)" >&2
            kill -USR1 "$(cat /tmp/vm.pid)" 2>/dev/null; sleep 1
        }
        guard_vm() {
            ( sleep 300; kill -0 "$1" 2>/dev/null || exit 0
              echo "the VM is still running after 300 s: stopping it" >&2
              kill -USR1 "$1"; sleep 1; kill -TERM "$1" ) &
        }"#;

/// MiB each bulk transfer moves in the vsock test: 256 MiB, about 11 s per
/// direction in the nested harness (`MOAT_VSOCK_BULK_MIB` changes it).
fn vsock_bulk_mib() -> u64 {
    std::env::var("MOAT_VSOCK_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[test]
fn vsock_hybrid_echo_100_connections_each_way_and_bulk_each_way() {
    let guest_tool = test_tool("guest-tool");
    let host_tool = test_tool("host-tool");
    let initramfs = test_initramfs_with("virtio-vsock", &[&guest_tool]);
    // The guest half runs from the test init (moat_mode=vsock): an echo
    // server on 5000 and a sink on 5001 for the host's clients, then its
    // own 256 MiB send to host port 6000, 100 echo clients to host port
    // 6001, and a connection to port 6999 where nothing listens.
    let script = format!(
        r#"set -u
        {watchdog}
        rm -f /tmp/v.sock /tmp/v.sock_*
        {{ {host} sink /tmp/v.sock_6000 || dump_vm "host sink failed"; }} >/tmp/host-sink.out &
        sink=$!
        {host} echo-server /tmp/v.sock_6001 &
        echo_server=$!
        while [ ! -S /tmp/v.sock_6000 ] || [ ! -S /tmp/v.sock_6001 ]; do sleep 0.1; done
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 512 --vcpus 2 \
            --vsock cid=3,path=/tmp/v.sock --append "quiet moat_mode=vsock moat_vsock_mib={mib}" &
        vm=$!; echo $vm >/tmp/vm.pid; guard_vm $vm
        {host} echo-clients /tmp/v.sock 5000 100 65536 >/tmp/host-echo.out || dump_vm "host echo clients failed"
        {host} send /tmp/v.sock 5001 $(({mib} * 1048576)) 7 >/tmp/host-send.out || dump_vm "host send failed"
        {host} send /tmp/v.sock 5002 1 1 >/dev/null
        wait $vm; echo "vm exit status: $?"
        # A guest that died never finishes the sink's connection.
        ( sleep 10; kill $sink 2>/dev/null ) & wait $sink
        # The host tools report once the guest's console has gone quiet,
        # so that their lines never split one of the guest's.
        cat /tmp/host-echo.out /tmp/host-send.out /tmp/host-sink.out
        kill $echo_server
        [ -e /tmp/v.sock ] && echo "vsock socket left behind" || echo "vsock socket removed""#,
        watchdog = VM_WATCHDOG,
        host = host_tool.display(),
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        mib = vsock_bulk_mib(),
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    assert!(
        run.stdout.contains("host echo clients: 100 ok"),
        "host to guest echo\n{all}"
    );
    assert_eq!(
        run.guest_value("vsock echo clients"),
        Some("100 ok"),
        "guest to host echo\n{all}"
    );
    assert_eq!(
        run.guest_value("vsock refused"),
        Some("ECONNRESET"),
        "no listener means reset\n{all}"
    );

    let bytes = vsock_bulk_mib() << 20;
    let (sent, sent_hash) = count_and_hash(run.line_after("host send: "));
    let (received, received_hash) = count_and_hash(run.guest_value("vsock sink"));
    assert_eq!(
        (sent, received),
        (bytes, bytes),
        "host to guest bulk\n{all}"
    );
    assert!(
        sent_hash.len() == 64 && sent_hash == received_hash,
        "host to guest SHA-256\n{all}"
    );
    let (sent, sent_hash) = count_and_hash(run.guest_value("vsock send"));
    let (received, received_hash) = count_and_hash(run.line_after("host sink: "));
    assert_eq!(
        (sent, received),
        (bytes, bytes),
        "guest to host bulk\n{all}"
    );
    assert!(
        sent_hash.len() == 64 && sent_hash == received_hash,
        "guest to host SHA-256\n{all}"
    );
    assert!(run.stdout.contains("vm exit status: 0"), "{all}");
    assert!(run.stdout.contains("vsock socket removed"), "{all}");
    for report in ["host send: ", "host sink: "] {
        if let Some(l) = run.line_after(report) {
            eprintln!("{report}{l}");
        }
    }
}

/// MiB each TCP transfer moves in the network test (`MOAT_NET_BULK_MIB`).
fn net_bulk_mib() -> u64 {
    std::env::var("MOAT_NET_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Splits a `<N> bytes sha256 <HEX>...` report into its count and hash.
fn count_and_hash(report: Option<&str>) -> (u64, String) {
    let (count, rest) = report
        .and_then(|r| r.split_once(" bytes sha256 "))
        .unwrap_or(("", ""));
    (
        count.parse().unwrap_or(0),
        rest.split(' ').next().unwrap_or("").to_string(),
    )
}

#[test]
fn virtio_net_over_a_tap_pings_and_moves_256mib_each_way() {
    // The MAC the VMM gives eth0, which the host's neighbour entry names.
    const GUEST_MAC: &str = "02:00:00:00:00:0a";
    let guest_tool = test_tool("guest-tool");
    let host_tool = test_tool("host-tool");
    let initramfs = test_initramfs_with("virtio-net", &[&guest_tool]);
    let bytes = net_bulk_mib() << 20;
    // eth0 is a tap the host made and configured; eth1 is one moat-vmm
    // creates itself, which must vanish with the VM.
    let script = format!(
        r#"set -u
        {watchdog}
        modprobe tun
        ip tuntap add dev moat-tap0 mode tap
        # No IPv6 chatter from the host's side (router and multicast
        # listener messages): the test counts every frame the guest drops.
        sysctl -qw net.ipv6.conf.moat-tap0.disable_ipv6=1
        ip addr add 10.0.2.1/24 dev moat-tap0
        ip link set moat-tap0 up
        # The host knows the guest's MAC from the start. Otherwise its
        # tcp-send, connecting again and again while the guest boots, has
        # the host's kernel resolve 10.0.2.2 before the guest's link is up;
        # an echo reply queued behind a resolution that then failed was
        # dropped by the host itself (its ICMP counters showed one more
        # host-unreachable sent to itself), while the device had carried
        # every frame both ways.
        ip neigh replace 10.0.2.2 lladdr {mac} dev moat-tap0 nud permanent
        {{ {host} tcp-sink 10.0.2.1:7000 || dump_vm "host tcp sink failed"; }} >/tmp/host-tcp-sink.out &
        sink=$!
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 512 --vcpus 2 \
            --net id=eth0,tap=moat-tap0,mac={mac} --net id=eth1,tap=moat-tmp0 \
            --append "quiet moat_mode=net moat_net_mib={mib}" &
        vm=$!; echo $vm >/tmp/vm.pid; guard_vm $vm
        {host} tcp-send 10.0.2.2:7001 {bytes} 7 >/tmp/host-tcp-send.out || dump_vm "host tcp send failed"
        wait $vm; echo "vm exit status: $?"
        # A guest that died never finishes the sink's connection.
        ( sleep 10; kill $sink 2>/dev/null ) & wait $sink
        cat /tmp/host-tcp-send.out /tmp/host-tcp-sink.out
        echo "tap tx dropped: $(cat /sys/class/net/moat-tap0/statistics/tx_dropped)"
        echo "tap frames: $(cat /sys/class/net/moat-tap0/statistics/rx_packets) from the guest, $(cat /sys/class/net/moat-tap0/statistics/tx_packets) to it"
        ip link show moat-tmp0 >/dev/null 2>&1 && echo "created tap left behind" || echo "created tap removed"
        ip link del moat-tap0"#,
        watchdog = VM_WATCHDOG,
        host = host_tool.display(),
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        mib = net_bulk_mib(),
        mac = GUEST_MAC,
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    assert_eq!(
        run.guest_value("eth0 mac"),
        Some(GUEST_MAC),
        "MAC from the config\n{all}"
    );
    assert!(
        run.guest_value("ping")
            .is_some_and(|p| p.contains("3 packets received")),
        "guest pings the host\n{all}"
    );
    let (sent, sent_hash) = count_and_hash(run.line_after("host tcp send: "));
    let (received, received_hash) = count_and_hash(run.guest_value("tcp sink"));
    assert_eq!((sent, received), (bytes, bytes), "host to guest\n{all}");
    assert!(
        sent_hash.len() == 64 && sent_hash == received_hash,
        "host to guest SHA-256\n{all}"
    );
    let (sent, sent_hash) = count_and_hash(run.guest_value("tcp send"));
    let (received, received_hash) = count_and_hash(run.line_after("host tcp sink: "));
    assert_eq!((sent, received), (bytes, bytes), "guest to host\n{all}");
    assert!(
        sent_hash.len() == 64 && sent_hash == received_hash,
        "guest to host SHA-256\n{all}"
    );
    assert!(run.stdout.contains("vm exit status: 0"), "{all}");
    assert!(run.stdout.contains("created tap removed"), "{all}");
    // Under a saturating load nothing is lost on either side: the tap's
    // queue never overflows (frames wait in it for rx buffers) and the
    // guest driver sees no bad buffer.
    assert!(run.stdout.contains("tap tx dropped: 0"), "{all}");
    assert_eq!(
        run.guest_value("eth0 rx dropped+errors"),
        Some("0"),
        "{all}"
    );
    // Every frame the guest's driver handed the device reached the host's
    // tap (the guest counts before its last frames; the tap after).
    let guest_sent = run
        .guest_value("eth0 counters")
        .and_then(|c| {
            c.split_whitespace()
                .find_map(|kv| kv.strip_prefix("tx_packets="))
        })
        .and_then(|n| n.parse::<u64>().ok());
    let tap_received = run
        .line_after("tap frames: ")
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        matches!((guest_sent, tap_received), (Some(sent), Some(got)) if sent > 0 && got >= sent),
        "frames the guest sent ({guest_sent:?}) all reach the tap ({tap_received:?})\n{all}"
    );
    for report in ["host tcp send: ", "host tcp sink: "] {
        if let Some(line) = run.line_after(report) {
            eprintln!("{report}{line}");
        }
    }
}

#[test]
fn sigterm_stops_the_vm_cleanly_and_removes_the_vsock_socket() {
    let guest_tool = test_tool("guest-tool");
    let initramfs = test_initramfs_with("virtio-vsock", &[&guest_tool]);
    // The vsock scenario's guest waits for host connections, so the VM
    // is still running when SIGTERM arrives.
    let script = format!(
        r#"set -u
        rm -f /tmp/term.sock
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 256 \
            --vsock cid=3,path=/tmp/term.sock --append "quiet moat_mode=vsock" \
            >/tmp/term-vm.out 2>/tmp/term-vm.err &
        vm=$!
        until grep -q "echo server: listening" /tmp/term-vm.out; do sleep 0.2; done
        [ -S /tmp/term.sock ] && echo "socket present while running"
        kill -TERM $vm
        wait $vm; echo "vm exit status: $?"
        [ -e /tmp/term.sock ] && echo "vsock socket left behind" || echo "vsock socket removed"
        cat /tmp/term-vm.err"#,
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    assert!(run.stdout.contains("socket present while running"), "{all}");
    assert!(run.stdout.contains("vm exit status: 0"), "{all}");
    assert!(run.stdout.contains("vsock socket removed"), "{all}");
    assert!(
        run.stdout.contains("guest stopped (HostSignal(15))"),
        "{all}"
    );
}
