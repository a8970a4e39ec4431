//! Shared set-up of moat-vmm's integration tests: the guest kernel, the
//! test initramfs and the KVM test harness.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// The moat-vmm binary under test.
pub fn vmm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_moat-vmm"))
}

fn last_line_of(script: &Path, args: &[&str]) -> PathBuf {
    let out = Command::new(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        path.is_file(),
        "{} printed no file path: {stdout:?}",
        script.display()
    );
    path
}

/// The project's guest vmlinux, built (or taken from the cache) by
/// `kernel-config/build-kernel.sh`.
pub fn guest_vmlinux() -> PathBuf {
    last_line_of(&repo_root().join("kernel-config/build-kernel.sh"), &[])
}

/// The bzImage built beside [`guest_vmlinux`].
pub fn guest_bzimage() -> PathBuf {
    let path = guest_vmlinux().with_file_name("bzImage");
    assert!(
        path.is_file(),
        "no bzImage beside the vmlinux at {}",
        path.display()
    );
    path
}

/// The test initramfs (`tests/guest/`), built into this test's own file.
pub fn test_initramfs(name: &str) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.cpio"));
    last_line_of(
        &repo_root().join("tests/guest/build-initramfs.sh"),
        &[out.to_str().expect("utf-8 path")],
    )
}

/// The output of one command, as text.
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Both streams, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// The value of the guest's `MOAT_GUEST <key>: <value>` report line.
    pub fn guest_value(&self, key: &str) -> Option<&str> {
        self.line_after(&format!("MOAT_GUEST {key}: "))
    }

    /// The rest of the first stdout line that starts with `prefix` (a
    /// report from a host tool of the scenario, or the guest's console).
    pub fn line_after(&self, prefix: &str) -> Option<&str> {
        self.stdout
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
    }
}

/// Runs `args` on a KVM host through `tests/harness/kvm-run`: directly on a
/// VT-x/AMD-V host, in the QEMU TCG L1 VM elsewhere. The harness states
/// which on stderr, and the test prints it.
///
/// The scenario runs once more, said and counted by [`record_rerun`], in
/// two cases only, both shown to be the nested TCG harness failing, not
/// the guest or its VMM (tests/harness/README.md):
/// - L1's own kernel died (kvm-run's exit 125 with a kernel panic in L1's
///   console), which was seen with QEMU as the guest's VMM too;
/// - `tests/harness/l0-leak-watch` saw a KVM exit whose guest rip lies in
///   L1's kvm_amd module: L0's SVM emulation gave the guest L1's own
///   registers, which no VMM can do.
///
/// Anything else, a guest crash included, is the test's result, and a
/// second failure is never retried.
pub fn kvm_run(args: &[&str]) -> Run {
    kvm_run_within(args, 600)
}

/// [`kvm_run`] for scenarios that take longer than its 600 s: kvm-run
/// stops L1 after `timeout_secs`.
pub fn kvm_run_within(args: &[&str], timeout_secs: u32) -> Run {
    let run = kvm_run_once(args, timeout_secs);
    let why = if run.code == 125 && run.stderr.contains("Kernel panic") {
        "L1's kernel panicked (kvm-run exit 125): the nested TCG harness died, not the guest"
            .to_string()
    } else if let Some(line) = run.stderr.lines().find_map(|l| l.strip_prefix(L0_LEAK)) {
        let exit = line.find("kvm_exit:").map_or(line, |at| &line[at..]).trim();
        format!(
            "L0's TCG SVM emulation put L1's host registers into a guest vCPU \
             (a KVM exit at a guest rip inside L1's kvm_amd): the nested harness failed, \
             not the guest [{exit}]"
        )
    } else {
        return run;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("a KVM test")
        .to_string();
    record_rerun(&test, &why);
    eprintln!("{}", run.describe());
    kvm_run_once(args, timeout_secs)
}

/// What `tests/harness/l0-leak-watch` prints for each KVM exit at a guest
/// rip inside L1's kvm_amd.
const L0_LEAK: &str = "l0-leak-watch: L0 leaked L1's host state into a guest";

fn kvm_run_once(args: &[&str], timeout_secs: u32) -> Run {
    let harness = repo_root().join("tests/harness/kvm-run");
    let watch = repo_root().join("tests/harness/l0-leak-watch");
    let out = Command::new(&harness)
        .args(["--timeout", &timeout_secs.to_string(), "--"])
        .arg(&watch)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", harness.display()));
    let run = Run::from(out);
    for line in run.stderr.lines() {
        if line.starts_with("kvm-run: mode=") || line.starts_with(L0_LEAK) {
            eprintln!("{line}");
        }
    }
    run
}

/// Says that `test` ran its scenario again and why: on stderr, and as a
/// line appended to the file `MOAT_RERUN_LOG` names (when set), which
/// `.ci/run` counts and prints at its end, so that no rerun goes unseen.
pub fn record_rerun(test: &str, why: &str) {
    eprintln!("RERUN {test}: {why}");
    if let Some(path) = std::env::var_os("MOAT_RERUN_LOG") {
        use std::io::Write;
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(log, "{test}: {why}");
        }
    }
}

/// Runs moat-vmm directly on this host (no harness), for checks that must
/// fail before any guest runs.
pub fn vmm_direct(args: &[&str]) -> Run {
    let out = Command::new(vmm_binary())
        .args(args)
        .output()
        .expect("cannot run moat-vmm");
    Run::from(out)
}

/// A helper program of the `moat-tests` crate, built by `make kvm-test`
/// (`host-tool` for the host side; the static `guest-tool` and
/// `hostile-guest` for guests).
pub fn test_tool(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let path = match name {
        "guest-tool" | "hostile-guest" => {
            target.join("x86_64-unknown-linux-gnu/release").join(name)
        }
        _ => target.join("release").join(name),
    };
    assert!(
        path.is_file(),
        "{} is missing: build it with `make test-tools`",
        path.display()
    );
    path
}

/// The test initramfs with extra static executables in its /bin.
pub fn test_initramfs_with(name: &str, extra: &[&Path]) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.cpio"));
    let mut args = vec![out.to_str().expect("utf-8 path")];
    args.extend(extra.iter().map(|p| p.to_str().expect("utf-8 path")));
    last_line_of(&repo_root().join("tests/guest/build-initramfs.sh"), &args)
}

/// The pinned virtiofsd, installed once into a cache outside the clone by
/// `tests/harness/install-virtiofsd`.
pub fn virtiofsd() -> PathBuf {
    last_line_of(&repo_root().join("tests/harness/install-virtiofsd"), &[])
}
