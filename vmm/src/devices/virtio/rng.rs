//! virtio-rng (entropy device, ID 4): one queue of device-writable buffers
//! that the device fills from the host's `getrandom`.

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    drain_queue, serve_and_notify, serve_queues, ActivateContext, ActivateError, Interrupt,
    VirtioDevice, WorkerThread, VIRTIO_F_VERSION_1,
};

/// The virtio device ID of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request: a guest asking for more gets this much,
/// so one request cannot make the device allocate without bound.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<WorkerThread>,
}

impl Rng {
    /// An entropy device, not yet activated.
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

/// Serves every available request on `queue`; returns whether any was
/// completed (and so whether the driver may need an interrupt).
pub fn process_queue(mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
    let mut buf = Vec::new();
    drain_queue(mem, queue, |chain| {
        let mut written: u32 = 0;
        for desc in chain {
            // Device-readable buffers have no place in an entropy request.
            if !desc.is_write_only() {
                continue;
            }
            let len = desc.len().min(MAX_REQUEST_BYTES - written);
            if len == 0 {
                break;
            }
            buf.resize(len as usize, 0);
            if !fill_random(&mut buf) || mem.write_slice(&buf, desc.addr()).is_err() {
                break;
            }
            written += len;
        }
        written
    })
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [queue] = ctx.take_queues::<1>()?;
        let ActivateContext {
            mem,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let queue = Arc::new(Mutex::new(queue));
        let serve = move |_: usize| serve_queue(&mem, &queue, &interrupt);
        self.worker = Some(serve_queues("moat_virtio_rng".into(), queue_events, serve)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

fn serve_queue(mem: &GuestMemoryMmap, queue: &Mutex<Queue>, interrupt: &Interrupt) {
    serve_and_notify(mem, queue, interrupt, |q| process_queue(mem, q));
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const MEM_SIZE: usize = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn used_len(vq: &MockSplitQueue<GuestMemoryMmap>, slot: u16) -> u32 {
        vq.used().ring().ref_at(slot as usize).unwrap().load().len()
    }

    #[test]
    fn writable_buffer_is_filled_with_random_bytes() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8_0000, 4096, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(process_queue(&mem, &mut q));
        assert_eq!(used_len(&vq, 0), 4096);
        let mut data = vec![0u8; 4096];
        mem.read_slice(&mut data, GuestAddress(0x8_0000)).unwrap();
        assert!(
            data.iter().filter(|b| **b != 0).count() > 3000,
            "looks random"
        );
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x8_0000, 64, 0, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(process_queue(&mem, &mut q));
        assert_eq!(used_len(&vq, 0), 0);
        let mut data = [1u8; 64];
        mem.read_slice(&mut data, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(data, [0u8; 64], "guest memory untouched");
    }

    #[test]
    fn oversized_request_is_capped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(0x1_0000, 0x8_0000, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(process_queue(&mem, &mut q));
        assert_eq!(used_len(&vq, 0), MAX_REQUEST_BYTES);
    }

    #[test]
    fn buffer_past_guest_memory_is_not_written() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(MEM_SIZE as u64 - 16, 64, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        process_queue(&mem, &mut q);
        assert_eq!(used_len(&vq, 0), 0);
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&[desc(u64::MAX - 8, 64, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        process_queue(&mem, &mut q);
        assert_eq!(used_len(&vq, 0), 0);
    }

    #[test]
    fn descriptor_loop_ends() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // Two descriptors that point at each other.
        vq.add_desc_chains(
            &[
                desc(0x8_0000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x9_0000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        process_queue(&mem, &mut q);
        assert!(used_len(&vq, 0) <= 16 * 16, "bounded by the queue size");
    }
}
