//! virtio-blk request parsing and I/O against a small image, with
//! every byte of guest memory chosen by the fuzzer.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::block::{process_queue, Disk};

#[path = "guest.rs"]
mod guest;

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = guest::guest(data);
    let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
    file.write_all(&[0u8; 8 * 512]).unwrap();
    let readonly = data.first().is_some_and(|b| b & 1 == 1);
    let disk = Disk::new(file, 8 * 512, readonly, "fuzz-disk");
    process_queue(&mem, &mut queue, &disk);
});
