//! A guest made of fuzz input: its memory holds the input, and a split
//! queue of 16 entries lives at fixed addresses in it, so descriptors,
//! rings and indices are all attacker-chosen.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size: 64 KiB, so that many addresses fall outside it.
pub const MEM_SIZE: usize = 0x1_0000;

/// Guest memory filled with `data` (repeated), and a ready queue over it.
pub fn guest(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    if !data.is_empty() {
        let mut fill = Vec::with_capacity(MEM_SIZE);
        while fill.len() < MEM_SIZE {
            fill.extend_from_slice(data);
        }
        fill.truncate(MEM_SIZE);
        mem.write_slice(&fill, GuestAddress(0)).unwrap();
    }
    let mut queue = Queue::new(16).unwrap();
    queue.set_desc_table_address(Some(0x0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_ready(true);
    (mem, queue)
}
