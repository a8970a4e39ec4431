//! boot-rate: how often a guest dies or stalls before its init reports,
//! moat-vmm against QEMU's microvm on the same KVM, kernel, initramfs and
//! command line, boots interleaved so that drift and load hit both alike.
//!
//! Every cell (guest image × vCPUs × load) boots each VMM the same number
//! of times, alternating moat and QEMU boot by boot. A boot is `ok` when its
//! init's first line reaches the console within the deadline, `crash` when
//! the VMM exits before that (a triple fault, a guest panic, a VMM error),
//! and `hang` when the deadline passes first. The busy load runs inside the
//! same machine as the VMMs: one thread spinning and one allocating,
//! touching and freeing 256 MiB over and over, so that the host kernel
//! reclaims and reuses pages while the guests boot.
//!
//! Run it on a KVM host, e.g. through `tests/harness/kvm-run`
//! (`make boot-rate` does). Its table can be pasted into a note as it is.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use moat_tests::measure::{median, qemu_version};

/// Both VMMs get this command line: moat-vmm's default one, quiet, with
/// `reboot=t` (QEMU's microvm has no i8042; a triple-fault reset is the
/// reboot both machines share) and the test init's bench mode (print the
/// marker, then reboot).
const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 pci=off nomodule i8042.noaux i8042.nomux \
                       i8042.nopnp i8042.dumbkbd quiet moat_mode=bench";
/// What the test initramfs prints first.
const TEST_MARKER: &str = "MOAT_GUEST init started";
/// What moat-agent prints once its vsock listener is up.
const AGENT_MARKER: &str = "moat-agent: serving on";
/// Console lines kept for a failed boot's report.
const TAIL_LINES: usize = 25;
/// Guest memory of every boot, MiB.
const MEMORY_MIB: &str = "256";
/// The churning thread's allocation.
const CHURN_BYTES: usize = 256 << 20;

/// Boot-failure rate: moat-vmm against QEMU microvm, side by side.
#[derive(Debug, Parser)]
struct Args {
    /// The moat-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    /// The guest kernel (ELF vmlinux with a PVH note, so QEMU boots it too).
    #[arg(long)]
    kernel: PathBuf,
    /// The test initramfs (`tests/guest/build-initramfs.sh`).
    #[arg(long)]
    test_initramfs: PathBuf,
    /// The pod guest's initramfs (`make guest`: moat-agent as /init).
    #[arg(long)]
    agent_initramfs: Option<PathBuf>,
    /// Boots of each VMM in each cell.
    #[arg(long, default_value_t = 25)]
    runs: usize,
    /// Which VMMs to boot.
    #[arg(long, value_delimiter = ',', default_value = "moat,qemu")]
    vmms: Vec<Vmm>,
    /// vCPU counts to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    vcpus: Vec<u8>,
    /// Loads to try.
    #[arg(long, value_delimiter = ',', default_value = "idle,busy")]
    loads: Vec<Load>,
    /// Seconds a boot may take to reach its marker before it counts as hung.
    #[arg(long, default_value_t = 60)]
    deadline: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU's `-cpu` model (`host` shows the guest what moat-vmm shows it:
    /// KVM's supported CPUID).
    #[arg(long, default_value = "host")]
    qemu_cpu: String,
    /// Extra arguments appended to the guest command line of both VMMs.
    #[arg(long, default_value = "")]
    append: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Vmm {
    Moat,
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Load {
    Idle,
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    Test,
    Agent,
}

impl Guest {
    fn name(self) -> &'static str {
        match self {
            Guest::Test => "test",
            Guest::Agent => "agent",
        }
    }

    fn marker(self) -> &'static str {
        match self {
            Guest::Test => TEST_MARKER,
            Guest::Agent => AGENT_MARKER,
        }
    }
}

/// How one boot ended.
#[derive(Debug)]
enum Outcome {
    /// The marker came after this long.
    Ok(Duration),
    /// The VMM exited first.
    Crash { kind: String, tail: Vec<String> },
    /// The deadline came first.
    Hang { tail: Vec<String> },
}

/// One cell's counts for one VMM.
#[derive(Debug, Default)]
struct Tally {
    ok: Vec<f64>,
    crashes: usize,
    hangs: usize,
}

impl Tally {
    fn boots(&self) -> usize {
        self.ok.len() + self.crashes + self.hangs
    }
    fn failures(&self) -> usize {
        self.crashes + self.hangs
    }
}

/// The busy load: a spinning thread and a memory-churning thread, until
/// dropped.
struct BusyLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoad {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let spin = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x: u64 = 1;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..100_000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            })
        };
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A fresh mapping each round: page faults in, freed on drop.
                    let mut buf = vec![0u8; CHURN_BYTES];
                    for page in buf.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    std::hint::black_box(&buf);
                }
            })
        };
        Self {
            stop,
            threads: vec![spin, churn],
        }
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn vmm_command(args: &Args, vmm: Vmm, guest: Guest, vcpus: u8, sock: &Path) -> Command {
    let initramfs = match guest {
        Guest::Test => &args.test_initramfs,
        Guest::Agent => args
            .agent_initramfs
            .as_ref()
            .unwrap_or(&args.test_initramfs),
    };
    let cmdline = format!("{CMDLINE} {}", args.append).trim().to_string();
    match vmm {
        Vmm::Moat => {
            let mut cmd = Command::new(&args.vmm);
            cmd.arg("--kernel")
                .arg(&args.kernel)
                .arg("--initramfs")
                .arg(initramfs)
                .args(["--vcpus", &vcpus.to_string(), "--memory", MEMORY_MIB])
                .args(["--cmdline", &cmdline]);
            if guest == Guest::Agent {
                cmd.arg("--vsock")
                    .arg(format!("cid=3,path={}", sock.display()));
            }
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = Command::new(&args.qemu);
            cmd.args(["-M", "microvm", "-accel", "kvm", "-cpu", &args.qemu_cpu])
                .args(["-smp", &vcpus.to_string(), "-m", MEMORY_MIB])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-no-reboot"])
                .arg("-kernel")
                .arg(&args.kernel)
                .arg("-initrd")
                .arg(initramfs)
                .args(["-append", &cmdline]);
            if guest == Guest::Agent {
                cmd.args(["-device", "vhost-vsock-device,guest-cid=3"]);
            }
            cmd
        }
    }
}

/// Sends every line of `stream` to `lines`.
fn forward_lines(stream: impl Read + Send + 'static, lines: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
}

/// Stops `child`: SIGTERM, then SIGKILL after `grace`.
fn stop(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own unreaped child's PID.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn crash_kind(lines: &[String], status: std::process::ExitStatus) -> String {
    let has = |s: &str| lines.iter().any(|l| l.contains(s));
    if has("triple fault") {
        "triple fault".into()
    } else if has("Kernel panic") {
        "guest panic".into()
    } else if has("KVM internal error") || has("could not enter the guest") {
        "vCPU error".into()
    } else {
        format!("VMM exit ({status}) with no message: reset or triple fault")
    }
}

fn boot_once(mut cmd: Command, marker: &str, deadline: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Crash {
                kind: format!("cannot start {:?}: {e}", cmd.get_program()),
                tail: Vec::new(),
            }
        }
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        forward_lines(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, tx);
    }
    let mut lines: Vec<String> = Vec::new();
    let keep = |lines: &mut Vec<String>, line: String| {
        lines.push(line);
        if lines.len() > TAIL_LINES {
            lines.remove(0);
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => {
                let hit = line.contains(marker);
                keep(&mut lines, line);
                if hit {
                    let at = start.elapsed();
                    stop(&mut child, Duration::from_secs(10));
                    return Outcome::Ok(at);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(20))
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Take what the readers still hold.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = line.contains(marker);
                keep(&mut lines, line);
                if hit {
                    return Outcome::Ok(start.elapsed());
                }
            }
            return Outcome::Crash {
                kind: crash_kind(&lines, status),
                tail: lines,
            };
        }
        if start.elapsed() > deadline {
            stop(&mut child, Duration::from_secs(5));
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                keep(&mut lines, line);
            }
            return Outcome::Hang { tail: lines };
        }
    }
}

fn vmm_name(v: Vmm) -> &'static str {
    match v {
        Vmm::Moat => "moat",
        Vmm::Qemu => "qemu",
    }
}

fn load_name(l: Load) -> &'static str {
    match l {
        Load::Idle => "idle",
        Load::Busy => "busy",
    }
}

/// The upper end of a 95% confidence interval for a rate seen as
/// `failures` in `n` trials (Wilson score interval).
fn upper_95(failures: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let (n, p, z) = (n as f64, failures as f64 / n as f64, 1.96f64);
    let centre = p + z * z / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    ((centre + margin) / (1.0 + z * z / n)).min(1.0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let host = std::env::var("MOAT_KVM_HOST")
        .unwrap_or_else(|_| "unknown (not run through kvm-run)".into());
    let mut guests = vec![Guest::Test];
    if args.agent_initramfs.is_some() {
        guests.push(Guest::Agent);
    }
    let sock = std::env::temp_dir().join(format!("boot-rate-{}.sock", std::process::id()));
    println!("boot-rate: boots that die or stall before their init's first console line");
    println!("KVM host: {host}");
    println!("kernel: {}", args.kernel.display());
    println!("command line: {CMDLINE} {}", args.append);
    println!(
        "peer: {} -M microvm -accel kvm -cpu {}",
        qemu_version(&args.qemu),
        args.qemu_cpu
    );
    println!(
        "cells: guests {:?} x vCPUs {:?} x loads {:?}; {} boots of each VMM per cell, alternating; deadline {} s",
        guests.iter().map(|g| g.name()).collect::<Vec<_>>(),
        args.vcpus,
        args.loads.iter().map(|l| load_name(*l)).collect::<Vec<_>>(),
        args.runs,
        args.deadline
    );
    println!();

    type Key = (Vmm, Guest, u8, Load);
    let mut tallies: Vec<(Key, Tally)> = Vec::new();
    let total_boots =
        args.loads.len() * guests.len() * args.vcpus.len() * args.vmms.len() * args.runs;
    let mut done = 0;
    let started = Instant::now();
    for &load in &args.loads {
        let _busy = (load == Load::Busy).then(BusyLoad::start);
        for run in 0..args.runs {
            for &guest in &guests {
                for &vcpus in &args.vcpus {
                    for &vmm in &args.vmms {
                        let key = (vmm, guest, vcpus, load);
                        let _ = std::fs::remove_file(&sock);
                        let cmd = vmm_command(&args, vmm, guest, vcpus, &sock);
                        let label = format!(
                            "{} {} {}vcpu {} #{}",
                            vmm_name(vmm),
                            guest.name(),
                            vcpus,
                            load_name(load),
                            run + 1
                        );
                        // Said before the boot, so that a run whose whole
                        // machine dies still names the boot it died in.
                        eprintln!("booting {label}");
                        let outcome =
                            boot_once(cmd, guest.marker(), Duration::from_secs(args.deadline));
                        done += 1;
                        let idx = match tallies.iter().position(|(k, _)| *k == key) {
                            Some(i) => i,
                            None => {
                                tallies.push((key, Tally::default()));
                                tallies.len() - 1
                            }
                        };
                        let tally = &mut tallies[idx].1;
                        match outcome {
                            Outcome::Ok(at) => {
                                tally.ok.push(at.as_secs_f64() * 1000.0);
                                eprintln!(
                                    "[{done}/{total_boots} {:.0}s] {label}: ok {} ms",
                                    started.elapsed().as_secs_f64(),
                                    at.as_millis()
                                );
                            }
                            Outcome::Crash { kind, tail } => {
                                tally.crashes += 1;
                                println!(
                                    "FAILED BOOT {label}: crash ({kind}); last console lines:"
                                );
                                for l in tail {
                                    println!("    {l}");
                                }
                            }
                            Outcome::Hang { tail } => {
                                tally.hangs += 1;
                                println!(
                                    "FAILED BOOT {label}: hang (no marker in {} s); last console lines:",
                                    args.deadline
                                );
                                for l in tail {
                                    println!("    {l}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&sock);

    println!();
    println!(
        "{:<5} {:<6} {:>5} {:<5} {:>6} {:>6} {:>6} {:>10}",
        "vmm", "guest", "vcpus", "load", "boots", "crash", "hang", "median_ms"
    );
    for ((vmm, guest, vcpus, load), t) in &tallies {
        println!(
            "{:<5} {:<6} {:>5} {:<5} {:>6} {:>6} {:>6} {:>10.0}",
            vmm_name(*vmm),
            guest.name(),
            vcpus,
            load_name(*load),
            t.boots(),
            t.crashes,
            t.hangs,
            median(&t.ok)
        );
    }
    println!();
    for &vmm in &args.vmms {
        let (boots, failures) = tallies
            .iter()
            .filter(|((v, ..), _)| *v == vmm)
            .fold((0, 0), |(b, f), (_, t)| (b + t.boots(), f + t.failures()));
        println!(
            "total {}: {failures} of {boots} boots failed ({:.2}%, 95% upper bound {:.2}%)",
            vmm_name(vmm),
            100.0 * failures as f64 / boots.max(1) as f64,
            100.0 * upper_95(failures, boots)
        );
    }
    println!("ran for {:.0} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_upper_bound_of_zero_in_200_is_about_two_percent() {
        let u = upper_95(0, 200);
        assert!((0.015..0.025).contains(&u), "{u}");
        assert!(upper_95(10, 100) > 0.1);
    }

    #[test]
    fn a_marker_is_ok_an_early_exit_is_a_crash_and_silence_is_a_hang() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo boot; echo MARK; sleep 30"]);
        assert!(matches!(
            boot_once(ok, "MARK", Duration::from_secs(10)),
            Outcome::Ok(_)
        ));
        let mut crash = Command::new("sh");
        crash.args([
            "-c",
            "echo 'moat-vmm: vCPU 0: triple fault at rip 0xffffffff81000000' >&2",
        ]);
        match boot_once(crash, "MARK", Duration::from_secs(10)) {
            Outcome::Crash { kind, tail } => {
                assert_eq!(kind, "triple fault");
                assert_eq!(tail.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let mut hang = Command::new("sh");
        hang.args(["-c", "echo waiting; sleep 30"]);
        match boot_once(hang, "MARK", Duration::from_millis(300)) {
            Outcome::Hang { tail } => assert_eq!(tail, vec!["waiting".to_string()]),
            other => panic!("{other:?}"),
        }
    }
}
