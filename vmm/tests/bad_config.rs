//! moat-vmm refuses a bad configuration before any guest runs, quickly and
//! with a message that names what was wrong. These run on the host itself:
//! every case must fail before KVM is even opened, except the last, which
//! checks what this host's /dev/kvm is.

mod common;

use std::time::{Duration, Instant};

use common::{vmm_direct, Run};

/// A generous bound: every refusal happens before a guest exists.
const FAST: Duration = Duration::from_secs(5);

fn refused(args: &[&str]) -> Run {
    let start = Instant::now();
    let run = vmm_direct(args);
    assert!(
        start.elapsed() < FAST,
        "took {:?}\n{}",
        start.elapsed(),
        run.describe()
    );
    assert_eq!(run.code, 1, "{}", run.describe());
    run
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

#[test]
fn missing_kernel_is_named() {
    let run = refused(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(
        run.stderr
            .contains("moat-vmm: error: config: kernel image /nonexistent/vmlinux: No such file"),
        "{}",
        run.stderr
    );
    let run = refused(&[]);
    assert!(
        run.stderr.contains("no kernel image given"),
        "{}",
        run.stderr
    );
}

#[test]
fn memory_out_of_range_is_named() {
    let kernel = temp_path("any-kernel");
    std::fs::write(&kernel, b"x").unwrap();
    let run = refused(&["--kernel", kernel.to_str().unwrap(), "--memory", "4"]);
    assert!(
        run.stderr.contains("memory = 4 MiB is too small"),
        "{}",
        run.stderr
    );
    let run = refused(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "100000000",
    ]);
    assert!(
        run.stderr
            .contains("memory = 100000000 MiB is more than this host's"),
        "{}",
        run.stderr
    );
    let run = refused(&["--kernel", kernel.to_str().unwrap(), "--vcpus", "0"]);
    assert!(
        run.stderr.contains("vcpus = 0: a VM has 1 to 32 vCPUs"),
        "{}",
        run.stderr
    );
}

#[test]
fn malformed_json_config_is_named() {
    let config = temp_path("bad-config.json");
    std::fs::write(&config, "{\"kernel\": \"/k\", \"memory\": 128}").unwrap();
    let run = refused(&["--config", config.to_str().unwrap()]);
    assert!(
        run.stderr.contains("is not a valid moat-vmm config"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("unknown field `memory`"),
        "{}",
        run.stderr
    );
}

#[test]
fn malformed_kernel_is_named() {
    let kernel = temp_path("garbage-kernel");
    std::fs::write(&kernel, vec![0x5au8; 64 * 1024]).unwrap();
    let run = refused(&["--kernel", kernel.to_str().unwrap()]);
    assert!(
        run.stderr
            .contains("is neither an ELF vmlinux nor a bzImage"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("garbage-kernel"), "{}", run.stderr);
}

#[test]
fn unusable_kvm_host_is_named_instead_of_hanging() {
    let kernel = temp_path("kernel-for-host-check");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let run = vmm_direct(&["--kernel", kernel.to_str().unwrap()]);
    eprintln!("host /dev/kvm: {}", if pvm { "PVM" } else { "not PVM" });
    if pvm {
        assert_eq!(run.code, 1, "{}", run.describe());
        assert!(
            run.stderr.contains("/dev/kvm on this host is PVM"),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("tests/harness/kvm-run"),
            "{}",
            run.stderr
        );
    } else {
        // Past the host check, the four-byte "ELF" is refused by the loader.
        assert_eq!(run.code, 1, "{}", run.describe());
        assert!(
            run.stderr.contains("cannot load it")
                || run.stderr.contains("cannot open /dev/kvm")
                || run.stderr.contains("no vmx or svm"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn bad_network_devices_are_named_before_kvm_is_opened() {
    let kernel = temp_path("kernel-for-net-checks");
    std::fs::write(&kernel, b"\x7fELF").unwrap();
    let kernel = kernel.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--net", "id=n0,tap=t0", "--net", "id=n0,tap=t1"],
            "network device ID \"n0\" is used twice",
        ),
        (
            &["--net", "id=n0,tap=t0", "--net", "id=n1,tap=t0"],
            "tap \"t0\" is given to two network devices",
        ),
        (
            &["--net", "id=n0,tap=t0,mac=01:00:5e:00:00:01"],
            "MAC address \"01:00:5e:00:00:01\"",
        ),
        (
            &["--net", "id=n0,tap=a-much-too-long-tap-name"],
            "tap name \"a-much-too-long-tap-name\" must be 1 to 15 bytes",
        ),
    ];
    for (args, message) in cases {
        let mut all = vec!["--kernel", kernel];
        all.extend_from_slice(args);
        let run = refused(&all);
        assert!(run.stderr.contains(message), "{args:?}\n{}", run.stderr);
    }
    // An interface that exists but is no tap: attaching to it fails, and
    // the error names the device and the interface, before KVM is touched.
    let run = refused(&["--kernel", kernel, "--net", "id=n0,tap=lo"]);
    assert!(
        run.stderr
            .contains("network device \"n0\": tap \"lo\": TUNSETIFF"),
        "{}",
        run.stderr
    );
}
