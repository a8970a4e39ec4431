//! moat-vmm's virtio devices driven by the real Linux drivers of a guest
//! booted through the KVM test harness.

mod common;

use common::{guest_vmlinux, kvm_run, test_initramfs, vmm_binary};

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
