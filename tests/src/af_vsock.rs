//! AF_VSOCK stream sockets through libc (std has none): what the guest
//! tool uses inside the VM, and what a benchmark uses on the host to reach
//! a guest behind vhost-vsock. Also the host side of moat-vmm's hybrid
//! vsock ([`connect_hybrid`]), which reaches a guest port through the VM's
//! Unix socket. Each socket is wrapped in a `UnixStream`,
//! whose read, write and shutdown work on any stream socket.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// The host's CID as a guest sees it.
pub const HOST_CID: u32 = 2;

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created socket this process owns alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// connect(2) of `fd` to `port` of `cid`.
fn connect_fd(fd: &OwnedFd, cid: u32, port: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let addr = address(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Connects to `port` of `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let fd = socket(0)?;
    connect_fd(&fd, cid, port)?;
    Ok(UnixStream::from(fd))
}

/// Starts a non-blocking connect to `port` of `cid` and returns the
/// socket at once: it polls writable when the connect has ended, and its
/// `SO_ERROR` then says how (0 for connected).
pub fn start_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::SOCK_NONBLOCK)?;
    match connect_fd(&fd, cid, port) {
        Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => Err(e),
        _ => Ok(fd),
    }
}

/// A listening socket on `port` of any local CID.
pub struct Listener(OwnedFd);

impl Listener {
    /// Binds and listens on `port`.
    pub fn bind(port: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = socket(0)?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a bound socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        use std::os::fd::AsRawFd;
        // SAFETY: accept(2) with no peer address wanted.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly accepted socket this process owns alone.
        Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl std::os::fd::AsRawFd for Listener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// Connects to guest `port` through a VM's hybrid vsock socket `uds`,
/// waiting at most 5 s for the VMM's `OK`.
pub fn connect_hybrid(uds: impl AsRef<std::path::Path>, port: u32) -> io::Result<UnixStream> {
    moat_protocol::hybrid_vsock::connect(uds.as_ref(), port, std::time::Duration::from_secs(5))
}
