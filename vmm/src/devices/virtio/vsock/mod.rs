//! virtio-vsock (ID 19) with Firecracker's hybrid host side: the guest
//! speaks AF_VSOCK, the host speaks Unix stream sockets.
//!
//! - Host-initiated: a process connects to the VM's socket at `uds_path`
//!   and sends `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <host port>\n` and the stream is the connection.
//! - Guest-initiated: a guest connection to the host (CID 2), port P, is
//!   forwarded to a Unix socket at `<uds_path>_P`; when nothing listens
//!   there the guest gets a reset.
//!
//! Flow control is vsock's credit scheme: each side announces its buffer
//! space and how much it has consumed, and never sends more than the peer
//! can hold. A guest that ignores the host's credit has that connection
//! reset. The device's worker ([`muxer`]) owns every connection; stopping
//! it closes them all.

pub mod muxer;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::{ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1};

/// The virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// The smallest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
const QUEUE_SIZE: u16 = 256;

/// Errors creating the device's host side.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The vsock device: its guest CID and the host socket it listens on.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    config: [u8; 8],
    worker: Option<super::WorkerThread>,
}

impl Vsock {
    /// A device for guest CID `cid`, listening at `uds_path` (which must not
    /// exist yet; the device removes it when dropped).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            config: cid.to_le_bytes(),
            worker: None,
        })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // rx, tx, event
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [rx, tx, _event] = ctx.take_queues::<3>()?;
        let ActivateContext {
            mem,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let muxer = muxer::Muxer::new(self.cid, self.uds_path.clone(), mem, rx, tx, interrupt);
        self.worker = Some(muxer::spawn_muxer(muxer, listener, queue_events)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}
