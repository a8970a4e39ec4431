//! vsock-guest: the guest half of moat's vsock tests, a static binary in
//! the test initramfs. It speaks AF_VSOCK and reports on the console in
//! `MOAT_GUEST <what>: <value>` lines.
//!
//!   vsock-guest echo-server PORT            echo every connection, forever
//!   vsock-guest sink PORT                   read one connection to its end
//!   vsock-guest send PORT BYTES SEED        send a pattern to the host
//!   vsock-guest echo-clients PORT N BYTES   N concurrent echo round trips
//!   vsock-guest refused PORT                connect where nothing listens

use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use moat_tests::stream_check::{concurrent_echo_clients, echo, receive_all, send_pattern};

const HOST_CID: u32 = 2;

fn vsock_socket() -> io::Result<i32> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A stream socket fd, used through UnixStream's generic read/write/shutdown.
fn stream(fd: i32) -> UnixStream {
    // SAFETY: fd is a freshly created socket this process owns alone.
    unsafe { UnixStream::from_raw_fd(fd) }
}

fn connect(port: u32) -> io::Result<UnixStream> {
    let fd = vsock_socket()?;
    let addr = address(HOST_CID, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) };
    let sock = stream(fd);
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn listen(port: u32) -> io::Result<i32> {
    let fd = vsock_socket()?;
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), ADDR_LEN) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a bound socket.
    if unsafe { libc::listen(fd, 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn accept(listener: i32) -> io::Result<UnixStream> {
    // SAFETY: accept(2) with no peer address wanted.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream(fd))
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}"))
}

fn run(args: &[String]) -> Result<(), String> {
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let port: u32 = arg(args, 1, "PORT")?;
    let io_err = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| format!("{what}: {e}")
    };
    match cmd {
        "echo-server" => {
            let listener = listen(port).map_err(io_err("listen"))?;
            println!("MOAT_GUEST vsock echo server: listening on {port}");
            loop {
                let mut conn = accept(listener).map_err(io_err("accept"))?;
                std::thread::spawn(move || {
                    let _ = echo(&mut conn);
                });
            }
        }
        "sink" => {
            let listener = listen(port).map_err(io_err("listen"))?;
            let mut conn = accept(listener).map_err(io_err("accept"))?;
            let (n, hash) = receive_all(&mut conn).map_err(io_err("receive"))?;
            println!("MOAT_GUEST vsock sink: {n} bytes sha256 {hash}");
        }
        "send" => {
            let bytes: u64 = arg(args, 2, "BYTES")?;
            let seed: u64 = arg(args, 3, "SEED")?;
            let mut conn = connect(port).map_err(io_err("connect"))?;
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("MOAT_GUEST vsock error: {} {e}", args.join(" "));
            ExitCode::FAILURE
        }
    }
}
