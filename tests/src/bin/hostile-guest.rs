//! hostile-guest: a guest that attacks its own VMM, for the hostile-guest
//! test (`vmm/tests/hostile.rs`). A static binary in the test initramfs,
//! run as root by the test init; it reports on the console in
//! `MOAT_GUEST hostile <what>: <value>` lines.
//!
//!   hostile-guest connect-flood PORT COUNT HOLD_SECS
//!       COUNT non-blocking connects to the host's PORT at once, through
//!       the guest's own vsock driver; every one that connects is filled
//!       with as much data as its credit allows, and all are held open for
//!       HOLD_SECS.
//!   hostile-guest raw-flood PORT SECONDS
//!       unbinds the guest's vsock driver and drives the device itself
//!       through /dev/mem, as a hostile kernel would: it posts no rx
//!       buffers and keeps the tx ring full of packets the device must
//!       answer or refuse (data for connections that do not exist,
//!       REQUESTs to PORT, lying lengths, a spoofed source, unknown ops)
//!       until the device stops taking them or SECONDS pass; then it posts
//!       rx buffers, keeps flooding, and counts what comes back.
//!   hostile-guest console-spam SECONDS
//!       writes to the serial console (/dev/ttyS0) as fast as it can for
//!       SECONDS.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use moat_tests::af_vsock::{start_connect, HOST_CID};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("missing or bad {what}"))
}

fn report(what: &str, value: impl std::fmt::Display) {
    println!("MOAT_GUEST hostile {what}: {value}");
    let _ = io::stdout().flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("connect-flood") => (|| {
            connect_flood(
                arg(&args, 1, "PORT")?,
                arg(&args, 2, "COUNT")?,
                arg(&args, 3, "HOLD_SECS")?,
            )
        })(),
        Some("raw-flood") => (|| raw_flood(arg(&args, 1, "PORT")?, arg(&args, 2, "SECONDS")?))(),
        Some("console-spam") => (|| console_spam(arg(&args, 1, "SECONDS")?))(),
        other => Err(format!("unknown command {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report("error", format!("{} {e}", args.join(" ")));
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// connect-flood: the guest's own driver, used without restraint.

fn raise_fd_limit(want: u64) -> Result<(), String> {
    let limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
        return Err(format!(
            "cannot raise RLIMIT_NOFILE to {want}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn socket_error(fd: &OwnedFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most len bytes into err.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        err
    }
}

fn connect_flood(port: u32, count: usize, hold_secs: u64) -> Result<(), String> {
    raise_fd_limit(count as u64 + 64)?;
    let began = Instant::now();
    let mut pending: Vec<OwnedFd> = Vec::with_capacity(count);
    let mut refused_at_once = 0usize;
    for _ in 0..count {
        match start_connect(HOST_CID, port) {
            Ok(fd) => pending.push(fd),
            Err(_) => refused_at_once += 1,
        }
    }
    // Wait for every connect to end: connected, reset, or timed out by the
    // guest kernel (2 s by default).
    let mut connected: Vec<OwnedFd> = Vec::new();
    let mut reset = 0usize;
    let mut timed_out = 0usize;
    let mut other = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() && Instant::now() < deadline {
        let mut polls: Vec<libc::pollfd> = pending
            .iter()
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // SAFETY: polls is a valid array of polls.len() pollfds.
        unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 500) };
        let mut still = Vec::new();
        for (fd, p) in pending.into_iter().zip(polls) {
            if p.revents == 0 {
                still.push(fd);
                continue;
            }
            match socket_error(&fd) {
                0 if p.revents & (libc::POLLERR | libc::POLLHUP) == 0 => connected.push(fd),
                libc::ECONNRESET | 0 => reset += 1,
                libc::ETIMEDOUT => timed_out += 1,
                _ => other += 1,
            }
        }
        pending = still;
    }
    report(
        "connects",
        format!(
            "{} connected {} reset {} timed-out {} other {} refused-at-once {} unfinished of {count} in {:.1} s",
            connected.len(),
            reset,
            timed_out,
            other,
            refused_at_once,
            pending.len(),
            began.elapsed().as_secs_f64()
        ),
    );
    // Fill every connection up to its credit: the host never reads, so
    // the bytes stay in moat-vmm (or the host socket's buffer).
    let chunk = vec![0x5au8; 64 * 1024];
    let mut held: u64 = 0;
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < Duration::from_secs(3) {
        let mut moved = false;
        for fd in &connected {
            // SAFETY: writes at most chunk.len() bytes from chunk.
            let n = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    chunk.as_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                held += n as u64;
                moved = true;
            }
        }
        if moved {
            last_progress = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    report("bytes sent and unread", held);
    report("holding", format!("{} connections", connected.len()));
    std::thread::sleep(Duration::from_secs(hold_secs));
    Ok(())
}

// ---------------------------------------------------------------------------
// raw-flood: a userspace virtio-mmio driver with no manners.

/// virtio-mmio registers (virtio 1.x §4.2.2).
mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const INTERRUPT_STATUS: usize = 0x060;
    pub const INTERRUPT_ACK: usize = 0x064;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC: usize = 0x080;
    pub const QUEUE_DRIVER: usize = 0x090;
    pub const QUEUE_DEVICE: usize = 0x0a0;
    pub const CONFIG: usize = 0x100;
}

const MMIO_MAGIC: u32 = 0x7472_6976;
const VIRTIO_ID_VSOCK: u32 = 19;
const PAGE: usize = 4096;
/// Entries per queue: small, so that the rings fit one page each.
const RING: u16 = 16;
/// Bytes of each packet buffer (header and up to 212 bytes of payload).
const SLOT: usize = 256;
const HEADER: usize = 44;
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const EVENT_QUEUE: u32 = 2;

/// One page of device registers, mapped from /dev/mem.
struct Mmio {
    base: *mut u8,
}

impl Mmio {
    fn map(phys: u64) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| format!("open /dev/mem: {e}"))?;
        // SAFETY: maps one page of /dev/mem; the result is checked.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                phys as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mmap /dev/mem at {phys:#x}: {}",
                io::Error::last_os_error()
            ));
        }
        Ok(Self { base: base.cast() })
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: offset is a register inside the mapped page.
        unsafe { ptr::read_volatile(self.base.add(offset).cast::<u32>()) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: offset is a register inside the mapped page.
        unsafe { ptr::write_volatile(self.base.add(offset).cast::<u32>(), value) }
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write(offset, value as u32);
        self.write(offset + 4, (value >> 32) as u32);
    }
}

/// Locked anonymous pages whose guest-physical addresses the device is
/// given (from /proc/self/pagemap).
struct Dma {
    base: *mut u8,
    frames: Vec<u64>,
}

impl Dma {
    fn new(pages: usize) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap DMA pages: {}", io::Error::last_os_error()));
        }
        let base: *mut u8 = base.cast();
        // SAFETY: the mapping is pages * PAGE bytes long.
        unsafe { ptr::write_bytes(base, 0, pages * PAGE) };
        let file =
            std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
        let mut frames = Vec::with_capacity(pages);
        for page in 0..pages {
            use std::os::unix::fs::FileExt;
            let virt = base as usize + page * PAGE;
            let mut entry = [0u8; 8];
            file.read_exact_at(&mut entry, (virt / PAGE * 8) as u64)
                .map_err(|e| format!("pagemap entry: {e}"))?;
            let entry = u64::from_le_bytes(entry);
            let frame = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || frame == 0 {
                return Err(format!("page {virt:#x} has no frame (pagemap {entry:#x})"));
            }
            frames.push(frame);
        }
        Ok(Self { base, frames })
    }

    fn phys(&self, offset: usize) -> u64 {
        self.frames[offset / PAGE] * PAGE as u64 + (offset % PAGE) as u64
    }

    fn ptr<T>(&self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets inside the mapping.
        unsafe { self.base.add(offset).cast() }
    }
}

/// A split virtqueue of [`RING`] entries in one DMA page: descriptors at
/// 0, the available ring at 512, the used ring at 1024.
struct Queue {
    page: usize,
    next_avail: u16,
    last_used: u16,
}

impl Queue {
    const DESC: usize = 0;
    const AVAIL: usize = 512;
    const USED: usize = 1024;

    fn set_descriptor(&self, dma: &Dma, slot: u16, addr: u64, len: u32, writable: bool) {
        let d = self.page * PAGE + Self::DESC + usize::from(slot) * 16;
        // SAFETY: the descriptor table lies inside this queue's page.
        unsafe {
            ptr::write_volatile(dma.ptr::<u64>(d), addr);
            ptr::write_volatile(dma.ptr::<u32>(d + 8), len);
            ptr::write_volatile(dma.ptr::<u16>(d + 12), if writable { 2 } else { 0 });
            ptr::write_volatile(dma.ptr::<u16>(d + 14), 0);
        }
    }

    /// Makes descriptor `slot` available and publishes the new index.
    fn offer(&mut self, dma: &Dma, slot: u16) {
        let ring = self.page * PAGE + Self::AVAIL + 4 + usize::from(self.next_avail % RING) * 2;
        // SAFETY: the available ring lies inside this queue's page.
        unsafe { ptr::write_volatile(dma.ptr::<u16>(ring), slot) };
        self.next_avail = self.next_avail.wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: as above.
        unsafe {
            ptr::write_volatile(
                dma.ptr::<u16>(self.page * PAGE + Self::AVAIL + 2),
                self.next_avail,
            )
        };
        fence(Ordering::SeqCst);
    }

    fn used_index(&self, dma: &Dma) -> u16 {
        fence(Ordering::SeqCst);
        // SAFETY: the used ring lies inside this queue's page.
        unsafe { ptr::read_volatile(dma.ptr::<u16>(self.page * PAGE + Self::USED + 2)) }
    }

    /// The next used element (descriptor id, length), if the device has
    /// returned one.
    fn take_used(&mut self, dma: &Dma) -> Option<(u32, u32)> {
        if self.used_index(dma) == self.last_used {
            return None;
        }
        let e = self.page * PAGE + Self::USED + 4 + usize::from(self.last_used % RING) * 8;
        self.last_used = self.last_used.wrapping_add(1);
        // SAFETY: the used ring lies inside this queue's page.
        unsafe {
            Some((
                ptr::read_volatile(dma.ptr::<u32>(e)),
                ptr::read_volatile(dma.ptr::<u32>(e + 4)),
            ))
        }
    }

    fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }
}

/// The guest-physical base of each `virtio_mmio.device=` on the kernel
/// command line.
fn mmio_bases() -> Result<Vec<u64>, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| e.to_string())?;
    Ok(cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(|d| d.split('@').nth(1))
        .filter_map(|a| a.split(':').next())
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect())
}

/// Takes the vsock device from the guest kernel's driver.
fn unbind_vsock_driver() -> Result<String, String> {
    for dev in std::fs::read_dir("/sys/bus/virtio/devices").map_err(|e| e.to_string())? {
        let dev = dev.map_err(|e| e.to_string())?;
        let id = std::fs::read_to_string(dev.path().join("device")).unwrap_or_default();
        if id.trim() != "0x0013" {
            continue;
        }
        let name = dev.file_name().to_string_lossy().into_owned();
        let unbind = dev.path().join("driver/unbind");
        std::fs::write(&unbind, &name)
            .map_err(|e| format!("unbind {name} at {}: {e}", unbind.display()))?;
        return Ok(name);
    }
    Err("no virtio device 0x0013 (vsock) in /sys/bus/virtio/devices".into())
}

#[allow(clippy::too_many_arguments)]
fn write_header(
    buf: *mut u8,
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
) {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&type_.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&(256u32 * 1024).to_le_bytes());
    // SAFETY: buf points at a SLOT-byte packet buffer, SLOT > HEADER.
    unsafe { ptr::copy_nonoverlapping(h.as_ptr(), buf, HEADER) };
}

/// Writes the `n`th hostile packet into `buf`; returns the bytes the
/// descriptor covers.
fn hostile_packet(buf: *mut u8, n: u64, guest_cid: u64, port: u32) -> u32 {
    const PAYLOAD: u32 = 64;
    let local = 10_000 + (n % 50_000) as u32;
    match n % 5 {
        // Data for a connection that does not exist: owed a RST.
        0 => write_header(
            buf,
            guest_cid,
            local,
            9_000 + (n % 997) as u32,
            PAYLOAD,
            1,
            5,
        ),
        // A REQUEST to the host's listener that never accepts.
        1 => write_header(buf, guest_cid, 100_000 + n as u32, port, 0, 1, 1),
        // A header that claims 2 GiB of payload in a 64-byte buffer.
        2 => write_header(buf, guest_cid, local, port, 0x7fff_0000, 1, 5),
        // A source CID that is not this guest's.
        3 => write_header(buf, guest_cid + 1, local, port, 0, 1, 1),
        // A socket type and an op that do not exist.
        _ => write_header(buf, guest_cid, local, port, 0, 2, 99),
    }
    (HEADER as u32) + PAYLOAD
}

fn raw_flood(port: u32, seconds: u64) -> Result<(), String> {
    let bases = mmio_bases()?;
    let mut device = None;
    for base in bases {
        let mmio = Mmio::map(base)?;
        if mmio.read(reg::MAGIC) == MMIO_MAGIC && mmio.read(reg::DEVICE_ID) == VIRTIO_ID_VSOCK {
            device = Some((base, mmio));
            break;
        }
    }
    let (base, mmio) = device.ok_or("no virtio-mmio vsock device on the command line")?;
    if mmio.read(reg::VERSION) != 2 {
        return Err(format!("virtio-mmio version {}", mmio.read(reg::VERSION)));
    }
    let driver = unbind_vsock_driver()?;
    report("unbound", format!("{driver} at {base:#x}"));

    // Pages: one per queue (rx, tx, event), then tx and rx packet buffers.
    let dma = Dma::new(5)?;
    const TX_BUFS: usize = 3 * PAGE;
    const RX_BUFS: usize = 4 * PAGE;

    mmio.write(reg::STATUS, 0);
    mmio.write(reg::STATUS, 1 | 2); // ACKNOWLEDGE | DRIVER
    mmio.write(reg::DRIVER_FEATURES_SEL, 1);
    mmio.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
    mmio.write(reg::DRIVER_FEATURES_SEL, 0);
    mmio.write(reg::DRIVER_FEATURES, 0);
    mmio.write(reg::STATUS, 1 | 2 | 8); // FEATURES_OK
    if mmio.read(reg::STATUS) & 8 == 0 {
        return Err("the device refused FEATURES_OK".into());
    }
    let mut queues = Vec::new();
    for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
        mmio.write(reg::QUEUE_SEL, q);
        let max = mmio.read(reg::QUEUE_NUM_MAX);
        if max < u32::from(RING) {
            return Err(format!("queue {q}: QueueNumMax {max}"));
        }
        let page = q as usize;
        mmio.write(reg::QUEUE_NUM, u32::from(RING));
        mmio.write64(reg::QUEUE_DESC, dma.phys(page * PAGE + Queue::DESC));
        mmio.write64(reg::QUEUE_DRIVER, dma.phys(page * PAGE + Queue::AVAIL));
        mmio.write64(reg::QUEUE_DEVICE, dma.phys(page * PAGE + Queue::USED));
        mmio.write(reg::QUEUE_READY, 1);
        queues.push(Queue {
            page,
            next_avail: 0,
            last_used: 0,
        });
    }
    mmio.write(reg::STATUS, 1 | 2 | 8 | 4); // DRIVER_OK
    let status = mmio.read(reg::STATUS);
    if status & 0x40 != 0 || status & 4 == 0 {
        return Err(format!("device status {status:#x} after DRIVER_OK"));
    }
    let guest_cid =
        u64::from(mmio.read(reg::CONFIG)) | (u64::from(mmio.read(reg::CONFIG + 4)) << 32);
    report("device ready", format!("guest cid {guest_cid}"));
    let mut tx = queues.remove(1);
    let mut rx = queues.remove(0);

    let ack = |mmio: &Mmio| {
        let pending = mmio.read(reg::INTERRUPT_STATUS);
        if pending != 0 {
            mmio.write(reg::INTERRUPT_ACK, pending);
        }
    };
    // Phase 1: no rx buffers; keep the tx ring full until the device stops
    // taking packets (it must, or hold without bound what it owes us).
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut consumed = 0u64;
    let mut stalled = false;
    let refill = |tx: &mut Queue, sent: &mut u64| {
        while tx.in_flight() < RING {
            let slot = tx.next_avail % RING;
            let buf_offset = TX_BUFS + usize::from(slot) * SLOT;
            let len = hostile_packet(dma.ptr(buf_offset), *sent, guest_cid, port);
            tx.set_descriptor(&dma, slot, dma.phys(buf_offset), len, false);
            tx.offer(&dma, slot);
            *sent += 1;
        }
    };
    // Fills the tx ring, notifies, and counts what the device has taken.
    let kick_tx = |tx: &mut Queue, sent: &mut u64, consumed: &mut u64| {
        refill(tx, sent);
        mmio.write(reg::QUEUE_NOTIFY, TX_QUEUE);
        let mut moved = false;
        while tx.take_used(&dma).is_some() {
            *consumed += 1;
            moved = true;
        }
        ack(&mmio);
        moved
    };
    let mut last_progress = Instant::now();
    while Instant::now() < deadline {
        if kick_tx(&mut tx, &mut sent, &mut consumed) {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(3) {
            stalled = true;
            break;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    report(
        "tx without rx buffers",
        format!(
            "{consumed} packets taken, then {}",
            if stalled {
                "the device stopped taking more"
            } else {
                "time ran out"
            }
        ),
    );

    // Phase 2: post rx buffers and keep flooding: the device must deliver
    // what it owes and take tx again.
    for slot in 0..RING {
        let offset = RX_BUFS + usize::from(slot) * SLOT;
        rx.set_descriptor(&dma, slot, dma.phys(offset), SLOT as u32, true);
        rx.offer(&dma, slot);
    }
    mmio.write(reg::QUEUE_NOTIFY, RX_QUEUE);
    let mut received = std::collections::BTreeMap::<u16, u64>::new();
    let consumed_before = consumed;
    let drain_until = Instant::now() + Duration::from_secs(seconds.max(10));
    let mut last_progress = Instant::now();
    while Instant::now() < drain_until && last_progress.elapsed() < Duration::from_secs(3) {
        let mut moved = false;
        while let Some((id, len)) = rx.take_used(&dma) {
            moved = true;
            let slot = (id % u32::from(RING)) as u16;
            let offset = RX_BUFS + usize::from(slot) * SLOT;
            if (len as usize) >= HEADER {
                // SAFETY: offset + 32 lies inside the rx buffer page.
                let op = unsafe { ptr::read_volatile(dma.ptr::<u16>(offset + 30)) };
                *received.entry(u16::from_le(op)).or_default() += 1;
            }
            rx.set_descriptor(&dma, slot, dma.phys(offset), SLOT as u32, true);
            rx.offer(&dma, slot);
        }
        mmio.write(reg::QUEUE_NOTIFY, RX_QUEUE);
        if kick_tx(&mut tx, &mut sent, &mut consumed) {
            moved = true;
        }
        if moved {
            last_progress = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let names = |op: u16| match op {
        1 => "REQUEST".to_string(),
        2 => "RESPONSE".to_string(),
        3 => "RST".to_string(),
        4 => "SHUTDOWN".to_string(),
        5 => "RW".to_string(),
        6 => "CREDIT_UPDATE".to_string(),
        7 => "CREDIT_REQUEST".to_string(),
        n => format!("op{n}"),
    };
    let total: u64 = received.values().sum();
    let by_op: Vec<String> = received
        .iter()
        .map(|(op, n)| format!("{}={n}", names(*op)))
        .collect();
    report(
        "rx after buffers were posted",
        format!("{total} packets ({})", by_op.join(" ")),
    );
    report(
        "tx after buffers were posted",
        format!("{} more packets taken", consumed - consumed_before),
    );
    report("device status", format!("{:#x}", mmio.read(reg::STATUS)));
    Ok(())
}

// ---------------------------------------------------------------------------
// console-spam

fn console_spam(seconds: u64) -> Result<(), String> {
    let mut console = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/ttyS0")
        .map_err(|e| format!("open /dev/ttyS0: {e}"))?;
    let line = [b'#'; 1023]
        .iter()
        .copied()
        .chain(std::iter::once(b'\n'))
        .collect::<Vec<u8>>();
    let began = Instant::now();
    let mut written = 0u64;
    while began.elapsed() < Duration::from_secs(seconds) {
        console
            .write_all(&line)
            .map_err(|e| format!("write /dev/ttyS0: {e}"))?;
        written += line.len() as u64;
    }
    report(
        "console bytes",
        format!("{written} in {:.1} s", began.elapsed().as_secs_f64()),
    );
    Ok(())
}
