//! bench-devices: virtio device throughput, moat-vmm against QEMU's
//! microvm machine on the same KVM, kernel, initramfs, disk image and tap,
//! runs interleaved so that drift hits both alike. QEMU uses its own
//! virtio-blk-device and virtio-net-device (with vhost-net) and
//! vhost-vsock-device; moat-vmm its own devices and hybrid vsock.
//!
//! The guest (test init, `moat_mode=devbench`) measures the disk itself;
//! the host side of vsock and TCP runs in this process and times each
//! transfer from first byte to the receiver's close. Run it on a KVM host,
//! e.g. through `tests/harness/kvm-run` (`make bench-devices` does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use moat_tests::af_vsock;
use moat_tests::measure::{median, sh, wait_or_kill};
use moat_tests::stream_check::{receive_all, send_pattern, PatternStream};

const TAP: &str = "moatbench0";
const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
const GUEST_CID: u32 = 3;
const WORK_DIR: &str = "/tmp/moat-bench-devices";
/// moat-vmm's default command line with `reboot=t`, which both VMMs end
/// on (QEMU's microvm has no i8042), and the test init's bench mode.
const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 pci=off nomodule i8042.noaux i8042.nomux \
                       i8042.nopnp i8042.dumbkbd quiet moat_mode=devbench";
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_PATIENCE: Duration = Duration::from_secs(120);

/// Device benchmark: moat-vmm against QEMU microvm.
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
    /// Runs of each VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the disk and of each sequential pass, in MiB.
    #[arg(long, default_value_t = 128)]
    disk_mib: u64,
    /// MiB each vsock and TCP transfer moves.
    #[arg(long, default_value_t = 64)]
    bulk_mib: u64,
    /// Seconds of 4 KiB random reads.
    #[arg(long, default_value_t = 5)]
    rand_secs: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Moat,
    Qemu,
}

/// The figures of one run; throughputs in MiB/s, IOPS for random reads.
const METRICS: [&str; 7] = [
    "blk seq-write MiB/s",
    "blk seq-read MiB/s",
    "blk 4k rand-read IOPS",
    "vsock host->guest MiB/s",
    "vsock guest->host MiB/s",
    "net host->guest MiB/s",
    "net guest->host MiB/s",
];

/// Loads the modules QEMU's devices need, makes the tap and the disk image.
fn set_up(args: &Args) -> Result<PathBuf, String> {
    for module in ["tun", "vhost_net", "vhost_vsock"] {
        sh("modprobe", &[module])?;
    }
    let _ = sh("ip", &["link", "del", TAP]);
    sh("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
    sh("ip", &["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    sh("ip", &["link", "set", TAP, "up"])?;
    std::fs::create_dir_all(WORK_DIR).map_err(|e| format!("{WORK_DIR}: {e}"))?;
    let disk = Path::new(WORK_DIR).join("disk.img");
    let mut file = std::fs::File::create(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
    // Real data, not a sparse file: reading holes would flatter both.
    let mut pattern = PatternStream::new(99);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..args.disk_mib {
        pattern.fill(&mut chunk);
        file.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", disk.display()))?;
    }
    Ok(disk)
}

fn guest_cmdline(args: &Args) -> String {
    format!(
        "{CMDLINE} moat_disk_mib={} moat_bulk_mib={} moat_rand_secs={}",
        args.disk_mib, args.bulk_mib, args.rand_secs
    )
}

fn vsock_socket() -> PathBuf {
    Path::new(WORK_DIR).join("v.sock")
}

fn command(args: &Args, vmm: Vmm, disk: &Path) -> Command {
    let memory = "512";
    match vmm {
        Vmm::Moat => {
            let mut cmd = Command::new(&args.vmm);
            cmd.arg("--kernel")
                .arg(&args.kernel)
                .arg("--initramfs")
                .arg(&args.initramfs)
                .args(["--vcpus", "2", "--memory", memory])
                .args(["--cmdline", &guest_cmdline(args)])
                .arg("--block")
                .arg(format!("id=bench,path={}", disk.display()))
                .args(["--net", &format!("id=eth0,tap={TAP}")])
                .arg("--vsock")
                .arg(format!("cid={GUEST_CID},path={}", vsock_socket().display()));
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = Command::new(&args.qemu);
            cmd.args([
                "-M",
                "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-smp",
                "2",
                "-m",
                memory,
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
            .args(["-append", &guest_cmdline(args)])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=bench",
                disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=bench"])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=on"),
                "-device",
                "virtio-net-device,netdev=n0",
                "-device",
                &format!("vhost-vsock-device,guest-cid={GUEST_CID}"),
            ]);
            cmd
        }
    }
}

/// Waits until `fd` (a listening socket) has a connection to accept, so
/// that a guest that never connects cannot pin a listener forever.
fn wait_for_client(fd: &impl std::os::fd::AsRawFd, timeout: Duration) -> Result<(), String> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, for the duration of the call.
    match unsafe { libc::poll(&mut pollfd, 1, millis) } {
        1 => Ok(()),
        0 => Err(format!("no connection within {timeout:?}")),
        _ => Err(format!("poll: {}", std::io::Error::last_os_error())),
    }
}

/// A transfer that makes no progress for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

fn set_timeouts(stream: &UnixStream) -> Result<(), String> {
    stream
        .set_read_timeout(Some(STALL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STALL_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))
}

/// Retries `connect` until it succeeds or the guest had long enough.
fn patiently<S>(what: &str, mut connect: impl FnMut() -> std::io::Result<S>) -> Result<S, String> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match connect() {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => return Err(format!("{what}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Connects to guest vsock `port`: through moat's hybrid socket, or
/// straight to the CID when QEMU's vhost-vsock serves it.
fn vsock_connect(vmm: Vmm, port: u32) -> std::io::Result<UnixStream> {
    match vmm {
        Vmm::Qemu => af_vsock::connect(GUEST_CID, port),
        Vmm::Moat => af_vsock::connect_hybrid(vsock_socket(), port),
    }
}

/// Sends `bytes` and waits for the receiver to close; MiB/s.
fn timed_send<S: Read + Write>(
    stream: &mut S,
    bytes: u64,
    shutdown: impl FnOnce(&S),
) -> Result<f64, String> {
    let start = Instant::now();
    send_pattern(stream, 1, bytes).map_err(|e| format!("send: {e}"))?;
    shutdown(stream);
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1048576.0)
}

/// Receives to the end and checks the byte count; MiB/s from the first
/// byte's arrival to the end (accept-to-first-byte is guest start-up).
fn timed_receive(stream: &mut impl Read, bytes: u64) -> Result<f64, String> {
    let mut first = [0u8; 1];
    stream
        .read_exact(&mut first)
        .map_err(|e| format!("receive: {e}"))?;
    let start = Instant::now();
    let (n, _) = receive_all(stream).map_err(|e| format!("receive: {e}"))?;
    if n + 1 != bytes {
        return Err(format!("received {} of {bytes} bytes", n + 1));
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1048576.0)
}

/// Runs one VM through the guest's sequence; returns the METRICS values.
fn run_once(args: &Args, vmm: Vmm, disk: &Path) -> Result<Vec<f64>, String> {
    let bytes = args.bulk_mib << 20;
    let uds = vsock_socket();
    let _ = std::fs::remove_file(&uds);
    let guest_to_host_uds = PathBuf::from(format!("{}_6000", uds.display()));
    let _ = std::fs::remove_file(&guest_to_host_uds);
    enum VsockListener {
        Uds(UnixListener),
        Vsock(af_vsock::Listener),
    }
    let vsock_listener = match vmm {
        Vmm::Moat => VsockListener::Uds(
            UnixListener::bind(&guest_to_host_uds).map_err(|e| format!("listen: {e}"))?,
        ),
        Vmm::Qemu => VsockListener::Vsock(
            af_vsock::Listener::bind(6000).map_err(|e| format!("vsock listen: {e}"))?,
        ),
    };
    let tcp_listener =
        TcpListener::bind((HOST_IP, 7000)).map_err(|e| format!("tcp listen: {e}"))?;

    let mut child = command(args, vmm, disk)
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
    // The receiving half runs beside the sending half, in guest order.
    let (received_tx, received_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let vsock = match &vsock_listener {
            VsockListener::Uds(l) => wait_for_client(l, RUN_TIMEOUT)
                .and_then(|()| l.accept().map(|(s, _)| s).map_err(|e| e.to_string())),
            VsockListener::Vsock(l) => {
                wait_for_client(l, RUN_TIMEOUT).and_then(|()| l.accept().map_err(|e| e.to_string()))
            }
        }
        .map_err(|e| format!("vsock accept: {e}"))
        .and_then(|mut s| {
            set_timeouts(&s)?;
            timed_receive(&mut s, bytes)
        });
        let tcp = wait_for_client(&tcp_listener, RUN_TIMEOUT)
            .and_then(|()| tcp_listener.accept().map_err(|e| e.to_string()))
            .map_err(|e| format!("tcp accept: {e}"))
            .and_then(|(mut s, _)| {
                s.set_read_timeout(Some(STALL_TIMEOUT))
                    .map_err(|e| format!("tcp timeout: {e}"))?;
                timed_receive(&mut s, bytes)
            });
        let _ = received_tx.send((vsock, tcp));
    });
    let progress = |what: &str| eprintln!("bench-devices: {vmm:?}: {what}");
    let result = (|| {
        progress("waiting for the guest's vsock sink");
        let mut vsock = patiently("vsock connect", || vsock_connect(vmm, 5001))?;
        progress("vsock host->guest");
        set_timeouts(&vsock)?;
        let vsock_in = timed_send(&mut vsock, bytes, |s| {
            let _ = s.shutdown(Shutdown::Write);
        })?;
        progress("waiting for the guest's tcp sink");
        let mut tcp = patiently("tcp connect", || TcpStream::connect((GUEST_IP, 7001)))?;
        progress("tcp host->guest");
        tcp.set_read_timeout(Some(STALL_TIMEOUT))
            .and_then(|()| tcp.set_write_timeout(Some(STALL_TIMEOUT)))
            .map_err(|e| format!("tcp timeouts: {e}"))?;
        let tcp_in = timed_send(&mut tcp, bytes, |s| {
            let _ = s.shutdown(Shutdown::Write);
        })?;
        progress("waiting for the guest-to-host transfers");
        let (vsock_out, tcp_out) = received_rx
            .recv_timeout(RUN_TIMEOUT)
            .map_err(|_| "guest-to-host transfers did not finish".to_string())?;
        Ok::<_, String>((vsock_in, vsock_out?, tcp_in, tcp_out?))
    })();
    let exited = wait_or_kill(&mut child, RUN_TIMEOUT);
    let lines = console.join().unwrap_or_default();
    let errors = errors.join().unwrap_or_default();
    let (vsock_in, vsock_out, tcp_in, tcp_out) = result.map_err(|e| {
        format!(
            "{vmm:?}: {e}; console tail: {}; stderr: {}",
            lines[lines.len().saturating_sub(15)..].join(" | "),
            errors.trim()
        )
    })?;
    if !exited {
        return Err(format!("{vmm:?} did not exit"));
    }
    let figure = |key: &str| -> Result<f64, String> {
        lines
            .iter()
            .find_map(|l| l.trim_end().strip_prefix(&format!("MOAT_GUEST {key}: ")))
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{vmm:?}: no {key:?} figure; console: {}", lines.join(" | ")))
    };
    Ok(vec![
        figure("blk seq-write")?,
        figure("blk seq-read")?,
        figure("blk rand-read-4k")?,
        vsock_in,
        vsock_out,
        tcp_in,
        tcp_out,
    ])
}

fn main() -> ExitCode {
    let args = Args::parse();
    let disk = match set_up(&args) {
        Ok(disk) => disk,
        Err(e) => {
            eprintln!("bench-devices: set-up failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "bench-devices: {} runs each, interleaved; disk {} MiB, transfers {} MiB, random reads {} s",
        args.runs, args.disk_mib, args.bulk_mib, args.rand_secs
    );
    let mut samples: [Vec<Vec<f64>>; 2] = [Vec::new(), Vec::new()];
    let mut failed = false;
    for run in 1..=args.runs {
        for (slot, vmm) in [(0, Vmm::Moat), (1, Vmm::Qemu)] {
            // The nested harness occasionally loses a guest (or L1) under
            // this load, whichever VMM runs; one retry keeps the medians
            // complete, and every failure is printed.
            let outcome = run_once(&args, vmm, &disk).or_else(|e| {
                eprintln!("run {run} {vmm:?} failed, retrying once: {e}");
                run_once(&args, vmm, &disk)
            });
            match outcome {
                Ok(values) => {
                    let shown: Vec<String> = values.iter().map(|v| format!("{v:.1}")).collect();
                    println!("run {run} {vmm:?}: {}", shown.join("  "));
                    samples[slot].push(values);
                }
                Err(e) => {
                    eprintln!("run {run}: {e}");
                    failed = true;
                }
            }
        }
    }
    let _ = sh("ip", &["link", "del", TAP]);
    let _ = std::fs::remove_dir_all(WORK_DIR);
    if samples.iter().any(Vec::is_empty) {
        eprintln!("bench-devices: no complete run for one of the VMMs");
        return ExitCode::FAILURE;
    }
    println!();
    println!("| median of {} runs | moat | QEMU | moat/QEMU |", args.runs);
    println!("| --- | --- | --- | --- |");
    for (i, name) in METRICS.iter().enumerate() {
        let moat = median(&samples[0].iter().map(|s| s[i]).collect::<Vec<_>>());
        let qemu = median(&samples[1].iter().map(|s| s[i]).collect::<Vec<_>>());
        println!("| {name} | {moat:.1} | {qemu:.1} | {:.2} |", moat / qemu);
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
