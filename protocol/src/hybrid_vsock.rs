//! The host side of moat-vmm's hybrid vsock: a guest port reached through
//! the VM's Unix socket (`CONNECT <port>\n`, answered `OK <host port>\n`),
//! the way Firecracker and Cloud Hypervisor expose vsock. The shim reaches
//! the agent this way.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The longest reply line the VMM sends (`OK ` and a port number).
const MAX_REPLY: usize = 64;

/// Connects to the Unix socket at `uds` only if `uds` itself is a socket,
/// never through a symlink there: the socket's directory belongs to the
/// jailed VMM's user, and a hostile VMM could otherwise point the shim
/// (root) at another pod's socket. The socket is opened `O_PATH |
/// O_NOFOLLOW` and connected through `/proc/self/fd`.
pub fn connect_no_follow(uds: &Path) -> io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(uds)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: not a socket ({}), not connecting",
                uds.display(),
                if kind.is_symlink() {
                    "a symlink"
                } else {
                    "another file type"
                }
            ),
        ));
    }
    UnixStream::connect(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Connects to guest `port` through the VM's hybrid vsock socket `uds`:
/// writes `CONNECT <port>`, then reads `OK <host port>`, waiting at most
/// `reply_timeout` for it. The returned stream is blocking, with no read
/// timeout.
pub fn connect(uds: &Path, port: u32, reply_timeout: Duration) -> io::Result<UnixStream> {
    let mut stream = connect_no_follow(uds)?;
    stream.set_read_timeout(Some(reply_timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{}: closed before OK (nothing listens on guest port {port}?)",
                    uds.display()
                ),
            ));
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: reply longer than {MAX_REPLY} bytes", uds.display()),
            ));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: unexpected reply {:?}",
                uds.display(),
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_socket_is_reached_and_a_symlink_to_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("moat-hv-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("real.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let stream = connect_no_follow(&socket).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        drop((stream, accepted));
        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        let err = connect_no_follow(&link).unwrap_err().to_string();
        let file = dir.join("file");
        std::fs::write(&file, b"").unwrap();
        let err_file = connect_no_follow(&file).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("a symlink") && err.contains("link.sock"),
            "{err}"
        );
        assert!(err_file.contains("not a socket"), "{err_file}");
    }
}
