//! virtio-fs (device ID 26) as a vhost-user frontend: the guest's FUSE
//! requests are served by a vhost-user-fs backend (virtiofsd) in another
//! process, which maps guest RAM from the memfd it is handed and reads and
//! writes the rings itself. The VMM owns the device's identity (the tag in
//! the configuration space, the queue count), the vhost-user session
//! (features, memory table, rings, kick and call eventfds) and what happens
//! when the backend goes away.
//!
//! The queues never pass through the VMM while the backend lives: a kick
//! is the KVM ioeventfd on QueueNotify, handed to the backend, and the
//! backend's interrupt is the VM's irqfd for this device. Since the VMM
//! does not see those interrupts, the transport's interrupt status reads
//! "used ring" permanently while the device is active (as Firecracker's
//! vhost-user devices do); Linux then checks every queue on each one.
//!
//! A backend that hangs up (killed, crashed) must not take the VM down:
//! the device's worker notices the hang-up on the socket and from then on
//! answers every FUSE request on the share with `EIO` itself, so the
//! guest's processes see I/O errors instead of hanging. Requests the
//! backend had taken but not answered are found from the rings: the
//! available entries past the used index (virtiofsd answers a queue's
//! requests in order unless given a thread pool).

use crate::seccomp::ThreadKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice, WorkerThread,
    INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::config::{FsConfig, FS_TAG_MAX_LEN};

/// The virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// How long the backend may take to answer the VMM, at start-up and at
/// each later exchange, before it counts as gone.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(4);
/// vhost-user's feature bit for protocol feature negotiation; it is the
/// backend's, never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// The virtio features moat passes from the backend to the guest.
const GUEST_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;
/// The size of the configuration space: the tag, then the number of
/// request queues (le32).
const CONFIG_SIZE: usize = FS_TAG_MAX_LEN + 4;
/// FUSE opcodes that get no reply.
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;

/// Errors setting up or talking to a vhost-user-fs backend; each names the
/// share's tag and the backend's socket.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The socket could not be connected to.
    #[error("virtio-fs {tag:?}: cannot connect to the backend's socket {socket}: {source}")]
    Connect {
        /// The share's tag.
        tag: String,
        /// The socket.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The backend accepted the connection but did not answer in time.
    #[error("virtio-fs {tag:?}: the backend at {socket} did not answer {step} within {} s", BACKEND_TIMEOUT.as_secs())]
    NoAnswer {
        /// The share's tag.
        tag: String,
        /// The socket.
        socket: PathBuf,
        /// The request it did not answer.
        step: &'static str,
    },
    /// The backend answered a request with an error or closed the socket.
    #[error("virtio-fs {tag:?}: the backend at {socket} failed {step}: {source}")]
    Protocol {
        /// The share's tag.
        tag: String,
        /// The socket.
        socket: PathBuf,
        /// The request that failed.
        step: &'static str,
        /// What vhost-user reported.
        source: vhost::Error,
    },
    /// The backend does not offer what moat needs.
    #[error("virtio-fs {tag:?}: the backend at {socket} {what}")]
    Unsupported {
        /// The share's tag.
        tag: String,
        /// The socket.
        socket: PathBuf,
        /// What it lacks.
        what: String,
    },
    /// The exchange's watchdog could not start (the VMM is stopping), so
    /// the exchange was not begun: unwatched, a mute backend would hang it.
    #[error("virtio-fs {tag:?}: {step} with the backend at {socket} not begun: {source}")]
    NoWatchdog {
        /// The share's tag.
        tag: String,
        /// The socket.
        socket: PathBuf,
        /// The exchange.
        step: &'static str,
        /// Why the watchdog thread did not start.
        source: std::io::Error,
    },
    /// Guest memory is private, so the backend could not map it.
    #[error(
        "virtio-fs {tag:?}: guest memory region at {addr:#x} is not file-backed shared memory"
    )]
    PrivateMemory {
        /// The share's tag.
        tag: String,
        /// The region's guest address.
        addr: u64,
    },
}

/// The vhost-user connection: the library's frontend and a second handle
/// on its socket, for deadlines and hang-up detection.
struct Session {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    stream: UnixStream,
}

impl Session {
    /// Runs `exchange` with the backend; if it has not returned within
    /// [`BACKEND_TIMEOUT`], the socket is shut down, which ends the blocked
    /// read with an error, and the error says the backend did not answer.
    fn exchange<T>(
        &mut self,
        step: &'static str,
        exchange: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, FsError> {
        let (done, wait) = mpsc::channel::<()>();
        let watched = self.stream.try_clone();
        let timed_out = Arc::new(AtomicBool::new(false));
        let flag = timed_out.clone();
        let watchdog = crate::threads::spawn(
            ThreadKind::VhostWatchdog,
            "moat_vhost_watchdog".into(),
            move || {
                if let (Err(mpsc::RecvTimeoutError::Timeout), Ok(stream)) =
                    (wait.recv_timeout(BACKEND_TIMEOUT), watched)
                {
                    flag.store(true, Ordering::SeqCst);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            },
        );
        let watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(source) => {
                return Err(FsError::NoWatchdog {
                    tag: self.tag.clone(),
                    socket: self.socket.clone(),
                    step,
                    source,
                })
            }
        };
        let result = exchange(&mut self.frontend);
        let _ = done.send(());
        let _ = watchdog.join();
        result.map_err(|source| {
            if timed_out.load(Ordering::SeqCst) {
                FsError::NoAnswer {
                    tag: self.tag.clone(),
                    socket: self.socket.clone(),
                    step,
                }
            } else {
                FsError::Protocol {
                    tag: self.tag.clone(),
                    socket: self.socket.clone(),
                    step,
                    source,
                }
            }
        })
    }

    fn unsupported(&self, what: String) -> FsError {
        FsError::Unsupported {
            tag: self.tag.clone(),
            socket: self.socket.clone(),
            what,
        }
    }
}

/// What the device and its worker share about the backend.
#[derive(Default)]
struct BackendState {
    /// The backend hung up (or failed) and the VMM answers the queues.
    gone: AtomicBool,
    /// FUSE requests the VMM answered with EIO since then.
    failed_requests: AtomicU64,
}

/// A virtio-fs share served by a vhost-user-fs backend.
pub struct Fs {
    session: Session,
    config: [u8; CONFIG_SIZE],
    queue_sizes: Vec<u16>,
    avail_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    state: Arc<BackendState>,
    /// The number of queues handed to the backend while active.
    active_queues: Option<usize>,
    worker: Option<WorkerThread>,
}

impl Fs {
    /// Connects to the backend of `share` and negotiates with it: owner,
    /// virtio and protocol features, queue count. Refused when the socket
    /// does not answer within [`BACKEND_TIMEOUT`] or the backend lacks what
    /// the share needs.
    pub fn connect(share: &FsConfig) -> Result<Self, FsError> {
        let tag = share.tag.clone();
        let socket = share.socket.clone();
        let stream = UnixStream::connect(&share.socket).map_err(|source| FsError::Connect {
            tag: tag.clone(),
            socket: socket.clone(),
            source,
        })?;
        let handle = stream.try_clone().map_err(|source| FsError::Connect {
            tag: tag.clone(),
            socket: socket.clone(),
            source,
        })?;
        // Config checks bound the queue count to 16 and the size to 1024.
        let queue_count = 1 + share.queues as usize;
        let queue_size = share.queue_size as u16;
        let mut session = Session {
            tag,
            socket,
            frontend: Frontend::from_stream(stream, queue_count as u64),
            stream: handle,
        };
        session.exchange("SET_OWNER", |f| f.set_owner())?;
        let backend_features = session.exchange("GET_FEATURES", |f| f.get_features())?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(session.unsupported("does not offer VIRTIO_F_VERSION_1".into()));
        }
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(session.unsupported("does not offer vhost-user protocol features".into()));
        }
        let offered = session.exchange("GET_PROTOCOL_FEATURES", |f| f.get_protocol_features())?;
        let protocol_features =
            offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        session.exchange("SET_PROTOCOL_FEATURES", |f| {
            f.set_protocol_features(protocol_features)
        })?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later request waits for the backend's verdict, so a
            // refused ring or memory table fails activation, not the guest.
            session
                .frontend
                .set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            session.exchange("GET_QUEUE_NUM", |f| f.get_queue_num())?
        } else {
            2
        };
        if (backend_queues as usize) < queue_count {
            return Err(session.unsupported(format!(
                "serves {} request queue(s); {} were asked for",
                backend_queues.saturating_sub(1),
                share.queues
            )));
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[..share.tag.len()].copy_from_slice(share.tag.as_bytes());
        config[FS_TAG_MAX_LEN..].copy_from_slice(&(share.queues as u32).to_le_bytes());
        Ok(Self {
            session,
            config,
            queue_sizes: vec![queue_size; queue_count],
            avail_features: backend_features & GUEST_FEATURES,
            protocol_features,
            state: Arc::default(),
            active_queues: None,
            worker: None,
        })
    }

    /// The share's tag.
    pub fn tag(&self) -> &str {
        &self.session.tag
    }

    /// Hands the backend everything it needs to serve the queues, in the
    /// order vhost-user prescribes: features, memory table, then for each
    /// ring its size, addresses, start index, call and kick eventfds, and
    /// finally enables the rings.
    fn start_backend(&mut self, ctx: &ActivateContext) -> Result<(), FsError> {
        let features = ctx.acked_features | VHOST_USER_F_PROTOCOL_FEATURES;
        self.session
            .exchange("SET_FEATURES", |f| f.set_features(features))?;
        let regions = ctx
            .mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                    FsError::PrivateMemory {
                        tag: self.session.tag.clone(),
                        addr: region.start_addr().0,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.session
            .exchange("SET_MEM_TABLE", |f| f.set_mem_table(&regions).map(|_| ()))?;
        let host_address = |addr: u64| {
            ctx.mem
                .get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .unwrap_or(0)
        };
        for (index, queue) in ctx.queues.iter().enumerate() {
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                // The transport checked that each ring lies in guest memory.
                desc_table_addr: host_address(queue.desc_table()),
                used_ring_addr: host_address(queue.used_ring()),
                avail_ring_addr: host_address(queue.avail_ring()),
                log_addr: None,
            };
            let next_avail = queue.next_avail();
            self.session
                .exchange("SET_VRING_NUM", |f| f.set_vring_num(index, queue.size()))?;
            self.session
                .exchange("SET_VRING_ADDR", |f| f.set_vring_addr(index, &rings))?;
            self.session
                .exchange("SET_VRING_BASE", |f| f.set_vring_base(index, next_avail))?;
            self.session.exchange("SET_VRING_CALL", |f| {
                f.set_vring_call(index, ctx.interrupt.irqfd())
            })?;
            let kick = ctx.queue_events.get(index).ok_or_else(|| {
                self.session
                    .unsupported(format!("got no notification eventfd for queue {index}"))
            })?;
            self.session
                .exchange("SET_VRING_KICK", |f| f.set_vring_kick(index, kick))?;
        }
        for index in 0..ctx.queues.len() {
            self.session
                .exchange("SET_VRING_ENABLE", |f| f.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// Stops the backend's rings (GET_VRING_BASE stops a ring in
    /// vhost-user), unless it is gone.
    fn stop_backend(&mut self, queues: usize) {
        if self.state.gone.load(Ordering::SeqCst) {
            return;
        }
        for index in 0..queues {
            let stopped = self
                .session
                .exchange("SET_VRING_ENABLE", |f| f.set_vring_enable(index, false))
                .and_then(|()| {
                    self.session
                        .exchange("GET_VRING_BASE", |f| f.get_vring_base(index))
                });
            if let Err(e) = stopped {
                crate::log_line!("moat-vmm: {e}");
                self.backend_gone();
                return;
            }
        }
    }

    /// Marks the backend gone and cuts the connection, so that a backend
    /// that is merely slow does not go on serving rings the VMM now owns.
    fn backend_gone(&self) {
        self.state.gone.store(true, Ordering::SeqCst);
        let _ = self.session.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue_count = ctx.queues.len();
        if queue_count != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queue_count,
            });
        }
        ctx.interrupt.set_sticky(INT_VRING);
        let started = if self.state.gone.load(Ordering::SeqCst) {
            false
        } else {
            match self.start_backend(&ctx) {
                Ok(()) => true,
                Err(e) => {
                    crate::log_line!("moat-vmm: {e}; the share's requests will fail with EIO");
                    self.backend_gone();
                    false
                }
            }
        };
        let watch = self
            .session
            .stream
            .try_clone()
            .map_err(ActivateError::Worker)?;
        let worker = Worker {
            tag: self.session.tag.clone(),
            socket: self.session.socket.clone(),
            mem: ctx.mem,
            queues: ctx.queues,
            queue_events: ctx.queue_events,
            interrupt: ctx.interrupt,
            event_idx: ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0,
            state: self.state.clone(),
        };
        self.worker = Some(worker.spawn(watch, started)?);
        self.active_queues = Some(queue_count);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        if let Some(queues) = self.active_queues.take() {
            self.stop_backend(queues);
        }
    }

    fn describe(&self) -> String {
        let backend = if self.state.gone.load(Ordering::SeqCst) {
            "gone"
        } else {
            "connected"
        };
        format!(
            "virtio-fs {:?} backend {} {backend}, {} request(s) answered with EIO, protocol features {:#x}",
            self.session.tag,
            self.session.socket.display(),
            self.state.failed_requests.load(Ordering::Relaxed),
            self.protocol_features.bits()
        )
    }
}

/// The device's thread: watches the backend's socket and, once it hangs
/// up, serves the queues itself with errors.
struct Worker {
    tag: String,
    socket: PathBuf,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    event_idx: bool,
    state: Arc<BackendState>,
}

/// Epoll tokens past the queue indices.
const TOKEN_KILL: u64 = u64::MAX;
const TOKEN_SOCKET: u64 = u64::MAX - 1;

impl Worker {
    fn spawn(
        self,
        watch: UnixStream,
        backend_running: bool,
    ) -> Result<WorkerThread, ActivateError> {
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let epoll = Epoll::new().map_err(ActivateError::Worker)?;
        let add = |fd: i32, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(ActivateError::Worker)
        };
        add(kill.as_raw_fd(), EventSet::IN, TOKEN_KILL)?;
        if backend_running {
            // Hang-up only: the socket's data belongs to the frontend.
            add(
                watch.as_raw_fd(),
                EventSet::READ_HANG_UP | EventSet::HANG_UP,
                TOKEN_SOCKET,
            )?;
        }
        let name = format!(
            "moat_virtio_fs_{}",
            self.tag.chars().take(8).collect::<String>()
        );
        let kill_handle = kill.try_clone().map_err(ActivateError::Worker)?;
        WorkerThread::spawn(ThreadKind::Fs, name, kill_handle, move || {
            let _ = kill;
            self.run(epoll, watch, backend_running)
        })
    }

    fn run(mut self, epoll: Epoll, watch: UnixStream, backend_running: bool) {
        let mut answering = false;
        if !backend_running {
            answering = self.take_over(&epoll);
        }
        let mut events = vec![EpollEvent::default(); self.queue_events.len() + 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_KILL => return,
                    TOKEN_SOCKET => {
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            watch.as_raw_fd(),
                            EpollEvent::default(),
                        );
                        if !answering {
                            crate::log_line!(
                                "moat-vmm: virtio-fs {:?}: the backend at {} hung up; \
                                 the share's requests now fail with EIO",
                                self.tag,
                                self.socket.display()
                            );
                            self.state.gone.store(true, Ordering::SeqCst);
                            answering = self.take_over(&epoll);
                        }
                    }
                    index if answering => {
                        let index = index as usize;
                        if let Some(evt) = self.queue_events.get(index) {
                            let _ = evt.read();
                            self.answer_queue(index);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Takes the queues over from a dead backend: every request past the
    /// used index is outstanding. Returns whether the queue kicks are now
    /// watched.
    fn take_over(&mut self, epoll: &Epoll) -> bool {
        for queue in &mut self.queues {
            let used = queue
                .used_idx(&self.mem, Ordering::Acquire)
                .map_or(0, |idx| idx.0);
            queue.set_next_avail(used);
            queue.set_next_used(used);
            queue.set_event_idx(self.event_idx);
        }
        for (index, evt) in self.queue_events.iter().enumerate() {
            let added = epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index as u64),
            );
            if added.is_err() {
                return false;
            }
        }
        for index in 0..self.queues.len() {
            self.answer_queue(index);
        }
        true
    }

    /// Answers every available request on queue `index` with EIO.
    fn answer_queue(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let mem = &self.mem;
        let mut answered = 0u64;
        loop {
            // With EVENT_IDX the driver kicks only past the index the
            // device last published, so keep it current while draining.
            let _ = queue.disable_notification(mem);
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = fail_request(mem, chain);
                let _ = queue.add_used(mem, head, len);
                answered += 1;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if answered > 0 {
            self.state
                .failed_requests
                .fetch_add(answered, Ordering::Relaxed);
            self.interrupt.signal_used_queue();
        }
    }
}

/// The header of every FUSE request (`struct fuse_in_header`).
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct FuseInHeader {
    len: u32,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: u32,
    total_extlen: u16,
    padding: u16,
}

// SAFETY: plain integers with no padding between them (40 bytes, repr(C)).
unsafe impl ByteValued for FuseInHeader {}

/// The header of every FUSE reply (`struct fuse_out_header`).
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
struct FuseOutHeader {
    len: u32,
    error: i32,
    unique: u64,
}

// SAFETY: plain integers with no padding between them (16 bytes, repr(C)).
unsafe impl ByteValued for FuseOutHeader {}

/// Answers one FUSE request with `-EIO`; returns the bytes written (0 for
/// requests that get no reply and for unusable chains).
fn fail_request(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
    let (Ok(mut reader), Ok(mut writer)) =
        (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    else {
        return 0;
    };
    let Ok(request) = reader.read_obj::<FuseInHeader>() else {
        return 0;
    };
    if matches!(request.opcode, FUSE_FORGET | FUSE_BATCH_FORGET) {
        return 0;
    }
    let reply = FuseOutHeader {
        len: std::mem::size_of::<FuseOutHeader>() as u32,
        error: -libc::EIO,
        unique: request.unique,
    };
    match writer.write_obj(reply) {
        Ok(()) => reply.len,
        Err(_) => 0,
    }
}

pub mod peer {
    //! A minimal vhost-user peer: it answers what a backend must answer
    //! (features, protocol features, queue count, ring bases, acks) and
    //! writes down every request code, and it can hang up on demand. It
    //! serves no queue. The unit tests check the frontend's order of
    //! requests against it, and the fuzz targets put the device behind it;
    //! the real backend, virtiofsd, is exercised in the KVM harness
    //! (vmm/tests/fs.rs).

    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use vhost::vhost_user::message::VhostUserProtocolFeatures;

    use super::{
        FsConfig, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    };

    /// vhost-user request codes.
    pub mod req {
        /// `VHOST_USER_GET_FEATURES`.
        pub const GET_FEATURES: u32 = 1;
        /// `VHOST_USER_SET_FEATURES`.
        pub const SET_FEATURES: u32 = 2;
        /// `VHOST_USER_SET_OWNER`.
        pub const SET_OWNER: u32 = 3;
        /// `VHOST_USER_SET_MEM_TABLE`.
        pub const SET_MEM_TABLE: u32 = 5;
        /// `VHOST_USER_SET_VRING_NUM`.
        pub const SET_VRING_NUM: u32 = 8;
        /// `VHOST_USER_SET_VRING_ADDR`.
        pub const SET_VRING_ADDR: u32 = 9;
        /// `VHOST_USER_SET_VRING_BASE`.
        pub const SET_VRING_BASE: u32 = 10;
        /// `VHOST_USER_GET_VRING_BASE`.
        pub const GET_VRING_BASE: u32 = 11;
        /// `VHOST_USER_SET_VRING_KICK`.
        pub const SET_VRING_KICK: u32 = 12;
        /// `VHOST_USER_SET_VRING_CALL`.
        pub const SET_VRING_CALL: u32 = 13;
        /// `VHOST_USER_GET_PROTOCOL_FEATURES`.
        pub const GET_PROTOCOL_FEATURES: u32 = 15;
        /// `VHOST_USER_SET_PROTOCOL_FEATURES`.
        pub const SET_PROTOCOL_FEATURES: u32 = 16;
        /// `VHOST_USER_GET_QUEUE_NUM`.
        pub const GET_QUEUE_NUM: u32 = 17;
        /// `VHOST_USER_SET_VRING_ENABLE`.
        pub const SET_VRING_ENABLE: u32 = 18;
    }

    /// A peer listening on a socket of its own, serving each connection
    /// on a thread.
    pub struct VhostUserPeer {
        socket: PathBuf,
        log: Arc<Mutex<Vec<u32>>>,
        conns: Arc<Mutex<Vec<UnixStream>>>,
        serving: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    }

    impl VhostUserPeer {
        /// Listens on a new socket named after `name` in the temporary
        /// folder, offering `queues` queues in all (hiprio included).
        pub fn start(name: &str, queues: u64) -> std::io::Result<Self> {
            let socket = std::env::temp_dir().join(format!(
                "moat-vhost-peer-{name}-{}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket)?;
            let log: Arc<Mutex<Vec<u32>>> = Arc::default();
            let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
            let serving: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
            let (log2, conns2, serving2) = (log.clone(), conns.clone(), serving.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    if let Ok(handle) = conn.try_clone() {
                        conns2
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(handle);
                    }
                    let log = log2.clone();
                    let thread = std::thread::spawn(move || serve(conn, &log, queues));
                    serving2
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(thread);
                }
            });
            Ok(Self {
                socket,
                log,
                conns,
                serving,
            })
        }

        /// Waits for the threads serving this peer's connections to end;
        /// each ends when its frontend closes, so call it once every
        /// frontend is dropped. (A fuzz target does, so that no thread of
        /// one input lives on into the next, where a leak checker would
        /// count its thread-local storage as leaked.)
        pub fn join_closed(&self) {
            let threads =
                std::mem::take(&mut *self.serving.lock().unwrap_or_else(|p| p.into_inner()));
            for thread in threads {
                let _ = thread.join();
            }
            self.conns.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }

        /// A share on this peer, with one request queue of 16 entries.
        pub fn share(&self, tag: &str) -> FsConfig {
            FsConfig {
                tag: tag.into(),
                socket: self.socket.clone(),
                queues: 1,
                queue_size: 16,
            }
        }

        /// The request codes received since the last call.
        pub fn take_log(&self) -> Vec<u32> {
            std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
        }

        /// Ends every connection, as a backend that dies does.
        pub fn hang_up(&self) {
            for conn in self
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    impl Drop for VhostUserPeer {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    fn serve(mut conn: UnixStream, log: &Mutex<Vec<u32>>, queues: u64) {
        loop {
            let mut header = [0u8; 12];
            if conn.read_exact(&mut header).is_err() {
                return;
            }
            let word = |i: usize| {
                u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]])
            };
            let (code, flags, size) = (word(0), word(4), word(8));
            // Bodies are small (the memory table is the largest, 8 regions).
            let mut body = vec![0u8; (size as usize).min(4096)];
            if conn.read_exact(&mut body).is_err() {
                return;
            }
            log.lock().unwrap_or_else(|p| p.into_inner()).push(code);
            let value: Option<Vec<u8>> = match code {
                req::GET_FEATURES => Some(
                    (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_RING_F_EVENT_IDX)
                        .to_le_bytes()
                        .to_vec(),
                ),
                req::GET_PROTOCOL_FEATURES => Some(
                    (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK)
                        .bits()
                        .to_le_bytes()
                        .to_vec(),
                ),
                req::GET_QUEUE_NUM => Some(queues.to_le_bytes().to_vec()),
                // struct vhost_vring_state: the index asked about, then 0.
                req::GET_VRING_BASE => {
                    let mut state = body.get(..4).unwrap_or(&[0; 4]).to_vec();
                    state.extend_from_slice(&[0; 4]);
                    Some(state)
                }
                // NEED_REPLY: an ack with 0 for success.
                _ if flags & 0x8 != 0 => Some(0u64.to_le_bytes().to_vec()),
                _ => None,
            };
            if let Some(value) = value {
                let mut reply = Vec::with_capacity(12 + value.len());
                reply.extend_from_slice(&code.to_le_bytes());
                // Version 1, and this is a reply.
                reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                reply.extend_from_slice(&(value.len() as u32).to_le_bytes());
                reply.extend_from_slice(&value);
                if conn.write_all(&reply).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_shared_guest_memory;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::peer::{req, VhostUserPeer as Recorder};

    const HEADER: u64 = 0x10_0000;
    const REPLY: u64 = 0x20_0000;

    /// An activation context on shared memory whose two queues (hiprio,
    /// request) come from `MockSplitQueue`s; the request queue holds one
    /// FUSE request (a 40-byte header, then room for the reply header).
    fn context(mem: &GuestMemoryMmap) -> (ActivateContext, Vec<EventFd>) {
        let hiprio = MockSplitQueue::create(mem, GuestAddress(0x30_0000), 16);
        let request = MockSplitQueue::create(mem, GuestAddress(0x40_0000), 16);
        let header = FuseInHeader {
            len: 40,
            opcode: 15, // FUSE_READ
            unique: 0x1234,
            ..Default::default()
        };
        mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        request
            .build_desc_chain(&[
                RawDescriptor::from(SplitDescriptor::new(HEADER, 40, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(
                    REPLY,
                    16,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )),
            ])
            .unwrap();
        let queues = vec![
            hiprio.create_queue::<Queue>().unwrap(),
            request.create_queue::<Queue>().unwrap(),
        ];
        let events: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues,
            queue_events: events.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            acked_features: VIRTIO_F_VERSION_1,
        };
        (ctx, events)
    }

    #[test]
    fn config_space_holds_the_tag_and_the_request_queue_count() {
        let backend = Recorder::start("config", 2).unwrap();
        let fs = Fs::connect(&backend.share(&"t".repeat(36))).unwrap();
        assert_eq!(fs.device_type(), VIRTIO_ID_FS);
        assert_eq!(
            fs.queue_max_sizes(),
            &[16, 16],
            "hiprio and one request queue"
        );
        let mut tag = [0u8; 36];
        fs.read_config(0, &mut tag);
        assert_eq!(tag, [b't'; 36], "a 36-byte tag fills the field, no NUL");
        let mut count = [0u8; 4];
        fs.read_config(36, &mut count);
        assert_eq!(u32::from_le_bytes(count), 1);
        let mut past = [0xffu8; 4];
        fs.read_config(40, &mut past);
        assert_eq!(past, [0; 4]);
        let short = Fs::connect(&backend_share_again("short")).unwrap();
        let mut tag = [0xffu8; 8];
        short.read_config(0, &mut tag);
        assert_eq!(&tag, b"pod\0\0\0\0\0", "a short tag is NUL-padded");
        assert_eq!(
            fs.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            "the backend's ring features pass, its vhost-user bit does not"
        );
    }

    fn backend_share_again(name: &str) -> FsConfig {
        let backend = Recorder::start(name, 2).unwrap();
        let share = backend.share("pod");
        // The listener lives on in the recorder's thread until it accepts.
        std::mem::forget(backend);
        share
    }

    #[test]
    fn negotiation_activation_and_reset_follow_the_vhost_user_order() {
        let backend = Recorder::start("order", 2).unwrap();
        let mut fs = Fs::connect(&backend.share("pod")).unwrap();
        assert_eq!(
            backend.take_log(),
            [
                req::SET_OWNER,
                req::GET_FEATURES,
                req::GET_PROTOCOL_FEATURES,
                req::SET_PROTOCOL_FEATURES,
                req::GET_QUEUE_NUM
            ]
        );
        let mem = create_shared_guest_memory(64 << 20).unwrap();
        let (ctx, _events) = context(&mem);
        let interrupt = ctx.interrupt.clone();
        fs.activate(ctx).unwrap();
        let ring = [
            req::SET_VRING_NUM,
            req::SET_VRING_ADDR,
            req::SET_VRING_BASE,
            req::SET_VRING_CALL,
            req::SET_VRING_KICK,
        ];
        let mut expected = vec![req::SET_FEATURES, req::SET_MEM_TABLE];
        expected.extend(ring);
        expected.extend(ring);
        expected.extend([req::SET_VRING_ENABLE, req::SET_VRING_ENABLE]);
        assert_eq!(backend.take_log(), expected);
        assert_eq!(
            interrupt.status() & INT_VRING,
            INT_VRING,
            "the backend's interrupts read as used-ring interrupts"
        );
        interrupt.ack(INT_VRING);
        assert_eq!(interrupt.status() & INT_VRING, INT_VRING, "and stay so");
        fs.reset();
        assert_eq!(
            backend.take_log(),
            [
                req::SET_VRING_ENABLE,
                req::GET_VRING_BASE,
                req::SET_VRING_ENABLE,
                req::GET_VRING_BASE
            ],
            "a reset stops both rings in the backend"
        );
        assert!(fs.describe().contains("connected"), "{}", fs.describe());
    }

    #[test]
    fn private_guest_memory_is_refused_and_the_share_fails_instead() {
        let backend = Recorder::start("private", 2).unwrap();
        let mut fs = Fs::connect(&backend.share("pod")).unwrap();
        let mem = crate::vstate::memory::create_guest_memory(64 << 20).unwrap();
        let (ctx, _events) = context(&mem);
        fs.activate(ctx).unwrap();
        assert!(fs.describe().contains("gone"), "{}", fs.describe());
        wait_for_failed_request(&fs);
        assert_eq!(
            mem.read_obj::<i32>(GuestAddress(REPLY + 4)).unwrap(),
            -libc::EIO
        );
    }

    fn wait_for_failed_request(fs: &Fs) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fs.state.failed_requests.load(Ordering::SeqCst) == 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_backend_that_hangs_up_leaves_the_vmm_answering_eio() {
        let backend = Recorder::start("hangup", 2).unwrap();
        let mut fs = Fs::connect(&backend.share("pod")).unwrap();
        let mem = create_shared_guest_memory(64 << 20).unwrap();
        let (ctx, events) = context(&mem);
        let interrupt = ctx.interrupt.clone();
        fs.activate(ctx).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(REPLY)).unwrap(), 0);
        // The request was never answered; the backend dies with it taken.
        backend.hang_up();
        wait_for_failed_request(&fs);
        let reply: FuseOutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(
            (reply.len, reply.error, reply.unique),
            (16, -libc::EIO, 0x1234),
            "the outstanding request is answered with EIO"
        );
        assert!(
            interrupt.irqfd().read().is_ok(),
            "the guest was interrupted"
        );
        assert!(fs
            .describe()
            .contains("gone, 1 request(s) answered with EIO"));
        // A kick after the hang-up is served too, and reset no longer
        // talks to the dead backend.
        events[1].write(1).unwrap();
        fs.reset();
        assert!(backend.take_log().iter().all(|&c| c != req::GET_VRING_BASE));
    }
}
