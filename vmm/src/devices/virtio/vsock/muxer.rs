//! The vsock connection multiplexer: one thread that owns the device's
//! rx and tx queues, the host listener and every connection's Unix
//! stream, and moves packets and bytes between them.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::HOST_CID;
use crate::devices::virtio::{ActivateError, Interrupt, WorkerThread};

/// Largest payload of one packet in either direction.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The buffer each connection announces to the guest: how many bytes of
/// guest data the host holds at most before the host stream takes them.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line accepted from a host client.
const MAX_HANDSHAKE: usize = 64;
/// First port handed to host-initiated connections (Firecracker's choice).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Packet types and operations (virtio 1.2 §5.10.6).
pub mod op {
    /// Stream socket type.
    pub const TYPE_STREAM: u16 = 1;
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// Shutdown of one or both directions.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit announcement.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Request for a credit announcement.
    pub const CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flag: the sender will receive no more data.
    pub const SHUTDOWN_RCV: u32 = 1;
    /// SHUTDOWN flag: the sender will send no more data.
    pub const SHUTDOWN_SEND: u32 = 2;
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const TOKEN_STREAM_BASE: u64 = 16;

/// A connection, named by its host-side and guest-side ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host side's port.
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// The guest's buffer size and how much of our data it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Guest bytes written to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as last announced to the guest.
    announced_fwd_cnt: u32,
    credit_update_queued: bool,
    /// Guest bytes the host stream has not taken yet.
    pending: VecDeque<u8>,
    /// Host bytes read but not yet delivered to the guest.
    rx_buf: Vec<u8>,
    in_ready: bool,
    host_eof: bool,
    /// The guest will send no more: shut the stream's write side once
    /// `pending` is drained.
    guest_done_sending: bool,
    /// Both directions are shut: remove once `pending` is drained.
    closing: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc,
            peer_fwd_cnt,
            rx_cnt: 0,
            fwd_cnt: 0,
            announced_fwd_cnt: 0,
            credit_update_queued: false,
            pending: VecDeque::new(),
            rx_buf: Vec::new(),
            in_ready: false,
            host_eof: false,
            guest_done_sending: false,
            closing: false,
        }
    }

    /// How many more bytes the guest can take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state == ConnState::Established
            && !self.in_ready
            && !self.host_eof
            && self.peer_credit() > 0
        {
            set |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

/// A control packet for the guest (no payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

/// A host client that has connected but not yet sent its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The device's connection state and queues.
pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    epoll: Option<Epoll>,
    conns: HashMap<ConnKey, Conn>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    control: VecDeque<Control>,
    ready: VecDeque<ConnKey>,
    next_local_port: u32,
}

impl Muxer {
    /// A multiplexer for guest `cid` whose guest-initiated connections go
    /// to `<uds_path>_<port>`.
    pub fn new(
        cid: u64,
        uds_path: PathBuf,
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            cid,
            uds_path,
            mem,
            rx,
            tx,
            interrupt,
            epoll: None,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        }
    }

    fn epoll_ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet) {
        if let Some(epoll) = &self.epoll {
            let token = TOKEN_STREAM_BASE + fd as u64;
            let _ = epoll.ctl(op, fd, EpollEvent::new(events | EventSet::ONE_SHOT, token));
        }
    }

    /// Re-arms the connection's one-shot epoll registration for what it
    /// now waits for.
    fn rearm(&self, key: ConnKey) {
        if let Some(conn) = self.conns.get(&key) {
            self.epoll_ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                conn.interest(),
            );
        }
    }

    fn add_conn(&mut self, key: ConnKey, conn: Conn) {
        let fd = conn.stream.as_raw_fd();
        let interest = conn.interest();
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.epoll_ctl(ControlOperation::Add, fd, interest);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if let Some(epoll) = &self.epoll {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.control.push_back(Control {
            key,
            op: op::RST,
            flags: 0,
        });
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.credit_update_queued {
                conn.credit_update_queued = true;
                self.control.push_back(Control {
                    key,
                    op: op::CREDIT_UPDATE,
                    flags: 0,
                });
            }
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_ready && !conn.host_eof && conn.state == ConnState::Established {
                conn.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    // ----------------------------------------------------------- tx: guest to host

    /// Handles every packet the guest has queued; returns whether any
    /// buffer was used.
    pub fn process_tx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        while let Some(chain) = self.tx.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            if let Some((header, data)) = read_tx_packet(&mem, chain) {
                self.handle_guest_packet(header, &data);
            }
            // Malformed packets are dropped; the buffer is returned either way.
            let _ = self.tx.add_used(&mem, head, 0);
            used = true;
        }
        if used && self.tx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        used
    }

    fn handle_guest_packet(&mut self, pkt: PacketHeader, data: &[u8]) {
        if pkt.src_cid != self.cid || pkt.dst_cid != HOST_CID {
            return; // not from this guest or not for the host: dropped
        }
        let key = ConnKey {
            local_port: pkt.dst_port,
            peer_port: pkt.src_port,
        };
        if pkt.type_ != op::TYPE_STREAM {
            if pkt.op != op::RST {
                self.control.push_back(Control {
                    key,
                    op: op::RST,
                    flags: 0,
                });
            }
            return;
        }
        if pkt.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                self.reset_conn(key);
            } else {
                self.guest_connect(key, &pkt);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if pkt.op != op::RST {
                self.control.push_back(Control {
                    key,
                    op: op::RST,
                    flags: 0,
                });
            }
            return;
        };
        let had_credit = conn.peer_credit() > 0;
        conn.peer_buf_alloc = pkt.buf_alloc;
        conn.peer_fwd_cnt = pkt.fwd_cnt;
        let credit_opened = !had_credit && conn.peer_credit() > 0;
        match (pkt.op, conn.state) {
            (op::RESPONSE, ConnState::AwaitingResponse) => {
                conn.state = ConnState::Established;
                let reply = format!("OK {}\n", key.local_port);
                // A fresh socket's buffer always holds this short line.
                if conn.stream.write_all(reply.as_bytes()).is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.rearm(key);
            }
            (op::RW, ConnState::Established) => self.forward_to_host(key, data),
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => self.queue_credit_update(key),
            (op::SHUTDOWN, ConnState::Established) => {
                if pkt.flags & op::SHUTDOWN_SEND != 0 {
                    conn.guest_done_sending = true;
                }
                if pkt.flags & (op::SHUTDOWN_SEND | op::SHUTDOWN_RCV)
                    == (op::SHUTDOWN_SEND | op::SHUTDOWN_RCV)
                {
                    conn.closing = true;
                }
                self.finish_host_writes(key);
            }
            (op::RST, _) => self.remove_conn(key),
            _ => self.reset_conn(key),
        }
        if credit_opened {
            self.mark_ready(key);
            self.rearm(key);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, pkt: &PacketHeader) {
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let conn = Conn::new(stream, ConnState::Established, pkt.buf_alloc, pkt.fwd_cnt);
                self.add_conn(key, conn);
                self.control.push_back(Control {
                    key,
                    op: op::RESPONSE,
                    flags: 0,
                });
            }
            Err(_) => self.control.push_back(Control {
                key,
                op: op::RST,
                flags: 0,
            }),
        }
    }

    fn forward_to_host(&mut self, key: ConnKey, data: &[u8]) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending.len() + data.len() > CONN_BUF_ALLOC as usize {
            // The guest sent past the credit it was given.
            self.reset_conn(key);
            return;
        }
        let mut written = 0;
        if conn.pending.is_empty() {
            match conn.stream.write(data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(written as u32);
        conn.pending.extend(&data[written..]);
        self.after_host_write(key);
    }

    /// Writes what the host stream will take of the pending bytes.
    fn flush_pending(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while !conn.pending.is_empty() {
            let (front, _) = conn.pending.as_slices();
            match conn.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    conn.pending.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        self.after_host_write(key);
    }

    fn after_host_write(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.fwd_cnt.wrapping_sub(conn.announced_fwd_cnt) >= CONN_BUF_ALLOC / 4 {
            self.queue_credit_update(key);
        }
        self.finish_host_writes(key);
    }

    /// Applies a guest shutdown once every byte it sent has reached the host.
    fn finish_host_writes(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.pending.is_empty() {
            if conn.closing {
                let _ = conn.stream.shutdown(Shutdown::Both);
                self.reset_conn(key);
                return;
            }
            if conn.guest_done_sending {
                let _ = conn.stream.shutdown(Shutdown::Write);
            }
        }
        self.rearm(key);
    }

    // ----------------------------------------------------------- rx: host to guest

    /// Reads host bytes for a ready connection into its `rx_buf`; returns
    /// whether it has bytes to deliver.
    fn fill_rx_buf(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        let credit = conn.peer_credit().min(MAX_PKT_DATA);
        if credit == 0 {
            conn.in_ready = false; // back when the guest opens credit
            return false;
        }
        if !conn.rx_buf.is_empty() {
            return true;
        }
        conn.rx_buf.resize(credit as usize, 0);
        match conn.stream.read(&mut conn.rx_buf) {
            Ok(0) => {
                conn.rx_buf.clear();
                conn.host_eof = true;
                conn.in_ready = false;
                self.control.push_back(Control {
                    key,
                    op: op::SHUTDOWN,
                    flags: op::SHUTDOWN_SEND,
                });
                false
            }
            Ok(n) => {
                conn.rx_buf.truncate(n);
                true
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                conn.rx_buf.clear();
                conn.in_ready = false;
                self.rearm(key);
                false
            }
            Err(_) => {
                self.reset_conn(key);
                false
            }
        }
    }

    /// Fills guest rx buffers with control packets, then data; returns
    /// whether any buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let item = if let Some(control) = self.control.pop_front() {
                Item::Control(control)
            } else if let Some(key) = self.ready.pop_front() {
                if !self.fill_rx_buf(key) {
                    continue;
                }
                Item::Data(key)
            } else {
                break;
            };
            let Some(chain) = self.rx.pop_descriptor_chain(&mem) else {
                match item {
                    Item::Control(c) => self.control.push_front(c),
                    Item::Data(key) => self.ready.push_front(key),
                }
                break;
            };
            let head = chain.head_index();
            let writer = Writer::new(&mem, chain)
                .ok()
                .filter(|w| w.available_bytes() >= HEADER_SIZE);
            let len = match writer {
                Some(mut writer) => self.write_rx_packet(&mut writer, item),
                None => {
                    // An unusable buffer is returned empty; the item waits for the next.
                    match item {
                        Item::Control(c) => self.control.push_front(c),
                        Item::Data(key) => self.ready.push_front(key),
                    }
                    0
                }
            };
            let _ = self.rx.add_used(&mem, head, len);
            used = true;
        }
        if used && self.rx.needs_notification(&mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
        used
    }

    /// Writes the packet for `item` into a guest rx buffer (at least a
    /// header long); returns the bytes written.
    fn write_rx_packet(&mut self, writer: &mut Writer<'_>, item: Item) -> u32 {
        let (key, op, flags) = match item {
            Item::Control(c) => (c.key, c.op, c.flags),
            Item::Data(key) => (key, op::RW, 0),
        };
        let room = writer.available_bytes() - HEADER_SIZE;
        let mut payload: &[u8] = &[];
        let mut fwd_cnt = 0;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.announced_fwd_cnt = conn.fwd_cnt;
            fwd_cnt = conn.fwd_cnt;
            if op == op::CREDIT_UPDATE {
                conn.credit_update_queued = false;
            }
            if let Item::Data(_) = item {
                let n = conn.rx_buf.len().min(room).min(conn.peer_credit() as usize);
                payload = &conn.rx_buf[..n];
            }
        }
        let header = PacketHeader {
            src_cid: HOST_CID.to_le(),
            dst_cid: self.cid.to_le(),
            src_port: key.local_port.to_le(),
            dst_port: key.peer_port.to_le(),
            len: (payload.len() as u32).to_le(),
            type_: op::TYPE_STREAM.to_le(),
            op: op.to_le(),
            flags: flags.to_le(),
            buf_alloc: CONN_BUF_ALLOC.to_le(),
            fwd_cnt: fwd_cnt.to_le(),
        };
        let n = payload.len();
        if writer.write_obj(header).is_err() || writer.write_all(payload).is_err() {
            return 0;
        }
        if let (Item::Data(_), Some(conn)) = (item, self.conns.get_mut(&key)) {
            conn.rx_buf.drain(..n);
            conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
            // More may be waiting: give other connections a turn first.
            // (With no credit left, the next fill takes it off the list.)
            self.ready.push_back(key);
        }
        (HEADER_SIZE + n) as u32
    }

    // ----------------------------------------------------------- host side

    fn accept_clients(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            self.epoll_ctl(ControlOperation::Add, fd, EventSet::IN);
        }
    }

    /// Reads a client's `CONNECT <port>\n`; a malformed or overlong line
    /// closes the client.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(mut hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if hs.line.len() < MAX_HANDSHAKE => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.epoll_ctl(ControlOperation::Modify, fd, EventSet::IN);
                    self.handshakes.insert(fd, hs);
                    return;
                }
                _ => {
                    self.drop_client(fd);
                    return;
                }
            }
        }
        let port = std::str::from_utf8(&hs.line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            self.drop_client(fd);
            return;
        };
        let local_port = self.allocate_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        // The guest's credit is unknown until it answers.
        self.add_conn(key, Conn::new(hs.stream, ConnState::AwaitingResponse, 0, 0));
        self.control.push_back(Control {
            key,
            op: op::REQUEST,
            flags: 0,
        });
    }

    fn drop_client(&mut self, fd: RawFd) {
        if let Some(epoll) = &self.epoll {
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&ConnKey {
                local_port: port,
                peer_port,
            }) {
                return port;
            }
        }
    }

    fn stream_event(&mut self, fd: RawFd, events: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        if events.contains(EventSet::OUT) {
            self.flush_pending(key);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.mark_ready(key);
        }
        self.rearm(key);
    }
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Control(Control),
    Data(ConnKey),
}

/// The virtio-vsock packet header (virtio 1.2 §5.10.6), little-endian.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, packed)]
pub struct PacketHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

// SAFETY: PacketHeader is packed plain old data: every bit pattern is valid.
unsafe impl ByteValued for PacketHeader {}

/// Size of [`PacketHeader`] on the wire.
pub const HEADER_SIZE: usize = std::mem::size_of::<PacketHeader>();

impl PacketHeader {
    fn to_native(self) -> Self {
        Self {
            src_cid: u64::from_le(self.src_cid),
            dst_cid: u64::from_le(self.dst_cid),
            src_port: u32::from_le(self.src_port),
            dst_port: u32::from_le(self.dst_port),
            len: u32::from_le(self.len),
            type_: u16::from_le(self.type_),
            op: u16::from_le(self.op),
            flags: u32::from_le(self.flags),
            buf_alloc: u32::from_le(self.buf_alloc),
            fwd_cnt: u32::from_le(self.fwd_cnt),
        }
    }
}

/// Reads a guest tx packet: the header, then for RW the payload, from
/// however many device-readable descriptors the guest used (Linux 6.x
/// scatters large payloads over pages). `None` for a chain that is not
/// in guest memory, too short, or longer than [`MAX_PKT_DATA`].
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Option<(PacketHeader, Vec<u8>)> {
    let mut reader = Reader::new(mem, chain).ok()?;
    let header = reader.read_obj::<PacketHeader>().ok()?.to_native();
    let mut data = Vec::new();
    if header.op == op::RW && header.len > 0 {
        if header.len > MAX_PKT_DATA || header.len as usize > reader.available_bytes() {
            return None;
        }
        data.resize(header.len as usize, 0);
        reader.read_exact(&mut data).ok()?;
    }
    Some((header, data))
}

/// Starts the muxer's thread: queue notifications, host clients and
/// streams. Stopping the returned worker closes every connection.
pub fn spawn_muxer(
    mut muxer: Muxer,
    listener: UnixListener,
    queue_events: Vec<EventFd>,
) -> Result<WorkerThread, ActivateError> {
    let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
    let epoll = Epoll::new().map_err(ActivateError::Worker)?;
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    for (token, evt) in [TOKEN_RX, TOKEN_TX, TOKEN_EVENT]
        .into_iter()
        .zip(&queue_events)
    {
        add(evt.as_raw_fd(), token).map_err(ActivateError::Worker)?;
    }
    add(kill.as_raw_fd(), TOKEN_KILL).map_err(ActivateError::Worker)?;
    add(listener.as_raw_fd(), TOKEN_LISTENER).map_err(ActivateError::Worker)?;
    muxer.epoll = Some(epoll);
    WorkerThread::spawn("moat_vsock".into(), kill, move || {
        run(muxer, listener, queue_events)
    })
}

fn run(mut muxer: Muxer, listener: UnixListener, queue_events: Vec<EventFd>) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match muxer.epoll.as_ref().map(|e| e.wait(-1, &mut events)) {
            Some(Ok(n)) => n,
            Some(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
            _ => return,
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_KILL => return,
                token @ (TOKEN_RX | TOKEN_TX | TOKEN_EVENT) => {
                    if let Some(evt) = queue_events.get(token as usize) {
                        let _ = evt.read();
                    }
                    if token == TOKEN_TX {
                        muxer.process_tx();
                    }
                }
                TOKEN_LISTENER => muxer.accept_clients(&listener),
                token => {
                    let fd = (token - TOKEN_STREAM_BASE) as RawFd;
                    muxer.stream_event(fd, event.event_set());
                }
            }
        }
        // Anything above may have queued packets for the guest.
        muxer.process_rx();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const MEM_SIZE: usize = 0x100_0000;

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    fn header(op: u16, len: u32, local_port: u32, peer_port: u32) -> [u8; 44] {
        let mut h = [0u8; 44];
        h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
        h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
        h[16..20].copy_from_slice(&peer_port.to_le_bytes());
        h[20..24].copy_from_slice(&local_port.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&op::TYPE_STREAM.to_le_bytes());
        h[30..32].copy_from_slice(&op.to_le_bytes());
        h[36..40].copy_from_slice(&(256u32 * 1024).to_le_bytes()); // buf_alloc
        h
    }

    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        muxer: Muxer,
        host_end: UnixStream,
        key: ConnKey,
    }

    fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut muxer = Muxer::new(
            GUEST_CID,
            PathBuf::from("/nonexistent/vsock"),
            mem.clone(),
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            irq,
        );
        let (ours, host_end) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 5000,
        };
        muxer.add_conn(key, Conn::new(ours, ConnState::Established, 256 * 1024, 0));
        Rig {
            mem,
            rx,
            tx,
            muxer,
            host_end,
            key,
        }
    }

    #[test]
    fn guest_data_reaches_the_host_stream_in_order() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        // Header and data in separate descriptors, then in one.
        r.mem
            .write_slice(
                &header(op::RW, 1000, r.key.local_port, r.key.peer_port),
                GuestAddress(0x10_0000),
            )
            .unwrap();
        r.mem
            .write_slice(&payload[..1000], GuestAddress(0x20_0000))
            .unwrap();
        let mut single = header(op::RW, 2000, r.key.local_port, r.key.peer_port).to_vec();
        single.extend_from_slice(&payload[1000..]);
        r.mem.write_slice(&single, GuestAddress(0x30_0000)).unwrap();
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
        let mut head = SplitDescriptor::new(0x10_0000, 44, next as u16, 1);
        head.set_next(1);
        r.tx.add_desc_chains(&[RawDescriptor::from(head), desc(0x20_0000, 1000, 0)], 0)
            .unwrap();
        r.muxer.tx = r.tx.create_queue::<Queue>().unwrap();
        assert!(r.muxer.process_tx());
        r.tx.add_desc_chains(&[desc(0x30_0000, 2044, 0)], 2)
            .unwrap();
        assert!(r.muxer.process_tx());
        r.host_end.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let _ = r.host_end.read_to_end(&mut got);
        assert_eq!(got.len(), payload.len());
        assert!(
            got == payload,
            "first difference at {:?}",
            got.iter().zip(&payload).position(|(a, b)| a != b)
        );
        let _ = &r.rx;
    }

    #[test]
    fn host_data_fills_a_scattered_rx_buffer() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        r.host_end.write_all(b"hello from the host").unwrap();
        r.muxer.mark_ready(r.key);
        let next = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
        let head = SplitDescriptor::new(0x10_0000, 30, (VRING_DESC_F_WRITE | next) as u16, 1);
        r.rx.add_desc_chains(
            &[
                RawDescriptor::from(head),
                desc(0x20_0000, 100, VRING_DESC_F_WRITE),
            ],
            0,
        )
        .unwrap();
        r.muxer.rx = r.rx.create_queue::<Queue>().unwrap();
        assert!(r.muxer.process_rx());
        let used = r.rx.used().ring().ref_at(0).unwrap().load().len();
        assert_eq!(used as usize, HEADER_SIZE + 19);
        // The header spans both descriptors: 30 bytes, then 14.
        let mut wire = [0u8; 130];
        mem.read_slice(&mut wire[..30], GuestAddress(0x10_0000))
            .unwrap();
        mem.read_slice(&mut wire[30..], GuestAddress(0x20_0000))
            .unwrap();
        let header: PacketHeader = PacketHeader::from_slice(&wire[..HEADER_SIZE])
            .copied()
            .unwrap()
            .to_native();
        assert_eq!({ header.op }, op::RW);
        assert_eq!({ header.len }, 19);
        assert_eq!(
            ({ header.src_port }, { header.dst_port }),
            (r.key.local_port, r.key.peer_port)
        );
        assert_eq!({ header.dst_cid }, GUEST_CID);
        assert_eq!(&wire[HEADER_SIZE..HEADER_SIZE + 19], b"hello from the host");
    }

    #[test]
    fn guest_sending_past_its_credit_is_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        r.muxer
            .conns
            .get_mut(&r.key)
            .unwrap()
            .pending
            .extend(vec![0u8; CONN_BUF_ALLOC as usize]);
        r.muxer.forward_to_host(r.key, b"one byte too many");
        assert!(!r.muxer.conns.contains_key(&r.key), "connection dropped");
        assert_eq!(r.muxer.control.back().map(|c| c.op), Some(op::RST));
    }

    #[test]
    fn packets_from_another_cid_or_to_another_host_are_dropped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        let mut spoofed =
            PacketHeader::from_slice(&header(op::RST, 0, r.key.local_port, r.key.peer_port))
                .copied()
                .unwrap()
                .to_native();
        spoofed.src_cid = 99;
        r.muxer.handle_guest_packet(spoofed, &[]);
        assert!(
            r.muxer.conns.contains_key(&r.key),
            "a spoofed RST changes nothing"
        );
        assert!(r.muxer.control.is_empty());
        let mut elsewhere = spoofed;
        elsewhere.src_cid = GUEST_CID;
        elsewhere.dst_cid = 7;
        r.muxer.handle_guest_packet(elsewhere, &[]);
        assert!(r.muxer.conns.contains_key(&r.key));
    }

    #[test]
    fn truncated_or_oversized_tx_packets_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut q: Queue = vq.create_queue().unwrap();
        // Header says 1000 bytes of data, the chain carries 10.
        mem.write_slice(&header(op::RW, 1000, 1, 2), GuestAddress(0x10_0000))
            .unwrap();
        vq.add_desc_chains(&[desc(0x10_0000, 54, 0)], 0).unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(read_tx_packet(&mem, chain).is_none());
        // Header says more than a packet may carry.
        mem.write_slice(
            &header(op::RW, MAX_PKT_DATA + 1, 1, 2),
            GuestAddress(0x20_0000),
        )
        .unwrap();
        vq.add_desc_chains(&[desc(0x20_0000, 44 + MAX_PKT_DATA + 1, 0)], 1)
            .unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(read_tx_packet(&mem, chain).is_none());
        // Shorter than a header.
        vq.add_desc_chains(&[desc(0x30_0000, 20, 0)], 2).unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(read_tx_packet(&mem, chain).is_none());
    }
}
