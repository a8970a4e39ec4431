//! The VM configuration: what to boot and on what machine, from a JSON file
//! and command-line flags, checked before anything touches KVM.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::mptable::MAX_VCPUS;

/// The kernel command line when none is given: serial console, reboot
/// through the i8042 reset line, panics end the VM, no PCI probing, and
/// the i8042 probes skipped (Firecracker's defaults).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// vCPUs when none are asked for.
pub const DEFAULT_VCPUS: u8 = 1;
/// Guest memory in MiB when none is asked for.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// The least memory a guest kernel and its initramfs can boot in.
pub const MIN_MEMORY_MIB: u64 = 32;

/// Errors in the configuration, each naming the value that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JSON config file is not valid.
    #[error("config file {path} is not a valid moat-vmm config: {source}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What serde found wrong, with line and column.
        source: serde_json::Error,
    },
    /// No kernel was named.
    #[error("no kernel image given: pass --kernel PATH or set \"kernel\" in the config file")]
    NoKernel,
    /// The kernel or initramfs file is missing or unreadable.
    #[error("{what} {path}: {source}")]
    Unreadable {
        /// "kernel image" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel or initramfs path is not a regular file.
    #[error("{what} {path} is not a regular file")]
    NotAFile {
        /// "kernel image" or "initramfs".
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Too few or too many vCPUs.
    #[error("vcpus = {0}: a VM has 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    /// Memory below what a guest can boot in.
    #[error("memory = {0} MiB is too small: a guest needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    /// Memory above what the host has.
    #[error("memory = {requested} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line ({len} bytes) is invalid: {reason}")]
    Cmdline {
        /// Its length in bytes.
        len: usize,
        /// Why it was refused.
        reason: String,
    },
    /// A block device description that cannot be parsed.
    #[error("block device {0:?}: expected id=ID,path=PATH[,readonly]")]
    BlockSyntax(String),
    /// A block device ID that is empty, too long or not printable.
    #[error("block device ID {0:?} must be 1 to 20 printable ASCII characters without commas")]
    BlockId(String),
    /// Two block devices with the same ID.
    #[error("block device ID {0:?} is used twice")]
    DuplicateBlockId(String),
    /// A network device description that cannot be parsed.
    #[error("network device {0:?}: expected id=ID,tap=TAP[,mac=MAC]")]
    NetSyntax(String),
    /// A network device ID that is empty, too long or not printable.
    #[error("network device ID {0:?} must be 1 to 20 printable ASCII characters without commas")]
    NetId(String),
    /// Two network devices with the same ID.
    #[error("network device ID {0:?} is used twice")]
    DuplicateNetId(String),
    /// A tap name Linux would refuse.
    #[error("network device {id:?}: tap name {tap:?} must be 1 to 15 bytes without '/', ',' or whitespace")]
    TapName {
        /// The device's ID.
        id: String,
        /// The tap name.
        tap: String,
    },
    /// Two network devices on the same tap.
    #[error("tap {0:?} is given to two network devices")]
    DuplicateTap(String),
    /// A MAC address that cannot be parsed or is not unicast.
    #[error("MAC address {0:?}: expected six hex bytes like 02:00:00:00:00:01, unicast (first byte even)")]
    Mac(String),
    /// A vsock description that cannot be parsed.
    #[error("vsock {0:?}: expected cid=CID,path=SOCKET")]
    VsockSyntax(String),
    /// A guest CID outside the usable range.
    #[error("vsock cid = {0}: a guest CID is 3 to 4294967294")]
    VsockCid(u64),
    /// The vsock socket's directory does not exist.
    #[error("vsock socket {0}: its directory does not exist")]
    VsockDir(PathBuf),
    /// The vsock socket path is taken.
    #[error("vsock socket {0} already exists; remove it or choose another path")]
    VsockExists(PathBuf),
    /// An unknown serial output.
    #[error(
        "serial output {0:?} is not one of stdout, none, file:PATH[,cap=BYTES] (a cap above 0)"
    )]
    SerialOutput(String),
    /// A virtio-fs description that cannot be parsed.
    #[error("virtio-fs {0:?}: expected tag=TAG,socket=PATH[,queues=N][,queue_size=N]")]
    FsSyntax(String),
    /// A virtio-fs tag that is empty, too long or not printable.
    #[error("virtio-fs tag {0:?} must be 1 to {FS_TAG_MAX_LEN} bytes of printable ASCII without commas or spaces")]
    FsTag(String),
    /// Two virtio-fs devices with the same tag.
    #[error("virtio-fs tag {0:?} is used twice")]
    DuplicateFsTag(String),
    /// A request queue count outside what moat-vmm serves.
    #[error("virtio-fs {tag:?}: queues = {queues}: a share has 1 to {FS_MAX_REQUEST_QUEUES} request queues")]
    FsQueues {
        /// The share's tag.
        tag: String,
        /// The count asked for.
        queues: u64,
    },
    /// A queue size that is not a power of two in range.
    #[error("virtio-fs {tag:?}: queue_size = {size}: expected a power of two from 2 to {FS_MAX_QUEUE_SIZE}")]
    FsQueueSize {
        /// The share's tag.
        tag: String,
        /// The size asked for.
        size: u64,
    },
}

/// The most a `file:` console log grows to unless its `cap=` says
/// otherwise (16 MiB): a guest that writes without end cannot fill the
/// host's disk.
pub const CONSOLE_FILE_CAP: u64 = 16 << 20;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated, that grows to at most `cap` bytes
    /// (default [`CONSOLE_FILE_CAP`]); the rest is dropped.
    File {
        /// The file.
        path: PathBuf,
        /// Its size cap in bytes.
        cap: u64,
    },
    /// Nowhere.
    None,
}

impl FromStr for SerialOutput {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::None),
            _ => {
                let bad = || ConfigError::SerialOutput(s.to_string());
                let file = s.strip_prefix("file:").ok_or_else(bad)?;
                let (path, cap) = match file.rsplit_once(",cap=") {
                    Some((path, cap)) => (path, cap.parse::<u64>().map_err(|_| bad())?),
                    None => (file, CONSOLE_FILE_CAP),
                };
                if path.is_empty() || cap == 0 {
                    return Err(bad());
                }
                Ok(SerialOutput::File {
                    path: PathBuf::from(path),
                    cap,
                })
            }
        }
    }
}

/// A block device: a raw image file the guest sees as `/dev/vdX`, in the
/// order given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The device's ID, also its serial number (virtio GET_ID).
    pub id: String,
    /// The image file.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub readonly: bool,
}

impl FromStr for BlockConfig {
    type Err = ConfigError;

    /// Parses `id=ID,path=PATH[,readonly]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut id, mut path, mut readonly) = (None, None, false);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) if id.is_none() => id = Some(v.to_string()),
                Some(("path", v)) if path.is_none() && !v.is_empty() => {
                    path = Some(PathBuf::from(v))
                }
                None if part == "readonly" => readonly = true,
                _ => return Err(ConfigError::BlockSyntax(s.to_string())),
            }
        }
        match (id, path) {
            (Some(id), Some(path)) => Ok(BlockConfig { id, path, readonly }),
            _ => Err(ConfigError::BlockSyntax(s.to_string())),
        }
    }
}

/// A device ID: 1 to 20 printable ASCII characters, no space or comma
/// (commas separate the fields of a CLI device description).
fn is_device_id(id: &str) -> bool {
    (1..=20).contains(&id.len()) && id.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
}

fn check_blocks(blocks: &[BlockConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for block in blocks {
        let id = &block.id;
        if !is_device_id(id) {
            return Err(ConfigError::BlockId(id.clone()));
        }
        if !seen.insert(id.as_str()) {
            return Err(ConfigError::DuplicateBlockId(id.clone()));
        }
        check_file("block device image", &block.path)?;
    }
    Ok(())
}

/// A network device: a tap interface on the host that the guest sees as
/// `eth0`, `eth1`, ... in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The device's ID.
    pub id: String,
    /// The host tap interface; it is created if it does not exist and
    /// moat-vmm may create it.
    pub tap: String,
    /// The guest's MAC address; the guest picks a random one without it.
    #[serde(default)]
    pub mac: Option<String>,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `id=ID,tap=TAP[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut id, mut tap, mut mac) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) if id.is_none() => id = Some(v.to_string()),
                Some(("tap", v)) if tap.is_none() => tap = Some(v.to_string()),
                Some(("mac", v)) if mac.is_none() => mac = Some(v.to_string()),
                _ => return Err(ConfigError::NetSyntax(s.to_string())),
            }
        }
        match (id, tap) {
            (Some(id), Some(tap)) => Ok(NetConfig { id, tap, mac }),
            _ => Err(ConfigError::NetSyntax(s.to_string())),
        }
    }
}

/// Parses a unicast MAC address written as six colon-separated hex bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

fn check_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    let mut ids = std::collections::HashSet::new();
    let mut taps = std::collections::HashSet::new();
    for net in nets {
        let id = &net.id;
        if !is_device_id(id) {
            return Err(ConfigError::NetId(id.clone()));
        }
        if !ids.insert(id.as_str()) {
            return Err(ConfigError::DuplicateNetId(id.clone()));
        }
        let tap = &net.tap;
        if tap.is_empty()
            || tap.len() > 15
            || !tap
                .bytes()
                .all(|b| (0x21..0x7f).contains(&b) && b != b'/' && b != b',')
        {
            return Err(ConfigError::TapName {
                id: id.clone(),
                tap: tap.clone(),
            });
        }
        if !taps.insert(tap.as_str()) {
            return Err(ConfigError::DuplicateTap(tap.clone()));
        }
        if let Some(mac) = &net.mac {
            parse_mac(mac)?;
        }
    }
    Ok(())
}

/// The vsock device: the guest's CID and the host Unix socket that stands
/// for it (Firecracker's hybrid vsock).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID.
    pub cid: u64,
    /// The host socket: clients connect here; guest connections to host
    /// port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    /// Parses `cid=CID,path=SOCKET`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut cid, mut path) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) if cid.is_none() => cid = v.parse::<u64>().ok(),
                Some(("path", v)) if path.is_none() && !v.is_empty() => {
                    path = Some(PathBuf::from(v))
                }
                _ => return Err(ConfigError::VsockSyntax(s.to_string())),
            }
        }
        match (cid, path) {
            (Some(cid), Some(uds_path)) => Ok(VsockConfig { cid, uds_path }),
            _ => Err(ConfigError::VsockSyntax(s.to_string())),
        }
    }
}

/// The longest virtio-fs tag: the size of the tag field in the device's
/// configuration space (virtio 1.2 §5.11.4).
pub const FS_TAG_MAX_LEN: usize = 36;
/// The most request queues one share may have.
pub const FS_MAX_REQUEST_QUEUES: u64 = 16;
/// The largest queue size a share may ask for (virtiofsd's own limit).
pub const FS_MAX_QUEUE_SIZE: u64 = 1024;
/// The request queue size when none is given.
pub const FS_DEFAULT_QUEUE_SIZE: u16 = 1024;

/// A virtio-fs share: a vhost-user-fs backend (virtiofsd) listening on a
/// Unix socket, mounted in the guest as `mount -t virtiofs TAG DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The tag the guest mounts the share by.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue); 1 by default.
    #[serde(default = "default_fs_queues")]
    pub queues: u64,
    /// Size of each queue; 1024 by default.
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u64,
}

fn default_fs_queues() -> u64 {
    1
}

fn default_fs_queue_size() -> u64 {
    u64::from(FS_DEFAULT_QUEUE_SIZE)
}

impl FromStr for FsConfig {
    type Err = ConfigError;

    /// Parses `tag=TAG,socket=PATH[,queues=N][,queue_size=N]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::FsSyntax(s.to_string());
        let (mut tag, mut socket, mut queues, mut queue_size) = (None, None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) if tag.is_none() => tag = Some(v.to_string()),
                Some(("socket", v)) if socket.is_none() && !v.is_empty() => {
                    socket = Some(PathBuf::from(v))
                }
                Some(("queues", v)) if queues.is_none() => {
                    queues = Some(v.parse::<u64>().map_err(|_| bad())?)
                }
                Some(("queue_size", v)) if queue_size.is_none() => {
                    queue_size = Some(v.parse::<u64>().map_err(|_| bad())?)
                }
                _ => return Err(bad()),
            }
        }
        match (tag, socket) {
            (Some(tag), Some(socket)) => Ok(FsConfig {
                tag,
                socket,
                queues: queues.unwrap_or_else(default_fs_queues),
                queue_size: queue_size.unwrap_or_else(default_fs_queue_size),
            }),
            _ => Err(bad()),
        }
    }
}

fn check_fs(shares: &[FsConfig]) -> Result<(), ConfigError> {
    let mut tags = std::collections::HashSet::new();
    for share in shares {
        let tag = &share.tag;
        if tag.is_empty()
            || tag.len() > FS_TAG_MAX_LEN
            || !tag.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b',')
        {
            return Err(ConfigError::FsTag(tag.clone()));
        }
        if !tags.insert(tag.as_str()) {
            return Err(ConfigError::DuplicateFsTag(tag.clone()));
        }
        if !(1..=FS_MAX_REQUEST_QUEUES).contains(&share.queues) {
            return Err(ConfigError::FsQueues {
                tag: tag.clone(),
                queues: share.queues,
            });
        }
        let size = share.queue_size;
        if !(2..=FS_MAX_QUEUE_SIZE).contains(&size) || !size.is_power_of_two() {
            return Err(ConfigError::FsQueueSize {
                tag: tag.clone(),
                size,
            });
        }
    }
    Ok(())
}

fn check_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    if !(3..=u64::from(u32::MAX - 1)).contains(&vsock.cid) {
        return Err(ConfigError::VsockCid(vsock.cid));
    }
    let dir = vsock
        .uds_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(ConfigError::VsockDir(vsock.uds_path.clone()));
    }
    if vsock.uds_path.symlink_metadata().is_ok() {
        return Err(ConfigError::VsockExists(vsock.uds_path.clone()));
    }
    Ok(())
}

/// A configuration as written: in the JSON file or as flags. Every field is
/// optional; a later layer overrides an earlier one.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// Path of the kernel: an ELF vmlinux or a bzImage.
    pub kernel: Option<PathBuf>,
    /// Path of an initramfs (cpio, optionally compressed).
    pub initramfs: Option<PathBuf>,
    /// The whole kernel command line, replacing [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// Arguments appended to the command line.
    pub append: Option<String>,
    /// Number of vCPUs.
    pub vcpus: Option<u64>,
    /// Guest memory in MiB.
    pub memory_mib: Option<u64>,
    /// Serial console output: "stdout", "none" or "file:PATH".
    pub serial: Option<String>,
    /// Whether the guest gets a virtio-rng entropy device.
    pub rng: Option<bool>,
    /// Block devices, in guest order.
    pub blocks: Option<Vec<BlockConfig>>,
    /// Network devices, in guest order.
    pub nets: Option<Vec<NetConfig>>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, each served by a vhost-user-fs backend.
    pub fs: Option<Vec<FsConfig>>,
    /// Whether guest RAM comes from a memfd mapped shared even without a
    /// virtio-fs share (a vhost-user backend needs it to map guest RAM).
    pub shared_memory: Option<bool>,
}

impl ConfigLayer {
    /// Reads a layer from a JSON file.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// This layer with every field that `over` sets replaced by `over`'s.
    pub fn overridden_by(self, over: ConfigLayer) -> ConfigLayer {
        ConfigLayer {
            kernel: over.kernel.or(self.kernel),
            initramfs: over.initramfs.or(self.initramfs),
            cmdline: over.cmdline.or(self.cmdline),
            append: over.append.or(self.append),
            vcpus: over.vcpus.or(self.vcpus),
            memory_mib: over.memory_mib.or(self.memory_mib),
            serial: over.serial.or(self.serial),
            rng: over.rng.or(self.rng),
            blocks: over.blocks.or(self.blocks),
            nets: over.nets.or(self.nets),
            vsock: over.vsock.or(self.vsock),
            fs: over.fs.or(self.fs),
            shared_memory: over.shared_memory.or(self.shared_memory),
        }
    }

    /// Applies defaults and checks every value against this host.
    pub fn resolve(self, host_memory_mib: u64) -> Result<VmConfig, ConfigError> {
        let kernel = self.kernel.ok_or(ConfigError::NoKernel)?;
        check_file("kernel image", &kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_file("initramfs", initramfs)?;
        }

        let vcpus = self.vcpus.unwrap_or(u64::from(DEFAULT_VCPUS));
        let vcpus = u8::try_from(vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::VcpuCount(vcpus))?;

        let memory_mib = self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(memory_mib));
        }
        if memory_mib > host_memory_mib {
            return Err(ConfigError::MemoryTooLarge {
                requested: memory_mib,
                host: host_memory_mib,
            });
        }

        let mut cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if let Some(extra) = self.append.filter(|a| !a.trim().is_empty()) {
            cmdline.push(' ');
            cmdline.push_str(extra.trim());
        }
        check_cmdline(&cmdline)?;

        let serial = self.serial.as_deref().unwrap_or("stdout").parse()?;
        let blocks = self.blocks.unwrap_or_default();
        check_blocks(&blocks)?;
        let nets = self.nets.unwrap_or_default();
        check_nets(&nets)?;
        if let Some(vsock) = &self.vsock {
            check_vsock(vsock)?;
        }
        let fs = self.fs.unwrap_or_default();
        check_fs(&fs)?;
        let shared_memory = self.shared_memory.unwrap_or(false) || !fs.is_empty();
        Ok(VmConfig {
            kernel,
            initramfs: self.initramfs,
            cmdline,
            vcpus,
            memory_mib,
            serial,
            rng: self.rng.unwrap_or(false),
            blocks,
            nets,
            vsock: self.vsock,
            fs,
            shared_memory,
        })
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn check_cmdline(cmdline: &str) -> Result<(), ConfigError> {
    let refuse = |reason: &str| ConfigError::Cmdline {
        len: cmdline.len(),
        reason: reason.to_string(),
    };
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(refuse(&format!(
            "the kernel accepts at most {} bytes",
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(refuse("it may hold printable ASCII only"));
    }
    Ok(())
}

/// A checked configuration, ready to build a VM from.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// The full kernel command line.
    pub cmdline: String,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// Whether the guest gets a virtio-rng entropy device.
    pub rng: bool,
    /// Block devices, in guest order.
    pub blocks: Vec<BlockConfig>,
    /// Network devices, in guest order.
    pub nets: Vec<NetConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares, in guest order.
    pub fs: Vec<FsConfig>,
    /// Whether guest RAM is a memfd mapped shared (always with `fs`).
    pub shared_memory: bool,
}

/// This host's RAM in MiB, from `/proc/meminfo` (0 if it cannot be read,
/// which makes every memory size "too large" rather than unchecked).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_MIB: u64 = 8192;

    fn kernel_file() -> PathBuf {
        // Any readable regular file will do for config checks.
        PathBuf::from("/proc/self/exe").canonicalize().unwrap()
    }

    fn layer() -> ConfigLayer {
        ConfigLayer {
            kernel: Some(kernel_file()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let cfg = layer().resolve(HOST_MIB).unwrap();
        assert_eq!(cfg.vcpus, DEFAULT_VCPUS);
        assert_eq!(cfg.memory_mib, DEFAULT_MEMORY_MIB);
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.serial, SerialOutput::Stdout);
        assert_eq!(cfg.initramfs, None);
    }

    #[test]
    fn append_extends_and_cmdline_replaces() {
        let cfg = ConfigLayer {
            append: Some(" quiet ".into()),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap();
        assert_eq!(cfg.cmdline, format!("{DEFAULT_CMDLINE} quiet"));
        let cfg = ConfigLayer {
            cmdline: Some("console=ttyS0".into()),
            append: Some("x=1".into()),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap();
        assert_eq!(cfg.cmdline, "console=ttyS0 x=1");
    }

    #[test]
    fn json_file_is_parsed_and_flags_override_it() {
        let json =
            r#"{"kernel": "/k", "vcpus": 2, "memory_mib": 256, "serial": "none", "rng": true}"#;
        let file: ConfigLayer = serde_json::from_str(json).unwrap();
        let flags = ConfigLayer {
            vcpus: Some(4),
            ..Default::default()
        };
        let merged = file.overridden_by(flags);
        assert_eq!(merged.vcpus, Some(4));
        assert_eq!(merged.memory_mib, Some(256));
        assert_eq!(merged.kernel, Some(PathBuf::from("/k")));
        assert_eq!(merged.serial.as_deref(), Some("none"));
        assert_eq!(merged.rng, Some(true));
    }

    #[test]
    fn unknown_json_field_is_named() {
        let err =
            serde_json::from_str::<ConfigLayer>(r#"{"kernel": "/k", "memory": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `memory`"), "{err}");
    }

    #[test]
    fn malformed_json_file_names_the_file_and_position() {
        let path =
            std::env::temp_dir().join(format!("moat-bad-config-{}.json", std::process::id()));
        std::fs::write(&path, "{\"vcpus\": two}").unwrap();
        let err = ConfigLayer::from_json_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = ConfigLayer::default().resolve(HOST_MIB).unwrap_err();
        assert!(matches!(err, ConfigError::NoKernel));
        let err = ConfigLayer {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..Default::default()
        }
        .resolve(HOST_MIB)
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "kernel image /nonexistent/vmlinux: No such file or directory (os error 2)"
        );
        let err = ConfigLayer {
            kernel: Some("/tmp".into()),
            ..Default::default()
        }
        .resolve(HOST_MIB)
        .unwrap_err()
        .to_string();
        assert_eq!(err, "kernel image /tmp is not a regular file");
    }

    #[test]
    fn missing_initramfs_is_named() {
        let err = ConfigLayer {
            initramfs: Some("/nonexistent/initrd".into()),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("initramfs /nonexistent/initrd:"), "{err}");
    }

    #[test]
    fn memory_bounds_are_enforced() {
        let err = ConfigLayer {
            memory_mib: Some(8),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory = 8 MiB is too small: a guest needs at least 32 MiB"
        );
        let err = ConfigLayer {
            memory_mib: Some(HOST_MIB + 1),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "memory = 8193 MiB is more than this host's 8192 MiB of RAM"
        );
        assert!(ConfigLayer {
            memory_mib: Some(MIN_MEMORY_MIB),
            ..layer()
        }
        .resolve(HOST_MIB)
        .is_ok());
    }

    #[test]
    fn vcpu_bounds_are_enforced() {
        for bad in [0u64, 33, 300] {
            let err = ConfigLayer {
                vcpus: Some(bad),
                ..layer()
            }
            .resolve(HOST_MIB)
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("vcpus = {bad}: a VM has 1 to 32 vCPUs")
            );
        }
        assert_eq!(
            ConfigLayer {
                vcpus: Some(32),
                ..layer()
            }
            .resolve(HOST_MIB)
            .unwrap()
            .vcpus,
            32
        );
    }

    #[test]
    fn overlong_or_binary_cmdline_is_refused() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let err = ConfigLayer {
            cmdline: Some(long),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(err.to_string().contains("at most 2047 bytes"), "{err}");
        let err = ConfigLayer {
            append: Some("a\nb".into()),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(err.to_string().contains("printable ASCII"), "{err}");
    }

    #[test]
    fn block_devices_parse_and_are_checked() {
        let image = kernel_file();
        let spec = format!("id=rootfs,path={},readonly", image.display());
        let block: BlockConfig = spec.parse().unwrap();
        assert_eq!(
            block,
            BlockConfig {
                id: "rootfs".into(),
                path: image.clone(),
                readonly: true
            }
        );
        for bad in [
            "path=/x",
            "id=a",
            "id=a,path=/x,rw",
            "id=a,id=b,path=/x",
            "id=a,path=",
        ] {
            let err = bad.parse::<BlockConfig>().unwrap_err();
            assert!(
                err.to_string().contains("expected id=ID,path=PATH"),
                "{bad}: {err}"
            );
        }
        let twice = vec![block.clone(), block.clone()];
        let err = ConfigLayer {
            blocks: Some(twice),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert_eq!(err.to_string(), "block device ID \"rootfs\" is used twice");
        let long = BlockConfig {
            id: "x".repeat(21),
            ..block.clone()
        };
        let err = ConfigLayer {
            blocks: Some(vec![long]),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(err.to_string().contains("1 to 20 printable"), "{err}");
        let missing = BlockConfig {
            path: "/nonexistent/disk.img".into(),
            ..block.clone()
        };
        let err = ConfigLayer {
            blocks: Some(vec![missing]),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("block device image /nonexistent/disk.img: No such file"),
            "{err}"
        );
        let json = r#"{"kernel": "/k", "blocks": [{"id": "data", "path": "/d.img"}]}"#;
        let layer: ConfigLayer = serde_json::from_str(json).unwrap();
        assert!(!layer.blocks.unwrap()[0].readonly, "read-write by default");
    }

    #[test]
    fn fs_shares_parse_and_are_checked() {
        let share: FsConfig = "tag=pod,socket=/run/fs.sock,queues=2,queue_size=512"
            .parse()
            .unwrap();
        assert_eq!(
            share,
            FsConfig {
                tag: "pod".into(),
                socket: "/run/fs.sock".into(),
                queues: 2,
                queue_size: 512
            }
        );
        let plain: FsConfig = "tag=a,socket=/s".parse().unwrap();
        assert_eq!((plain.queues, plain.queue_size), (1, 1024));
        for bad in [
            "socket=/s",
            "tag=a",
            "tag=a,socket=",
            "tag=a,socket=/s,queues=x",
            "tag=a,socket=/s,cache=auto",
            "tag=a,tag=b,socket=/s",
        ] {
            let err = bad.parse::<FsConfig>().unwrap_err();
            assert!(err.to_string().contains("expected tag=TAG"), "{bad}: {err}");
        }
        let resolve = |shares: Vec<FsConfig>| {
            ConfigLayer {
                fs: Some(shares),
                ..layer()
            }
            .resolve(HOST_MIB)
        };
        let cfg = resolve(vec![plain.clone()]).unwrap();
        assert!(cfg.shared_memory, "a share implies shared guest memory");
        let err = resolve(vec![plain.clone(), plain.clone()]).unwrap_err();
        assert_eq!(err.to_string(), "virtio-fs tag \"a\" is used twice");
        for tag in [String::new(), "x".repeat(37), "a b".into()] {
            let err = resolve(vec![FsConfig {
                tag: tag.clone(),
                ..plain.clone()
            }])
            .unwrap_err();
            assert!(err.to_string().contains("1 to 36 bytes"), "{tag:?}: {err}");
        }
        assert!(resolve(vec![FsConfig {
            tag: "x".repeat(36),
            ..plain.clone()
        }])
        .is_ok());
        for (queues, queue_size) in [(0, 1024), (17, 1024), (1, 1000), (1, 2048), (1, 1)] {
            let err = resolve(vec![FsConfig {
                queues,
                queue_size,
                ..plain.clone()
            }])
            .unwrap_err();
            assert!(err.to_string().contains("virtio-fs \"a\""), "{err}");
        }
        let json = r#"{"kernel": "/k", "fs": [{"tag": "pod", "socket": "/s"}]}"#;
        let layer: ConfigLayer = serde_json::from_str(json).unwrap();
        assert_eq!(layer.fs.unwrap()[0].queues, 1);
        assert!(!layer_shared_by_default());
    }

    fn layer_shared_by_default() -> bool {
        layer().resolve(HOST_MIB).unwrap().shared_memory
    }

    #[test]
    fn vsock_parses_and_is_checked() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("moat-vsock-cfg-{}.sock", std::process::id()));
        let spec = format!("cid=7,path={}", path.display());
        let vsock: VsockConfig = spec.parse().unwrap();
        assert_eq!(
            vsock,
            VsockConfig {
                cid: 7,
                uds_path: path.clone()
            }
        );
        assert!(ConfigLayer {
            vsock: Some(vsock.clone()),
            ..layer()
        }
        .resolve(HOST_MIB)
        .is_ok());
        for bad in ["cid=3", "path=/x", "cid=x,path=/x", "cid=3,path=/x,extra=1"] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
        for cid in [0, 2, u64::from(u32::MAX)] {
            let err = ConfigLayer {
                vsock: Some(VsockConfig {
                    cid,
                    ..vsock.clone()
                }),
                ..layer()
            }
            .resolve(HOST_MIB)
            .unwrap_err();
            assert!(err.to_string().contains("a guest CID is 3 to"), "{err}");
        }
        let nodir = VsockConfig {
            uds_path: "/nonexistent/dir/v.sock".into(),
            ..vsock.clone()
        };
        let err = ConfigLayer {
            vsock: Some(nodir),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(
            err.to_string().contains("its directory does not exist"),
            "{err}"
        );
        let taken = VsockConfig {
            uds_path: kernel_file(),
            ..vsock
        };
        let err = ConfigLayer {
            vsock: Some(taken),
            ..layer()
        }
        .resolve(HOST_MIB)
        .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    #[test]
    fn serial_outputs_parse() {
        assert_eq!(
            "stdout".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdout
        );
        assert_eq!("none".parse::<SerialOutput>().unwrap(), SerialOutput::None);
        assert_eq!(
            "file:/tmp/console.log".parse::<SerialOutput>().unwrap(),
            SerialOutput::File {
                path: "/tmp/console.log".into(),
                cap: CONSOLE_FILE_CAP
            }
        );
        assert_eq!(
            "file:/tmp/a,b.log,cap=65536"
                .parse::<SerialOutput>()
                .unwrap(),
            SerialOutput::File {
                path: "/tmp/a,b.log".into(),
                cap: 65536
            }
        );
        for bad in [
            "file:",
            "tty",
            "",
            "file:/tmp/x,cap=0",
            "file:/tmp/x,cap=1M",
            "file:,cap=9",
        ] {
            assert!(bad.parse::<SerialOutput>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory_mib() > 0);
    }

    #[test]
    fn network_devices_parse_and_are_checked() {
        let net: NetConfig = "id=eth0,tap=tap0,mac=02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(
            net,
            NetConfig {
                id: "eth0".into(),
                tap: "tap0".into(),
                mac: Some("02:00:00:00:00:0a".into()),
            }
        );
        assert_eq!(parse_mac("02:00:00:00:00:0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "zz:00:00:00:00:00",
            "03:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(matches!(parse_mac(bad), Err(ConfigError::Mac(_))), "{bad}");
        }
        for bad in ["tap=t", "id=a,tap=t,bogus=1", "id=a,id=b,tap=t"] {
            assert!(
                matches!(bad.parse::<NetConfig>(), Err(ConfigError::NetSyntax(_))),
                "{bad}"
            );
        }
        let json = r#"{"kernel": "/k", "nets": [{"id": "n0", "tap": "tap0"}]}"#;
        let layer: ConfigLayer = serde_json::from_str(json).unwrap();
        assert_eq!(layer.nets.unwrap()[0].mac, None);
        let bad_json =
            r#"{"kernel": "/k", "nets": [{"id": "n0", "tap": "tap0", "ip": "1.2.3.4"}]}"#;
        assert!(
            serde_json::from_str::<ConfigLayer>(bad_json).is_err(),
            "unknown fields refused"
        );
        assert!(check_nets(std::slice::from_ref(&net)).is_ok());
        let twice = [
            net.clone(),
            NetConfig {
                id: "eth1".into(),
                ..net.clone()
            },
        ];
        assert!(matches!(
            check_nets(&twice),
            Err(ConfigError::DuplicateTap(_))
        ));
    }
}
