//! The vsock connection multiplexer: one thread that owns the device's
//! rx and tx queues, the host listener and every connection's Unix
//! stream, and moves packets and bytes between them.
//!
//! Everything a guest can make it hold is bounded, as in Firecracker's
//! muxer: at most [`MAX_CONNECTIONS`] connections, [`MAX_HANDSHAKES`]
//! host clients that have not named a port yet, [`CONTROL_QUEUE_CAP`]
//! control packets waiting for guest rx buffers (the tx queue is not read
//! while [`TX_BACKPRESSURE`] of them wait, so a guest that posts no rx
//! buffers only stalls itself), [`CONN_BUF_ALLOC`] guest bytes per
//! connection waiting for host streams ([`MAX_PENDING_TOTAL`] in all), and a connection the guest never answers or never
//! finishes closing is reset after [`CONNECT_TIMEOUT`] or
//! [`SHUTDOWN_TIMEOUT`]. A connection's life is [`ConnState`]'s state
//! machine.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::HOST_CID;
use crate::devices::virtio::{ActivateError, Interrupt, WorkerThread};
use crate::seccomp::ThreadKind;

/// Largest payload of one packet in either direction.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The buffer each connection announces to the guest: how many bytes of
/// guest data the host holds at most before the host stream takes them.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections open at once, host- and guest-initiated together
/// (one host fd each). Past it a guest REQUEST is answered with RST and
/// a host client is closed.
pub const MAX_CONNECTIONS: usize = 256;
/// Most host clients that have connected but not yet sent their
/// `CONNECT <port>` line; more are closed at once.
pub const MAX_HANDSHAKES: usize = 32;
/// Most control packets (RST, RESPONSE, SHUTDOWN, credit) waiting for
/// guest rx buffers. One that finds the queue full is dropped, and a
/// connection it was for is closed on the host side: the guest that
/// posts no rx buffers is the one out of step.
pub const CONTROL_QUEUE_CAP: usize = 2048;
/// While this many control packets wait, the tx queue is not read: a
/// guest flooding tx (say, with packets for connections that do not
/// exist, each owed a RST) only fills its own ring.
pub const TX_BACKPRESSURE: usize = 512;
/// Most guest bytes held, over all connections, for host streams that
/// have not taken them yet (64 MiB): what the credit each connection is
/// given ([`CONN_BUF_ALLOC`]) allows over [`MAX_CONNECTIONS`], so a guest
/// within its credit never meets it, and a connection whose data would
/// pass it is reset.
pub const MAX_PENDING_TOTAL: usize = MAX_CONNECTIONS * CONN_BUF_ALLOC as usize;
/// How long a host-initiated connection waits for the guest's RESPONSE
/// before the host client is closed and the guest sent RST (Firecracker's
/// 2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may take to end once it is closing: the guest's
/// last bytes reaching the host stream, or the guest's RST once neither
/// side sends any more. Past it the connection is reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client may take to send its `CONNECT <port>` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
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

/// Where a connection is in its life. Every packet and host event moves
/// it along these edges only; anything else resets it.
///
/// ```text
/// LocalInit --RESPONSE--> Established --guest SHUTDOWN both-----------> Closing(reset when drained)
///     |                     |  host EOF + guest SHUTDOWN SEND, drained --> Closing(await guest RST)
///     +--CONNECT_TIMEOUT--> reset            Closing --drained / RST / SHUTDOWN_TIMEOUT--> gone
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE
    /// until `deadline`.
    LocalInit {
        /// When the guest's silence resets the connection.
        deadline: Instant,
    },
    /// Open. A side that is done sending is half-closed.
    Established {
        /// The host stream ended and the guest was told (SHUTDOWN SEND).
        host_done: bool,
        /// The guest said it sends no more (SHUTDOWN SEND).
        guest_done: bool,
    },
    /// Ending: reset at `deadline` at the latest.
    Closing {
        /// When the connection is reset however far it got.
        deadline: Instant,
        /// The guest closed both directions: reset as soon as its last
        /// bytes reach the host stream. Otherwise both sides finished
        /// sending and the guest's own RST is awaited.
        reset_when_drained: bool,
    },
}

impl ConnState {
    const OPEN: ConnState = ConnState::Established {
        host_done: false,
        guest_done: false,
    };

    fn deadline(self) -> Option<Instant> {
        match self {
            ConnState::LocalInit { deadline } | ConnState::Closing { deadline, .. } => {
                Some(deadline)
            }
            ConnState::Established { .. } => None,
        }
    }

    /// Whether host bytes may still be read for the guest.
    fn host_may_send(self) -> bool {
        matches!(
            self,
            ConnState::Established {
                host_done: false,
                ..
            }
        )
    }
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
        }
    }

    /// How many more bytes the guest can take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.state.host_may_send() && !self.in_ready && self.peer_credit() > 0 {
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
    deadline: Instant,
}

/// What the muxer holds now, against its bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxerLoad {
    /// Open connections (at most [`MAX_CONNECTIONS`]).
    pub connections: usize,
    /// Host clients not yet past their handshake (at most [`MAX_HANDSHAKES`]).
    pub handshakes: usize,
    /// Control packets waiting for rx buffers (at most [`CONTROL_QUEUE_CAP`]).
    pub control_queued: usize,
    /// Guest bytes waiting for host streams (at most [`MAX_PENDING_TOTAL`]).
    pub pending_bytes: usize,
    /// Host bytes read and waiting for guest rx buffers.
    pub rx_buffered_bytes: usize,
    /// Control packets dropped because the queue was full.
    pub control_dropped: u64,
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
    control_dropped: u64,
    ready: VecDeque<ConnKey>,
    next_local_port: u32,
    pending_total: usize,
    /// The last tx pass stopped for backpressure with packets perhaps left.
    tx_stalled: bool,
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
            control_dropped: 0,
            ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            pending_total: 0,
            tx_stalled: false,
        }
    }

    /// What the muxer holds now.
    pub fn load(&self) -> MuxerLoad {
        debug_assert_eq!(
            self.pending_total,
            self.conns.values().map(|c| c.pending.len()).sum::<usize>(),
            "the pending byte count drifted from the connections' own"
        );
        MuxerLoad {
            connections: self.conns.len(),
            handshakes: self.handshakes.len(),
            control_queued: self.control.len(),
            pending_bytes: self.pending_total,
            rx_buffered_bytes: self.conns.values().map(|c| c.rx_buf.len()).sum(),
            control_dropped: self.control_dropped,
        }
    }

    /// Creates the muxer's epoll set and adds `listener` to it; host
    /// streams are added as they come. Call once, before the muxer runs.
    pub fn attach(&mut self, listener: &UnixListener) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        self.epoll = Some(epoll);
        Ok(())
    }

    fn epoll_ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet) {
        if let Some(epoll) = &self.epoll {
            let token = TOKEN_STREAM_BASE + fd as u64;
            let _ = epoll.ctl(op, fd, EpollEvent::new(events | EventSet::ONE_SHOT, token));
        }
    }

    /// Re-arms the connection's one-shot epoll registration for what it
    /// now waits for. With nothing to wait for it stays disarmed: the
    /// kernel adds hang-up to every registration, and a host stream that
    /// closed would otherwise wake the loop without end.
    fn rearm(&self, key: ConnKey) {
        if let Some(conn) = self.conns.get(&key) {
            let interest = conn.interest();
            if !interest.is_empty() {
                self.epoll_ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), interest);
            }
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
            self.pending_total -= conn.pending.len();
            if let Some(epoll) = &self.epoll {
                let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    /// Queues a control packet for the guest. Past [`CONTROL_QUEUE_CAP`]
    /// it is dropped, and a connection it was for is closed on the host
    /// side (the guest holds a half it will learn is dead on its next
    /// packet, which is answered with RST).
    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= CONTROL_QUEUE_CAP {
            self.control_dropped += 1;
            if op != op::RST {
                self.remove_conn(key);
            }
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.push_control(key, op::RST, 0);
    }

    fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.credit_update_queued {
                conn.credit_update_queued = true;
                self.push_control(key, op::CREDIT_UPDATE, 0);
            }
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_ready && conn.state.host_may_send() {
                conn.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    // ----------------------------------------------------------- timers

    /// The nearest moment a connection or host client times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(|c| c.state.deadline());
        let clients = self.handshakes.values().map(|h| h.deadline);
        conns.chain(clients).min()
    }

    /// Resets every connection and closes every host client whose
    /// deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            if let Some(conn) = self.conns.get(&key) {
                let _ = conn.stream.shutdown(Shutdown::Both);
            }
            self.reset_conn(key);
        }
        let late_clients: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late_clients {
            self.handshakes.remove(&fd);
            self.drop_client(fd);
        }
    }

    // ----------------------------------------------------------- tx: guest to host

    /// Handles the packets the guest has queued, until the control queue
    /// reaches [`TX_BACKPRESSURE`]; returns whether any buffer was used.
    pub fn process_tx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if self.control.len() >= TX_BACKPRESSURE {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = self.tx.pop_descriptor_chain(&mem) else {
                break;
            };
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
                self.push_control(key, op::RST, 0);
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
                self.push_control(key, op::RST, 0);
            }
            return;
        };
        let had_credit = conn.peer_credit() > 0;
        conn.peer_buf_alloc = pkt.buf_alloc;
        conn.peer_fwd_cnt = pkt.fwd_cnt;
        let credit_opened = !had_credit && conn.peer_credit() > 0;
        match (pkt.op, conn.state) {
            (op::RST, _) => {
                self.remove_conn(key);
                return;
            }
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => self.queue_credit_update(key),
            (op::RESPONSE, ConnState::LocalInit { .. }) => {
                conn.state = ConnState::OPEN;
                let reply = format!("OK {}\n", key.local_port);
                // A fresh socket's buffer always holds this short line.
                if conn.stream.write_all(reply.as_bytes()).is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.rearm(key);
            }
            (
                op::RW,
                ConnState::Established {
                    guest_done: false, ..
                },
            ) => self.forward_to_host(key, data),
            (op::SHUTDOWN, ConnState::Established { host_done, .. }) => {
                let both = op::SHUTDOWN_SEND | op::SHUTDOWN_RCV;
                if pkt.flags & both == both {
                    conn.state = ConnState::Closing {
                        deadline: Instant::now() + SHUTDOWN_TIMEOUT,
                        reset_when_drained: true,
                    };
                } else if pkt.flags & op::SHUTDOWN_SEND != 0 {
                    conn.state = ConnState::Established {
                        host_done,
                        guest_done: true,
                    };
                }
                self.finish_host_writes(key);
            }
            // A repeated or late SHUTDOWN changes nothing.
            (op::SHUTDOWN, ConnState::Closing { .. }) => {}
            _ => {
                self.reset_conn(key);
                return;
            }
        }
        if credit_opened {
            self.mark_ready(key);
            self.rearm(key);
        }
    }

    fn guest_connect(&mut self, key: ConnKey, pkt: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.push_control(key, op::RST, 0);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.local_port));
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Conn::new(stream, ConnState::OPEN, pkt.buf_alloc, pkt.fwd_cnt);
                self.add_conn(key, conn);
                self.push_control(key, op::RESPONSE, 0);
            }
            Err(_) => self.push_control(key, op::RST, 0),
        }
    }

    fn forward_to_host(&mut self, key: ConnKey, data: &[u8]) {
        let pending_total = self.pending_total;
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
        let rest = &data[written..];
        if pending_total + rest.len() > MAX_PENDING_TOTAL {
            // Every connection's host side is slow at once: this one goes.
            self.reset_conn(key);
            return;
        }
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(written as u32);
        conn.pending.extend(rest);
        self.pending_total += rest.len();
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
                    self.pending_total -= n;
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                    // A closing connection whose host reader keeps taking
                    // bytes gets its time again: only a stalled one is cut.
                    if let ConnState::Closing { deadline, .. } = &mut conn.state {
                        *deadline = Instant::now() + SHUTDOWN_TIMEOUT;
                    }
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

    /// Moves a connection on once the guest's bytes have all reached the
    /// host: passes the guest's end of sending on to the host stream, and
    /// closes a connection that is done both ways.
    fn finish_host_writes(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending.is_empty() {
            match conn.state {
                ConnState::Closing {
                    reset_when_drained: true,
                    ..
                } => {
                    let _ = conn.stream.shutdown(Shutdown::Both);
                    self.reset_conn(key);
                    return;
                }
                ConnState::Established {
                    host_done,
                    guest_done: true,
                } => {
                    let _ = conn.stream.shutdown(Shutdown::Write);
                    if host_done {
                        conn.state = ConnState::Closing {
                            deadline: Instant::now() + SHUTDOWN_TIMEOUT,
                            reset_when_drained: false,
                        };
                    }
                }
                _ => {}
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
        if !conn.state.host_may_send() {
            conn.in_ready = false;
            conn.rx_buf.clear();
            return false;
        }
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
                conn.in_ready = false;
                let guest_done = matches!(
                    conn.state,
                    ConnState::Established {
                        guest_done: true,
                        ..
                    }
                );
                conn.state = ConnState::Established {
                    host_done: true,
                    guest_done,
                };
                self.push_control(key, op::SHUTDOWN, op::SHUTDOWN_SEND);
                self.finish_host_writes(key);
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

    /// Accepts waiting host clients; past [`MAX_HANDSHAKES`] waiting, or
    /// with [`MAX_CONNECTIONS`] open, a client is closed at once.
    fn accept_clients(&mut self, listener: &UnixListener) {
        while let Ok((stream, _)) = listener.accept() {
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                continue; // dropped: the client sees its stream end
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + HANDSHAKE_TIMEOUT,
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
        if self.conns.len() >= MAX_CONNECTIONS {
            self.drop_client(fd);
            return;
        }
        let local_port = self.allocate_local_port(peer_port);
        let key = ConnKey {
            local_port,
            peer_port,
        };
        // The guest's credit is unknown until it answers.
        let state = ConnState::LocalInit {
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        self.add_conn(key, Conn::new(hs.stream, state, 0, 0));
        self.push_control(key, op::REQUEST, 0);
    }

    fn drop_client(&mut self, fd: RawFd) {
        if let Some(epoll) = &self.epoll {
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        // Terminates: at most MAX_CONNECTIONS ports are taken.
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

    /// Waits up to `max_wait` (less if a deadline comes first) for host
    /// clients and streams, handles what came, and expires what timed
    /// out. Queue events are the device loop's; they are not in this
    /// wait unless [`spawn_muxer`] added them.
    pub fn handle_host_events(&mut self, listener: &UnixListener, max_wait: Duration) {
        let mut events = [EpollEvent::default(); 64];
        let n = self.wait(&mut events, max_wait).unwrap_or(0);
        for event in &events[..n] {
            self.dispatch_host(event, listener);
        }
        self.expire(Instant::now());
    }

    /// Waits on the epoll set for up to `max_wait`, or until the next
    /// deadline; returns how many events came (none if interrupted).
    fn wait(&self, events: &mut [EpollEvent], max_wait: Duration) -> std::io::Result<usize> {
        let now = Instant::now();
        let wait = self
            .next_deadline()
            .map_or(max_wait, |d| d.saturating_duration_since(now).min(max_wait));
        // Round up, so that a deadline 0.5 ms away is not a busy loop.
        let ms = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let Some(epoll) = &self.epoll else {
            return Err(std::io::Error::new(
                ErrorKind::NotConnected,
                "the muxer was never attached to its listener",
            ));
        };
        match epoll.wait(ms, events) {
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            other => other,
        }
    }

    fn dispatch_host(&mut self, event: &EpollEvent, listener: &UnixListener) {
        match event.data() {
            TOKEN_LISTENER => self.accept_clients(listener),
            token if token >= TOKEN_STREAM_BASE => {
                let fd = (token - TOKEN_STREAM_BASE) as RawFd;
                self.stream_event(fd, event.event_set());
            }
            _ => {}
        }
    }

    /// After rx buffers came: fills them, and reads the tx queue again if
    /// backpressure had stopped it, for as long as both make progress.
    pub fn drain_queues(&mut self) {
        loop {
            self.process_rx();
            if !self.tx_stalled || self.control.len() >= TX_BACKPRESSURE {
                return;
            }
            if !self.process_tx() {
                return;
            }
        }
    }
}

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose backlog is full refuses (EAGAIN) instead of stalling the muxer.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes for the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
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
/// streams, and connection deadlines. Stopping the returned worker closes
/// every connection.
pub fn spawn_muxer(
    mut muxer: Muxer,
    listener: UnixListener,
    queue_events: Vec<EventFd>,
) -> Result<WorkerThread, ActivateError> {
    let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
    muxer.attach(&listener).map_err(ActivateError::Worker)?;
    if let Some(epoll) = &muxer.epoll {
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
    }
    WorkerThread::spawn(ThreadKind::Vsock, "moat_vsock".into(), kill, move || {
        run(muxer, listener, queue_events)
    })
}

fn run(mut muxer: Muxer, listener: UnixListener, queue_events: Vec<EventFd>) {
    let mut events = vec![EpollEvent::default(); 64];
    // With no deadline pending the wait is long; the kill event ends it.
    let idle = Duration::from_secs(3600);
    loop {
        let Ok(n) = muxer.wait(&mut events, idle) else {
            return; // the epoll set is broken: the device goes quiet
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
                _ => muxer.dispatch_host(event, &listener),
            }
        }
        muxer.expire(Instant::now());
        // Anything above may have queued packets for the guest, or made
        // room for tx to go on.
        muxer.drain_queues();
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
        muxer.add_conn(key, Conn::new(ours, ConnState::OPEN, 256 * 1024, 0));
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
        r.muxer.pending_total += CONN_BUF_ALLOC as usize;
        r.muxer.forward_to_host(r.key, b"one byte too many");
        assert_eq!(r.muxer.pending_total, 0, "its pending bytes are let go");
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
    fn packet(op: u16, local_port: u32, peer_port: u32, flags: u32) -> PacketHeader {
        let mut h = PacketHeader::from_slice(&header(op, 0, local_port, peer_port))
            .copied()
            .unwrap()
            .to_native();
        h.flags = flags;
        h
    }

    fn ops(muxer: &Muxer) -> Vec<u16> {
        muxer.control.iter().map(|c| c.op).collect()
    }

    fn count(ops: &[u16], op: u16) -> usize {
        ops.iter().filter(|o| **o == op).count()
    }

    /// A muxer whose guest connections go to `<dir>/vsock_<port>`, and
    /// that listens for host clients at `<dir>/vsock`.
    fn attached_muxer(mem: &GuestMemoryMmap, dir: &Path) -> (Muxer, UnixListener) {
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 64);
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut muxer = Muxer::new(
            GUEST_CID,
            dir.join("vsock"),
            mem.clone(),
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            irq,
        );
        let listener = UnixListener::bind(dir.join("vsock")).unwrap();
        listener.set_nonblocking(true).unwrap();
        muxer.attach(&listener).unwrap();
        (muxer, listener)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-muxer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn guest_requests_past_the_connection_cap_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = temp_dir("cap");
        let (mut muxer, _listener) = attached_muxer(&mem, &dir);
        let _port = UnixListener::bind(dir.join("vsock_5000")).unwrap();
        for peer_port in 0..(MAX_CONNECTIONS as u32 + 20) {
            muxer.handle_guest_packet(packet(op::REQUEST, 5000, 40_000 + peer_port, 0), &[]);
        }
        assert_eq!(muxer.load().connections, MAX_CONNECTIONS);
        let ops = ops(&muxer);
        assert_eq!(count(&ops, op::RESPONSE), MAX_CONNECTIONS);
        assert_eq!(count(&ops, op::RST), 20);
        // A REQUEST to a port nobody listens on is refused too.
        muxer.handle_guest_packet(packet(op::RST, 5000, 40_000, 0), &[]);
        muxer.handle_guest_packet(packet(op::REQUEST, 5001, 1, 0), &[]);
        assert_eq!(muxer.control.back().map(|c| c.op), Some(op::RST));
        assert_eq!(muxer.load().connections, MAX_CONNECTIONS - 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_closed_host_stream_does_not_wake_the_loop_again_and_again() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = temp_dir("hangup");
        let (mut muxer, listener) = attached_muxer(&mem, &dir);
        let port = UnixListener::bind(dir.join("vsock_5000")).unwrap();
        muxer.handle_guest_packet(packet(op::REQUEST, 5000, 1, 0), &[]);
        let key = ConnKey {
            local_port: 5000,
            peer_port: 1,
        };
        assert!(muxer.conns.contains_key(&key));
        let (host, _) = port.accept().unwrap();
        drop(host); // the host side closes for good; the guest keeps its half
        muxer.handle_host_events(&listener, Duration::from_millis(100));
        assert!(!muxer.fill_rx_buf(key), "the host stream ended");
        assert!(matches!(
            muxer.conns[&key].state,
            ConnState::Established {
                host_done: true,
                ..
            }
        ));
        let mut events = [EpollEvent::default(); 8];
        for _ in 0..3 {
            let n = muxer.wait(&mut events, Duration::ZERO).unwrap();
            for event in &events[..n] {
                muxer.dispatch_host(event, &listener);
            }
        }
        assert_eq!(
            muxer.wait(&mut events, Duration::ZERO).unwrap(),
            0,
            "the hang-up keeps waking the loop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_host_listener_with_a_full_backlog_is_refused_without_blocking() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = temp_dir("backlog");
        let (mut muxer, _listener) = attached_muxer(&mem, &dir);
        let port = UnixListener::bind(dir.join("vsock_6000")).unwrap();
        // SAFETY: a valid listening socket; a backlog of 0 takes one
        // connection that nobody accepts.
        assert_eq!(unsafe { libc::listen(port.as_raw_fd(), 0) }, 0);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for peer_port in 0..8 {
                muxer.handle_guest_packet(packet(op::REQUEST, 6000, peer_port, 0), &[]);
            }
            let _ = done_tx.send(ops(&muxer));
        });
        let ops = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a full backlog blocked the muxer");
        assert!(count(&ops, op::RST) >= 6, "{ops:?}");
        drop(port);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A tx ring of `n` packets for connections that do not exist.
    fn tx_flood(mem: &GuestMemoryMmap, n: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
        let tx = MockSplitQueue::create(mem, GuestAddress(0x40_0000), 1024);
        mem.write_slice(&header(op::RW, 0, 7777, 8888), GuestAddress(0x80_0000))
            .unwrap();
        let descs: Vec<RawDescriptor> = (0..n).map(|_| desc(0x80_0000, 44, 0)).collect();
        tx.add_desc_chains(&descs, 0).unwrap();
        tx
    }

    #[test]
    fn a_tx_flood_with_no_rx_buffers_stops_at_the_backpressure_mark() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        let tx = tx_flood(&mem, 1000);
        r.muxer.tx = tx.create_queue().unwrap();
        r.muxer.process_tx();
        assert_eq!(r.muxer.load().control_queued, TX_BACKPRESSURE);
        assert_eq!(tx.used().idx().load(), TX_BACKPRESSURE as u16);
        assert!(!r.muxer.process_tx(), "nothing more is read");
        // Rx buffers come: their RSTs go out, and tx goes on as far as
        // the room they made.
        let rx_descs: Vec<RawDescriptor> = (0..64u64)
            .map(|i| desc(0x90_0000 + i * 0x100, 0x100, VRING_DESC_F_WRITE))
            .collect();
        r.rx.add_desc_chains(&rx_descs, 0).unwrap();
        r.muxer.rx = r.rx.create_queue().unwrap();
        r.muxer.drain_queues();
        assert_eq!(r.rx.used().idx().load(), 64);
        assert_eq!(tx.used().idx().load(), TX_BACKPRESSURE as u16 + 64);
        assert_eq!(r.muxer.load().control_queued, TX_BACKPRESSURE);
        assert!(
            r.muxer.conns.contains_key(&r.key),
            "other connections live on"
        );
    }

    #[test]
    fn a_full_control_queue_drops_packets_and_closes_the_connection_they_were_for() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        for port in 0..CONTROL_QUEUE_CAP as u32 + 100 {
            r.muxer.push_control(
                ConnKey {
                    local_port: 1,
                    peer_port: port,
                },
                op::RST,
                0,
            );
        }
        assert_eq!(r.muxer.load().control_queued, CONTROL_QUEUE_CAP);
        assert_eq!(r.muxer.load().control_dropped, 100);
        r.muxer.handle_guest_packet(
            packet(op::CREDIT_REQUEST, r.key.local_port, r.key.peer_port, 0),
            &[],
        );
        assert!(
            !r.muxer.conns.contains_key(&r.key),
            "its credit update was lost, so the connection is closed"
        );
        assert_eq!(r.muxer.load().control_queued, CONTROL_QUEUE_CAP);
    }

    #[test]
    fn a_guest_that_never_answers_a_host_connect_is_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = temp_dir("connect-timeout");
        let (mut muxer, listener) = attached_muxer(&mem, &dir);
        let mut client = UnixStream::connect(dir.join("vsock")).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        for _ in 0..10 {
            muxer.handle_host_events(&listener, Duration::from_millis(50));
            if muxer.load().connections == 1 {
                break;
            }
        }
        assert_eq!(muxer.load().connections, 1);
        assert_eq!(ops(&muxer), vec![op::REQUEST]);
        let deadline = muxer.next_deadline().expect("the connect has a deadline");
        assert!(deadline <= Instant::now() + CONNECT_TIMEOUT);
        muxer.expire(deadline - Duration::from_millis(1));
        assert_eq!(muxer.load().connections, 1, "not before its deadline");
        muxer.expire(deadline);
        assert_eq!(muxer.load().connections, 0);
        assert_eq!(ops(&muxer), vec![op::REQUEST, op::RST]);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the client sees its stream end"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connection_both_sides_finished_is_reset_unless_the_guest_resets_it_first() {
        for guest_resets in [false, true] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let mut r = rig(&mem);
            r.host_end.shutdown(Shutdown::Write).unwrap();
            r.muxer.mark_ready(r.key);
            assert!(!r.muxer.fill_rx_buf(r.key), "the host stream ended");
            let (local, peer) = (r.key.local_port, r.key.peer_port);
            r.muxer
                .handle_guest_packet(packet(op::SHUTDOWN, local, peer, op::SHUTDOWN_SEND), &[]);
            let state = r.muxer.conns[&r.key].state;
            assert!(
                matches!(
                    state,
                    ConnState::Closing {
                        reset_when_drained: false,
                        ..
                    }
                ),
                "{state:?}"
            );
            assert_eq!(ops(&r.muxer), vec![op::SHUTDOWN]);
            if guest_resets {
                r.muxer
                    .handle_guest_packet(packet(op::RST, local, peer, 0), &[]);
                assert!(r.muxer.conns.is_empty());
                assert_eq!(ops(&r.muxer), vec![op::SHUTDOWN], "no RST answers a RST");
            } else {
                r.muxer.expire(Instant::now() + SHUTDOWN_TIMEOUT);
                assert!(r.muxer.conns.is_empty());
                assert_eq!(ops(&r.muxer), vec![op::SHUTDOWN, op::RST]);
            }
        }
    }

    #[test]
    fn data_after_the_guest_said_it_sends_no_more_resets_the_connection() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        let (local, peer) = (r.key.local_port, r.key.peer_port);
        r.muxer
            .handle_guest_packet(packet(op::SHUTDOWN, local, peer, op::SHUTDOWN_SEND), &[]);
        assert!(r.muxer.conns.contains_key(&r.key), "half-closed lives on");
        let mut rw = packet(op::RW, local, peer, 0);
        rw.len = 3;
        r.muxer.handle_guest_packet(rw, b"abc");
        assert!(!r.muxer.conns.contains_key(&r.key));
        assert_eq!(ops(&r.muxer), vec![op::RST]);
    }

    #[test]
    fn host_clients_past_the_handshake_cap_are_closed_and_silent_ones_time_out() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = temp_dir("handshakes");
        let (mut muxer, listener) = attached_muxer(&mem, &dir);
        let mut clients: Vec<UnixStream> = (0..MAX_HANDSHAKES + 8)
            .map(|_| UnixStream::connect(dir.join("vsock")).unwrap())
            .collect();
        muxer.handle_host_events(&listener, Duration::from_millis(100));
        assert_eq!(muxer.load().handshakes, MAX_HANDSHAKES);
        let mut closed = 0;
        for client in &mut clients {
            client.set_nonblocking(true).unwrap();
            if matches!(client.read(&mut [0u8; 1]), Ok(0)) {
                closed += 1;
            }
        }
        assert_eq!(closed, 8, "the clients past the cap are closed");
        muxer.expire(Instant::now() + HANDSHAKE_TIMEOUT);
        assert_eq!(muxer.load().handshakes, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn guest_bytes_held_for_slow_host_streams_are_capped_over_all_connections() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut r = rig(&mem);
        // The host side reads nothing: fill its socket buffer.
        let stream = r.muxer.conns[&r.key].stream.try_clone().unwrap();
        let chunk = [0u8; 4096];
        while (&stream).write(&chunk).is_ok() {}
        r.muxer.forward_to_host(r.key, &[1u8; 1000]);
        assert_eq!(r.muxer.pending_total, 1000, "held while under the cap");
        // Other connections hold nearly all the rest.
        r.muxer.pending_total = MAX_PENDING_TOTAL - 10;
        r.muxer.forward_to_host(r.key, &[2u8; 100]);
        assert!(!r.muxer.conns.contains_key(&r.key), "reset past the cap");
        assert_eq!(r.muxer.pending_total, MAX_PENDING_TOTAL - 10 - 1000);
        assert_eq!(ops(&r.muxer), vec![op::RST]);
    }
}
