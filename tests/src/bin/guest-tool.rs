//! guest-tool: the guest half of moat's vsock and network tests, a
//! static binary in the test initramfs. It speaks AF_VSOCK (and TCP for
//! the tcp- commands) and reports on the console in
//! `MOAT_GUEST <what>: <value>` lines.
//!
//!   guest-tool echo-server PORT            echo every connection, forever
//!   guest-tool sink PORT                   read one connection to its end
//!   guest-tool send PORT BYTES SEED        send a pattern to the host
//!   guest-tool echo-clients PORT N BYTES   N concurrent echo round trips
//!   guest-tool refused PORT                connect where nothing listens
//!   guest-tool tcp-sink PORT               read one TCP connection to its end
//!   guest-tool tcp-send ADDR:PORT BYTES SEED  send a pattern over TCP
//!   guest-tool blk-bench DEV MIB SECONDS  direct-I/O sequential write and
//!                                         read of MIB MiB, then 4 KiB random
//!                                         reads (one at a time) for SECONDS
//!   guest-tool fs-make-tree DIR            build the virtio-fs scenarios' tree
//!                                         (on the host; see moat_tests::fs_tree)
//!   guest-tool fs-manifest DIR             print the manifest of the tree in DIR
//!   guest-tool fs-make-wide DIR ENTRIES    the metadata tree of bench-fs
//!   guest-tool fs-bench LABEL DIR WIDE MIB SECONDS
//!                                         bench-fs's file system figures

use std::io;
use std::process::ExitCode;

use moat_tests::af_vsock::{self, HOST_CID};
use moat_tests::stream_check::{
    concurrent_echo_clients, echo, receive_all, send_pattern, BoundedSocket, GUEST_STALL_TIMEOUT,
};

fn connect(port: u32) -> io::Result<std::os::unix::net::UnixStream> {
    af_vsock::connect(HOST_CID, port)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let io_err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| format!("{what}: {e}")
    };
    match cmd {
        "tcp-sink" => {
            let port: u16 = arg(args, 1, "PORT")?;
            let listener =
                std::net::TcpListener::bind(("0.0.0.0", port)).map_err(io_err("listen"))?;
            println!("MOAT_GUEST tcp sink listening: {port}");
            let (mut conn, _) = listener.accept().map_err(io_err("accept"))?;
            conn.bound(GUEST_STALL_TIMEOUT)
                .map_err(io_err("timeouts"))?;
            let (n, hash) = receive_all(&mut conn).map_err(io_err("receive"))?;
            println!("MOAT_GUEST tcp sink: {n} bytes sha256 {hash}");
            return Ok(());
        }
        "tcp-send" => {
            let addr: std::net::SocketAddr = arg(args, 1, "ADDR:PORT")?;
            let bytes: u64 = arg(args, 2, "BYTES")?;
            let seed: u64 = arg(args, 3, "SEED")?;
            let mut conn = std::net::TcpStream::connect(addr).map_err(io_err("connect"))?;
            conn.bound(GUEST_STALL_TIMEOUT)
                .map_err(io_err("timeouts"))?;
            let hash = send_pattern(&mut conn, seed, bytes).map_err(io_err("send"))?;
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(io_err("shutdown"))?;
            // Wait for the host to close: every byte has then arrived.
            let mut rest = Vec::new();
            let _ = io::Read::read_to_end(&mut conn, &mut rest);
            println!("MOAT_GUEST tcp send: {bytes} bytes sha256 {hash}");
            return Ok(());
        }
        "fs-make-tree" => {
            let dir: String = arg(args, 1, "DIR")?;
            return moat_tests::fs_tree::make_tree(std::path::Path::new(&dir))
                .map_err(io_err("fs-make-tree"));
        }
        "fs-manifest" => {
            let dir: String = arg(args, 1, "DIR")?;
            let text = moat_tests::fs_tree::manifest(std::path::Path::new(&dir))
                .map_err(io_err("fs-manifest"))?;
            print!("{text}");
            return Ok(());
        }
        "fs-make-wide" => {
            let dir: String = arg(args, 1, "DIR")?;
            let entries: usize = arg(args, 2, "ENTRIES")?;
            return moat_tests::fs_tree::make_wide_tree(std::path::Path::new(&dir), entries)
                .map_err(io_err("fs-make-wide"));
        }
        "fs-bench" => {
            let label: String = arg(args, 1, "LABEL")?;
            let dir: String = arg(args, 2, "DIR")?;
            let wide: String = arg(args, 3, "WIDE")?;
            let mib: u64 = arg(args, 4, "MIB")?;
            let seconds: u64 = arg(args, 5, "SECONDS")?;
            let figures = moat_tests::fs_tree::bench(
                std::path::Path::new(&dir),
                std::path::Path::new(&wide),
                mib,
                seconds,
            )
            .map_err(io_err("fs-bench"))?;
            for (name, value) in figures {
                println!("MOAT_GUEST fsbench {label} {name}: {value:.2}");
            }
            return Ok(());
        }
        "blk-bench" => {
            let dev: String = arg(args, 1, "DEV")?;
            let mib: u64 = arg(args, 2, "MIB")?;
            let seconds: u64 = arg(args, 3, "SECONDS")?;
            return block_bench(&dev, mib, seconds).map_err(io_err("blk-bench"));
        }
        _ => {}
    }
    let port: u32 = arg(args, 1, "PORT")?;
    match cmd {
        "echo-server" => {
            let listener = af_vsock::Listener::bind(port).map_err(io_err("listen"))?;
            println!("MOAT_GUEST vsock echo server: listening on {port}");
            loop {
                let mut conn = listener.accept().map_err(io_err("accept"))?;
                std::thread::spawn(move || {
                    let _ = echo(&mut conn);
                });
            }
        }
        "sink" => {
            let listener = af_vsock::Listener::bind(port).map_err(io_err("listen"))?;
            let mut conn = listener.accept().map_err(io_err("accept"))?;
            conn.bound(GUEST_STALL_TIMEOUT)
                .map_err(io_err("timeouts"))?;
            let (n, hash) = receive_all(&mut conn).map_err(io_err("receive"))?;
            println!("MOAT_GUEST vsock sink: {n} bytes sha256 {hash}");
        }
        "send" => {
            let bytes: u64 = arg(args, 2, "BYTES")?;
            let seed: u64 = arg(args, 3, "SEED")?;
            let mut conn = connect(port).map_err(io_err("connect"))?;
            conn.bound(GUEST_STALL_TIMEOUT)
                .map_err(io_err("timeouts"))?;
            let hash = send_pattern(&mut conn, seed, bytes).map_err(io_err("send"))?;
            let _ = conn.shutdown(std::net::Shutdown::Write);
            println!("MOAT_GUEST vsock send: {bytes} bytes sha256 {hash}");
        }
        "echo-clients" => {
            let count: u64 = arg(args, 2, "N")?;
            let bytes: u64 = arg(args, 3, "BYTES")?;
            concurrent_echo_clients(count, 1000, bytes, move |_| connect(port))?;
            println!("MOAT_GUEST vsock echo clients: {count} ok");
        }
        "refused" => match connect(port) {
            Ok(_) => println!("MOAT_GUEST vsock refused: connected"),
            Err(e) => println!(
                "MOAT_GUEST vsock refused: {}",
                e.raw_os_error().map_or("other".into(), |c| {
                    if c == libc::ECONNRESET {
                        "ECONNRESET".to_string()
                    } else {
                        format!("errno {c}")
                    }
                })
            ),
        },
        _ => return Err(format!("unknown command {cmd:?}")),
    }
    Ok(())
}

/// Direct I/O against `dev`: sequential 1 MiB writes then reads over the
/// first `mib` MiB, then single 4 KiB reads at random offsets in it for
/// `seconds`. Prints one line per figure.
fn block_bench(dev: &str, mib: u64, seconds: u64) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::time::{Duration, Instant};
    const CHUNK: usize = 1 << 20;
    const ALIGN: usize = 4096;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)?;
    // O_DIRECT wants an aligned buffer: take an aligned window of a larger one.
    let mut backing = vec![0u8; CHUNK + ALIGN];
    let start = backing.as_ptr().align_offset(ALIGN);
    let buf = &mut backing[start..start + CHUNK];
    moat_tests::stream_check::PatternStream::new(1).fill(buf);
    let total = mib * CHUNK as u64;
    let rate = |secs: f64| total as f64 / secs / CHUNK as f64;

    let began = Instant::now();
    for offset in (0..total).step_by(CHUNK) {
        file.write_all_at(buf, offset)?;
    }
    file.sync_all()?;
    let secs = began.elapsed().as_secs_f64();
    println!(
        "MOAT_GUEST blk seq-write: {:.1} MiB/s ({mib} MiB in {secs:.2} s)",
        rate(secs)
    );

    let began = Instant::now();
    for offset in (0..total).step_by(CHUNK) {
        file.read_exact_at(buf, offset)?;
    }
    let secs = began.elapsed().as_secs_f64();
    println!(
        "MOAT_GUEST blk seq-read: {:.1} MiB/s ({mib} MiB in {secs:.2} s)",
        rate(secs)
    );

    let blocks = total / ALIGN as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut reads = 0u64;
    let began = Instant::now();
    let limit = Duration::from_secs(seconds);
    while began.elapsed() < limit {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        file.read_exact_at(&mut buf[..ALIGN], (state % blocks) * ALIGN as u64)?;
        reads += 1;
    }
    let secs = began.elapsed().as_secs_f64();
    println!(
        "MOAT_GUEST blk rand-read-4k: {:.0} IOPS ({reads} reads in {secs:.2} s)",
        reads as f64 / secs
    );
    Ok(())
}

/// What the guest's kernel says about its devices, after a failed
/// transfer: the virtio lines of /proc/interrupts (how many interrupts each
/// device's IRQ delivered, per CPU) and each interface's counters.
fn print_guest_view() {
    let interrupts = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    for (i, line) in interrupts.lines().enumerate() {
        if i == 0 || line.contains("virtio") {
            println!("MOAT_GUEST view /proc/interrupts: {}", line.trim());
        }
    }
    let Ok(interfaces) = std::fs::read_dir("/sys/class/net") else {
        return;
    };
    for interface in interfaces.flatten() {
        let name = interface.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let counters: Vec<String> = [
            "rx_packets",
            "rx_bytes",
            "rx_dropped",
            "rx_errors",
            "tx_packets",
            "tx_bytes",
            "tx_dropped",
            "tx_errors",
        ]
        .iter()
        .map(|c| {
            let path = interface.path().join("statistics").join(c);
            let value = std::fs::read_to_string(path).unwrap_or_default();
            format!("{c}={}", value.trim())
        })
        .collect();
        println!("MOAT_GUEST view {name}: {}", counters.join(" "));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("MOAT_GUEST guest-tool error: {} {e}", args.join(" "));
            print_guest_view();
            ExitCode::FAILURE
        }
    }
}
