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

/// Connects to guest `port` through the VM's hybrid vsock socket `uds`:
/// writes `CONNECT <port>`, then reads `OK <host port>`, waiting at most
/// `reply_timeout` for it. The returned stream is blocking, with no read
/// timeout.
pub fn connect(uds: &Path, port: u32, reply_timeout: Duration) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
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
