//! moat-vmm boots the project's guest kernel with the test initramfs on
//! real KVM (through the KVM test harness) and the guest's own report is
//! checked.

mod common;

use common::{guest_bzimage, guest_vmlinux, kvm_run, test_initramfs, vmm_binary};

fn boot(kernel: &std::path::Path, initramfs: &std::path::Path, extra: &[&str]) -> common::Run {
    let vmm = vmm_binary();
    let mut args = vec![
        vmm.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kvm_run(&args)
}

#[test]
fn elf_vmlinux_boots_and_guest_sees_cmdline_memory_and_vcpus() {
    let initramfs = test_initramfs("boot-report");
    let run = boot(
        &guest_vmlinux(),
        &initramfs,
        &[
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--append",
            "quiet moat_probe=cmdline-reached-guest",
        ],
    );
    let all = run.describe();
    assert_eq!(
        run.code, 0,
        "moat-vmm must exit 0 after the guest reboots\n{all}"
    );

    let uname = run
        .guest_value("uname")
        .unwrap_or_else(|| panic!("no uname line\n{all}"));
    assert!(
        uname.starts_with("Linux ") && uname.contains("x86_64"),
        "{uname}"
    );

    let cmdline = run
        .guest_value("cmdline")
        .unwrap_or_else(|| panic!("no cmdline line\n{all}"));
    assert!(
        cmdline.starts_with("console=ttyS0 reboot=k panic=1"),
        "default command line: {cmdline}"
    );
    assert!(
        cmdline.ends_with("quiet moat_probe=cmdline-reached-guest"),
        "appended arguments: {cmdline}"
    );

    assert_eq!(run.guest_value("vcpus"), Some("2"), "{all}");
    assert_eq!(run.guest_value("cpus online"), Some("0-1"), "{all}");

    // MemTotal is RAM less what the kernel reserves for itself: for 256 MiB
    // it must lie between 200 MiB and 256 MiB.
    let memtotal: u64 = run
        .guest_value("memtotal_kib")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (200 * 1024..=256 * 1024).contains(&memtotal),
        "MemTotal {memtotal} KiB\n{all}"
    );
    // The e820 map the VMM wrote ends exactly at 256 MiB.
    assert!(
        run.stdout
            .contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "e820 map\n{all}"
    );
    assert_eq!(run.guest_value("clocksource"), Some("kvm-clock"), "{all}");

    assert!(
        run.stderr.contains("moat-vmm: guest boot time: "),
        "boot-time marker\n{all}"
    );
    assert!(run.stdout.contains("MOAT_GUEST init done"), "{all}");
    assert!(run.stderr.contains("guest stopped (GuestReset)"), "{all}");
    assert!(
        !run.stderr.contains("did not stop in time"),
        "both vCPU threads stop\n{all}"
    );
}

#[test]
fn guest_power_off_ends_the_vmm_with_status_zero_and_console_goes_to_a_file() {
    let initramfs = test_initramfs("boot-poweroff");
    // Writes inside the harness VM stay there, so the same shell prints the
    // console file after moat-vmm has exited.
    let script = format!(
        "{vmm} --kernel {kernel} --initramfs {initramfs} --vcpus 2 \
           --append 'quiet moat_exit=poweroff' --serial file:/tmp/moat-console.log; \
         status=$?; sed 's/^/console: /' /tmp/moat-console.log; exit $status",
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
        initramfs = initramfs.display(),
    );
    let run = kvm_run(&["sh", "-c", &script]);
    let all = run.describe();
    assert_eq!(run.code, 0, "{all}");
    assert!(
        run.stdout.contains("console: MOAT_GUEST init done"),
        "{all}"
    );
    assert!(
        !run.stdout.lines().any(|l| l.starts_with("MOAT_GUEST")),
        "console output goes only to the file\n{all}"
    );
    assert!(
        run.stderr.contains("guest stopped (GuestPowerOff)"),
        "{all}"
    );
    assert!(
        !run.stderr.contains("did not stop in time"),
        "both vCPU threads stop\n{all}"
    );
}

#[test]
fn a_guest_kernel_panic_has_an_exit_status_of_its_own() {
    // The test init exits, so the kernel panics ("Attempted to kill
    // init!"). moat-vmm must stop at the panic's closing line with status
    // 10, not take the reset panic=1 does a second later for a clean stop.
    let initramfs = test_initramfs("boot-panic");
    let run = boot(
        &guest_vmlinux(),
        &initramfs,
        &["--memory", "128", "--append", "quiet moat_exit=panic"],
    );
    let all = run.describe();
    assert_eq!(run.code, 10, "a guest panic has exit status 10\n{all}");
    assert!(
        run.stderr.contains(
            "moat-vmm: the guest kernel panicked: Kernel panic - not syncing: Attempted to kill init!"
        ),
        "{all}"
    );
    assert!(
        run.stderr
            .contains("moat-vmm: VM crashed: guest kernel panic: Kernel panic - not syncing"),
        "{all}"
    );
    assert!(!run.stderr.contains("guest stopped"), "{all}");
}

#[test]
fn bzimage_boots_with_one_vcpu_from_a_json_config() {
    let initramfs = test_initramfs("boot-bzimage");
    let config = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bzimage-config.json");
    let json = format!(
        r#"{{"kernel": "{}", "initramfs": "{}", "memory_mib": 128, "vcpus": 1, "append": "quiet"}}"#,
        guest_bzimage().display(),
        initramfs.display()
    );
    std::fs::write(&config, json).unwrap();
    let run = kvm_run(&[
        vmm_binary().to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let all = run.describe();
    assert_eq!(run.code, 0, "{all}");
    assert_eq!(run.guest_value("vcpus"), Some("1"), "{all}");
    assert!(
        run.guest_value("cmdline")
            .is_some_and(|c| c.ends_with(" quiet")),
        "{all}"
    );
    assert!(run.stderr.contains("moat-vmm: guest boot time: "), "{all}");
    assert!(run.stderr.contains("guest stopped (GuestReset)"), "{all}");
}

#[test]
fn missing_dev_kvm_is_named() {
    // A private mount namespace with an empty /dev: the host check passes
    // (this is a KVM host) and opening /dev/kvm fails.
    let script = format!(
        "mount -t tmpfs none /dev && exec {vmm} --kernel {kernel}",
        vmm = vmm_binary().display(),
        kernel = guest_vmlinux().display(),
    );
    let run = kvm_run(&["unshare", "--mount", "sh", "-c", &script]);
    assert_eq!(run.code, 1, "{}", run.describe());
    assert!(
        run.stderr
            .contains("moat-vmm: error: KVM: cannot open /dev/kvm: No such file or directory"),
        "{}",
        run.describe()
    );
}

/// The value of `key=` in a trace line of `key=value` words.
fn trace_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_guests_triple_fault_is_reported_with_its_vmcb_state() {
    // Linux's reboot=t ends the guest with a triple fault on purpose: it
    // loads an empty IDT and raises int3. moat-vmm must name it, and in
    // the TCG harness l0-leak-watch must record the shutdown exit and the
    // VMCB save area at it, the record a crash's diagnosis depends on.
    let initramfs = test_initramfs("boot-triple-fault");
    let run = boot(
        &guest_vmlinux(),
        &initramfs,
        &["--memory", "128", "--append", "quiet reboot=t"],
    );
    let all = run.describe();
    assert_eq!(run.code, 11, "a triple fault has exit status 11\n{all}");
    assert!(
        run.stderr.contains("vCPU 0: triple fault at rip 0x"),
        "{all}"
    );
    assert!(
        run.stderr
            .contains("moat-vmm: VM crashed: triple fault on vCPU 0 at rip 0x"),
        "{all}"
    );
    if !run.stderr.contains("kvm-run: mode=l1 ") {
        return; // a real KVM host: the watch is the TCG harness's own
    }
    assert!(
        run.stderr
            .contains("l0-leak-watch: a guest vCPU triple-faulted (its last exit): "),
        "the watch did not record the shutdown exit\n{all}"
    );
    let vmcb = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("l0-leak-watch: the triple-faulted vCPU's VMCB save area: "))
        .unwrap_or_else(|| panic!("no VMCB record of the triple fault\n{all}"));
    // The empty IDT the guest loaded and its kernel code segment: the
    // probe reads the guest's state.
    assert_eq!(trace_field(vmcb, "idt_limit"), Some("0x0"), "{vmcb}");
    assert_eq!(trace_field(vmcb, "idt"), Some("0x0"), "{vmcb}");
    assert_eq!(trace_field(vmcb, "cs"), Some("0x10"), "{vmcb}");
    let cr3 = trace_field(vmcb, "cr3")
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| panic!("no cr3 in {vmcb}"));
    // With nested paging the VMCB holds the guest's own cr3, inside its
    // 128 MiB; with shadow paging (the harness's default) KVM's shadow
    // root, a page of L1's memory.
    if run.stderr.contains("kvm_amd npt=Y") {
        assert!(
            cr3 > 0 && cr3 < 128 << 20,
            "cr3 {cr3:#x} outside the guest: {vmcb}"
        );
    } else {
        assert!(
            cr3 > 0 && cr3 % 4096 == 0,
            "cr3 {cr3:#x} is no page-table root: {vmcb}"
        );
    }
    let rip = trace_field(vmcb, "rip").unwrap_or_default();
    assert!(
        rip.starts_with("0xffffffff8"),
        "rip {rip} not in guest kernel text: {vmcb}"
    );
}
