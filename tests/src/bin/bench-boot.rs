//! bench-boot: time from VMM start to the guest's init, moat-vmm against
//! QEMU's microvm machine on the same KVM, kernel, initramfs and command
//! line, runs interleaved so that drift hits both alike. Also compares the
//! peak RSS of the two VMM processes. A third VM in every round is
//! moat-vmm with its guest RAM in a memfd mapped shared (`--shared-memory`,
//! what every `--fs` share implies), to show what that costs. Run it on a KVM host, e.g. through
//! `tests/harness/kvm-run` (`make bench-boot` does).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use moat_tests::measure::{median, qemu_version, run_to_marker, RunSample};

/// What the test initramfs prints first, before it does anything else.
const INIT_MARKER: &str = "MOAT_GUEST init started";
/// Kernel arguments both VMMs get: moat-vmm's default command line, quiet,
/// and the test init's bench mode (print the marker, then reboot). The one
/// change is `reboot=t`: QEMU's microvm has no i8042, so a triple-fault
/// reset is the reboot path both machines share (moat-vmm ends on either).
const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 pci=off nomodule i8042.noaux i8042.nomux \
                       i8042.nopnp i8042.dumbkbd quiet moat_mode=bench";
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// moat-vmm's statuses for a run that ended as planned: `reboot=t`'s
/// triple fault is a crash status (11) to moat-vmm, and here the plan.
const MOAT_OK: &[i32] = &[0, 11];

/// Boot-time benchmark: moat-vmm against QEMU microvm.
#[derive(Debug, Parser)]
struct Args {
    /// The moat-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    /// The guest kernel (ELF vmlinux with a PVH note, so QEMU boots it too).
    #[arg(long)]
    kernel: PathBuf,
    /// The test initramfs.
    #[arg(long)]
    initramfs: PathBuf,
    /// Runs of each VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

fn moat_command(args: &Args) -> Command {
    let mut cmd = Command::new(&args.vmm);
    cmd.arg("--kernel")
        .arg(&args.kernel)
        .arg("--initramfs")
        .arg(&args.initramfs)
        .args(["--vcpus", "1", "--memory", &args.memory.to_string()])
        .args(["--cmdline", CMDLINE]);
    cmd
}

fn moat_shared_memory_command(args: &Args) -> Command {
    let mut cmd = moat_command(args);
    cmd.arg("--shared-memory");
    cmd
}

fn qemu_command(args: &Args) -> Command {
    let mut cmd = Command::new(&args.qemu);
    cmd.args([
        "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1",
    ])
    .args(["-m", &args.memory.to_string()])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&args.kernel)
    .arg("-initrd")
    .arg(&args.initramfs)
    .args(["-append", CMDLINE]);
    cmd
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let args = Args::parse();
    let host = std::env::var("MOAT_KVM_HOST")
        .unwrap_or_else(|_| "unknown (not run through kvm-run)".into());
    println!(
        "bench-boot: VMM start -> guest init (first line of the test init on the serial console)"
    );
    println!("KVM host: {host}");
    println!("kernel: {}", args.kernel.display());
    println!("initramfs: {}", args.initramfs.display());
    println!(
        "guest: 1 vCPU, {} MiB, command line: {CMDLINE}",
        args.memory
    );
    println!(
        "peer: {} -M microvm -accel kvm, same kernel, initramfs and command line",
        qemu_version(&args.qemu)
    );
    println!("runs: {} of each, interleaved", args.runs);
    println!();
    println!(
        "{:>3}  {:>12} {:>12}  {:>13} {:>13}  {:>12} {:>12}  {:>12} {:>12}",
        "run",
        "moat_init_ms",
        "qemu_init_ms",
        "moat_total_ms",
        "qemu_total_ms",
        "moat_rss_kib",
        "qemu_rss_kib",
        "memfd_init_ms",
        "memfd_rss_kib"
    );

    let mut moat: Vec<RunSample> = Vec::new();
    let mut qemu: Vec<RunSample> = Vec::new();
    let mut memfd: Vec<RunSample> = Vec::new();
    for run in 1..=args.runs {
        let m = run_to_marker(moat_command(&args), INIT_MARKER, RUN_TIMEOUT, MOAT_OK);
        let q = run_to_marker(qemu_command(&args), INIT_MARKER, RUN_TIMEOUT, &[0]);
        let f = run_to_marker(
            moat_shared_memory_command(&args),
            INIT_MARKER,
            RUN_TIMEOUT,
            MOAT_OK,
        );
        match (m, q, f) {
            (Ok(m), Ok(q), Ok(f)) => {
                println!(
                    "{run:>3}  {:>12.0} {:>12.0}  {:>13.0} {:>13.0}  {:>12} {:>12}  {:>12.0} {:>12}",
                    ms(m.to_marker),
                    ms(q.to_marker),
                    ms(m.total),
                    ms(q.total),
                    m.max_rss_kib,
                    q.max_rss_kib,
                    ms(f.to_marker),
                    f.max_rss_kib
                );
                moat.push(m);
                qemu.push(q);
                memfd.push(f);
            }
            (m, q, f) => {
                for err in [m.err(), q.err(), f.err()].into_iter().flatten() {
                    eprintln!("bench-boot: run {run} failed: {err}");
                }
                return ExitCode::FAILURE;
            }
        }
    }

    let med = |samples: &[RunSample], f: fn(&RunSample) -> f64| {
        median(&samples.iter().map(f).collect::<Vec<_>>())
    };
    let init = (
        med(&moat, |s| ms(s.to_marker)),
        med(&qemu, |s| ms(s.to_marker)),
    );
    let total = (med(&moat, |s| ms(s.total)), med(&qemu, |s| ms(s.total)));
    let rss = (
        med(&moat, |s| s.max_rss_kib as f64),
        med(&qemu, |s| s.max_rss_kib as f64),
    );
    println!();
    println!(
        "median VMM start -> guest init: moat {:.0} ms, qemu {:.0} ms, ratio moat/qemu {:.2}",
        init.0,
        init.1,
        init.0 / init.1
    );
    println!(
        "median VMM start -> VMM exit:   moat {:.0} ms, qemu {:.0} ms, ratio moat/qemu {:.2}",
        total.0,
        total.1,
        total.0 / total.1
    );
    println!(
        "median peak RSS:                moat {:.1} MiB, qemu {:.1} MiB, ratio moat/qemu {:.2}",
        rss.0 / 1024.0,
        rss.1 / 1024.0,
        rss.0 / rss.1
    );
    let memfd_init = med(&memfd, |s| ms(s.to_marker));
    let memfd_rss = med(&memfd, |s| s.max_rss_kib as f64);
    println!(
        "memfd guest RAM (--shared-memory, implied by --fs): guest init {:.0} ms vs {:.0} ms private, \
         ratio {:.2}; peak RSS {:.1} MiB vs {:.1} MiB, ratio {:.2}",
        memfd_init,
        init.0,
        memfd_init / init.0,
        memfd_rss / 1024.0,
        rss.0 / 1024.0,
        memfd_rss / rss.0
    );
    ExitCode::SUCCESS
}
