//! The pod's shared directory on the host: what virtiofsd serves, and the
//! mounts the shim makes in it for each container.
//!
//! Layout of one pod (`dir` is in the pod's state directory):
//!
//! ```text
//! dir/rw/                 a shared mount (bound onto itself) where the shim mounts
//! dir/rw/<cid>/rootfs     the container's rootfs (containerd's mounts, bound in)
//! dir/rw/<cid>/volumes/N  the spec's N-th mount, when it is a bind mount
//! dir/shared/             a read-only slave bind of rw/: what virtiofsd serves
//! ```
//!
//! Mounts made under `rw/` after virtiofsd started propagate into
//! `shared/`, so the guest sees each container as it comes; the guest
//! cannot create anything at the top of the share, since `shared/` itself
//! is read-only, while a writable volume stays writable (a propagated mount
//! keeps its own flags). In the guest the share is mounted at
//! [`GUEST_SHARE_DIR`].
//!
//! Removal never deletes through a mount: directories are removed only
//! after /proc/self/mountinfo shows nothing mounted below them, so a
//! volume's host contents survive any error.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::Mount as SpecMount;

pub use moat_protocol::GUEST_SHARE_DIR;

/// Mount types the guest makes itself; they pass through the spec unchanged.
pub const GUEST_MOUNT_TYPES: [&str; 7] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

/// What went wrong setting up or tearing down a pod's mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A container ID that is not one safe path component.
    #[error("container id {0:?} is not usable as a directory name (letters, digits, '_', '-', '.', at most 76, not '.' or '..')")]
    BadId(String),
    /// The container already has a directory in the share.
    #[error("container {0} is already in the pod's share")]
    AlreadyPresent(String),
    /// A spec mount the shim cannot carry into the guest.
    #[error("mount on {destination} of type {fstype:?} (source {mount_source:?}) cannot be carried into a moat VM: only bind mounts travel over virtio-fs, and the guest makes only {}", GUEST_MOUNT_TYPES.join(", "))]
    Unsupported {
        /// The mount's destination in the container.
        destination: String,
        /// Its type.
        fstype: String,
        /// Its source.
        mount_source: String,
    },
    /// A bind mount's source is not an absolute, existing host path.
    #[error("bind mount on {destination}: source {mount_source:?} {why}")]
    BadSource {
        /// The mount's destination in the container.
        destination: String,
        /// Its source.
        mount_source: String,
        /// What is wrong with it.
        why: String,
    },
    /// A rootfs mount from containerd with no type.
    #[error("rootfs mount {index} from containerd has no type (source {mount_source:?})")]
    RootfsWithoutType {
        /// Its place in containerd's list.
        index: usize,
        /// Its source.
        mount_source: String,
    },
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Sys {
        /// The operation.
        what: &'static str,
        /// The path it worked on.
        path: PathBuf,
        /// The error.
        source: nix::Error,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path it worked on.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Something is still mounted where a directory was to be removed.
    #[error("{path} still has mounts below it ({mounts}); not removing it")]
    StillMounted {
        /// The directory.
        path: PathBuf,
        /// Mount points still there.
        mounts: String,
    },
}

/// One of containerd's rootfs mounts (task Create's `rootfs` list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// Filesystem type, e.g. `overlay` or `bind`.
    pub fstype: String,
    /// Source, e.g. `overlay` or a snapshot directory.
    pub source: String,
    /// Options, e.g. `lowerdir=...`, `ro`, `rbind`.
    pub options: Vec<String>,
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> MountError + 'a {
    move |source| MountError::Sys {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that a container (or exec) ID is one safe path component.
pub fn check_id(id: &str) -> Result<(), MountError> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(MountError::BadId(id.to_string()))
    }
}

/// Splits mount options into flags and the data string the filesystem
/// gets, as mount(8) does.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            // Propagation is the guest's business for spec mounts.
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => continue,
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

/// Mounts containerd's rootfs mounts, in order, on `target` (the
/// bundle's `rootfs`), as containerd's runc shim does. On failure, what
/// was mounted is undone.
pub fn mount_rootfs(mounts: &[RootfsMount], target: &Path) -> Result<(), MountError> {
    for (index, m) in mounts.iter().enumerate() {
        if m.fstype.is_empty() {
            unmount_all_below(target).ok();
            return Err(MountError::RootfsWithoutType {
                index,
                mount_source: m.source.clone(),
            });
        }
        let (mut flags, data) = parse_options(&m.options);
        if m.fstype == "bind" {
            flags |= MsFlags::MS_BIND;
        }
        let fstype = (!flags.contains(MsFlags::MS_BIND)).then_some(m.fstype.as_str());
        let data = (!data.is_empty()).then_some(data.as_str());
        let result = mount(Some(m.source.as_str()), target, fstype, flags, data)
            .map_err(sys("mount rootfs on", target))
            .and_then(|()| {
                if flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY) {
                    remount_bind_readonly(target)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = result {
            unmount_all_below(target).ok();
            return Err(e);
        }
    }
    Ok(())
}

fn remount_bind_readonly(path: &Path) -> Result<(), MountError> {
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(sys("remount read-only", path))
}

/// Unmounts everything mounted at or below `path`, deepest first (lazily,
/// so a busy mount does not stop teardown).
pub fn unmount_all_below(path: &Path) -> Result<(), MountError> {
    let mut points = mount_points_below(path)?;
    // Deepest first; for stacked mounts on one point, the last made first.
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match umount2(&point, MntFlags::MNT_DETACH) {
            // Gone already: a parent's lazy unmount took it.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(sys("unmount", &point)(e)),
        }
    }
    let left = mount_points_below(path)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(still_mounted(path, &left))
    }
}

fn still_mounted(path: &Path, left: &[PathBuf]) -> MountError {
    MountError::StillMounted {
        path: path.to_path_buf(),
        mounts: left
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Mount points at or below `path` in this mount namespace, in
/// mountinfo's order (the order they were made).
pub fn mount_points_below(path: &Path) -> Result<Vec<PathBuf>, MountError> {
    // thread-self: a thread may have a mount namespace of its own.
    let info_path = Path::new("/proc/thread-self/mountinfo");
    let info = std::fs::read(info_path).map_err(io("read", info_path))?;
    Ok(info
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape_octal(field))))
        .filter(|point| point.starts_with(path))
        .collect())
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|d| (b'0'..=b'7').contains(d))
        {
            let value = field[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// Removes an empty directory tree, refusing while anything is mounted in it.
fn remove_unmounted_tree(path: &Path) -> Result<(), MountError> {
    let left = mount_points_below(path)?;
    if !left.is_empty() {
        return Err(still_mounted(path, &left));
    }
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_dir() => std::fs::remove_file(path),
        _ => std::fs::remove_dir_all(path),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

/// One pod's shared directory.
#[derive(Debug, Clone)]
pub struct PodShare {
    dir: PathBuf,
}

impl PodShare {
    /// Makes `dir/rw` (a shared mount) and `dir/shared` (its read-only
    /// slave view). `dir` must be absolute.
    pub fn create(dir: &Path) -> Result<Self, MountError> {
        let share = Self::open(dir);
        let (rw, shared) = (share.rw_dir(), share.shared_dir());
        for d in [&rw, &shared, &dir.join("staging")] {
            std::fs::create_dir_all(d).map_err(io("create", d))?;
        }
        let result = (|| {
            bind(&rw, &rw, false)?;
            mount(
                None::<&str>,
                &rw,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
            .map_err(sys("make shared", &rw))?;
            bind(&rw, &shared, false)?;
            mount(
                None::<&str>,
                &shared,
                None::<&str>,
                MsFlags::MS_SLAVE,
                None::<&str>,
            )
            .map_err(sys("make slave", &shared))?;
            remount_bind_readonly(&shared)
        })();
        if let Err(e) = result {
            share.destroy().ok();
            return Err(e);
        }
        Ok(share)
    }

    /// The share at `dir` as made earlier (for teardown after a restart).
    pub fn open(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Where the shim mounts.
    pub fn rw_dir(&self) -> PathBuf {
        self.dir.join("rw")
    }

    /// What virtiofsd serves.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Brings a container into the share: its mounted rootfs (`rootfs`,
    /// the bundle's) and every bind mount of its spec. Returns the spec's
    /// mounts rewritten for the guest (bind sources under
    /// [`GUEST_SHARE_DIR`]), and the rootfs path in the guest. Refuses a
    /// mount type it cannot carry before mounting anything; on any error,
    /// what it mounted is undone.
    pub fn add_container(
        &self,
        id: &str,
        rootfs: &Path,
        spec_mounts: &[SpecMount],
    ) -> Result<(Vec<SpecMount>, String), MountError> {
        check_id(id)?;
        let plan = plan(spec_mounts)?;
        let dir = self.rw_dir().join(id);
        if dir.exists() {
            return Err(MountError::AlreadyPresent(id.to_string()));
        }
        std::fs::create_dir_all(dir.join("volumes")).map_err(io("create", &dir))?;
        match self.mount_container(id, &dir, rootfs, spec_mounts, &plan) {
            Ok(rewritten) => Ok((rewritten, format!("{GUEST_SHARE_DIR}/{id}/rootfs"))),
            Err(e) => {
                if unmount_all_below(&dir).is_ok() {
                    remove_unmounted_tree(&dir).ok();
                }
                Err(e)
            }
        }
    }

    fn mount_container(
        &self,
        id: &str,
        dir: &Path,
        rootfs: &Path,
        spec_mounts: &[SpecMount],
        plan: &[Carry],
    ) -> Result<Vec<SpecMount>, MountError> {
        let rootfs_target = dir.join("rootfs");
        std::fs::create_dir(&rootfs_target).map_err(io("create", &rootfs_target))?;
        bind(rootfs, &rootfs_target, true)?;
        let mut rewritten = Vec::with_capacity(spec_mounts.len());
        for (index, (m, carry)) in spec_mounts.iter().zip(plan).enumerate() {
            let Carry::Bind {
                source,
                readonly,
                recursive,
            } = carry
            else {
                rewritten.push(m.clone());
                continue;
            };
            let target = dir.join("volumes").join(index.to_string());
            if source.is_dir() {
                std::fs::create_dir(&target).map_err(io("create", &target))?;
            } else {
                std::fs::File::create(&target).map_err(io("create", &target))?;
            }
            if *readonly {
                self.bind_readonly(source, &target, *recursive, &format!("{id}-{index}"))?;
            } else {
                bind(source, &target, *recursive)?;
            }
            let mut guest = m.clone();
            guest.set_source(Some(PathBuf::from(format!(
                "{GUEST_SHARE_DIR}/{id}/volumes/{index}"
            ))));
            guest.set_typ(Some("bind".to_string()));
            rewritten.push(guest);
        }
        Ok(rewritten)
    }

    /// Binds `source` read-only onto `target`. Mount flags do not
    /// propagate: a bind made under `rw/` and remounted read-only there
    /// would stay writable in `shared/`, which virtiofsd serves. So the
    /// read-only bind is made in `staging/` first and bound from there,
    /// and each copy inherits the flag.
    fn bind_readonly(
        &self,
        source: &Path,
        target: &Path,
        recursive: bool,
        name: &str,
    ) -> Result<(), MountError> {
        let staging = self.dir.join("staging").join(name);
        if source.is_dir() {
            std::fs::create_dir_all(&staging).map_err(io("create", &staging))?;
        } else {
            std::fs::File::create(&staging).map_err(io("create", &staging))?;
        }
        let result = bind(source, &staging, recursive)
            .and_then(|()| remount_bind_readonly(&staging))
            .and_then(|()| bind(&staging, target, recursive));
        let cleaned = unmount_all_below(&staging).and_then(|()| remove_unmounted_tree(&staging));
        result.and(cleaned)
    }

    /// Takes a container out of the share: unmounts its rootfs and
    /// volumes, then removes its directory. Removing one that is not
    /// there succeeds, so teardown can run twice.
    pub fn remove_container(&self, id: &str) -> Result<(), MountError> {
        check_id(id)?;
        let dir = self.rw_dir().join(id);
        unmount_all_below(&dir)?;
        remove_unmounted_tree(&dir)
    }

    /// Unmounts everything in the share and removes it. Succeeds when the
    /// share is already gone.
    pub fn destroy(&self) -> Result<(), MountError> {
        unmount_all_below(&self.dir)?;
        remove_unmounted_tree(&self.dir)
    }
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), MountError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(sys("bind onto", target))
}

/// What happens to one spec mount.
enum Carry {
    /// Made by the guest; passes unchanged.
    Guest,
    /// Bound into the share from this host path.
    Bind {
        source: PathBuf,
        readonly: bool,
        recursive: bool,
    },
}

/// Decides, before anything is mounted, how each spec mount reaches the guest.
/// Checks that every spec mount can be carried into the guest, before
/// anything is mounted or booted.
pub fn check_mounts(spec_mounts: &[SpecMount]) -> Result<(), MountError> {
    plan(spec_mounts).map(|_| ())
}

fn plan(spec_mounts: &[SpecMount]) -> Result<Vec<Carry>, MountError> {
    spec_mounts
        .iter()
        .map(|m| {
            let options = m.options().clone().unwrap_or_default();
            let fstype = m.typ().clone().unwrap_or_default();
            let source = m
                .source()
                .as_ref()
                .map(|s| s.display().to_string())
                .unwrap_or_default();
            let is_bind = fstype == "bind"
                || options.iter().any(|o| o == "bind" || o == "rbind");
            if !is_bind {
                if GUEST_MOUNT_TYPES.contains(&fstype.as_str()) {
                    return Ok(Carry::Guest);
                }
                return Err(MountError::Unsupported {
                    destination: m.destination().display().to_string(),
                    fstype,
                    mount_source: source,
                });
            }
            let bad = |why: &str| MountError::BadSource {
                destination: m.destination().display().to_string(),
                mount_source: source.clone(),
                why: why.to_string(),
            };
            let path = PathBuf::from(&source);
            if !path.is_absolute() {
                return Err(bad("is not an absolute path"));
            }
            let meta = std::fs::metadata(&path).map_err(|e| bad(&format!("cannot be used: {e}")))?;
            if !(meta.is_dir() || meta.is_file()) {
                return Err(bad("is neither a directory nor a regular file (devices and sockets do not travel over virtio-fs)"));
            }
            Ok(Carry::Bind {
                source: path,
                readonly: options.iter().any(|o| o == "ro"),
                recursive: options.iter().any(|o| o == "rbind"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sched::{unshare, CloneFlags};
    use oci_spec::runtime::MountBuilder;

    /// A private mount namespace for this test thread, with a tmpfs to work
    /// in: nothing a test mounts is seen by the host or outlives the test.
    struct Scratch {
        dir: PathBuf,
    }

    impl Scratch {
        fn new(name: &str) -> Self {
            assert!(
                nix::unistd::geteuid().is_root(),
                "the shim's mount tests need root (mount namespaces, bind mounts, overlayfs)"
            );
            unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("make / private");
            let dir = std::env::temp_dir()
                .join(format!("moat-shim-mounts-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .expect("tmpfs");
            Scratch { dir }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.join(rel)
        }

        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let p = self.path(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    fn spec_mount(destination: &str, fstype: &str, source: &str, options: &[&str]) -> SpecMount {
        MountBuilder::default()
            .destination(destination)
            .typ(fstype)
            .source(source)
            .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    fn overlay_rootfs(s: &Scratch) -> PathBuf {
        s.write("snap/lower/bin/hello", "from the image");
        for d in ["snap/upper", "snap/work", "bundle/rootfs"] {
            std::fs::create_dir_all(s.path(d)).unwrap();
        }
        let rootfs = s.path("bundle/rootfs");
        let mounts = [RootfsMount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", s.path("snap/work").display()),
                format!("upperdir={}", s.path("snap/upper").display()),
                format!("lowerdir={}", s.path("snap/lower").display()),
            ],
        }];
        mount_rootfs(&mounts, &rootfs).unwrap();
        rootfs
    }

    /// Mount points strictly below `dir`.
    fn mounts_inside(dir: &Path) -> Vec<PathBuf> {
        mount_points_below(dir)
            .unwrap()
            .into_iter()
            .filter(|p| p != dir)
            .collect()
    }

    fn is_erofs(result: std::io::Result<impl Sized>) -> bool {
        matches!(result, Err(e) if e.raw_os_error() == Some(libc::EROFS))
    }

    #[test]
    fn share_is_a_read_only_slave_view_that_sees_later_mounts() {
        let s = Scratch::new("slave");
        let share = PodShare::create(&s.path("pod")).unwrap();
        assert!(is_erofs(std::fs::File::create(
            share.shared_dir().join("x")
        )));
        std::fs::create_dir(share.rw_dir().join("later")).unwrap();
        mount(
            Some("tmpfs"),
            &share.rw_dir().join("later"),
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(share.rw_dir().join("later/file"), "late").unwrap();
        // Mounted after the share was made, seen through it, and writable
        // there: a propagated mount keeps its own flags.
        assert_eq!(
            std::fs::read_to_string(share.shared_dir().join("later/file")).unwrap(),
            "late"
        );
        std::fs::write(share.shared_dir().join("later/back"), "ok").unwrap();
        umount2(&share.rw_dir().join("later"), MntFlags::empty()).unwrap();
        assert!(!share.shared_dir().join("later/file").exists());
        share.destroy().unwrap();
        assert!(!s.path("pod").exists());
        assert!(mount_points_below(&s.path("pod")).unwrap().is_empty());
    }

    #[test]
    fn container_rootfs_and_volumes_reach_the_share() {
        let s = Scratch::new("container");
        let share = PodShare::create(&s.path("pod")).unwrap();
        let rootfs = overlay_rootfs(&s);
        s.write("host/data/in", "host data");
        s.write("host/config/key", "value");
        let hosts = s.write("host/etc-hosts", "127.0.0.1 localhost\n");
        let mounts = vec![
            spec_mount("/proc", "proc", "proc", &["nosuid"]),
            spec_mount(
                "/data",
                "bind",
                s.path("host/data").to_str().unwrap(),
                &["rbind", "rw"],
            ),
            spec_mount(
                "/config",
                "bind",
                s.path("host/config").to_str().unwrap(),
                &["rbind", "ro"],
            ),
            spec_mount(
                "/etc/hosts",
                "bind",
                hosts.to_str().unwrap(),
                &["bind", "ro"],
            ),
            spec_mount("/dev/shm", "tmpfs", "shm", &["size=65536k"]),
        ];
        let (guest, guest_rootfs) = share.add_container("c1", &rootfs, &mounts).unwrap();
        assert_eq!(guest_rootfs, "/run/moat/shared/c1/rootfs");
        let sources: Vec<_> = guest
            .iter()
            .map(|m| m.source().as_ref().unwrap().display().to_string())
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/moat/shared/c1/volumes/1",
                "/run/moat/shared/c1/volumes/2",
                "/run/moat/shared/c1/volumes/3",
                "shm"
            ]
        );
        assert_eq!(guest[1].options(), mounts[1].options());
        assert_eq!(guest[0], mounts[0]);
        let seen = share.shared_dir().join("c1");
        assert_eq!(
            std::fs::read_to_string(seen.join("rootfs/bin/hello")).unwrap(),
            "from the image"
        );
        // The guest's rootfs writes land in the snapshot's upper dir.
        std::fs::write(seen.join("rootfs/new"), "guest").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.path("snap/upper/new")).unwrap(),
            "guest"
        );
        // A writable volume writes through to the host; a read-only one refuses.
        std::fs::write(seen.join("volumes/1/out"), "guest wrote").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.path("host/data/out")).unwrap(),
            "guest wrote"
        );
        assert_eq!(
            std::fs::read_to_string(seen.join("volumes/2/key")).unwrap(),
            "value"
        );
        assert!(is_erofs(std::fs::File::create(seen.join("volumes/2/new"))));
        assert!(is_erofs(
            std::fs::OpenOptions::new()
                .append(true)
                .open(seen.join("volumes/3"))
        ));
        assert_eq!(
            std::fs::read_to_string(seen.join("volumes/3")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        // A host change is seen.
        std::fs::write(s.path("host/config/key"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(seen.join("volumes/2/key")).unwrap(),
            "changed"
        );

        assert!(matches!(
            share.add_container("c1", &rootfs, &[]),
            Err(MountError::AlreadyPresent(_))
        ));
        share.remove_container("c1").unwrap();
        assert!(!share.rw_dir().join("c1").exists());
        assert!(mounts_inside(&share.rw_dir()).is_empty());
        assert!(mounts_inside(&share.shared_dir()).is_empty());
        // Teardown never reaches through a mount into host data.
        assert_eq!(
            std::fs::read_to_string(s.path("host/data/in")).unwrap(),
            "host data"
        );
        assert_eq!(
            std::fs::read_to_string(s.path("host/data/out")).unwrap(),
            "guest wrote"
        );
        assert_eq!(
            std::fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("bin/hello")).unwrap(),
            "from the image"
        );
        // Twice is fine.
        share.remove_container("c1").unwrap();
        unmount_all_below(&rootfs).unwrap();
        share.destroy().unwrap();
        share.destroy().unwrap();
    }

    #[test]
    fn a_mount_that_cannot_travel_is_refused_before_anything_is_mounted() {
        let s = Scratch::new("refused");
        let share = PodShare::create(&s.path("pod")).unwrap();
        let rootfs = overlay_rootfs(&s);
        s.write("host/data/in", "x");
        let data = s.path("host/data");
        let cases = [
            (spec_mount("/nfs", "nfs", "server:/export", &[]), "/nfs"),
            (spec_mount("/blk", "ext4", "/dev/vdb", &[]), "/blk"),
            (
                spec_mount("/rel", "bind", "relative/path", &["rbind"]),
                "not an absolute path",
            ),
            (
                spec_mount("/gone", "bind", "/nonexistent/moat", &["rbind"]),
                "/nonexistent/moat",
            ),
            (
                spec_mount("/null", "bind", "/dev/null", &["bind"]),
                "neither a directory",
            ),
        ];
        for (bad, expect) in cases {
            let mounts = vec![
                spec_mount("/data", "bind", data.to_str().unwrap(), &["rbind"]),
                bad,
            ];
            let err = share
                .add_container("c2", &rootfs, &mounts)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{err}");
            assert!(
                !share.rw_dir().join("c2").exists(),
                "{err}: left a directory"
            );
            let left = mounts_inside(&share.rw_dir());
            assert!(left.is_empty(), "{err}: left mounts {left:?}");
            let left = mounts_inside(&s.path("pod/staging"));
            assert!(left.is_empty(), "{err}: left staging mounts {left:?}");
        }
        for id in ["", ".", "..", "../x", "a/b", &"x".repeat(77)] {
            assert!(
                matches!(
                    share.add_container(id, &rootfs, &[]),
                    Err(MountError::BadId(_))
                ),
                "{id}"
            );
        }
        unmount_all_below(&rootfs).unwrap();
        share.destroy().unwrap();
    }

    #[test]
    fn removal_refuses_to_delete_through_a_mount() {
        let s = Scratch::new("busy");
        let share = PodShare::create(&s.path("pod")).unwrap();
        let rootfs = overlay_rootfs(&s);
        share.add_container("c3", &rootfs, &[]).unwrap();
        let err = remove_unmounted_tree(&share.rw_dir().join("c3")).unwrap_err();
        assert!(matches!(err, MountError::StillMounted { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(s.path("snap/lower/bin/hello")).unwrap(),
            "from the image"
        );
        share.destroy().unwrap();
        unmount_all_below(&rootfs).unwrap();
    }

    #[test]
    fn rootfs_mounts_need_a_type_and_are_undone_on_failure() {
        let s = Scratch::new("rootfs");
        let target = s.path("bundle/rootfs");
        std::fs::create_dir_all(&target).unwrap();
        let err = mount_rootfs(
            &[RootfsMount {
                fstype: String::new(),
                source: "x".into(),
                options: vec![],
            }],
            &target,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no type"), "{err}");
        let err = mount_rootfs(
            &[RootfsMount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec!["lowerdir=/nonexistent/moat".into()],
            }],
            &target,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mount rootfs on"), "{err}");
        assert!(mount_points_below(&target).unwrap().is_empty());
        // A read-only bind rootfs (containerd's native snapshotter, ro).
        s.write("snap/dir/f", "native");
        mount_rootfs(
            &[RootfsMount {
                fstype: "bind".into(),
                source: s.path("snap/dir").display().to_string(),
                options: vec!["rbind".into(), "ro".into()],
            }],
            &target,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f")).unwrap(), "native");
        assert!(is_erofs(std::fs::File::create(target.join("g"))));
        unmount_all_below(&target).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_octal(b"/a\\040b\\011c\\134d"), b"/a b\tc\\d");
        assert_eq!(unescape_octal(b"/end\\04"), b"/end\\04");
    }
}
