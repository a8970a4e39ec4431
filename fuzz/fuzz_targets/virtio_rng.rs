//! virtio-rng request handling with every byte of guest memory chosen by
//! the fuzzer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::rng::process_queue;

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = guest::guest(data);
    process_queue(&mem, &mut queue);
});
