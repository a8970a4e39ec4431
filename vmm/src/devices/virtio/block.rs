//! virtio-blk (block device, ID 2) over a raw image file, with synchronous
//! I/O on the device's worker thread: read, write, flush and get-id.
//!
//! A request is a 16-byte header (type, reserved, sector) in device-readable
//! memory, data buffers, and a one-byte status at the very end of the
//! device-writable part. Every part is located through virtio-queue's
//! Reader/Writer, which check each descriptor against guest memory; a
//! request whose descriptors are unusable is dropped with length 0.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

use super::{
    drain_queue, read_config_bytes, serve_and_notify, serve_queues, ActivateContext, ActivateError,
    Interrupt, VirtioDevice, WorkerThread, VIRTIO_F_VERSION_1,
};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;
/// The longest device ID (and GET_ID answer).
pub const MAX_ID_LEN: usize = 20;
/// The largest data transfer one request may carry; a guest that raises
/// its request size past this gets an I/O error rather than an unbounded
/// host allocation.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
const QUEUE_SIZE: u16 = 256;
/// Segments per request offered to the driver (queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest segment offered to the driver: with [`SEG_MAX`] segments, the
/// largest request the limits allow fits [`MAX_REQUEST_BYTES`], so the
/// device never refuses a request its own limits let through.
const SIZE_MAX: u32 = 128 << 10;
const _: () = assert!(SEG_MAX as usize * SIZE_MAX as usize <= MAX_REQUEST_BYTES);

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Request status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// The request failed (bad range, read-only device, host I/O error).
    pub const IOERR: u8 = 1;
    /// The request type is not supported.
    pub const UNSUPP: u8 = 2;
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: RequestHeader is plain old data with no padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for RequestHeader {}

/// The backing image of a block device.
pub struct Disk {
    file: File,
    sectors: u64,
    readonly: bool,
    id: [u8; MAX_ID_LEN],
    /// The bounce buffer between the image and guest memory, kept from
    /// request to request: a fresh 1 MiB allocation per request cost a
    /// page fault per page and halved sequential reads.
    bounce: Mutex<Vec<u8>>,
}

impl Disk {
    /// A disk over `file` (already opened read-only or read-write, as
    /// `readonly` says) of `size` bytes, identified as `id`.
    pub fn new(file: File, size: u64, readonly: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; MAX_ID_LEN];
        let n = id.len().min(MAX_ID_LEN);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            file,
            sectors: size / SECTOR_SIZE,
            readonly,
            id: id_bytes,
            bounce: Mutex::new(Vec::new()),
        }
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The byte offset of `len` bytes at `sector`, if they lie on the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(offset)
    }

    fn read_into(&self, header: &RequestHeader, data: &mut Writer<'_>) -> u8 {
        let len = data.available_bytes();
        let Some(offset) = self
            .range(header.sector, len)
            .filter(|_| len <= MAX_REQUEST_BYTES)
        else {
            return status::IOERR;
        };
        let mut bounce = self.bounce.lock().unwrap_or_else(|p| p.into_inner());
        let buf = sized(&mut bounce, len);
        if self.file.read_exact_at(buf, offset).is_err() || data.write_all(buf).is_err() {
            return status::IOERR;
        }
        status::OK
    }

    fn write_from(&self, header: &RequestHeader, data: &mut Reader<'_>) -> u8 {
        let len = data.available_bytes();
        let Some(offset) = self
            .range(header.sector, len)
            .filter(|_| len <= MAX_REQUEST_BYTES)
        else {
            return status::IOERR;
        };
        if self.readonly {
            return status::IOERR;
        }
        let mut bounce = self.bounce.lock().unwrap_or_else(|p| p.into_inner());
        let buf = sized(&mut bounce, len);
        if data.read_exact(buf).is_err() || self.file.write_all_at(buf, offset).is_err() {
            return status::IOERR;
        }
        status::OK
    }

    /// Serves one request; returns the number of bytes written to the guest
    /// (data and status), or 0 when the request is unusable and dropped.
    pub fn handle(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            return 0;
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return 0; // no room for the status byte
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else {
            return 0;
        };
        let status = match reader.read_obj::<RequestHeader>() {
            Err(_) => status::IOERR,
            Ok(header) => match header.request_type {
                request::IN => self.read_into(&header, &mut writer),
                request::OUT => self.write_from(&header, &mut reader),
                request::FLUSH if self.readonly => status::OK,
                request::FLUSH => match self.file.sync_data() {
                    Ok(()) => status::OK,
                    Err(_) => status::IOERR,
                },
                request::GET_ID => {
                    let n = data_len.min(MAX_ID_LEN);
                    match writer.write_all(&self.id[..n]) {
                        Ok(()) => status::OK,
                        Err(_) => status::IOERR,
                    }
                }
                _ => status::UNSUPP,
            },
        };
        if status_writer.write_obj(status).is_err() {
            return 0;
        }
        (writer.bytes_written() + status_writer.bytes_written()) as u32
    }
}

/// The first `len` bytes of `buf`, growing it if needed (`len` is at most
/// [`MAX_REQUEST_BYTES`]).
fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Serves every available request on `queue`; returns whether any was
/// completed.
pub fn process_queue(mem: &GuestMemoryMmap, queue: &mut Queue, disk: &Disk) -> bool {
    drain_queue(mem, queue, |chain| disk.handle(mem, chain))
}

/// A virtio block device.
pub struct Block {
    disk: Arc<Disk>,
    config: Vec<u8>,
    worker: Option<WorkerThread>,
}

impl Block {
    /// A block device over `disk`.
    pub fn new(disk: Disk) -> Self {
        // virtio_blk_config: capacity, size_max, seg_max (the rest zero).
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&disk.sectors().to_le_bytes());
        config.extend_from_slice(&SIZE_MAX.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            disk: Arc::new(disk),
            config,
            worker: None,
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.readonly {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [queue] = ctx.take_queues::<1>()?;
        let ActivateContext {
            mem,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let queue = Mutex::new(queue);
        let disk = self.disk.clone();
        let serve = move |_: usize| serve_queue(&mem, &queue, &disk, &interrupt);
        self.worker = Some(serve_queues("moat_virtio_blk".into(), queue_events, serve)?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

fn serve_queue(mem: &GuestMemoryMmap, queue: &Mutex<Queue>, disk: &Disk, interrupt: &Interrupt) {
    serve_and_notify(mem, queue, interrupt, |q| process_queue(mem, q, disk));
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM_SIZE: usize = 0x40_0000;
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    fn disk(sectors: u64, readonly: bool) -> (Disk, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "moat-blk-{}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        let contents: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, &contents).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(&path)
            .unwrap();
        (
            Disk::new(file, sectors * SECTOR_SIZE, readonly, "disk-serial-0001"),
            path,
        )
    }

    /// Submits one request and returns (used length, status byte).
    fn submit(
        mem: &GuestMemoryMmap,
        disk: &Disk,
        request_type: u32,
        sector: u64,
        descs: &[RawDescriptor],
    ) -> (u32, u8) {
        let header = RequestHeader {
            request_type,
            _reserved: 0,
            sector,
        };
        mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(process_queue(mem, &mut q, disk));
        let used = vq.used().ring().ref_at(0).unwrap().load().len();
        (used, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn rw(header_len: u32, data_len: u32, data_flags: u32) -> Vec<RawDescriptor> {
        vec![
            desc(HEADER, header_len, 0),
            desc(DATA, data_len, data_flags),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ]
    }

    #[test]
    fn read_returns_the_sectors_asked_for() {
        let mem = memory();
        let (disk, path) = disk(8, false);
        let (used, st) = submit(
            &mem,
            &disk,
            request::IN,
            2,
            &rw(16, 1024, VRING_DESC_F_WRITE),
        );
        std::fs::remove_file(path).unwrap();
        assert_eq!((used, st), (1025, status::OK));
        let mut data = vec![0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data[..512].iter().all(|b| *b == 2) && data[512..].iter().all(|b| *b == 3));
    }

    #[test]
    fn write_lands_in_the_image_and_flush_succeeds() {
        let mem = memory();
        let (disk, path) = disk(8, false);
        mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        let (used, st) = submit(&mem, &disk, request::OUT, 5, &rw(16, 512, 0));
        assert_eq!((used, st), (1, status::OK));
        let flush = [desc(HEADER, 16, 0), desc(STATUS, 1, VRING_DESC_F_WRITE)];
        assert_eq!(
            submit(&mem, &disk, request::FLUSH, 0, &flush),
            (1, status::OK)
        );
        let image = std::fs::read(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        assert!(image[5 * 512..6 * 512].iter().all(|b| *b == 0xab));
        assert!(
            image[6 * 512..7 * 512].iter().all(|b| *b == 6),
            "next sector untouched"
        );
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mem = memory();
        let (disk, path) = disk(8, true);
        let (used, st) = submit(&mem, &disk, request::OUT, 0, &rw(16, 512, 0));
        let image = std::fs::read(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        assert_eq!((used, st), (1, status::IOERR));
        assert!(image[..512].iter().all(|b| *b == 0));
        assert_ne!(Block::new(disk).features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn access_past_the_end_is_an_io_error() {
        let mem = memory();
        let (disk, path) = disk(8, false);
        assert_eq!(
            submit(
                &mem,
                &disk,
                request::IN,
                7,
                &rw(16, 1024, VRING_DESC_F_WRITE)
            )
            .1,
            status::IOERR
        );
        assert_eq!(
            submit(
                &mem,
                &disk,
                request::IN,
                u64::MAX / 256,
                &rw(16, 512, VRING_DESC_F_WRITE)
            )
            .1,
            status::IOERR
        );
        assert_eq!(
            submit(&mem, &disk, request::OUT, u64::MAX, &rw(16, 512, 0)).1,
            status::IOERR
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mem = memory();
        let (disk, path) = disk(1, false);
        let (used, st) = submit(
            &mem,
            &disk,
            request::GET_ID,
            0,
            &rw(16, 20, VRING_DESC_F_WRITE),
        );
        std::fs::remove_file(path).unwrap();
        assert_eq!((used, st), (21, status::OK));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..16], b"disk-serial-0001");
        assert_eq!(&id[16..], &[0; 4]);
    }

    #[test]
    fn unknown_type_is_unsupported_and_short_header_is_an_error() {
        let mem = memory();
        let (disk, path) = disk(1, false);
        assert_eq!(
            submit(&mem, &disk, 99, 0, &rw(16, 512, VRING_DESC_F_WRITE)).1,
            status::UNSUPP
        );
        assert_eq!(
            submit(&mem, &disk, request::IN, 0, &rw(8, 512, VRING_DESC_F_WRITE)).1,
            status::IOERR
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn descriptors_outside_guest_memory_drop_the_request() {
        let mem = memory();
        let (disk, path) = disk(8, false);
        let bad_data = [
            desc(HEADER, 16, 0),
            desc(MEM_SIZE as u64 - 8, 512, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(
            submit(&mem, &disk, request::IN, 0, &bad_data),
            (0, 0xff),
            "status untouched"
        );
        let no_status = [desc(HEADER, 16, 0)];
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&no_status).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        process_queue(&mem, &mut q, &disk);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn oversized_request_is_refused_without_allocating_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap();
        let (disk, path) = disk(1, false);
        let big = [
            desc(HEADER, 16, 0),
            desc(DATA, 0x300_0000, VRING_DESC_F_WRITE),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ];
        assert_eq!(submit(&mem, &disk, request::IN, 0, &big).1, status::IOERR);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_reports_capacity() {
        let (disk, path) = disk(8, false);
        let block = Block::new(disk);
        std::fs::remove_file(path).unwrap();
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 8);
        let mut seg_max = [0u8; 4];
        block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    }
}
