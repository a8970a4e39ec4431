//! virtio-net (network device, ID 1) over a tap interface: one rx and one
//! tx queue, served by one worker thread that also waits on the tap.
//!
//! Frames cross unchanged: the tap is opened with `IFF_VNET_HDR` and a
//! 12-byte header, the same `virtio_net_hdr_v1` the guest reads and
//! writes, so checksum offload and TSO work end to end. The tap is told
//! which offloads the guest accepted (`TUNSETOFFLOAD`) when the driver
//! starts the device.
//!
//! Receive uses mergeable buffers (`VIRTIO_NET_F_MRG_RXBUF`): a frame of up
//! to 64 KiB spreads over as many of the guest's rx buffers as it needs,
//! and the header's `num_buffers` says how many. When the guest has too
//! few buffers the frame waits (and the worker stops reading the tap)
//! until the guest adds more, so nothing the tap delivered is dropped.

pub mod tap;

use crate::seccomp::ThreadKind;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use tap::{Tap, TapError};

use super::{
    add_used_together, read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    WorkerThread, VIRTIO_F_VERSION_1,
};

/// The virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_SIZE: usize = 12;
/// The largest frame with its header: a 64 KiB GSO frame plus the
/// Ethernet header and the virtio-net header (Firecracker's bound).
pub const MAX_FRAME_WITH_HDR: usize = 65562;
const NUM_BUFFERS_OFFSET: usize = 10;
const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2 §5.1.3).
pub mod feature {
    /// The device takes frames with a partial checksum.
    pub const CSUM: u64 = 1 << 0;
    /// The driver takes frames with a partial checksum.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in its configuration space.
    pub const MAC: u64 = 1 << 5;
    /// The driver takes TSO over IPv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TSO over IPv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The driver takes TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// The device takes TSO over IPv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device takes TSO over IPv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// The device takes TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// The driver can merge rx buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
}

/// A MAC address.
pub type MacAddr = [u8; 6];

/// A virtio-net device over a tap.
pub struct Net {
    tap: Arc<Tap>,
    mac: Option<MacAddr>,
    worker: Option<WorkerThread>,
    state: Arc<NetState>,
}

/// What the worker last did, published for the VMM's state report: where
/// the device stands in each ring, whether a frame waits for rx buffers,
/// and counters of notifications and frames.
#[derive(Debug, Default)]
pub struct NetState {
    rx_next_avail: AtomicU16,
    rx_next_used: AtomicU16,
    tx_next_avail: AtomicU16,
    tx_next_used: AtomicU16,
    /// Bytes (header included) of the frame waiting for rx buffers; 0: none.
    rx_waiting: AtomicUsize,
    watching_tap: AtomicBool,
    rx_kicks: AtomicU64,
    tx_kicks: AtomicU64,
    tap_wakeups: AtomicU64,
    frames_to_guest: AtomicU64,
    frames_from_guest: AtomicU64,
    rx_buffer_shortages: AtomicU64,
}

impl NetState {
    fn describe(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "net: rx next avail {} next used {}, tx next avail {} next used {}; \
             frame waiting for rx buffers: {} bytes; watching tap: {}; \
             rx kicks {} tx kicks {} tap wakeups {}; frames to guest {} from guest {}; \
             rx buffer shortages {}",
            self.rx_next_avail.load(Ordering::Relaxed),
            self.rx_next_used.load(Ordering::Relaxed),
            self.tx_next_avail.load(Ordering::Relaxed),
            self.tx_next_used.load(Ordering::Relaxed),
            self.rx_waiting.load(Ordering::Relaxed),
            self.watching_tap.load(Ordering::Relaxed),
            get(&self.rx_kicks),
            get(&self.tx_kicks),
            get(&self.tap_wakeups),
            get(&self.frames_to_guest),
            get(&self.frames_from_guest),
            get(&self.rx_buffer_shortages),
        )
    }
}

impl Net {
    /// A device over `tap`, announcing `mac` to the guest if given (the
    /// guest picks a random one otherwise).
    pub fn new(tap: Tap, mac: Option<MacAddr>) -> Self {
        Self {
            tap: Arc::new(tap),
            mac,
            worker: None,
            state: Arc::default(),
        }
    }
}

/// The tap offloads that match what the driver accepted.
fn tap_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & feature::GUEST_CSUM != 0 {
        flags |= tap::offload::CSUM;
        if acked & feature::GUEST_TSO4 != 0 {
            flags |= tap::offload::TSO4;
        }
        if acked & feature::GUEST_TSO6 != 0 {
            flags |= tap::offload::TSO6;
        }
        if acked & feature::GUEST_ECN != 0 {
            flags |= tap::offload::TSO_ECN;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // rx, tx
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mac = if self.mac.is_some() { feature::MAC } else { 0 };
        VIRTIO_F_VERSION_1
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6
            | feature::GUEST_ECN
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::HOST_ECN
            | feature::MRG_RXBUF
            | mac
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.unwrap_or_default(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [rx, tx] = ctx.take_queues::<2>()?;
        self.tap
            .set_offload(tap_offloads(ctx.acked_features))
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e.to_string())))?;
        let tap = self.tap.file().try_clone().map_err(ActivateError::Worker)?;
        let mergeable = ctx.acked_features & feature::MRG_RXBUF != 0;
        let ActivateContext {
            mem,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let mut port = NetPort::new(mem, rx, tx, interrupt, tap, mergeable);
        port.state = self.state.clone();
        self.worker = Some(spawn_worker(port, queue_events)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }

    fn describe(&self) -> String {
        self.state.describe()
    }
}

/// What one delivery attempt of the waiting rx frame did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// The frame is in guest buffers.
    Delivered,
    /// The guest has too few buffers; the frame waits.
    NoBuffers,
    /// The guest's buffers could not hold it (malformed or, without
    /// mergeable buffers, too small): the frame is dropped.
    Dropped,
}

/// The queues and the tap: everything the worker moves frames between.
pub struct NetPort {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    tap: File,
    mergeable: bool,
    /// The frame read from the tap and not yet delivered (header first).
    rx_frame: Vec<u8>,
    rx_frame_len: usize,
    tx_frame: Vec<u8>,
    state: Arc<NetState>,
}

impl NetPort {
    /// A port over `tap` (any fd that reads and writes whole frames).
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
        tap: File,
        mergeable: bool,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            interrupt,
            tap,
            mergeable,
            rx_frame: vec![0; MAX_FRAME_WITH_HDR],
            rx_frame_len: 0,
            tx_frame: Vec::with_capacity(MAX_FRAME_WITH_HDR),
            state: Arc::default(),
        }
    }

    /// Publishes where the device stands, for the state report.
    fn publish(&self) {
        let s = &self.state;
        s.rx_next_avail
            .store(self.rx.next_avail(), Ordering::Relaxed);
        s.rx_next_used.store(self.rx.next_used(), Ordering::Relaxed);
        s.tx_next_avail
            .store(self.tx.next_avail(), Ordering::Relaxed);
        s.tx_next_used.store(self.tx.next_used(), Ordering::Relaxed);
        s.rx_waiting.store(self.rx_frame_len, Ordering::Relaxed);
    }

    /// Sends every frame the guest queued to the tap; returns whether any
    /// buffer was used.
    pub fn process_tx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            self.tx_frame.clear();
            let frame_ok = Reader::new(&mem, chain).ok().is_some_and(|mut reader| {
                let len = reader.available_bytes();
                (VNET_HDR_SIZE..=MAX_FRAME_WITH_HDR).contains(&len) && {
                    self.tx_frame.resize(len, 0);
                    reader.read_exact(&mut self.tx_frame).is_ok()
                }
            });
            if frame_ok {
                // A tap that cannot take a frame drops it, as a NIC would.
                let _ = self.tap.write(&self.tx_frame);
                self.state.frames_from_guest.fetch_add(1, Ordering::Relaxed);
            }
            let _ = self.tx.add_used(&mem, head, 0);
            used = true;
        }
        if used && self.tx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        self.publish();
        used
    }

    /// Moves frames from the tap into guest rx buffers until the tap is
    /// empty or the guest is out of buffers; returns whether the tap
    /// should be watched (false while a frame waits for buffers).
    pub fn process_rx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        let watch_tap = loop {
            if self.rx_frame_len == 0 {
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n >= VNET_HDR_SIZE => self.rx_frame_len = n,
                    Ok(_) => continue, // runt: nothing to deliver
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // WouldBlock, or a tap that went away: wait for epoll.
                    Err(_) => break true,
                }
            }
            match self.deliver_frame(&mem) {
                Delivery::Delivered | Delivery::Dropped => {
                    self.rx_frame_len = 0;
                    self.state.frames_to_guest.fetch_add(1, Ordering::Relaxed);
                    used = true;
                }
                Delivery::NoBuffers => {
                    self.state
                        .rx_buffer_shortages
                        .fetch_add(1, Ordering::Relaxed);
                    break false;
                }
            }
        };
        if used && self.rx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        self.state.watching_tap.store(watch_tap, Ordering::Relaxed);
        self.publish();
        watch_tap
    }

    /// Copies the waiting frame into as many rx buffers as it needs.
    fn deliver_frame(&mut self, mem: &GuestMemoryMmap) -> Delivery {
        let frame = &mut self.rx_frame[..self.rx_frame_len];
        let mut heads: Vec<(u16, u32)> = Vec::new();
        let mut header_writer = None;
        let mut offset = VNET_HDR_SIZE;
        let mut outcome = Delivery::Delivered;
        while offset < frame.len() || heads.is_empty() {
            if !self.mergeable && !heads.is_empty() {
                outcome = Delivery::Dropped; // does not fit one buffer
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                // Put back what was taken: the guest sees none of it.
                for _ in &heads {
                    self.rx.go_to_previous_position();
                }
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let Ok(mut writer) = Writer::new(mem, chain) else {
                heads.push((head, 0));
                outcome = Delivery::Dropped;
                break;
            };
            let mut written = 0;
            if heads.is_empty() {
                // The header goes in last, once num_buffers is known.
                match writer.split_at(VNET_HDR_SIZE) {
                    Ok(rest) if writer.available_bytes() == VNET_HDR_SIZE => {
                        header_writer = Some(writer);
                        writer = rest;
                        written = VNET_HDR_SIZE;
                    }
                    _ => {
                        heads.push((head, 0));
                        outcome = Delivery::Dropped;
                        break;
                    }
                }
            }
            let n = writer.available_bytes().min(frame.len() - offset);
            if writer.write_all(&frame[offset..offset + n]).is_err() || (n == 0 && written == 0) {
                heads.push((head, 0));
                outcome = Delivery::Dropped;
                break;
            }
            offset += n;
            heads.push((head, (written + n) as u32));
        }
        if outcome == Delivery::Delivered {
            let count = u16::try_from(heads.len()).unwrap_or(u16::MAX);
            frame[NUM_BUFFERS_OFFSET..VNET_HDR_SIZE].copy_from_slice(&count.to_le_bytes());
            let header_ok = header_writer
                .as_mut()
                .is_some_and(|w| w.write_all(&frame[..VNET_HDR_SIZE]).is_ok());
            if !header_ok {
                outcome = Delivery::Dropped;
            }
        }
        if outcome == Delivery::Dropped {
            // The guest gets its buffers back empty; its driver counts an
            // rx error and drops them.
            for (_, len) in &mut heads {
                *len = 0;
            }
        }
        // All of the frame's buffers reach the driver at once; heads that
        // passed pop_descriptor_chain are in range.
        let _ = add_used_together(&mut self.rx, mem, &heads);
        outcome
    }
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;

/// Starts the worker: queue notifications and the tap, until stopped.
pub fn spawn_worker(
    mut port: NetPort,
    queue_events: Vec<EventFd>,
) -> Result<WorkerThread, ActivateError> {
    let [rx_event, tx_event]: [EventFd; 2] =
        queue_events
            .try_into()
            .map_err(|q: Vec<EventFd>| ActivateError::QueueCount {
                expected: 2,
                got: q.len(),
            })?;
    let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
    let epoll = Epoll::new().map_err(ActivateError::Worker)?;
    for (fd, token) in [
        (rx_event.as_raw_fd(), TOKEN_RX),
        (tx_event.as_raw_fd(), TOKEN_TX),
        (port.tap.as_raw_fd(), TOKEN_TAP),
        (kill.as_raw_fd(), TOKEN_KILL),
    ] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(ActivateError::Worker)?;
    }
    WorkerThread::spawn(ThreadKind::Net, "moat_virtio_net".into(), kill, move || {
        let mut events = [EpollEvent::default(); 4];
        let mut watching_tap = true;
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let mut rx_work = false;
            for event in &events[..n] {
                match event.data() {
                    TOKEN_KILL => return,
                    TOKEN_TX => {
                        let _ = tx_event.read();
                        port.state.tx_kicks.fetch_add(1, Ordering::Relaxed);
                        port.process_tx();
                    }
                    TOKEN_RX => {
                        let _ = rx_event.read();
                        port.state.rx_kicks.fetch_add(1, Ordering::Relaxed);
                        rx_work = true;
                    }
                    _ => {
                        port.state.tap_wakeups.fetch_add(1, Ordering::Relaxed);
                        rx_work = true
                    }
                }
            }
            if rx_work {
                let watch = port.process_rx();
                if watch != watching_tap {
                    // A level-triggered tap with no guest buffers would
                    // wake us forever; ignore it until buffers arrive.
                    let set = if watch {
                        EventSet::IN
                    } else {
                        EventSet::empty()
                    };
                    let _ = epoll.ctl(
                        ControlOperation::Modify,
                        port.tap.as_raw_fd(),
                        EpollEvent::new(set, TOKEN_TAP),
                    );
                    watching_tap = watch;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 0x100_0000;
    const BUFS: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A port whose "tap" is one end of a datagram socket pair, which
    /// keeps frame boundaries as a tap does; the other end is returned.
    fn port<'a>(
        mem: &'a GuestMemoryMmap,
        mergeable: bool,
    ) -> (
        NetPort,
        MockSplitQueue<'a, GuestMemoryMmap>,
        MockSplitQueue<'a, GuestMemoryMmap>,
        UnixDatagram,
    ) {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let port = NetPort::new(
            mem.clone(),
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            irq,
            File::from(OwnedFd::from(ours)),
            mergeable,
        );
        (port, rx, tx, theirs)
    }

    /// Adds one chain of `(addr, len, flags)` descriptors at table index
    /// `at`, linking them with NEXT; returns the index after it.
    fn add_chain(
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        parts: &[(u64, u32, u32)],
        at: u16,
    ) -> u16 {
        let last = parts.len() - 1;
        let descs: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i < last { VRING_DESC_F_NEXT } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    (flags | next) as u16,
                    at + i as u16 + 1,
                ))
            })
            .collect();
        q.add_desc_chains(&descs, at).unwrap();
        at + parts.len() as u16
    }

    /// Offers `count` single-descriptor rx buffers of `size` bytes from
    /// table index `at`; returns the index after them.
    fn offer_rx(rx: &MockSplitQueue<'_, GuestMemoryMmap>, count: u16, size: u32, at: u16) -> u16 {
        (0..count).fold(at, |at, _| {
            let addr = BUFS + u64::from(at) * 0x1_0000;
            add_chain(rx, &[(addr, size, VRING_DESC_F_WRITE)], at)
        })
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        for (i, b) in f.iter_mut().enumerate().skip(VNET_HDR_SIZE) {
            *b = (i % 251) as u8;
        }
        f
    }

    fn used(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let ring = q.used();
        (0..ring.idx().load())
            .map(|i| {
                let e = ring.ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    #[test]
    fn a_large_frame_spreads_over_mergeable_buffers() {
        let mem = memory();
        let (mut port, rx, _tx, host) = port(&mem, true);
        offer_rx(&rx, 4, 1526, 0);
        let sent = frame(4000);
        host.send(&sent).unwrap();
        assert!(port.process_rx(), "tap drained: keep watching it");
        let used = used(&rx);
        assert_eq!(used.len(), 3, "{used:?}");
        assert_eq!(
            used.iter().map(|u| u.1).sum::<u32>(),
            4000,
            "every byte lands once"
        );
        let mut got = Vec::new();
        for (i, (_, len)) in used.iter().enumerate() {
            let mut buf = vec![0u8; *len as usize];
            mem.read_slice(&mut buf, GuestAddress(BUFS + i as u64 * 0x1_0000))
                .unwrap();
            got.extend(buf);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[VNET_HDR_SIZE..], sent[VNET_HDR_SIZE..]);
    }

    #[test]
    fn a_frame_waits_for_buffers_and_is_then_delivered() {
        let mem = memory();
        let (mut port, rx, _tx, host) = port(&mem, true);
        let at = offer_rx(&rx, 1, 1526, 0);
        host.send(&frame(3000)).unwrap();
        assert!(
            !port.process_rx(),
            "stop watching the tap until buffers come"
        );
        assert!(used(&rx).is_empty(), "nothing half-delivered");
        offer_rx(&rx, 2, 1526, at);
        assert!(port.process_rx());
        let used = used(&rx);
        assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), 3000, "{used:?}");
    }

    #[test]
    fn without_mergeable_buffers_an_oversized_frame_is_dropped_not_split() {
        let mem = memory();
        let (mut port, rx, _tx, host) = port(&mem, false);
        offer_rx(&rx, 2, 1526, 0);
        host.send(&frame(3000)).unwrap();
        host.send(&frame(100)).unwrap();
        assert!(port.process_rx());
        let used = used(&rx);
        assert_eq!(used, vec![(0, 0), (1, 100)], "dropped, then delivered");
    }

    #[test]
    fn malformed_rx_buffers_are_returned_empty() {
        let mem = memory();
        let (mut port, rx, _tx, host) = port(&mem, true);
        // Read-only, past the end of memory, and shorter than a header.
        let at = add_chain(&rx, &[(BUFS, 1526, 0)], 0);
        let at = add_chain(&rx, &[(MEM_SIZE as u64 - 8, 1526, VRING_DESC_F_WRITE)], at);
        add_chain(&rx, &[(BUFS, 4, VRING_DESC_F_WRITE)], at);
        for _ in 0..3 {
            host.send(&frame(200)).unwrap();
        }
        port.process_rx();
        let used = used(&rx);
        assert_eq!(used.len(), 3);
        assert!(used.iter().all(|u| u.1 == 0), "{used:?}");
    }

    #[test]
    fn tx_frames_reach_the_tap_and_bad_chains_do_not() {
        let mem = memory();
        let (mut port, _rx, tx, host) = port(&mem, true);
        let sent = frame(1000);
        mem.write_slice(&sent[..500], GuestAddress(BUFS)).unwrap();
        mem.write_slice(&sent[500..], GuestAddress(BUFS + 0x1_0000))
            .unwrap();
        let at = add_chain(&tx, &[(BUFS, 500, 0), (BUFS + 0x1_0000, 500, 0)], 0);
        // Device-writable, too short for a header, and oversized.
        let at = add_chain(&tx, &[(BUFS, 100, VRING_DESC_F_WRITE)], at);
        let at = add_chain(&tx, &[(BUFS, 4, 0)], at);
        add_chain(&tx, &[(BUFS, MAX_FRAME_WITH_HDR as u32 + 1, 0)], at);
        assert!(port.process_tx());
        host.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 70000];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &sent[..]);
        assert!(host.recv(&mut buf).is_err(), "only the good frame is sent");
        assert_eq!(port.tx.next_used(), 4, "every chain is returned");
    }

    #[test]
    fn descriptor_loops_end_within_the_queue_size() {
        let mem = memory();
        let (mut port, rx, tx, host) = port(&mem, true);
        // Each chain's only descriptor names itself as next: virtio-queue
        // stops following it after queue-size (64) hops, so the chain is
        // at most 64 aliases of the same 64 guest bytes.
        let looped = |flags: u32| {
            RawDescriptor::from(SplitDescriptor::new(
                BUFS,
                64,
                (flags | VRING_DESC_F_NEXT) as u16,
                0,
            ))
        };
        rx.add_desc_chains(&[looped(VRING_DESC_F_WRITE)], 0)
            .unwrap();
        tx.add_desc_chains(&[looped(0)], 0).unwrap();
        host.send(&frame(1000)).unwrap();
        port.process_rx();
        assert!(port.process_tx());
        let rx_used = used(&rx);
        assert_eq!(rx_used.len(), 1);
        assert!(rx_used[0].1 <= 64 * 64, "{rx_used:?}");
        assert_eq!(used(&tx), vec![(0, 0)], "tx chain returned");
        host.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 8192];
        let sent = host.recv(&mut buf).unwrap_or(0);
        assert!(sent <= 64 * 64, "at most the aliased bytes: {sent}");
    }

    #[test]
    fn offloads_follow_the_accepted_features() {
        use feature::*;
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(GUEST_TSO4), 0, "TSO needs checksum offload");
        assert_eq!(
            tap_offloads(GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN),
            tap::offload::CSUM | tap::offload::TSO4 | tap::offload::TSO6 | tap::offload::TSO_ECN
        );
    }
}
