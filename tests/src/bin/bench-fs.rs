//! bench-fs: virtio-fs throughput and metadata speed, moat-vmm against
//! QEMU's microvm machine with `vhost-user-fs-device`, side by side in one
//! run: the same virtiofsd binary and options, the same shared tree, the
//! same kernel and initramfs, 2 vCPUs and 512 MiB each, runs interleaved
//! so that drift hits both alike. The same operations on an ext4 image
//! over moat's virtio-blk, in the same moat guest, are the reference.
//! Then moat-vmm alone under other virtiofsd settings (`--cache`,
//! `--thread-pool-size`), to say which is fastest.
//!
//! The guest (test init, `moat_mode=fs`) runs `guest-tool fs-bench` from
//! the share (see `moat_tests::fs_tree::bench`). Run it on a KVM host,
//! e.g. through `tests/harness/kvm-run` (`make bench-fs` does).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use moat_tests::measure::{median, sh, wait_or_kill};

const WORK_DIR: &str = "/tmp/moat-bench-fs";
/// moat-vmm's default command line with `reboot=t`, which both VMMs end
/// on (QEMU's microvm has no i8042), and the test init's fs mode.
const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 pci=off nomodule i8042.noaux i8042.nomux \
                       i8042.nopnp i8042.dumbkbd quiet moat_mode=fs";
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
const MEMORY_MIB: &str = "512";
/// Entries of the tree the metadata walk stats.
const WIDE_ENTRIES: usize = 10_000;

/// The figures, in the order `guest-tool fs-bench` prints them.
const METRICS: [&str; 5] = [
    "seq-write MiB/s",
    "seq-read MiB/s",
    "4k rand-read IOPS",
    "create+stat+unlink ops/s",
    "find+stat s",
];

/// virtio-fs benchmark: moat-vmm against QEMU microvm.
#[derive(Debug, Parser)]
struct Args {
    /// The moat-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    /// The guest kernel (ELF vmlinux with a PVH note, so QEMU boots it too).
    #[arg(long)]
    kernel: PathBuf,
    /// The test initramfs, with guest-tool in it.
    #[arg(long)]
    initramfs: PathBuf,
    /// The guest-tool binary (static; it builds the trees on the host too).
    #[arg(long)]
    guest_tool: PathBuf,
    /// The virtiofsd binary.
    #[arg(long)]
    virtiofsd: PathBuf,
    /// Runs of each VMM in the side-by-side comparison.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Runs of each other virtiofsd setting (moat-vmm only).
    #[arg(long, default_value_t = 1)]
    setting_runs: usize,
    /// Size of the sequentially written and read file, in MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Seconds of 4 KiB random reads.
    #[arg(long, default_value_t = 5)]
    rand_secs: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Skip the comparison with QEMU: run moat-vmm under each virtiofsd
    /// setting, virtiofsd's defaults included.
    #[arg(long)]
    settings_only: bool,
    /// Only the comparison with QEMU, no other settings.
    #[arg(long, conflicts_with = "settings_only")]
    no_settings: bool,
    /// Run only this virtiofsd setting (`CACHE:THREADS`, e.g. `never:4`)
    /// besides the defaults; repeatable. Default: auto:4, never:0, never:4.
    #[arg(long = "setting", value_parser = parse_setting)]
    settings: Vec<Setting>,
    /// Print the settings table from earlier runs' outputs (their
    /// `setting-median` lines) and exit; runs nothing.
    #[arg(long, num_args = 1..)]
    summarize: Vec<PathBuf>,
}

/// Parses `CACHE:THREADS`.
fn parse_setting(text: &str) -> Result<Setting, String> {
    let (cache, threads) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected CACHE:THREADS, e.g. never:4"))?;
    let cache = match cache {
        "auto" => "auto",
        "never" => "never",
        "always" => "always",
        "metadata" => "metadata",
        other => {
            return Err(format!(
                "{other:?}: not a virtiofsd cache mode (auto, never, always, metadata)"
            ))
        }
    };
    let threads = threads
        .parse()
        .map_err(|e| format!("{threads:?}: not a thread count: {e}"))?;
    Ok(Setting { cache, threads })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Moat,
    Qemu,
}

/// virtiofsd's settings for one run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Setting {
    cache: &'static str,
    threads: u32,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--cache={} --thread-pool-size={}",
            self.cache, self.threads
        )
    }
}

/// virtiofsd's own defaults.
const DEFAULT_SETTING: Setting = Setting {
    cache: "auto",
    threads: 0,
};
const OTHER_SETTINGS: [Setting; 3] = [
    Setting {
        cache: "auto",
        threads: 4,
    },
    Setting {
        cache: "never",
        threads: 0,
    },
    Setting {
        cache: "never",
        threads: 4,
    },
];

fn work(name: &str) -> PathBuf {
    Path::new(WORK_DIR).join(name)
}

/// The share (with the guest's script and the metadata tree) and the ext4
/// image holding the same tree.
fn set_up(args: &Args) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(WORK_DIR);
    let share = work("share");
    std::fs::create_dir_all(share.join("scratch")).map_err(|e| format!("{WORK_DIR}: {e}"))?;
    let tool = args.guest_tool.to_str().ok_or("guest-tool path")?;
    let wide = share.join("wide");
    sh(
        tool,
        &[
            "fs-make-wide",
            wide.to_str().ok_or("path")?,
            &WIDE_ENTRIES.to_string(),
        ],
    )?;
    let script = format!(
        "guest-tool fs-bench virtiofs /ctl/scratch /ctl/wide {mib} {secs}\n\
         if [ -b /dev/vda ]; then\n\
           mkdir -p /blk && mount -t ext4 /dev/vda /blk && mkdir -p /blk/scratch &&\n\
           guest-tool fs-bench ext4 /blk/scratch /blk/wide {mib} {secs}\n\
           umount /blk\n\
         fi\n",
        mib = args.file_mib,
        secs = args.rand_secs
    );
    std::fs::write(share.join("guest.sh"), script).map_err(|e| format!("guest.sh: {e}"))?;
    let image = work("ext4.img");
    let size = format!("{}M", args.file_mib * 2 + 512);
    let populate = work("ext4-root");
    std::fs::create_dir_all(&populate).map_err(|e| format!("ext4 root: {e}"))?;
    sh(
        "cp",
        &[
            "-a",
            wide.to_str().ok_or("path")?,
            populate.to_str().ok_or("path")?,
        ],
    )?;
    sh(
        "mkfs.ext4",
        &[
            "-F",
            "-q",
            "-d",
            populate.to_str().ok_or("path")?,
            image.to_str().ok_or("path")?,
            &size,
        ],
    )
}

fn socket() -> PathBuf {
    work("fs.sock")
}

/// Starts virtiofsd on the share and waits for its socket. The previous
/// run's virtiofsd (its sandboxed child) may still hold the socket's lock
/// file for a moment after the VM ended; a start that fails on that is
/// tried again, for up to 30 s.
fn start_virtiofsd(args: &Args, setting: Setting) -> Result<Child, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = work("virtiofsd.log");
    loop {
        let _ = std::fs::remove_file(socket());
        let stderr = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(&args.virtiofsd)
            .arg("--shared-dir")
            .arg(work("share"))
            .arg("--socket-path")
            .arg(socket())
            .arg(format!("--cache={}", setting.cache))
            .arg(format!("--thread-pool-size={}", setting.threads))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("start virtiofsd: {e}"))?;
        loop {
            if socket().exists() {
                return Ok(child);
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if Instant::now() > deadline {
            let why = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "virtiofsd made no socket in 30 s: {}",
                why.trim().lines().last().unwrap_or("(no output)")
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn command(args: &Args, vmm: Vmm) -> Command {
    let fs = format!("tag=ctl,socket={}", socket().display());
    match vmm {
        Vmm::Moat => {
            let mut cmd = Command::new(&args.vmm);
            cmd.arg("--kernel")
                .arg(&args.kernel)
                .arg("--initramfs")
                .arg(&args.initramfs)
                .args(["--vcpus", "2", "--memory", MEMORY_MIB])
                .args(["--cmdline", CMDLINE])
                .args(["--fs", &fs])
                .arg("--block")
                .arg(format!("id=ext4,path={}", work("ext4.img").display()));
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = Command::new(&args.qemu);
            cmd.args([
                "-M",
                "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem",
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-smp",
                "2",
                "-m",
                MEMORY_MIB,
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
            .args(["-append", CMDLINE])
            .arg("-chardev")
            .arg(format!("socket,id=fs0,path={}", socket().display()))
            .args(["-device", "vhost-user-fs-device,chardev=fs0,tag=ctl"]);
            cmd
        }
    }
}

/// One VM through the guest's benchmark: the virtio-fs figures, and the
/// ext4 ones when the guest had the disk.
fn run_once(
    args: &Args,
    vmm: Vmm,
    setting: Setting,
) -> Result<(Vec<f64>, Option<Vec<f64>>), String> {
    let mut daemon = start_virtiofsd(args, setting)?;
    let result = (|| {
        let mut child = command(args, vmm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {vmm:?}: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let console = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        let mut stderr = child.stderr.take().ok_or("no stderr")?;
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let exited = wait_or_kill(&mut child, RUN_TIMEOUT);
        let lines = console.join().unwrap_or_default();
        let errors = errors.join().unwrap_or_default();
        if !exited {
            return Err(format!(
                "{vmm:?} did not finish in {RUN_TIMEOUT:?}; console tail: {}",
                lines[lines.len().saturating_sub(10)..].join(" | ")
            ));
        }
        let figures = |label: &str| -> Option<Vec<f64>> {
            METRICS
                .iter()
                .map(|name| {
                    let key = format!("MOAT_GUEST fsbench {label} {name}: ");
                    lines
                        .iter()
                        .find_map(|l| l.trim_end().strip_prefix(key.as_str()))
                        .and_then(|v| v.parse().ok())
                })
                .collect()
        };
        let fs = figures("virtiofs").ok_or_else(|| {
            format!(
                "{vmm:?}: no virtio-fs figures; console: {}; stderr: {}",
                lines.join(" | "),
                errors.trim()
            )
        })?;
        Ok((fs, figures("ext4")))
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    result
}

fn medians(samples: &[Vec<f64>]) -> Vec<f64> {
    (0..METRICS.len())
        .map(|i| median(&samples.iter().map(|s| s[i]).collect::<Vec<_>>()))
        .collect()
}

fn virtiofsd_version(path: &Path) -> String {
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The side-by-side comparison with QEMU under virtiofsd's defaults;
/// returns moat-vmm's medians and whether every run completed.
fn compare_with_qemu(
    args: &Args,
    show: &dyn Fn(&[f64]) -> String,
) -> Result<(Vec<f64>, bool), String> {
    let mut all_runs = true;
    let mut samples: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let mut ext4 = Vec::new();
    for run in 1..=args.runs {
        for (slot, vmm) in [(0, Vmm::Moat), (1, Vmm::Qemu)] {
            match run_once(args, vmm, DEFAULT_SETTING) {
                Ok((fs, blk)) => {
                    println!("run {run} {vmm:?} virtiofs: {}", show(&fs));
                    samples[slot].push(fs);
                    if let Some(blk) = blk {
                        println!("run {run} {vmm:?} ext4 on virtio-blk: {}", show(&blk));
                        ext4.push(blk);
                    }
                }
                Err(e) => {
                    eprintln!("run {run}: {e}");
                    all_runs = false;
                }
            }
        }
    }
    if samples.iter().any(Vec::is_empty) || ext4.is_empty() {
        return Err("no complete run for one of the VMMs".into());
    }
    let (moat, qemu, blk) = (medians(&samples[0]), medians(&samples[1]), medians(&ext4));
    println!();
    println!(
        "| median of {} runs, virtiofsd {DEFAULT_SETTING} | moat | QEMU | moat/QEMU | ext4 on moat's virtio-blk |",
        args.runs
    );
    println!("| --- | --- | --- | --- | --- |");
    for (i, name) in METRICS.iter().enumerate() {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.1} |",
            moat[i],
            qemu[i],
            moat[i] / qemu[i],
            blk[i]
        );
    }
    println!("(find+stat: seconds, lower is better; the rest: higher is better)");

    Ok((moat, all_runs))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.summarize.is_empty() {
        return match read_medians(&args.summarize) {
            Ok(settings) if !settings.is_empty() => {
                print_settings(&settings);
                ExitCode::SUCCESS
            }
            Ok(_) => {
                eprintln!("bench-fs: no setting-median lines in {:?}", args.summarize);
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("bench-fs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = set_up(&args) {
        eprintln!("bench-fs: set-up failed: {e}");
        return ExitCode::FAILURE;
    }
    let what = if args.settings_only {
        format!("moat-vmm alone, {} runs of each setting", args.setting_runs)
    } else {
        format!(
            "({DEFAULT_SETTING}), {} runs of each VMM interleaved",
            args.runs
        )
    };
    println!(
        "bench-fs: {} {what}; file {} MiB, random reads {} s, \
         walk over {WIDE_ENTRIES} entries; 2 vCPUs, {MEMORY_MIB} MiB",
        virtiofsd_version(&args.virtiofsd),
        args.file_mib,
        args.rand_secs
    );
    let mut failed = false;
    let show = |values: &[f64]| {
        values
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut settings = Vec::new();
    let mut to_try = if args.no_settings {
        Vec::new()
    } else if args.settings.is_empty() {
        OTHER_SETTINGS.to_vec()
    } else {
        args.settings.clone()
    };
    if args.settings_only {
        if args.settings.is_empty() {
            to_try.insert(0, DEFAULT_SETTING);
        }
    } else {
        match compare_with_qemu(&args, &show) {
            Ok((moat, all_runs)) => {
                failed |= !all_runs;
                settings.push((DEFAULT_SETTING, moat));
            }
            Err(e) => {
                eprintln!("bench-fs: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for setting in to_try {
        let mut runs = Vec::new();
        for _ in 0..args.setting_runs {
            match run_once(&args, Vmm::Moat, setting) {
                Ok((fs, _)) => {
                    println!("moat, virtiofsd {setting}: {}", show(&fs));
                    runs.push(fs);
                }
                Err(e) => {
                    eprintln!("moat, virtiofsd {setting}: {e}");
                    failed = true;
                }
            }
        }
        if !runs.is_empty() {
            settings.push((setting, medians(&runs)));
        }
    }
    for (setting, values) in &settings {
        println!("{}", median_line(setting, values));
    }
    print_settings(&settings);
    let _ = std::fs::remove_dir_all(WORK_DIR);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The `setting-median` line of one setting, which `--summarize` reads.
fn median_line(setting: &Setting, values: &[f64]) -> String {
    format!(
        "setting-median {setting}: {}",
        values
            .iter()
            .map(|v| format!("{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Reads the `setting-median` lines of earlier outputs.
fn read_medians(files: &[PathBuf]) -> Result<Vec<(String, Vec<f64>)>, String> {
    let mut settings = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("setting-median ") else {
                continue;
            };
            let Some((setting, values)) = rest.split_once(": ") else {
                return Err(format!("{}: malformed line {line:?}", file.display()));
            };
            let values = values
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<Vec<f64>, _>>()
                .map_err(|e| format!("{}: {line:?}: {e}", file.display()))?;
            if values.len() != METRICS.len() {
                return Err(format!(
                    "{}: {line:?}: {} figures",
                    file.display(),
                    values.len()
                ));
            }
            settings.push((setting.to_string(), values));
        }
    }
    Ok(settings)
}

/// The settings table and the fastest setting for each figure.
fn print_settings<S: std::fmt::Display>(settings: &[(S, Vec<f64>)]) {
    println!();
    println!("| moat-vmm, virtiofsd setting | {} |", METRICS.join(" | "));
    println!("|{}", " --- |".repeat(METRICS.len() + 1));
    for (setting, values) in settings {
        println!(
            "| {setting} | {} |",
            values
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    for (i, name) in METRICS.iter().enumerate() {
        let lower_is_better = name.ends_with(" s");
        let best = settings.iter().max_by(|a, b| {
            let ord = a.1[i].total_cmp(&b.1[i]);
            if lower_is_better {
                ord.reverse()
            } else {
                ord
            }
        });
        if let Some((setting, _)) = best {
            println!("fastest for {name}: {setting}");
        }
    }
}
