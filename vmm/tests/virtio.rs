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
