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

#[test]
fn bad_virtio_fs_shares_are_named() {
    let kernel = temp_path("fs-kernel");
    std::fs::write(&kernel, b"x").unwrap();
    let kernel = kernel.to_str().unwrap();
    let long_tag = format!("tag={},socket=/s", "t".repeat(37));
    for (spec, expected) in [
        ("tag=,socket=/s", "virtio-fs tag \"\" must be 1 to 36 bytes"),
        (long_tag.as_str(), "must be 1 to 36 bytes"),
        (
            "tag=a,socket=/s,queues=0",
            "queues = 0: a share has 1 to 16",
        ),
        (
            "tag=a,socket=/s,queue_size=100",
            "queue_size = 100: expected a power of two",
        ),
    ] {
        let run = refused(&["--kernel", kernel, "--fs", spec]);
        assert!(run.stderr.contains(expected), "{spec}: {}", run.stderr);
    }
    let run = refused(&[
        "--kernel",
        kernel,
        "--fs",
        "tag=pod,socket=/a",
        "--fs",
        "tag=pod,socket=/b",
    ]);
    assert!(
        run.stderr.contains("virtio-fs tag \"pod\" is used twice"),
        "{}",
        run.stderr
    );
}

/// A real kernel image path is needed for the device stage, which comes
/// after the kernel's format check; any ELF file passes that check.
fn elf_file() -> String {
    std::fs::canonicalize("/proc/self/exe")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn virtio_fs_backend_that_is_absent_or_mute_is_refused_within_5_s() {
    let kernel = elf_file();
    let missing = temp_path("no-such-fs.sock");
    let _ = std::fs::remove_file(&missing);
    let spec = format!("tag=pod,socket={}", missing.display());
    let run = refused(&["--kernel", &kernel, "--fs", &spec]);
    assert!(
        run.stderr
            .contains("virtio-fs \"pod\": cannot connect to the backend's socket"),
        "{}",
        run.stderr
    );
    // A listener that accepts (the backlog does) but never answers.
    let mute = temp_path("mute-fs.sock");
    let _ = std::fs::remove_file(&mute);
    let _listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    let spec = format!("tag=pod,socket={}", mute.display());
    let run = refused(&["--kernel", &kernel, "--fs", &spec]);
    assert!(
        run.stderr
            .contains("did not answer GET_FEATURES within 4 s"),
        "{}",
        run.stderr
    );
}

#[test]
fn virtio_fs_asking_virtiofsd_for_more_queues_than_it_serves_is_refused() {
    let dir = temp_path("fs-queues");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("share")).unwrap();
    let socket = dir.join("fs.sock");
    let mut daemon = std::process::Command::new(common::virtiofsd())
        .arg("--shared-dir")
        .arg(dir.join("share"))
        .arg("--socket-path")
        .arg(&socket)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("virtiofsd starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec = format!("tag=pod,socket={},queues=2", socket.display());
    let run = refused(&["--kernel", &elf_file(), "--fs", &spec]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        run.stderr
            .contains("serves 1 request queue(s); 2 were asked for"),
        "{}",
        run.stderr
    );
}
