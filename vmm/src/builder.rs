//! Turns a checked [`VmConfig`] into a running VM and runs it to its end:
//! guest memory, kernel and initramfs, command line, machine tables,
//! devices, vCPUs.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_DEVICES_START, VIRTIO_IRQ_BASE,
    VIRTIO_IRQ_MAX,
};
use crate::arch::x86_64::{self as arch, ArchError, InitrdRange};
use crate::config::{parse_mac, SerialOutput, VmConfig};
use crate::devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORT_COUNT};
use crate::devices::legacy::serial::{
    ConsoleSink, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_COUNT,
};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::pseudo::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use crate::devices::virtio::block::{Block, Disk};
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::{Bus, BusError};
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::shutdown::{stop_on_host_signals, ExitReason, StateReport, StopSignal};
use crate::threads::Spawner;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, BootSpec, Buses, Vcpu, VcpuError};
use crate::vstate::vm::{self, VmError};

/// Offset of the 64-bit entry point from the start of a bzImage's
/// protected-mode code (`startup_64`).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_HDRS_OFFSET: u64 = 0x202;

/// Errors building or running a VM; each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// KVM or the VM could not be set up.
    #[error("KVM: {0}")]
    Vm(#[from] VmError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// A kernel or initramfs file could not be read.
    #[error("{what} {path}: {source}")]
    Io {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel image is in no format moat-vmm boots.
    #[error("kernel image {0} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" at 0x202)")]
    KernelFormat(PathBuf),
    /// linux-loader refused the kernel image.
    #[error("kernel image {path}: cannot load it: {source}")]
    KernelLoad {
        /// The image.
        path: PathBuf,
        /// What the loader reported.
        source: linux_loader::loader::Error,
    },
    /// The initramfs could not be placed or copied into guest memory.
    #[error("initramfs {path}: {reason}")]
    Initrd {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The command line could not be written.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// The machine tables could not be written.
    #[error("machine set-up: {0}")]
    Arch(#[from] ArchError),
    /// A device could not be created or attached.
    #[error("devices: {0}")]
    Device(String),
    /// A vCPU could not be created, configured or started.
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// The serial output file could not be opened.
    #[error("serial output {path}: {source}")]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<BusError> for BuildError {
    fn from(e: BusError) -> Self {
        BuildError::Device(e.to_string())
    }
}

/// How a VM's run ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// Why it stopped.
    pub reason: ExitReason,
    /// Time from VMM start to the guest's boot-complete marker, if it wrote one.
    pub boot_time: Option<Duration>,
    /// vCPU threads that did not stop when kicked.
    pub stuck_vcpus: usize,
}

/// A kernel loaded into guest memory.
struct LoadedKernel {
    entry: u64,
    end: u64,
    header: Option<setup_header>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The boot formats moat-vmm knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// Opens the kernel image and recognises its format from its magic bytes,
/// so that a wrong file is refused before KVM is touched.
fn open_kernel(path: &Path) -> Result<(File, KernelFormat), BuildError> {
    let mut file = File::open(path).map_err(io_err("kernel image", path))?;
    let mut magic = [0u8; 4];
    let format = if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        KernelFormat::Elf
    } else if file.seek(SeekFrom::Start(BZIMAGE_HDRS_OFFSET)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && magic == *b"HdrS"
    {
        KernelFormat::BzImage
    } else {
        return Err(BuildError::KernelFormat(path.to_path_buf()));
    };
    file.rewind().map_err(io_err("kernel image", path))?;
    Ok((file, format))
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mut file: File,
    format: KernelFormat,
) -> Result<LoadedKernel, BuildError> {
    let load_err = |source| BuildError::KernelLoad {
        path: path.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: result.kernel_load.0,
                end: result.kernel_end,
                header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: result.kernel_end,
                header: result.setup_header,
            })
        }
    }
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel: &LoadedKernel,
) -> Result<InitrdRange, BuildError> {
    let mut file = File::open(path).map_err(io_err("initramfs", path))?;
    let size = file.metadata().map_err(io_err("initramfs", path))?.len();
    let initrd_err = |reason: String| BuildError::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    if size == 0 {
        return Err(initrd_err("the file is empty".into()));
    }
    let addr = arch::initrd_load_addr(
        mem_size,
        size,
        kernel.end,
        kernel.header.map(|h| h.initrd_addr_max),
    )
    .map_err(|e| initrd_err(e.to_string()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| initrd_err(format!("cannot copy it into guest memory: {e}")))?;
    Ok(InitrdRange { addr, size })
}

fn write_cmdline(mem: &GuestMemoryMmap, text: &str) -> Result<usize, BuildError> {
    let cmdline = Cmdline::try_from(text, CMDLINE_MAX_SIZE)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    Ok(text.len() + 1)
}

fn console_writer(serial: &SerialOutput) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File { path, cap } => Box::new(CappedWriter::new(
            File::create(path).map_err(|source| BuildError::SerialFile {
                path: path.clone(),
                source,
            })?,
            *cap,
        )),
    })
}

/// The default cap of a `--serial file:` console log.
pub use crate::config::CONSOLE_FILE_CAP;

/// Passes writes through until `cap` bytes, then notes the cut once and
/// drops the rest (reporting it written, so the guest never stalls).
pub struct CappedWriter<W> {
    inner: W,
    cap: u64,
    written: u64,
}

impl<W: Write> CappedWriter<W> {
    /// A writer that lets at most `cap` bytes of output through to `inner`.
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            cap,
            written: 0,
        }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.cap {
            return Ok(buf.len());
        }
        let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX);
        let take = buf.len().min(room);
        self.inner.write_all(&buf[..take])?;
        self.written += take as u64;
        if self.written >= self.cap {
            let _ = writeln!(
                self.inner,
                "\n[moat-vmm: console log capped at {} bytes; the rest is dropped]",
                self.cap
            );
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The legacy devices on the port bus: COM1 (interrupting through an irqfd),
/// the i8042 reset line and the boot timer.
fn attach_legacy_devices(
    vm: &VmFd,
    console: Box<dyn Write + Send>,
    stop: &StopSignal,
    vmm_start: Instant,
    boot_time: Arc<Mutex<Option<Duration>>>,
) -> Result<Bus, BuildError> {
    let device_err = |what: &str, e: std::io::Error| BuildError::Device(format!("{what}: {e}"));
    let com1_irq =
        EventFd::new(EFD_NONBLOCK).map_err(|e| device_err("COM1 interrupt eventfd", e))?;
    vm.register_irqfd(&com1_irq, COM1_IRQ)
        .map_err(|e| BuildError::Device(format!("cannot attach COM1 to IRQ {COM1_IRQ}: {e}")))?;
    let serial = SerialDevice::new(
        EventFdTrigger(com1_irq),
        ConsoleSink::new(console, stop.clone()),
    );

    let mut bus = Bus::pio();
    bus.insert(COM1_PORT, COM1_PORT_COUNT, Arc::new(Mutex::new(serial)))?;
    bus.insert(
        I8042_PORT,
        I8042_PORT_COUNT,
        Arc::new(Mutex::new(I8042::new(stop.clone()))),
    )?;
    bus.insert(
        BOOT_TIMER_PORT,
        1,
        Arc::new(Mutex::new(BootTimer::new(vmm_start, boot_time))),
    )?;
    Ok(bus)
}

/// A virtio device's transport, shared by the MMIO bus and the state report.
type SharedTransport = Arc<Mutex<MmioTransport>>;

/// Places the virtio devices in consecutive MMIO windows with consecutive
/// IRQs, wires their notifications (ioeventfd) and interrupts (irqfd), and
/// returns the MMIO bus, the `virtio_mmio.device=` kernel arguments that
/// tell the guest where they are, and the transports (for state reports).
fn attach_virtio_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<(Bus, Vec<String>, Vec<SharedTransport>), BuildError> {
    let mut bus = Bus::mmio();
    let mut args = Vec::new();
    let mut transports = Vec::new();
    for (index, device) in devices.into_iter().enumerate() {
        let irq = VIRTIO_IRQ_BASE + index as u32;
        if irq > VIRTIO_IRQ_MAX {
            return Err(BuildError::Device(format!(
                "too many virtio devices: at most {} fit the IOAPIC",
                VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1
            )));
        }
        let base = MMIO_DEVICES_START + index as u64 * MMIO_WINDOW_SIZE;
        let kind = device.device_type();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            BuildError::Device(format!(
                "virtio device {index} (type {kind}) at {base:#x}: {what}: {e}"
            ))
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|e| fail("interrupt eventfd", &e))?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|e| fail("attach IRQ", &e))?;
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))
            .map_err(|e| fail("queue eventfds", &e))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(|e| fail("register queue notification", &e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
        transports.push(transport);
        args.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    Ok((bus, args, transports))
}

/// The configured virtio devices, block devices first so that the first
/// one is /dev/vda, then network devices (eth0 first).
fn virtio_devices(config: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for block in &config.blocks {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!block.readonly)
            .open(&block.path)
            .map_err(io_err("block device image", &block.path))?;
        let size = file
            .metadata()
            .map_err(io_err("block device image", &block.path))?
            .len();
        devices.push(Box::new(Block::new(Disk::new(
            file,
            size,
            block.readonly,
            &block.id,
        ))));
    }
    for net in &config.nets {
        let fail = |e: &dyn std::fmt::Display| {
            BuildError::Device(format!("network device {:?}: {e}", net.id))
        };
        let mac = net
            .mac
            .as_deref()
            .map(parse_mac)
            .transpose()
            .map_err(|e| fail(&e))?;
        let tap = Tap::open(&net.tap).map_err(|e| fail(&e))?;
        devices.push(Box::new(Net::new(tap, mac)));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock.cid, &vsock.uds_path)
            .map_err(|e| BuildError::Device(e.to_string()))?;
        devices.push(Box::new(device));
    }
    for share in &config.fs {
        let device = Fs::connect(share).map_err(|e| BuildError::Device(e.to_string()))?;
        devices.push(Box::new(device));
    }
    Ok(devices)
}

/// Builds the VM `config` describes and runs it until the guest resets or
/// powers off, a vCPU fails, or the host sends SIGTERM or SIGINT. `vmm_start` is when the VMM process began,
/// for the boot-time marker.
pub fn run_vm(config: &VmConfig, vmm_start: Instant) -> Result<VmOutcome, BuildError> {
    let stop = StopSignal::new();
    let report: StateReport = Arc::default();
    stop_on_host_signals(&stop, report.clone())
        .map_err(|e| BuildError::Device(format!("signal handling: {e}")))?;
    let (kernel_file, kernel_format) = open_kernel(&config.kernel)?;
    // Images and taps are the user's input: their errors come before KVM's.
    let devices = virtio_devices(config)?;
    let kvm = vm::open_kvm()?;
    let mem_size = config.memory_mib << 20;
    let guest_memory = if config.shared_memory {
        memory::create_shared_guest_memory(mem_size)?
    } else {
        memory::create_guest_memory(mem_size)?
    };
    let vm = vm::create_vm(&kvm)?;
    memory::register_guest_memory(&vm, &guest_memory)?;

    let kernel = load_kernel(&guest_memory, &config.kernel, kernel_file, kernel_format)?;
    let initrd = match &config.initramfs {
        Some(path) => Some(load_initrd(&guest_memory, path, mem_size, &kernel)?),
        None => None,
    };
    let (mmio_bus, device_args, transports) = attach_virtio_devices(&vm, &guest_memory, devices)?;
    let shutdown_transports = transports.clone();
    // The vCPU threads' IDs, once they run: the report kicks them.
    let vcpu_threads: Arc<Mutex<Vec<libc::pthread_t>>> = Arc::default();
    let report_vcpus = vcpu_threads.clone();
    *report.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move || {
        vcpu::request_register_report(&report_vcpus.lock().unwrap_or_else(|p| p.into_inner()));
        transports
            .iter()
            .enumerate()
            .map(|(index, t)| {
                let t = t.lock().unwrap_or_else(|p| p.into_inner());
                format!("virtio device {index}: {}", t.describe())
            })
            .collect()
    }));
    let mut cmdline = config.cmdline.clone();
    for arg in device_args {
        cmdline.push(' ');
        cmdline.push_str(&arg);
    }
    let cmdline_size = write_cmdline(&guest_memory, &cmdline)?;
    arch::configure_system(
        &guest_memory,
        mem_size,
        config.vcpus,
        cmdline_size,
        initrd,
        kernel.header,
    )?;

    let boot_time = Arc::new(Mutex::new(None));
    let console = console_writer(&config.serial)?;
    let pio_bus = attach_legacy_devices(&vm, console, &stop, vmm_start, boot_time.clone())?;
    let buses = Buses {
        pio: pio_bus,
        mmio: mmio_bus,
    };

    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Setup {
            what: "read the supported CPUID",
            source,
        })?;
    let spec = BootSpec {
        entry: kernel.entry,
        vcpu_count: config.vcpus,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let vcpus = (0..config.vcpus)
        .map(|index| {
            let vcpu = Vcpu::new(&vm, index)?;
            vcpu.configure(&guest_memory, &supported_cpuid, spec)?;
            Ok(vcpu)
        })
        .collect::<Result<Vec<_>, VcpuError>>()?;

    vcpu::install_kick_handler()?;
    // From here on device threads (started as the guest activates its
    // devices) come from this thread; see crate::threads.
    let spawner = Spawner::register();
    let stopper = spawner.stopper();
    stop.on_raise(move || stopper.stop());
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.start(buses.clone(), stop.clone()) {
            Ok(thread) => {
                vcpu_threads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(thread.as_pthread_t());
                threads.push(thread)
            }
            Err(e) => {
                stop.raise(ExitReason::VcpuFailure(e.to_string()));
                spawner.close();
                vcpu::stop_vcpus(threads);
                return Err(e.into());
            }
        }
    }

    if let Err(e) = seccomp::apply(ThreadKind::Main) {
        stop.raise(ExitReason::VcpuFailure(e.to_string()));
        spawner.close();
        vcpu::stop_vcpus(threads);
        return Err(e.into());
    }
    spawner.serve();
    let reason = stop.wait();
    // No more reports: the threads are about to end.
    report.lock().unwrap_or_else(|p| p.into_inner()).take();
    vcpu_threads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let stuck_vcpus = vcpu::stop_vcpus(threads);
    for transport in &shutdown_transports {
        transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
    let boot_time = *boot_time.lock().unwrap_or_else(|p| p.into_inner());
    Ok(VmOutcome {
        reason,
        boot_time,
        stuck_vcpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_console_stops_growing_at_its_cap() {
        let mut out = CappedWriter::new(Vec::new(), 100);
        for _ in 0..1000 {
            assert_eq!(out.write(&[b'x'; 7]).unwrap(), 7);
        }
        let text = String::from_utf8(out.inner).unwrap();
        assert!(text.starts_with(&"x".repeat(100)), "{text}");
        assert_eq!(text.matches('x').count(), 100);
        assert!(text.ends_with("the rest is dropped]\n"), "{text}");
        assert!(text.len() < 200, "{}", text.len());
    }

    fn guest_memory() -> GuestMemoryMmap {
        memory::create_guest_memory(64 << 20).unwrap()
    }

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("moat-builder-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn kernel_in_no_known_format_is_named() {
        let path = temp_file("not-a-kernel", &[0u8; 4096]);
        let err = open_kernel(&path).err().unwrap().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains("is neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
        assert!(err.contains("not-a-kernel"), "{err}");
    }

    #[test]
    fn truncated_elf_is_refused_by_the_loader() {
        let path = temp_file("truncated-elf", b"\x7fELF\x02\x01\x01");
        let (file, format) = open_kernel(&path).unwrap();
        assert_eq!(format, KernelFormat::Elf);
        let err = load_kernel(&guest_memory(), &path, file, format)
            .err()
            .unwrap()
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("truncated-elf: cannot load it"), "{err}");
    }

    #[test]
    fn bzimage_is_recognised_by_its_header_magic() {
        let mut image = vec![0u8; 4096];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let path = temp_file("fake-bzimage", &image);
        let (_, format) = open_kernel(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(format, KernelFormat::BzImage);
        let short = temp_file("short-kernel", b"HdrS");
        assert!(open_kernel(&short).is_err());
        std::fs::remove_file(&short).unwrap();
    }

    #[test]
    fn empty_initramfs_is_refused() {
        let path = temp_file("empty-initrd", b"");
        let kernel = LoadedKernel {
            entry: 0,
            end: 0x200_0000,
            header: None,
        };
        let err = load_initrd(&guest_memory(), &path, 64 << 20, &kernel)
            .err()
            .unwrap()
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.ends_with("the file is empty"), "{err}");
    }

    #[test]
    fn initramfs_is_copied_to_the_top_of_memory() {
        let contents: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let path = temp_file("small-initrd", &contents);
        let mem = guest_memory();
        let kernel = LoadedKernel {
            entry: 0,
            end: 0x200_0000,
            header: None,
        };
        let range = load_initrd(&mem, &path, 64 << 20, &kernel).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(range.size, contents.len() as u64);
        let mut back = vec![0u8; contents.len()];
        mem.read_slice(&mut back, GuestAddress(range.addr)).unwrap();
        assert_eq!(back, contents);
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = guest_memory();
        let size = write_cmdline(&mem, "console=ttyS0 quiet").unwrap();
        assert_eq!(size, 20);
        let mut back = [0u8; 20];
        mem.read_slice(&mut back, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&back, b"console=ttyS0 quiet\0");
    }
}
