//! moat-vmm's seccomp filters on real KVM (through the KVM test harness):
//! a VM with every device (rng, block, net over a tap, vsock, virtio-fs
//! with the real virtiofsd) boots and stops cleanly with every thread
//! under its filter, and for each thread kind the hidden
//! `--seccomp-selftest KIND` hook makes that thread open an AF_INET
//! socket right after its filter is in (the signal thread: at SIGUSR1,
//! while the guest runs): the VMM must die of SIGSYS then, with nothing
//! after the call.

mod common;

use common::{guest_vmlinux, kvm_run_within, test_initramfs, virtiofsd, vmm_binary};

/// Every thread kind of `moat_vmm::seccomp::ThreadKind` but the signal
/// thread's, which breaks its filter at SIGUSR1 (tested on its own).
const KINDS: [&str; 7] = [
    "main",
    "vcpu",
    "queue-worker",
    "net",
    "vsock",
    "fs",
    "vhost-watchdog",
];

#[test]
fn every_thread_kind_dies_of_sigsys_outside_its_filter_and_a_full_vm_runs_inside_them() {
    let initramfs = test_initramfs("seccomp");
    let script = format!(
        r#"set -u
        W=/tmp/moat-seccomp; rm -rf $W; mkdir -p $W/shared
        truncate -s 8M $W/disk.img
        ip tuntap add dev moat-sc0 mode tap && ip link set moat-sc0 up
        boot() {{ # boot LABEL [moat-vmm args...]
          label=$1; shift
          rm -f $W/fs.sock $W/v.sock
          {virtiofsd} --shared-dir $W/shared --socket-path $W/fs.sock >$W/fs.log 2>&1 &
          fs=$!
          for _ in $(seq 1 100); do [ -S $W/fs.sock ] && break; sleep 0.05; done
          {vmm} --kernel {kernel} --initramfs {initramfs} --memory 128 --rng \
            --block id=d0,path=$W/disk.img --net id=n0,tap=moat-sc0 \
            --vsock cid=3,path=$W/v.sock --fs tag=share,socket=$W/fs.sock \
            --append quiet "$@" >$W/$label.out 2>$W/$label.err
          echo "status $label $?"
          sed "s/^/err $label: /" $W/$label.err
          grep -q 'MOAT_GUEST init done' $W/$label.out && echo "guest done $label"
          kill $fs 2>/dev/null; wait $fs 2>/dev/null
        }}
        boot clean
        for kind in {kinds}; do boot $kind --seccomp-selftest $kind; done
        # The signal thread breaks its filter at SIGUSR1, in a running VM.
        rm -f $W/fs.sock $W/v.sock
        {vmm} --kernel {kernel} --initramfs {initramfs} --memory 128           --append "quiet moat_mode=wait" --seccomp-selftest signals >$W/signals.out 2>$W/signals.err &
        vm=$!
        for _ in $(seq 1 600); do grep -q 'MOAT_GUEST waiting' $W/signals.out && break; sleep 0.1; done
        kill -USR1 $vm; wait $vm
        echo "status signals $?"
        sed "s/^/err signals: /" $W/signals.err
        ip link del moat-sc0"#,
        virtiofsd = virtiofsd().display(),
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
        kinds = KINDS.join(" "),
    );
    let run = kvm_run_within(&["bash", "-c", &script], 900);
    let all = run.describe();
    assert_eq!(run.code, 0, "kvm-run's own exit (124: L1 timed out)\n{all}");
    assert!(run.stdout.contains("status clean 0"), "{all}");
    assert!(run.stdout.contains("guest done clean"), "{all}");
    assert!(
        run.stdout
            .contains("err clean: moat-vmm: guest stopped (GuestReset)"),
        "{all}"
    );
    for kind in KINDS.iter().chain(&["signals"]) {
        // 128 + SIGSYS (31): killed by the kernel, as the filter says.
        assert!(
            run.stdout.contains(&format!("status {kind} 159")),
            "the {kind} thread did not die of SIGSYS\n{all}"
        );
        assert!(
            run.stdout.contains(&format!(
                "err {kind}: moat-vmm: seccomp self-test: the {kind} thread opens an AF_INET socket"
            )),
            "the {kind} thread never ran its self-test\n{all}"
        );
        assert!(
            !run.stdout
                .contains(&format!("the {kind} thread is still alive")),
            "{all}"
        );
    }
}
