//! host-tool: the host half of moat's vsock tests, talking to a VM's
//! hybrid vsock socket the way the shim will.
//!
//!   host-tool echo-clients UDS PORT N BYTES   N concurrent echo round trips
//!   host-tool send UDS PORT BYTES SEED         send a pattern to the guest
//!   host-tool sink PATH                        one guest connection to its end
//!   host-tool echo-server PATH                 echo guest connections, forever
//!   host-tool idle-listener PATH               listen, never accept, forever
//!   host-tool tcp-send ADDR:PORT BYTES SEED     send a pattern over TCP
//!   host-tool tcp-sink ADDR:PORT                one TCP connection to its end

use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use moat_tests::stream_check::{
    concurrent_echo_clients, echo, receive_all, send_pattern, BoundedSocket, HOST_STALL_TIMEOUT,
};

/// How long to keep retrying while the guest is not listening yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(120);

fn connect(uds: &str, port: u32) -> io::Result<UnixStream> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match moat_tests::af_vsock::connect_hybrid(uds, port) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A transfer that makes no progress for [`HOST_STALL_TIMEOUT`] fails
/// with a report of how far it got, instead of waiting forever.
fn bound(conn: &impl BoundedSocket) -> Result<(), String> {
    conn.bound(HOST_STALL_TIMEOUT)
        .map_err(|e| format!("socket timeouts: {e}"))
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let report = |what: &str, n: u64, hash: &str, start: Instant| {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "host {what}: {n} bytes sha256 {hash} in {secs:.2} s ({:.1} MiB/s)",
            n as f64 / secs / 1048576.0
        );
    };
    match cmd {
        "tcp-send" => {
            let addr: std::net::SocketAddr = arg(args, 1, "ADDR:PORT")?;
            let bytes: u64 = arg(args, 2, "BYTES")?;
            let seed: u64 = arg(args, 3, "SEED")?;
            let deadline = Instant::now() + CONNECT_PATIENCE;
            let mut conn = loop {
                match std::net::TcpStream::connect(addr) {
                    Ok(conn) => break conn,
                    Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            bound(&conn)?;
            let start = Instant::now();
            let hash = send_pattern(&mut conn, seed, bytes).map_err(|e| format!("send: {e}"))?;
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            let mut rest = Vec::new();
            let _ = conn.read_to_end(&mut rest);
            report("tcp send", bytes, &hash, start);
            return Ok(());
        }
        "tcp-sink" => {
            let addr: std::net::SocketAddr = arg(args, 1, "ADDR:PORT")?;
            let listener =
                std::net::TcpListener::bind(addr).map_err(|e| format!("listen {addr}: {e}"))?;
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            bound(&conn)?;
            let start = Instant::now();
            let (n, hash) = receive_all(&mut conn).map_err(|e| format!("receive: {e}"))?;
            report("tcp sink", n, &hash, start);
            return Ok(());
        }
        _ => {}
    }
    let path: String = arg(args, 1, "socket path")?;
    match cmd {
        "echo-clients" => {
            let port: u32 = arg(args, 2, "PORT")?;
            let count: u64 = arg(args, 3, "N")?;
            let bytes: u64 = arg(args, 4, "BYTES")?;
            // The first connection waits for the guest's server to come up.
            drop(connect(&path, port).map_err(|e| format!("first connect: {e}"))?);
            concurrent_echo_clients(count, 2000, bytes, move |_| connect(&path, port))?;
            println!("host echo clients: {count} ok");
        }
        "send" => {
            let port: u32 = arg(args, 2, "PORT")?;
            let bytes: u64 = arg(args, 3, "BYTES")?;
            let seed: u64 = arg(args, 4, "SEED")?;
            let mut conn = connect(&path, port).map_err(|e| format!("connect: {e}"))?;
            bound(&conn)?;
            let start = Instant::now();
            let hash = send_pattern(&mut conn, seed, bytes).map_err(|e| format!("send: {e}"))?;
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "host send: {bytes} bytes sha256 {hash} in {secs:.2} s ({:.1} MiB/s)",
                bytes as f64 / secs / 1048576.0
            );
        }
        "sink" => {
            let listener = UnixListener::bind(&path).map_err(|e| format!("listen {path}: {e}"))?;
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            bound(&conn)?;
            let start = Instant::now();
            let (n, hash) = receive_all(&mut conn).map_err(|e| format!("receive: {e}"))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "host sink: {n} bytes sha256 {hash} in {secs:.2} s ({:.1} MiB/s)",
                n as f64 / secs / 1048576.0
            );
        }
        "echo-server" => {
            let listener = UnixListener::bind(&path).map_err(|e| format!("listen {path}: {e}"))?;
            for conn in listener.incoming() {
                let mut conn = conn.map_err(|e| e.to_string())?;
                std::thread::spawn(move || {
                    let _ = echo(&mut conn);
                });
            }
        }
        "idle-listener" => {
            // Connections queue in the backlog and are never accepted or
            // read: the far end of a hostile guest's connect flood.
            let listener = UnixListener::bind(&path).map_err(|e| format!("listen {path}: {e}"))?;
            use std::os::fd::AsRawFd;
            // SAFETY: listen(2) again on a listening socket only resizes
            // its backlog.
            if unsafe { libc::listen(listener.as_raw_fd(), 4096) } < 0 {
                return Err(format!("listen {path}: {}", io::Error::last_os_error()));
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => return Err(format!("unknown command {cmd:?}")),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host-tool {}: {e}", args.join(" "));
            ExitCode::FAILURE
        }
    }
}
