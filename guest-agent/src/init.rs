//! What the agent does as PID 1 of the guest before it serves: the early
//! root switch, the early mounts, the hostname and the cgroup controllers.

use std::ffi::CString;

/// Errors setting the guest up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        /// The filesystem type.
        fstype: &'static str,
        /// Where.
        target: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The pod's virtio-fs share could not be mounted.
    #[error("mount virtiofs tag {tag:?} on {target}: {source}")]
    Share {
        /// The virtio-fs tag (`moat.share=`).
        tag: String,
        /// Where.
        target: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A cgroup setting failed.
    #[error("cgroup: {what}: {source}")]
    Cgroup {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Moving the root to a tmpfs failed.
    #[error("switch root: {what}: {source}")]
    SwitchRoot {
        /// The step.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The hostname could not be set.
    #[error("sethostname {name:?}: {source}")]
    Hostname {
        /// The name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The early mounts: (fstype, target, flags, data).
const MOUNTS: [(&str, &str, libc::c_ulong, &str); 7] = [
    (
        "proc",
        "/proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "sysfs",
        "/sys",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
    (
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    (
        "cgroup2",
        "/sys/fs/cgroup",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    ),
    (
        "tmpfs",
        "/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    ),
    (
        "tmpfs",
        "/run",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    ),
];

/// Mounts proc, sys, dev, devpts, cgroup2, tmp and run, creating the
/// mount points.
pub fn mount_early_filesystems() -> Result<(), InitError> {
    for (fstype, target, flags, data) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        mount_one(fstype, target, flags, data).map_err(|source| InitError::Mount {
            fstype,
            target,
            source,
        })?;
    }
    Ok(())
}

/// Sets the guest's hostname.
pub fn set_hostname(name: &str) -> Result<(), InitError> {
    // SAFETY: name points to name.len() readable bytes.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(InitError::Hostname {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Mounts the pod's virtio-fs share, tag `tag`, on
/// [`moat_protocol::GUEST_SHARE_DIR`], where the shim puts each
/// container's rootfs and volumes.
pub fn mount_share(tag: &str) -> Result<(), InitError> {
    let target = moat_protocol::GUEST_SHARE_DIR;
    let fail = |source| InitError::Share {
        tag: tag.to_string(),
        target,
        source,
    };
    std::fs::create_dir_all(target).map_err(fail)?;
    let invalid = || fail(std::io::Error::from_raw_os_error(libc::EINVAL));
    let tag_c = CString::new(tag).map_err(|_| invalid())?;
    let target_c = CString::new(target).map_err(|_| invalid())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; no data argument.
    let rc = unsafe {
        libc::mount(
            tag_c.as_ptr(),
            target_c.as_ptr(),
            c"virtiofs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(fail(std::io::Error::last_os_error()))
    }
}

/// Enables every controller the kernel has for the cgroups below the
/// root, so containers' cgroups can take cpu, memory, pids and io limits.
pub fn enable_cgroup_controllers() -> Result<(), InitError> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).map_err(|source| {
        InitError::Cgroup {
            what: "read cgroup.controllers".into(),
            source,
        }
    })?;
    let enable: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    std::fs::write(root.join("cgroup.subtree_control"), enable.join(" ")).map_err(|source| {
        InitError::Cgroup {
            what: format!("enable {} in cgroup.subtree_control", enable.join(" ")),
            source,
        }
    })
}

/// Set in the environment of the re-executed `/init` once the root is a
/// tmpfs.
const SWITCHED: &str = "MOAT_ROOT_SWITCHED";
const NEW_ROOT: &str = "/.moat-root";

/// Moves the initramfs into a tmpfs and makes that the root, then
/// re-executes `/init` there (what `switch_root` does). The kernel's
/// initramfs root cannot be pivoted away from, so without this no
/// container could use `pivot_root`.
pub fn switch_to_tmpfs_root() -> Result<(), InitError> {
    if std::env::var_os(SWITCHED).is_some() {
        return Ok(());
    }
    let step = |what: &str| {
        let what = what.to_string();
        move |source| InitError::SwitchRoot { what, source }
    };
    let new_root = std::path::Path::new(NEW_ROOT);
    std::fs::create_dir_all(new_root).map_err(step("create /.moat-root"))?;
    mount_one(
        "tmpfs",
        NEW_ROOT,
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )
    .map_err(step("mount tmpfs on /.moat-root"))?;
    for entry in std::fs::read_dir("/").map_err(step("read /"))? {
        let entry = entry.map_err(step("read /"))?;
        let name = entry.file_name();
        if [".moat-root", "proc", "sys", "dev"].contains(&name.to_string_lossy().as_ref()) {
            continue;
        }
        let from = entry.path();
        copy_tree(&from, &new_root.join(&name))
            .map_err(step(&format!("copy {}", from.display())))?;
        // Free the initramfs copy as we go.
        let _ = if from.is_dir() && !from.is_symlink() {
            std::fs::remove_dir_all(&from)
        } else {
            std::fs::remove_file(&from)
        };
    }
    for dir in ["proc", "sys", "dev"] {
        std::fs::create_dir_all(new_root.join(dir)).map_err(step("create mount points"))?;
    }
    std::env::set_current_dir(new_root).map_err(step("chdir /.moat-root"))?;
    mount_one(".", "/", libc::MS_MOVE, "").map_err(step("move /.moat-root to /"))?;
    let dot = CString::new(".").unwrap_or_default();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(step("chroot")(std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new("/init")
        .env(SWITCHED, "1")
        .exec();
    Err(step("re-execute /init")(error))
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())
    } else if meta.is_file() {
        std::fs::copy(from, to).map(|_| ())
    } else {
        // Device nodes and sockets: the new /dev provides them.
        Ok(())
    }
}

/// Mounts a pseudo filesystem whose source names its type (`proc`,
/// `tmpfs`…), or, with MS_MOVE, moves the mount at `source`.
fn mount_one(source: &str, target: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let (source_c, target_c, data_c) = (c(source), c(target), c(data));
    let fstype = if flags & libc::MS_MOVE != 0 {
        std::ptr::null()
    } else {
        source_c.as_ptr()
    };
    // SAFETY: every pointer is a valid NUL-terminated string (or null for
    // the fstype of a move) that outlives the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype,
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
