//! The host side of a virtio-net device: a Linux tap interface opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so every frame read or written
//! carries the same 12-byte virtio-net header the guest uses, and segment
//! and checksum offloads pass through untouched.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// The longest interface name Linux accepts (IFNAMSIZ less the NUL).
pub const MAX_TAP_NAME: usize = 15;

// ioctl numbers from <linux/if_tun.h>: _IOW('T', nr, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload flags for `TUNSETOFFLOAD`: what the reader of the tap (the
/// guest) can take.
pub mod offload {
    /// Frames may carry a partial checksum.
    pub const CSUM: u32 = 0x01;
    /// TCP over IPv4 segments up to 64 KiB.
    pub const TSO4: u32 = 0x02;
    /// TCP over IPv6 segments up to 64 KiB.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a `/` or NUL.
    #[error("tap name {0:?} must be 1 to {MAX_TAP_NAME} bytes without '/' or NUL")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun for tap {name:?}: {source} (is the tun module loaded?)")]
    OpenTun {
        /// The tap's name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An ioctl on the tap failed.
    #[error("tap {name:?}: {what} failed: {source}")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// Which operation.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name` (creating it if it does not exist and the
    /// caller may), non-blocking, with 12-byte virtio-net headers.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > MAX_TAP_NAME || name.bytes().any(|b| b == b'/' || b == 0)
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _union_rest: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Self {
            file,
            name: name.to_string(),
        };
        // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req`
        // is (40 bytes, name then flags).
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETIFF, &mut req) };
        tap.check(
            rc,
            "TUNSETIFF (attach; does the tap exist and are we allowed to use it?)",
        )?;
        let header_size: libc::c_int = super::VNET_HDR_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &header_size) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the kernel which offloads (see [`offload`]) frames to the
    /// guest may use.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap's file: each read returns one frame, each write sends one.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a-name-that-is-too-long", "a/b", "nul\0"] {
            let err = Tap::open(bad).unwrap_err();
            assert!(matches!(err, TapError::Name(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
