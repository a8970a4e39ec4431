//! What the agent does as PID 1 of the guest before it serves: the early
//! mounts, the hostname, and reaping orphans.

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
        let c = |s: &str| CString::new(s).unwrap_or_default();
        let (source, fs, dir, data) = (c(fstype), c(fstype), c(target), c(data));
        // SAFETY: every pointer is a valid NUL-terminated string that
        // outlives the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                dir.as_ptr(),
                fs.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(InitError::Mount {
                fstype,
                target,
                source: std::io::Error::last_os_error(),
            });
        }
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

/// Reaps every child whose parent died (PID 1's duty), forever, on a
/// thread of its own.
pub fn spawn_orphan_reaper() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid < 0 {
                // No children yet: check again shortly.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
        .map(|_| ())
}
