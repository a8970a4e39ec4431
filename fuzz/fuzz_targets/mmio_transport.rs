//! The virtio-mmio register file driven by a fuzzer-chosen sequence of
//! reads and writes (offset, width, value), with an rng device or a
//! virtio-fs device behind it (the first byte chooses). The virtio-fs
//! device talks to a minimal vhost-user peer; guest memory here is
//! private, so once the driver activates it the device serves the
//! fuzz-made queues itself, answering each FUSE request with EIO.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::fs::peer::VhostUserPeer;
use moat_vmm::devices::virtio::fs::Fs;
use moat_vmm::devices::virtio::mmio::MmioTransport;
use moat_vmm::devices::virtio::rng::Rng;
use moat_vmm::devices::virtio::{Interrupt, VirtioDevice};
use moat_vmm::devices::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "guest.rs"]
mod guest;

fn peer() -> &'static VhostUserPeer {
    static PEER: OnceLock<VhostUserPeer> = OnceLock::new();
    PEER.get_or_init(|| VhostUserPeer::start("fuzz", 2).expect("peer socket"))
}

fuzz_target!(|data: &[u8]| {
    let (mem, _) = guest::guest(data);
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let uses_peer = data.first().is_some_and(|b| b & 1 == 1);
    let device: Box<dyn VirtioDevice> = if uses_peer {
        Box::new(Fs::connect(&peer().share("fuzz")).expect("the peer answers"))
    } else {
        Box::new(Rng::new())
    };
    let mut transport = MmioTransport::new(device, mem, irq).unwrap();
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from(op[2] & 3)];
        let value = [op[3], op[4], op[5], op[6], op[7], 0, 0, 0];
        if op[2] & 4 == 0 {
            transport.write(offset, &value[..width]);
        } else {
            let mut out = [0u8; 8];
            transport.read(offset, &mut out[..width]);
        }
    }
    transport.shutdown();
    drop(transport);
    if uses_peer {
        // The peer's thread for this input's connection ends now that the
        // device closed it; an input leaves no thread behind.
        peer().join_closed();
    }
});
