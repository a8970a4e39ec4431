//! virtio-net rx delivery (a frame spread over mergeable or single rx
//! buffers) and tx frame gathering, with every byte of guest memory, both
//! queues and the frame's length chosen by the fuzzer.
#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::net::{NetPort, MAX_FRAME_WITH_HDR};
use moat_vmm::devices::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    // The tx queue is guest.rs's; the rx queue sits above it.
    let (mem, tx) = guest::guest(data);
    let mut rx = Queue::new(16).unwrap();
    rx.set_desc_table_address(Some(0x4000), Some(0));
    rx.set_avail_ring_address(Some(0x5000), Some(0));
    rx.set_used_ring_address(Some(0x6000), Some(0));
    rx.set_ready(true);
    let (ours, host) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mergeable = data.first().is_some_and(|b| b & 1 == 1);
    let frame_len = data
        .get(1..3)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        .min(MAX_FRAME_WITH_HDR);
    host.send(&data.iter().copied().cycle().take(frame_len).collect::<Vec<u8>>())
        .unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut port = NetPort::new(mem, rx, tx, irq, File::from(OwnedFd::from(ours)), mergeable);
    port.process_rx();
    port.process_rx();
    port.process_tx();
});
