//! A hostile guest against moat-vmm, in the KVM test harness: the test
//! initramfs's `hostile-guest` (tests/src/bin/hostile-guest.rs) floods its
//! VMM's vsock device through the guest's driver and then drives the
//! device itself, with no rx buffers, and spams the console. Meanwhile the
//! host samples the VMM's memory and fds, and a second VM runs the normal
//! vsock scenario beside it.

mod common;

use common::{guest_vmlinux, kvm_run, test_initramfs_with, test_tool, vmm_binary};

/// The hostile VM's memory, MiB: its RAM mapping is left out of the VMM's
/// own memory figure.
const GUEST_MIB: u64 = 256;
/// Bound on the VMM's fds under the flood: its own (about 20) plus the
/// vsock muxer's caps, 256 connections and 32 handshakes.
const MAX_FDS: u64 = 320;
/// Bound on the VMM's resident memory outside guest RAM, MiB. What the
/// muxer may hold for unread host streams is capped at 64 MiB in all
/// (MAX_PENDING_TOTAL); the rest is the VMM itself.
const MAX_OWN_RSS_MIB: u64 = 96;
/// Connections the guest opens at once.
const CONNECTS: u64 = 4000;
/// The vsock muxer's connection cap (vmm/src/devices/virtio/vsock/muxer.rs).
const MAX_CONNECTIONS: u64 = 256;
/// Its control queue's cap: what it may owe a guest that posts no rx
/// buffers.
const CONTROL_QUEUE_CAP: u64 = 2048;
/// The console file's cap, set low (`--serial file:PATH,cap=BYTES`; the
/// default is 16 MiB) because the nested harness's serial port moves only
/// about 5 KB/s: 30 s of spam must pass it.
const CONSOLE_CAP: u64 = 64 * 1024;

/// The number before `word` in `text` ("256 connected" gives 256 for
/// "connected").
fn count_before(text: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
}

#[test]
fn hostile_guest_floods_leave_the_vmm_bounded_and_other_vms_working() {
    let guest_tool = test_tool("guest-tool");
    let hostile = test_tool("hostile-guest");
    let host_tool = test_tool("host-tool");
    let initramfs = test_initramfs_with("hostile", &[&guest_tool, &hostile]);
    let script = format!(
        r#"set -u
        rm -f /tmp/h.sock* /tmp/v.sock*
        {host} idle-listener /tmp/h.sock_7000 &
        idle=$!
        {host} sink /tmp/v.sock_6000 >/tmp/host-sink.out &
        sink=$!
        {host} echo-server /tmp/v.sock_6001 &
        echo_server=$!
        while [ ! -S /tmp/h.sock_7000 ] || [ ! -S /tmp/v.sock_6000 ] || [ ! -S /tmp/v.sock_6001 ]; do sleep 0.1; done
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory {guest_mib} --vcpus 1 \
            --serial file:/tmp/hostile.console,cap={console_cap} --vsock cid=3,path=/tmp/h.sock \
            --append "quiet moat_mode=hostile moat_hostile_conns={connects}" &
        hostile=$!
        # The VMM's own memory: every mapping's RSS but guest RAM's.
        own_rss_kib() {{
            awk -v guest={guest_kib} '/^Size:/ {{ size = $2 }}
                /^Rss:/ {{ if (size != guest) rss += $2 }} END {{ print rss + 0 }}' "/proc/$1/smaps" 2>/dev/null
        }}
        sample() {{ # PID NAME: the most seen while PID lives
            max_rss=0; max_fds=0
            while kill -0 "$1" 2>/dev/null; do
                rss=$(own_rss_kib "$1"); fds=$(ls "/proc/$1/fd" 2>/dev/null | wc -l)
                [ "${{rss:-0}}" -gt "$max_rss" ] && max_rss=$rss
                [ "$fds" -gt "$max_fds" ] && max_fds=$fds
                sleep 0.5
            done
            echo "$2 max own rss kib: $max_rss"
            echo "$2 max fds: $max_fds"
        }}
        sample $hostile hostile >/tmp/hostile-sample.out &
        sampler=$!
        # The second VM starts once the hostile one holds its connections.
        for _ in $(seq 600); do
            grep -aq 'MOAT_GUEST hostile connects:' /tmp/hostile.console 2>/dev/null && break
            sleep 0.5
        done
        echo "second VM starts: $(grep -a 'MOAT_GUEST hostile connects:' /tmp/hostile.console)"
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 256 --vcpus 1 \
            --vsock cid=3,path=/tmp/v.sock --append "quiet moat_mode=vsock moat_vsock_mib=16" &
        other=$!
        sample $other other >/tmp/other-sample.out &
        other_sampler=$!
        {host} echo-clients /tmp/v.sock 5000 100 65536 >/tmp/host-echo.out
        {host} send /tmp/v.sock 5001 16777216 7 >/tmp/host-send.out
        {host} send /tmp/v.sock 5002 1 1 >/dev/null
        wait $other; echo "other vm exit status: $?"
        wait $hostile; echo "hostile vm exit status: $?"
        wait $sampler $other_sampler
        ( sleep 10; kill $sink 2>/dev/null ) & wait $sink
        kill $idle $echo_server
        cat /tmp/host-echo.out /tmp/host-send.out /tmp/host-sink.out /tmp/hostile-sample.out /tmp/other-sample.out
        echo "console file bytes: $(stat -c %s /tmp/hostile.console)"
        grep -aq 'console log capped at' /tmp/hostile.console && echo "console cap noted: yes"
        grep -a '^MOAT_GUEST hostile' /tmp/hostile.console | tr -d '\r'
        [ -e /tmp/h.sock ] && echo "hostile vsock socket left behind" || echo "hostile vsock socket removed""#,
        host = host_tool.display(),
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        guest_mib = GUEST_MIB,
        guest_kib = GUEST_MIB * 1024,
        connects = CONNECTS,
        console_cap = CONSOLE_CAP,
    );
    let run = kvm_run(&["bash", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    let value = |prefix: &str| run.line_after(prefix).unwrap_or_default().to_string();
    for line in run.stdout.lines().filter(|l| {
        l.contains("MOAT_GUEST hostile") || l.contains(" max ") || l.starts_with("console")
    }) {
        eprintln!("{line}");
    }

    // The VMM lived through it all and stopped cleanly when its guest
    // rebooted; so did the VM beside it.
    assert!(
        run.stdout.contains("hostile vm exit status: 0"),
        "hostile VM's exit\n{all}"
    );
    assert!(
        run.stdout.contains("other vm exit status: 0"),
        "second VM's exit\n{all}"
    );
    assert!(run.stdout.contains("hostile vsock socket removed"), "{all}");

    // Connect flood: at most the muxer's cap connect; every other one is
    // refused, none is left hanging.
    let connects = value("MOAT_GUEST hostile connects: ");
    let connected = count_before(&connects, "connected");
    assert!(
        connected.is_some_and(|n| (1..=MAX_CONNECTIONS).contains(&n)),
        "between 1 and {MAX_CONNECTIONS} connections: {connects}\n{all}"
    );
    let ended: u64 = [
        "connected",
        "reset",
        "timed-out",
        "other",
        "refused-at-once",
    ]
    .iter()
    .filter_map(|w| count_before(&connects, w))
    .sum();
    assert_eq!(ended, CONNECTS, "every connect ended: {connects}\n{all}");
    assert!(
        count_before(&connects, "reset").is_some_and(|n| n > 0),
        "connects past the cap are reset: {connects}\n{all}"
    );

    // Raw flood with no rx buffers: the device stops taking tx before it
    // owes the guest more than its control queue holds.
    let starved = value("MOAT_GUEST hostile tx without rx buffers: ");
    assert!(
        starved.contains("the device stopped taking more"),
        "tx back-pressure: {starved}\n{all}"
    );
    let taken = count_before(&starved, "packets");
    assert!(
        taken.is_some_and(|n| n > 0 && n <= CONTROL_QUEUE_CAP),
        "tx taken before back-pressure: {starved}\n{all}"
    );
    // Once rx buffers come, what it owes arrives and tx flows again.
    let delivered = value("MOAT_GUEST hostile rx after buffers were posted: ");
    assert!(
        delivered.contains("RST="),
        "RSTs for the unknown connections: {delivered}\n{all}"
    );
    let resumed = value("MOAT_GUEST hostile tx after buffers were posted: ");
    assert!(
        count_before(&resumed, "more").is_some_and(|n| n > 0),
        "tx resumes: {resumed}\n{all}"
    );
    let status = value("MOAT_GUEST hostile device status: ");
    assert_eq!(status, "0xf", "device still live (no NEEDS_RESET)\n{all}");

    // The bounds held throughout.
    let own_rss_kib: u64 = value("hostile max own rss kib: ")
        .parse()
        .unwrap_or(u64::MAX);
    assert!(
        own_rss_kib <= MAX_OWN_RSS_MIB * 1024,
        "VMM memory outside guest RAM {own_rss_kib} KiB > {MAX_OWN_RSS_MIB} MiB\n{all}"
    );
    let fds: u64 = value("hostile max fds: ").parse().unwrap_or(u64::MAX);
    assert!(fds <= MAX_FDS, "VMM fds {fds} > {MAX_FDS}\n{all}");
    let console: u64 = value("console file bytes: ").parse().unwrap_or(u64::MAX);
    assert!(
        console <= CONSOLE_CAP + 256,
        "console file {console} bytes > cap {CONSOLE_CAP}\n{all}"
    );
    assert!(
        run.stdout.contains("console cap noted: yes"),
        "the spam reached the cap\n{all}"
    );

    // The VM beside it worked throughout.
    assert!(
        run.stdout.contains("host echo clients: 100 ok"),
        "second VM: host to guest echo\n{all}"
    );
    assert_eq!(
        run.guest_value("vsock echo clients"),
        Some("100 ok"),
        "second VM: guest to host echo\n{all}"
    );
    assert!(
        run.line_after("host send: ")
            .is_some_and(|l| l.starts_with("16777216 bytes")),
        "second VM: host to guest bulk\n{all}"
    );
    assert!(
        run.line_after("host sink: ")
            .is_some_and(|l| l.starts_with("16777216 bytes")),
        "second VM: guest to host bulk\n{all}"
    );
}
