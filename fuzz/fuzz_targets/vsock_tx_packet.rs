//! vsock tx packet parsing (header, then a payload scattered over any
//! descriptors) with every byte of guest memory chosen by the fuzzer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::vsock::muxer::{read_tx_packet, MAX_PKT_DATA};
use virtio_queue::QueueT;

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = guest::guest(data);
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        if let Some((_, payload)) = read_tx_packet(&mem, chain) {
            assert!(payload.len() <= MAX_PKT_DATA as usize);
        }
    }
});
