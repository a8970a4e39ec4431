//! The `moat-vmm` command: parses flags and an optional JSON config, boots
//! the microVM, and exits 0 when the guest powers off or reboots or the
//! host sends SIGTERM; a guest panic, a triple fault and a vCPU failure
//! each have a status of their own (`moat_vmm::shutdown::exit_status`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use moat_vmm::builder::run_vm;
use moat_vmm::config::{
    host_memory_mib, BlockConfig, ConfigLayer, FsConfig, NetConfig, VsockConfig,
};
use moat_vmm::seccomp::{self, Mode, ThreadKind};

/// Boot a Linux kernel in a KVM microVM.
#[derive(Debug, Parser)]
#[command(
    name = "moat-vmm",
    version,
    about,
    after_help = "Exit status: 0 the guest powered off or rebooted, or SIGTERM/SIGINT; \
1 the VMM failed (config, host error); 2 bad flags; 10 guest kernel panic; \
11 triple fault; 12 vCPU failure; killed by SIGSYS: a seccomp violation."
)]
struct Cli {
    /// JSON config file; flags override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs image.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Whole kernel command line, replacing the default.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Extra kernel arguments appended to the command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    append: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Guest memory in MiB (default 128).
    #[arg(long, value_name = "MiB")]
    memory: Option<u64>,
    /// Serial console output: stdout, none or file:PATH[,cap=BYTES]
    /// (default stdout; a file's cap defaults to 16 MiB).
    #[arg(long, value_name = "OUTPUT")]
    serial: Option<String>,
    /// Give the guest a virtio-rng entropy device.
    #[arg(long)]
    rng: bool,
    /// Add a virtio block device: id=ID,path=IMAGE[,readonly] (repeatable;
    /// the first is /dev/vda).
    #[arg(long, value_name = "SPEC")]
    block: Vec<BlockConfig>,
    /// Add a virtio network device over a tap: id=ID,tap=TAP[,mac=MAC]
    /// (repeatable; the first is eth0).
    #[arg(long, value_name = "SPEC")]
    net: Vec<NetConfig>,
    /// Add the vsock device: cid=CID,path=SOCKET (hybrid vsock: host
    /// clients connect to SOCKET; guest connections to port P reach
    /// SOCKET_P).
    #[arg(long, value_name = "SPEC")]
    vsock: Option<VsockConfig>,
    /// Add a virtio-fs share served by a vhost-user-fs backend such as
    /// virtiofsd: tag=TAG,socket=PATH[,queues=N][,queue_size=N]
    /// (repeatable; the guest mounts it with `mount -t virtiofs TAG DIR`).
    #[arg(long, value_name = "SPEC")]
    fs: Vec<FsConfig>,
    /// Back guest RAM with a memfd mapped shared (implied by --fs).
    #[arg(long)]
    shared_memory: bool,
    /// Run without seccomp filters. For debugging only: every thread may
    /// then make any system call.
    #[arg(long)]
    no_seccomp: bool,
    /// Test hook: threads of this kind make a call outside their seccomp
    /// filter right after installing it (main, signals, vcpu,
    /// queue-worker, net, vsock, fs, vhost-watchdog).
    #[arg(long, hide = true, value_name = "KIND")]
    seccomp_selftest: Option<String>,
}

fn main() -> ExitCode {
    let vmm_start = Instant::now();
    // One malloc arena for every thread: glibc shrinks a thread's own
    // arena only after reading /proc/sys/vm/overcommit_memory, an open(2)
    // no device thread's seccomp filter allows (and fewer arenas hold
    // less memory per pod).
    // SAFETY: mallopt only sets a malloc tunable; no thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = Cli::parse();
    match run(cli, vmm_start) {
        Ok(code) => code,
        Err(message) => {
            moat_vmm::log_line!("moat-vmm: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, vmm_start: Instant) -> Result<ExitCode, String> {
    seccomp::set_mode(if cli.no_seccomp {
        moat_vmm::log_line!(
            "moat-vmm: warning: --no-seccomp: the VMM runs without seccomp filters"
        );
        Mode::Off
    } else if std::env::var_os("MOAT_VMM_SECCOMP_LOG").is_some() {
        // Diagnostics: the kernel logs calls outside a filter (audit type
        // 1326, with the thread's name) instead of killing the VMM.
        moat_vmm::log_line!(
            "moat-vmm: warning: MOAT_VMM_SECCOMP_LOG: seccomp violations are only logged"
        );
        Mode::Log
    } else {
        Mode::Kill
    });
    if let Some(name) = &cli.seccomp_selftest {
        let kind = ThreadKind::from_name(name).ok_or_else(|| {
            let kinds: Vec<&str> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
            format!(
                "--seccomp-selftest {name}: no such thread kind (one of {})",
                kinds.join(", ")
            )
        })?;
        seccomp::set_selftest(kind);
    }
    let file_layer = match &cli.config {
        Some(path) => ConfigLayer::from_json_file(path).map_err(|e| e.to_string())?,
        None => ConfigLayer::default(),
    };
    let flags_layer = ConfigLayer {
        kernel: cli.kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        append: cli.append,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        serial: cli.serial,
        rng: cli.rng.then_some(true),
        blocks: (!cli.block.is_empty()).then_some(cli.block),
        nets: (!cli.net.is_empty()).then_some(cli.net),
        vsock: cli.vsock,
        fs: (!cli.fs.is_empty()).then_some(cli.fs),
        shared_memory: cli.shared_memory.then_some(true),
    };
    let config = file_layer
        .overridden_by(flags_layer)
        .resolve(host_memory_mib())
        .map_err(|e| format!("config: {e}"))?;
    let outcome = run_vm(&config, vmm_start).map_err(|e| e.to_string())?;
    if outcome.stuck_vcpus > 0 {
        moat_vmm::log_line!(
            "moat-vmm: warning: {} vCPU thread(s) did not stop in time",
            outcome.stuck_vcpus
        );
    }
    let status = outcome.reason.exit_status();
    if outcome.reason.is_clean() {
        moat_vmm::log_line!(
            "moat-vmm: guest stopped ({:?}) after {} ms",
            outcome.reason,
            vmm_start.elapsed().as_millis()
        );
    } else {
        moat_vmm::log_line!(
            "moat-vmm: VM crashed: {} (exit status {status})",
            outcome.reason
        );
    }
    Ok(ExitCode::from(status))
}
