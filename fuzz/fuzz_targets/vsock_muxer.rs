//! The vsock muxer's whole state machine: guest packets (every header
//! field fuzz-chosen, to a listening host port, a dead one or a
//! host-initiated connection), guest rx buffers of any size, host clients
//! and their CONNECT lines, host streams writing, reading, half-closing
//! and closing, and time jumping past deadlines, interleaved in the order
//! the input gives. After every step the muxer must hold no more than its
//! bounds, and every packet it gives the guest must be well formed.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use moat_vmm::devices::virtio::vsock::muxer::{
    op, Muxer, CONTROL_QUEUE_CAP, HEADER_SIZE, MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_PENDING_TOTAL,
    MAX_PKT_DATA,
};
use moat_vmm::devices::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_CID: u64 = 3;
const RING: u16 = 32;
const BUF: u64 = 0x1000;
const MEM_SIZE: usize = 0x10_0000;
/// The host port with a listener behind it, and one with none.
const LISTENING_PORT: u32 = 1000;
const DEAD_PORT: u32 = 1001;
/// Host streams the harness opens at most, so fds never run out.
const MAX_HOST_STREAMS: usize = 96;

/// One split ring in guest memory, filled the way a driver would.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    next_avail: u16,
}

impl Ring {
    fn queue(&self) -> Queue {
        let mut q = Queue::new(RING).unwrap();
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Posts one buffer of `len` bytes holding `data`; false if the ring
    /// is full.
    fn post(&mut self, mem: &GuestMemoryMmap, data: &[u8], len: u32, writable: bool) -> bool {
        if self.next_avail.wrapping_sub(self.used_idx(mem)) >= RING {
            return false;
        }
        let slot = u64::from(self.next_avail % RING);
        let addr = self.bufs + slot * BUF;
        mem.write_slice(data, GuestAddress(addr)).unwrap();
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        let flags: u16 = if writable { 2 } else { 0 };
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&desc, GuestAddress(self.desc + slot * 16))
            .unwrap();
        let entry = self.avail + 4 + u64::from(self.next_avail % RING) * 2;
        mem.write_obj(slot as u16, GuestAddress(entry)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2))
            .unwrap();
        true
    }
}

/// The fuzz input, read a byte or word at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }
}

fn guest_packet(input: &mut Input, host_ports: &[u32]) -> Vec<u8> {
    let choice = input.byte();
    let local_port = match choice % 4 {
        0 => LISTENING_PORT,
        1 => DEAD_PORT,
        2 => host_ports
            .get(usize::from(choice / 4) % host_ports.len().max(1))
            .copied()
            .unwrap_or(1 << 30),
        _ => input.u32(),
    };
    let peer_port = u32::from(input.byte() % 8);
    let op = u16::from(input.byte() % 9);
    let flags = u32::from(input.byte() % 4);
    let type_ = if input.byte() < 250 { op::TYPE_STREAM } else { 2 };
    let buf_alloc = match input.byte() % 3 {
        0 => 256 * 1024,
        1 => u32::from(input.byte()) * 64,
        _ => input.u32(),
    };
    let fwd_cnt = input.u32();
    let payload_len = usize::from(input.byte()) * 8;
    let payload = input.bytes(payload_len);
    let src_cid = if input.byte() == 255 { 9 } else { GUEST_CID };
    let mut pkt = Vec::with_capacity(HEADER_SIZE + payload.len());
    pkt.extend_from_slice(&src_cid.to_le_bytes());
    pkt.extend_from_slice(&2u64.to_le_bytes());
    pkt.extend_from_slice(&peer_port.to_le_bytes());
    pkt.extend_from_slice(&local_port.to_le_bytes());
    // The header's length is usually the payload's, sometimes a lie.
    let len = if input.byte() == 255 { input.u32() } else { payload.len() as u32 };
    pkt.extend_from_slice(&len.to_le_bytes());
    pkt.extend_from_slice(&type_.to_le_bytes());
    pkt.extend_from_slice(&op.to_le_bytes());
    pkt.extend_from_slice(&flags.to_le_bytes());
    pkt.extend_from_slice(&buf_alloc.to_le_bytes());
    pkt.extend_from_slice(&fwd_cnt.to_le_bytes());
    pkt.extend_from_slice(&payload);
    pkt
}

/// Checks every rx packet the muxer wrote since `seen`.
fn check_rx(mem: &GuestMemoryMmap, rx: &Ring, seen: &mut u16) {
    let used = rx.used_idx(mem);
    while *seen != used {
        let elem = rx.used + 4 + u64::from(*seen % RING) * 8;
        let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
        assert!(u64::from(len) <= BUF, "used length {len} past the buffer");
        if len as usize >= HEADER_SIZE {
            let addr = rx.bufs + u64::from(id) * BUF;
            let src: u64 = mem.read_obj(GuestAddress(addr)).unwrap();
            let dst: u64 = mem.read_obj(GuestAddress(addr + 8)).unwrap();
            let plen: u32 = mem.read_obj(GuestAddress(addr + 24)).unwrap();
            assert_eq!((src, dst), (2, GUEST_CID));
            assert!(plen <= MAX_PKT_DATA);
            assert_eq!(len as usize, HEADER_SIZE + plen as usize);
        } else {
            assert_eq!(len, 0, "a short buffer is returned empty");
        }
        *seen = seen.wrapping_add(1);
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let dir = PathBuf::from(format!(
        "/tmp/moat-fuzz-muxer-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut tx = Ring { desc: 0x0, avail: 0x1000, used: 0x2000, bufs: 0x1_0000, next_avail: 0 };
    let mut rx = Ring { desc: 0x3000, avail: 0x4000, used: 0x5000, bufs: 0x4_0000, next_avail: 0 };
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let mut muxer = Muxer::new(
        GUEST_CID,
        dir.join("vsock"),
        mem.clone(),
        rx.queue(),
        tx.queue(),
        interrupt,
    );
    let listener = UnixListener::bind(dir.join("vsock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    muxer.attach(&listener).unwrap();
    let port_listener = UnixListener::bind(dir.join(format!("vsock_{LISTENING_PORT}"))).unwrap();
    port_listener.set_nonblocking(true).unwrap();

    let mut host: Vec<UnixStream> = Vec::new();
    let mut host_ports: Vec<u32> = Vec::new();
    let mut rx_seen = 0u16;
    let mut later = Duration::ZERO;
    let mut input = Input(data);
    let mut buf = vec![0u8; 64 * 1024];
    while !input.0.is_empty() {
        match input.byte() % 9 {
            0 | 1 => {
                let pkt = guest_packet(&mut input, &host_ports);
                let len = if input.byte() == 255 { u32::from(input.byte()) } else { pkt.len() as u32 };
                let pkt = &pkt[..pkt.len().min(BUF as usize)];
                if tx.post(&mem, pkt, len.min(BUF as u32), false) {
                    muxer.process_tx();
                }
            }
            2 => {
                for _ in 0..input.byte() % 8 {
                    let len = match input.byte() % 3 {
                        0 => u32::from(input.byte()),
                        _ => BUF as u32,
                    };
                    rx.post(&mem, &[], len, true);
                }
                muxer.drain_queues();
            }
            3 if host.len() < MAX_HOST_STREAMS => {
                if let Ok(mut client) = UnixStream::connect(dir.join("vsock")) {
                    let line = match input.byte() % 4 {
                        0 => b"CONNECT 7\n".to_vec(),
                        1 => format!("CONNECT {}\n", input.byte() % 8).into_bytes(),
                        2 => Vec::new(),
                        _ => {
                            let n = usize::from(input.byte() % 80);
                            input.bytes(n)
                        }
                    };
                    let _ = client.set_nonblocking(true);
                    let _ = client.write(&line);
                    host.push(client);
                }
            }
            4 if !host.is_empty() => {
                let i = usize::from(input.byte()) % host.len();
                let n = usize::from(input.byte()) * 64;
                let _ = host[i].write(&buf[..n]);
            }
            5 if !host.is_empty() => {
                let i = usize::from(input.byte()) % host.len();
                match input.byte() % 3 {
                    0 => {
                        let _ = host[i].shutdown(Shutdown::Write);
                    }
                    1 => drop(host.swap_remove(i)),
                    _ => {
                        // Read what came, and learn the port an "OK" names.
                        if let Ok(n) = host[i].read(&mut buf) {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            if let Some(port) = text
                                .strip_prefix("OK ")
                                .and_then(|r| r.split('\n').next())
                                .and_then(|p| p.parse().ok())
                            {
                                host_ports.push(port);
                            }
                        }
                    }
                }
            }
            6 => {
                while host.len() < MAX_HOST_STREAMS {
                    let Ok((stream, _)) = port_listener.accept() else { break };
                    let _ = stream.set_nonblocking(true);
                    host.push(stream);
                }
                muxer.handle_host_events(&listener, Duration::ZERO);
                muxer.drain_queues();
            }
            7 => {
                later += Duration::from_millis(u64::from(input.byte()) * 20);
                muxer.expire(Instant::now() + later);
                muxer.drain_queues();
            }
            _ => {
                muxer.handle_host_events(&listener, Duration::ZERO);
                muxer.drain_queues();
            }
        }
        let load = muxer.load();
        assert!(load.connections <= MAX_CONNECTIONS, "{load:?}");
        assert!(load.handshakes <= MAX_HANDSHAKES, "{load:?}");
        assert!(load.control_queued <= CONTROL_QUEUE_CAP, "{load:?}");
        assert!(load.pending_bytes <= MAX_PENDING_TOTAL, "{load:?}");
        check_rx(&mem, &rx, &mut rx_seen);
    }
    drop(muxer);
    let _ = std::fs::remove_dir_all(&dir);
});
