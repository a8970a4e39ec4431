//! virtio devices over the virtio-mmio transport (version 2, modern only).
//!
//! The transport ([`mmio`]) owns the register file, feature negotiation and
//! queue set-up; a device owns its configuration space and, once the driver
//! is ready, a worker thread that serves its queues. Queue notifications
//! arrive on ioeventfds and interrupts leave through an irqfd, so the fast
//! path never exits to the VMM's vCPU threads.
//!
//! Everything in a queue comes from the guest: devices validate every
//! descriptor against guest memory and answer a bad request with an error
//! status or by dropping it, never with a panic.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use crate::seccomp::ThreadKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VIRTIO_F_VERSION_1`: the device is modern (virtio 1.x). Every moat
/// device offers it and requires the driver to accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits the driver writes (virtio 1.x §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration space changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the status the driver reads and acknowledges, and
/// the irqfd that injects its IRQ.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    /// Bits that read as set whatever the driver acknowledges: a vhost-user
    /// backend writes the irqfd itself, so nothing in the VMM can set the
    /// used-ring bit as its interrupts arrive.
    sticky: AtomicU32,
    irqfd: EventFd,
    /// How many times the device raised the IRQ, for state reports.
    raised: AtomicU64,
}

impl Interrupt {
    /// An interrupt that fires through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            sticky: AtomicU32::new(0),
            irqfd,
            raised: AtomicU64::new(0),
        }
    }

    /// The eventfd KVM injects the IRQ from.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INT_VRING);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        // An eventfd counter only fails to add at u64::MAX - 1, which the
        // in-kernel reader never lets it reach.
        let _ = self.irqfd.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst) | self.sticky.load(Ordering::SeqCst)
    }

    /// Makes `bits` read as set until changed again (0 clears them), for
    /// devices whose backend raises the irqfd directly.
    pub fn set_sticky(&self, bits: u32) {
        self.sticky.store(bits, Ordering::SeqCst);
    }

    /// How many times the IRQ was raised since the VM started.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// The driver acknowledges the bits in `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.sticky.store(0, Ordering::SeqCst);
    }
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device was handed the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device serves.
        expected: usize,
        /// What the transport passed.
        got: usize,
    },
    /// The worker could not be set up or started.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and validated by the transport.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

impl ActivateContext {
    /// The queues as the `N` a device serves, or an error naming the count.
    pub fn take_queues<const N: usize>(&mut self) -> Result<[Queue; N], ActivateError> {
        std::mem::take(&mut self.queues)
            .try_into()
            .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                expected: N,
                got: q.len(),
            })
    }
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 for entropy, 2 for block, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`; bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; ignored by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them (driver reset).
    fn reset(&mut self);
    /// The device's own state beyond its rings (pending work, counters),
    /// one line, for the VMM's state report; empty by default.
    fn describe(&self) -> String {
        String::new()
    }
    /// The VMM is stopping: tell whatever serves the device (a vhost-user
    /// backend) and stop. By default the same as a driver reset.
    fn shutdown(&mut self) {
        self.reset();
    }
}

/// Serves every available chain of `queue` with `handle`, which returns the
/// bytes it wrote to the guest; returns whether any chain was used.
pub fn drain_queue<F>(mem: &GuestMemoryMmap, queue: &mut Queue, mut handle: F) -> bool
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = handle(chain);
        // A head index that passed pop_descriptor_chain is in range.
        let _ = queue.add_used(mem, head, len);
        used = true;
    }
    used
}

/// Why chains could not be returned to the driver.
#[derive(Debug, thiserror::Error)]
pub enum UsedRingError {
    /// A head index is not below the queue size.
    #[error("head index {head} is out of range for a queue of {size}")]
    HeadOutOfRange {
        /// The head index.
        head: u16,
        /// The queue's size.
        size: u16,
    },
    /// The used ring lies outside guest memory.
    #[error("the used ring at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
}

/// Returns the chains `heads` (head index, bytes written) to the driver
/// all at once: their used elements are written first and the used index
/// is published once, after them. The buffers of one mergeable frame
/// must arrive together: a driver polling the ring that saw the index
/// move past the first buffer only would find the others missing and
/// drop the frame (Linux counts an rx length error). `add_used` publishes
/// the index after every element, so it cannot do this.
pub fn add_used_together(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    heads: &[(u16, u32)],
) -> Result<(), UsedRingError> {
    let size = queue.size();
    if let Some(&(head, _)) = heads.iter().find(|(head, _)| *head >= size) {
        return Err(UsedRingError::HeadOutOfRange { head, size });
    }
    let used = GuestAddress(queue.used_ring());
    let outside = || UsedRingError::OutsideMemory(used.0);
    let mut next = queue.next_used();
    for &(head, len) in heads {
        // struct virtq_used_elem { le32 id; le32 len; } after flags and idx.
        let element = used
            .0
            .checked_add(4 + u64::from(next % size) * 8)
            .ok_or_else(outside)?;
        let bytes = (u64::from(len) << 32 | u64::from(head)).to_le();
        mem.write_obj(bytes, GuestAddress(element))
            .map_err(|_| outside())?;
        next = next.wrapping_add(1);
    }
    let index = used.0.checked_add(2).ok_or_else(outside)?;
    // Release: the elements are visible before the index that covers them.
    mem.store(u16::to_le(next), GuestAddress(index), Ordering::Release)
        .map_err(|_| outside())?;
    queue.set_next_used(next);
    Ok(())
}

/// A worker's turn on its queue: `drain` it, then interrupt the driver if
/// anything was used and the driver asked to be told.
pub fn serve_and_notify(
    mem: &GuestMemoryMmap,
    queue: &std::sync::Mutex<Queue>,
    interrupt: &Interrupt,
    drain: impl FnOnce(&mut Queue) -> bool,
) {
    let mut queue = queue.lock().unwrap_or_else(|p| p.into_inner());
    if drain(&mut queue) && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

/// Copies `config[offset..]` into `data`, zero past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A device's thread, which returns once its kill eventfd is readable;
/// stopping (or dropping) it writes that eventfd and joins the thread.
pub struct WorkerThread {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts `body` on a thread named `name` under `kind`'s seccomp
    /// filter (see [`crate::threads::spawn`]); `body` must watch `kill`.
    pub fn spawn(
        kind: ThreadKind,
        name: String,
        kill: EventFd,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<Self, ActivateError> {
        let thread = crate::threads::spawn(kind, name, body).map_err(ActivateError::Worker)?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a worker named `name` that waits on the queue eventfds and calls
/// `handler` with the index of each queue that was notified, until stopped.
pub fn serve_queues<F>(
    name: String,
    queue_events: Vec<EventFd>,
    mut handler: F,
) -> Result<WorkerThread, ActivateError>
where
    F: FnMut(usize) + Send + 'static,
{
    {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let kill_token = queue_events.len() as u64;
        for (index, evt) in queue_events.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, index as u64),
                )
                .map_err(ActivateError::Worker)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, kill_token),
            )
            .map_err(ActivateError::Worker)?;
        WorkerThread::spawn(ThreadKind::QueueWorker, name, kill, move || {
            {
                let mut events = vec![EpollEvent::default(); queue_events.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for event in &events[..n] {
                        let token = event.data();
                        if token == kill_token {
                            return;
                        }
                        let index = token as usize;
                        if let Some(evt) = queue_events.get(index) {
                            // Drain the counter; the queue holds the real state.
                            let _ = evt.read();
                            handler(index);
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xaau8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn used_elements_are_published_together_and_wrap_around_the_ring() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(4).unwrap();
        queue.set_used_ring_address(Some(0x2000), None);
        queue.set_next_used(3);
        add_used_together(&mut queue, &mem, &[(2, 100), (0, 200), (1, 0)]).unwrap();
        let elem = |slot: u64| {
            mem.read_obj::<u64>(GuestAddress(0x2004 + slot * 8))
                .unwrap()
        };
        assert_eq!(elem(3), (100 << 32) | 2, "slot 3: head 2, 100 bytes");
        assert_eq!(elem(0), 200 << 32, "wrapped to slot 0: head 0, 200 bytes");
        assert_eq!(elem(1), 1, "slot 1: head 1, 0 bytes");
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 6);
        assert_eq!(queue.next_used(), 6);
        let err = add_used_together(&mut queue, &mem, &[(1, 1), (4, 1)]).unwrap_err();
        assert!(matches!(
            err,
            UsedRingError::HeadOutOfRange { head: 4, size: 4 }
        ));
        assert_eq!(queue.next_used(), 6, "nothing published on error");
    }

    #[test]
    fn interrupt_status_is_set_and_acknowledged() {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.signal_used_queue();
        assert_eq!(irq.status(), INT_VRING);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        irq.ack(INT_VRING);
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn worker_calls_the_handler_per_notified_queue_and_stops() {
        let events: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let triggers: Vec<EventFd> = events.iter().map(|e| e.try_clone().unwrap()).collect();
        let mut worker =
            serve_queues("test_worker".into(), events, move |q| tx.send(q).unwrap()).unwrap();
        triggers[1].write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            1
        );
        triggers[0].write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            0
        );
        worker.stop();
    }
}
