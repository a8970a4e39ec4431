//! Confinement of a pod's host processes: its cgroup ([`PodCgroup`]), and
//! the namespaces, root and identity moat-vmm and virtiofsd are started
//! in ([`JailPlan`], [`spawn_in_new_pid_namespace`]).
//!
//! moat-vmm is started as PID 1 of a new PID namespace, in new mount, IPC
//! and UTS namespaces (and the pod's network namespace), in the pod's
//! cgroup. Before it runs, its root becomes a small tmpfs that holds only
//! what it needs: its binary and the libraries the dynamic loader maps,
//! the guest kernel and initramfs (read-only binds), `/dev/kvm` and
//! `/dev/net/tun`, a private `/proc`, and `/run`, the pod's socket
//! directory (the one host directory it can write). It then drops every
//! capability and runs as the configured unprivileged uid and gid with
//! `no_new_privs`. The mounts live only in its mount namespace, so
//! nothing is left on the host when it ends. virtiofsd, which needs root
//! and sandboxes itself, gets the namespaces and the cgroup only.
//!
//! The setup runs between fork and exec (a pre-exec hook of the shim's
//! multi-threaded process), so [`JailPlan::enter`] makes only raw system
//! calls on data built beforehand, and records which step failed in a
//! shared page for the error the shim reports.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What went wrong confining a pod's processes.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The cgroup parent is not in a cgroup v2 hierarchy.
    #[error("{parent} is not in a cgroup v2 hierarchy (no cgroup.controllers): moat's jail needs cgroup v2")]
    NotCgroup2 {
        /// `jail.cgroup_parent`.
        parent: PathBuf,
    },
    /// A cgroup or jail file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A device node the VMM needs is missing.
    #[error("{path} is not a character device; moat-vmm needs it")]
    NoDevice {
        /// The device.
        path: PathBuf,
    },
    /// The binary's libraries could not be listed.
    #[error("list the libraries of {binary} with ldd: {message}")]
    Libraries {
        /// The binary.
        binary: PathBuf,
        /// What ldd said.
        message: String,
    },
    /// A path holds a NUL byte.
    #[error("{path:?} holds a NUL byte")]
    Nul {
        /// The path.
        path: PathBuf,
    },
    /// The cgroup still held processes after being killed.
    #[error("cgroup {path} still holds processes {timeout_ms} ms after cgroup.kill")]
    StillPopulated {
        /// The cgroup.
        path: PathBuf,
        /// How long was waited.
        timeout_ms: u128,
    },
}

type Result<T> = std::result::Result<T, JailError>;

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_path_buf();
    move |source| JailError::Io { what, path, source }
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul {
        path: path.to_path_buf(),
    })
}

/// How long a killed cgroup may take to empty.
const CGROUP_KILL_WAIT: Duration = Duration::from_secs(5);

/// One pod's cgroup (v2): moat-vmm and virtiofsd join it before they
/// exec, and it is killed and removed at teardown.
#[derive(Debug)]
pub struct PodCgroup {
    path: PathBuf,
}

impl PodCgroup {
    /// Makes `parent/name` with `memory.max` = `memory_max` bytes, no swap,
    /// and `pids.max` = `pids_max`, enabling the memory and pids
    /// controllers for `parent`'s children.
    pub fn create(parent: &Path, name: &str, memory_max: u64, pids_max: u32) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        if !parent.join("cgroup.controllers").exists() {
            return Err(JailError::NotCgroup2 {
                parent: parent.to_path_buf(),
            });
        }
        let control = parent.join("cgroup.subtree_control");
        std::fs::write(&control, "+memory +pids")
            .map_err(io_error("enable memory and pids in", &control))?;
        let path = parent.join(name);
        std::fs::create_dir(&path).map_err(io_error("create", &path))?;
        let cgroup = Self { path };
        let limits = [
            ("memory.max", memory_max.to_string()),
            ("memory.swap.max", "0".to_string()),
            ("pids.max", pids_max.to_string()),
        ];
        for (file, value) in limits {
            let file = cgroup.path.join(file);
            if file.ends_with("memory.swap.max") && !file.exists() {
                continue; // a kernel without swap accounting
            }
            if let Err(e) = std::fs::write(&file, &value) {
                let _ = cgroup.remove();
                return Err(io_error("write", &file)(e));
            }
        }
        Ok(cgroup)
    }

    /// The cgroup at `path`, made earlier (for a cleanup).
    pub fn open(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Its directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its `cgroup.procs`, opened for a child to write itself into.
    fn procs(&self) -> Result<File> {
        let path = self.path.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_error("open", &path))
    }

    /// The PIDs in it.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether any process is in it.
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// The most memory it has held, bytes (`memory.peak`, when the kernel
    /// has it).
    pub fn memory_peak(&self) -> Option<u64> {
        std::fs::read_to_string(self.path.join("memory.peak"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
    }

    /// Kills whatever is left in it (`cgroup.kill`), waits for it to
    /// empty and removes it. A cgroup that is gone already is not an error.
    pub fn remove(&self) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        if self.populated() {
            let kill = self.path.join("cgroup.kill");
            std::fs::write(&kill, "1").map_err(io_error("write", &kill))?;
            let start = Instant::now();
            while self.populated() {
                if start.elapsed() > CGROUP_KILL_WAIT {
                    return Err(JailError::StillPopulated {
                        path: self.path.clone(),
                        timeout_ms: CGROUP_KILL_WAIT.as_millis(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io_error("remove", &self.path)(e))
            }
            _ => Ok(()),
        }
    }
}

/// The libraries the dynamic loader maps for `binary` (and the loader),
/// as `ldd` resolves them; empty for a static binary.
pub fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let failed = |message: String| JailError::Libraries {
        binary: binary.to_path_buf(),
        message,
    };
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| failed(e.to_string()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(failed(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let resolved = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.split_whitespace().next().unwrap_or("");
                if path == "not" {
                    return Err(failed(format!("{} is not found", name.trim())));
                }
                path
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if resolved.starts_with('/') {
            libraries.push(PathBuf::from(resolved));
        }
    }
    Ok(libraries)
}

/// A file bound read-only into the jail.
#[derive(Debug, Clone)]
pub struct JailFile {
    /// Where it is on the host.
    pub host: PathBuf,
    /// Its absolute path inside the jail.
    pub jail: PathBuf,
}

/// One step of the setup, on data made before the fork.
enum Op {
    JoinCgroup(File),
    Unshare(libc::c_int),
    SetHostname(CString),
    /// `MS_PRIVATE` or `MS_SLAVE`, recursively on `/`.
    Propagation(libc::c_ulong),
    MountTmpfs {
        dst: CString,
        data: CString,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Touch {
        path: CString,
    },
    Mknod {
        path: CString,
        dev: libc::dev_t,
    },
    Chown {
        path: CString,
        uid: u32,
        gid: u32,
    },
    Bind {
        src: CString,
        dst: CString,
        remount: libc::c_ulong,
    },
    MountProc {
        dst: CString,
    },
    PivotRoot {
        root: CString,
    },
    RootReadOnly,
    DropCapabilities,
    SetIds {
        uid: u32,
        gid: u32,
    },
    NoNewPrivs,
    NoCoreDumps,
}

/// A page shared with the forked child, where it writes the number of
/// the step it is at, so that the parent can name a failed one.
struct SharedStep(*mut AtomicU32);

// SAFETY: the page is only touched through the AtomicU32 it holds.
unsafe impl Send for SharedStep {}
// SAFETY: as above: all access is atomic.
unsafe impl Sync for SharedStep {}

impl SharedStep {
    fn new() -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous shared mapping; no existing memory is
        // touched, and the result is checked.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the page is zeroed, page-aligned memory we own; a zero
        // AtomicU32 is valid.
        unsafe { (*(page as *mut AtomicU32)).store(u32::MAX, Ordering::SeqCst) };
        Ok(Self(page.cast()))
    }

    fn get(&self) -> &AtomicU32 {
        // SAFETY: the mapping lives as long as self.
        unsafe { &*self.0 }
    }
}

impl Drop for SharedStep {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in new(); no reference outlives self.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// Everything a child does between fork and exec to enter its jail.
pub struct JailPlan {
    steps: Vec<(String, Op)>,
    at: SharedStep,
}

/// What moat-vmm's jail holds.
#[derive(Debug, Clone)]
pub struct VmmJail<'a> {
    /// An empty host directory the jail's tmpfs root is mounted on (in
    /// the jail's own mount namespace only).
    pub root: &'a Path,
    /// The host directory that becomes the jail's `/run` (sockets).
    pub run: &'a Path,
    /// Files bound read-only (binary, libraries, kernel, initramfs).
    pub files: &'a [JailFile],
    /// Host character devices made in the jail's `/dev` at the same path.
    pub devices: &'a [&'a Path],
    /// The identity the VMM runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// The cgroup it joins.
    pub cgroup: &'a PodCgroup,
}

const NAMESPACES: libc::c_int = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

impl JailPlan {
    /// The full jail, for moat-vmm.
    pub fn vmm(jail: &VmmJail<'_>) -> Result<Self> {
        let root = jail.root;
        let at =
            |p: &Path| -> Result<CString> { cstring(&root.join(p.strip_prefix("/").unwrap_or(p))) };
        let mut steps = vec![
            (
                format!("join cgroup {}", jail.cgroup.path.display()),
                Op::JoinCgroup(jail.cgroup.procs()?),
            ),
            (
                "unshare the mount, IPC and UTS namespaces".into(),
                Op::Unshare(NAMESPACES),
            ),
            (
                "set the hostname".into(),
                Op::SetHostname(CString::from(c"moat-vmm")),
            ),
            (
                "make every mount private".into(),
                Op::Propagation(libc::MS_PRIVATE),
            ),
            (
                format!("mount a tmpfs on {}", root.display()),
                Op::MountTmpfs {
                    dst: cstring(root)?,
                    data: CString::from(c"size=1m,nr_inodes=256,mode=0755"),
                },
            ),
        ];
        let mut dirs: Vec<PathBuf> = vec!["/dev".into(), "/proc".into(), "/run".into()];
        for path in jail
            .files
            .iter()
            .map(|f| f.jail.as_path())
            .chain(jail.devices.iter().copied())
        {
            let mut parent = path.parent();
            while let Some(dir) = parent.filter(|d| *d != Path::new("/")) {
                dirs.push(dir.to_path_buf());
                parent = dir.parent();
            }
        }
        dirs.sort_by(|a, b| (a.components().count(), a).cmp(&(b.components().count(), b)));
        dirs.dedup();
        for dir in &dirs {
            steps.push((
                format!("make {} in the jail", dir.display()),
                Op::Mkdir {
                    path: at(dir)?,
                    mode: 0o755,
                },
            ));
        }
        for device in jail.devices {
            let meta = std::fs::metadata(device).map_err(io_error("stat", device))?;
            if !meta.file_type().is_char_device() {
                return Err(JailError::NoDevice {
                    path: device.to_path_buf(),
                });
            }
            let path = at(device)?;
            steps.push((
                format!("make the device node {} in the jail", device.display()),
                Op::Mknod {
                    path: path.clone(),
                    dev: meta.rdev(),
                },
            ));
            steps.push((
                format!("give {} to the jail's user", device.display()),
                Op::Chown {
                    path,
                    uid: jail.uid,
                    gid: jail.gid,
                },
            ));
        }
        for file in jail.files {
            let dst = at(&file.jail)?;
            steps.push((
                format!("make {} in the jail", file.jail.display()),
                Op::Touch { path: dst.clone() },
            ));
            steps.push((
                format!(
                    "bind {} read-only at {}",
                    file.host.display(),
                    file.jail.display()
                ),
                Op::Bind {
                    src: cstring(&file.host)?,
                    dst,
                    remount: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                },
            ));
        }
        steps.push((
            format!("bind {} at /run", jail.run.display()),
            Op::Bind {
                src: cstring(jail.run)?,
                dst: at(Path::new("/run"))?,
                remount: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            },
        ));
        steps.push((
            "mount a private /proc".into(),
            Op::MountProc {
                dst: at(Path::new("/proc"))?,
            },
        ));
        steps.push((
            format!("pivot_root into {}", root.display()),
            Op::PivotRoot {
                root: cstring(root)?,
            },
        ));
        steps.push(("make the jail's root read-only".into(), Op::RootReadOnly));
        steps.push(("drop every capability".into(), Op::DropCapabilities));
        steps.push((
            format!("become uid {} gid {}", jail.uid, jail.gid),
            Op::SetIds {
                uid: jail.uid,
                gid: jail.gid,
            },
        ));
        steps.push(("set no_new_privs".into(), Op::NoNewPrivs));
        // A core would hold guest memory, and take seconds to write.
        steps.push(("turn core dumps off".into(), Op::NoCoreDumps));
        Self::new(steps)
    }

    /// Namespaces and the cgroup only, for virtiofsd (which must stay
    /// root to serve files of any owner, and sandboxes itself).
    pub fn namespaces(hostname: &str, cgroup: &PodCgroup) -> Result<Self> {
        Self::new(vec![
            (
                format!("join cgroup {}", cgroup.path.display()),
                Op::JoinCgroup(cgroup.procs()?),
            ),
            (
                "unshare the mount, IPC and UTS namespaces".into(),
                Op::Unshare(NAMESPACES),
            ),
            (
                "set the hostname".into(),
                Op::SetHostname(cstring(Path::new(hostname))?),
            ),
            // Slave, not private: the container mounts the shim makes in
            // the share later must reach virtiofsd.
            (
                "make every mount a slave of the host's".into(),
                Op::Propagation(libc::MS_SLAVE),
            ),
        ])
    }

    fn new(steps: Vec<(String, Op)>) -> Result<Self> {
        let at = SharedStep::new().map_err(io_error("map", Path::new("a shared page")))?;
        Ok(Self { steps, at })
    }

    /// The step a failed [`enter`](Self::enter) stopped at.
    pub fn failed_step(&self) -> Option<&str> {
        let at = self.at.get().load(Ordering::SeqCst);
        self.steps
            .get(usize::try_from(at).ok()?)
            .map(|(what, _)| what.as_str())
    }

    /// Runs every step in the calling process: call it only in a forked
    /// child, before exec. It makes raw system calls only, allocates
    /// nothing, and stops at the first failure.
    pub fn enter(&self) -> std::io::Result<()> {
        for (index, (_, op)) in self.steps.iter().enumerate() {
            self.at.get().store(index as u32, Ordering::SeqCst);
            run(op)?;
        }
        self.at.get().store(u32::MAX, Ordering::SeqCst);
        Ok(())
    }
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mount(
    src: *const libc::c_char,
    dst: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
) -> std::io::Result<()> {
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    check(unsafe { libc::mount(src, dst, fstype, flags, data.cast()) })
}

/// One step; async-signal-safe (system calls on prepared data only).
fn run(op: &Op) -> std::io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    match op {
        Op::JoinCgroup(procs) => {
            // SAFETY: writes two bytes from a static buffer to an open fd.
            let written = unsafe { libc::write(procs.as_raw_fd(), b"0\n".as_ptr().cast(), 2) };
            check(written as libc::c_int)
        }
        // SAFETY: unshare takes flags only.
        Op::Unshare(flags) => check(unsafe { libc::unshare(*flags) }),
        Op::SetHostname(name) => {
            // SAFETY: `name` is valid for its length.
            check(unsafe { libc::sethostname(name.as_ptr(), name.as_bytes().len()) })
        }
        Op::Propagation(kind) => mount(null, c"/".as_ptr(), null, libc::MS_REC | kind, null),
        Op::MountTmpfs { dst, data } => mount(
            c"tmpfs".as_ptr(),
            dst.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID,
            data.as_ptr(),
        ),
        // SAFETY: `path` is a valid C string.
        Op::Mkdir { path, mode } => check(unsafe { libc::mkdir(path.as_ptr(), *mode) }),
        Op::Touch { path } => {
            // SAFETY: `path` is a valid C string; the fd is closed at once.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o444,
                )
            };
            check(fd)?;
            // SAFETY: `fd` was just opened and is ours.
            unsafe { libc::close(fd) };
            Ok(())
        }
        Op::Mknod { path, dev } => {
            // SAFETY: `path` is a valid C string.
            check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *dev) })
        }
        Op::Chown { path, uid, gid } => {
            // SAFETY: `path` is a valid C string.
            check(unsafe { libc::chown(path.as_ptr(), *uid, *gid) })
        }
        Op::Bind { src, dst, remount } => {
            mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, null)?;
            mount(
                null,
                dst.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | remount,
                null,
            )
        }
        Op::MountProc { dst } => mount(
            c"proc".as_ptr(),
            dst.as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            null,
        ),
        Op::PivotRoot { root } => {
            // SAFETY: valid C strings; pivot_root(".", ".") stacks the old
            // root on the new one, and the detach below drops it.
            unsafe {
                check(libc::chdir(root.as_ptr()))?;
                check(
                    libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr())
                        as libc::c_int,
                )?;
                check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
                check(libc::chdir(c"/".as_ptr()))
            }
        }
        Op::RootReadOnly => mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
            null,
        ),
        Op::DropCapabilities => {
            for cap in 0..64 {
                // SAFETY: prctl with integer arguments; EINVAL past the
                // kernel's last capability ends the loop.
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(std::io::Error::last_os_error());
                }
            }
            // SAFETY: prctl with integer arguments.
            check(unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )
            })
        }
        Op::SetIds { uid, gid } => {
            // SAFETY: setgroups with an empty list, then integer ids; a
            // change of every uid away from 0 clears the capability sets.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(*gid, *gid, *gid))?;
                check(libc::setresuid(*uid, *uid, *uid))
            }
        }
        Op::NoCoreDumps => {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `none` is a valid rlimit.
            check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) })
        }
        // SAFETY: prctl with integer arguments.
        Op::NoNewPrivs => check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }),
    }
}

/// Spawns `command` as PID 1 of a new PID namespace: `unshare` on a
/// thread of its own affects only the children that thread makes.
pub fn spawn_in_new_pid_namespace(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let runtime = tokio::runtime::Handle::current();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare takes flags only; CLONE_NEWPID changes
                // this thread's namespace for children, not the thread.
                check(unsafe { libc::unshare(libc::CLONE_NEWPID) })?;
                let _runtime = runtime.enter();
                command.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_of_a_dynamic_binary_include_the_loader() {
        let libraries = libraries(Path::new("/bin/ls")).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
        let err = libraries_error(Path::new("/nonexistent/binary"));
        assert!(err.contains("/nonexistent/binary"), "{err}");
    }

    fn libraries_error(path: &Path) -> String {
        libraries(path).unwrap_err().to_string()
    }

    #[test]
    fn a_cgroup_parent_outside_cgroup2_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("moat-jail-test-{}", std::process::id()));
        let err = PodCgroup::create(&dir, "pod", 1 << 30, 64)
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.contains("cgroup v2") && err.contains(&dir.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_failed_step_is_named() {
        let plan = JailPlan::new(vec![
            ("set no_new_privs".into(), Op::NoNewPrivs),
            (
                "make /nonexistent/dir in the jail".into(),
                Op::Mkdir {
                    path: CString::from(c"/nonexistent/dir"),
                    mode: 0o755,
                },
            ),
        ])
        .unwrap();
        assert_eq!(plan.failed_step(), None);
        // Run in a forked child, as the sandbox does: the step it stopped
        // at reaches the parent through the shared page.
        let mut command = std::process::Command::new("/bin/true");
        let plan = std::sync::Arc::new(plan);
        let child_plan = plan.clone();
        // SAFETY: enter makes only raw system calls on prepared data.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || child_plan.enter());
        }
        let err = command.status().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
        assert_eq!(
            plan.failed_step(),
            Some("make /nonexistent/dir in the jail")
        );
    }
}
