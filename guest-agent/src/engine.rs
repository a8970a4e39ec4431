//! The container engine: the pod's containers and their processes.
//!
//! It owns each container's bundle (`STATE/bundles/ID`: `config.json`,
//! the rootfs mount point, exec process files), its libcontainer state
//! (`STATE/containers/ID`), its cgroup, and the agent's ends of every
//! process's stdio. Calls that clone (create, exec) go through the
//! single-threaded [`crate::helper`]; the others use libcontainer and
//! libcgroups in-process, on tokio's blocking pool. One container's
//! failure only ever fails that container's call.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, CgroupConfig, CgroupManager, CgroupSetup,
    ControllerOpt,
};
use libcontainer::container::Container as LcContainer;
use libcontainer::oci_spec::runtime::{LinuxResources, Process as OciProcess, Spec};
use libcontainer::signal::Signal;
use nix::sys::signal::Signal as NixSignal;

use crate::helper;
use crate::oom::OomWatcher;
use crate::reaper::{Exit, ProcessExit, Reaper};
use crate::stdio::{self, Stdio, Stream};

/// How long a helper may take to create a container or exec a process.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long removal waits for SIGKILLed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the engine; each names the container or process and input.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No container has this ID.
    #[error("container {0:?} not found")]
    NotFound(String),
    /// The container has no process with this exec ID.
    #[error("process {exec_id:?} not found in container {container_id:?}")]
    ProcessNotFound {
        /// The container.
        container_id: String,
        /// The exec ID.
        exec_id: String,
    },
    /// The container ID is taken.
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    /// The exec ID is taken in this container.
    #[error("process {exec_id:?} already exists in container {container_id:?}")]
    ProcessExists {
        /// The container.
        container_id: String,
        /// The exec ID.
        exec_id: String,
    },
    /// A request field is malformed.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The field.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// The call does not fit the container's or process's state.
    #[error("{0}")]
    Precondition(String),
    /// A system call on the agent's side failed.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing, with its input.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// libcontainer or libcgroups failed.
    #[error("{0}")]
    Runtime(String),
}

type Result<T> = std::result::Result<T, EngineError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

fn invalid(what: &str, why: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// Where the engine keeps its state and puts its cgroups.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The agent's state directory (`/run/moat` in the guest).
    pub state_dir: PathBuf,
    /// The cgroup under which containers without a `cgroupsPath` go.
    pub cgroup_parent: String,
    /// The agent binary, re-executed as the helper.
    pub agent_exe: PathBuf,
}

/// A rootfs or volume to mount for a container.
#[derive(Debug, Clone, Default)]
pub struct MountRequest {
    /// A path or device in the guest.
    pub source: String,
    /// The mount point (ignored for the rootfs).
    pub destination: String,
    /// The filesystem type; empty or `bind` for a bind mount.
    pub fstype: String,
    /// Mount options (`ro`, `bind`, `rbind` or filesystem data).
    pub options: Vec<String>,
}

/// A process the agent started: a container's init or an exec.
#[derive(Debug)]
pub struct Process {
    /// Its PID in the agent's PID namespace.
    pub pid: i32,
    /// The agent's ends of its stdio.
    pub stdio: Stdio,
    /// Its exit, once the reaper has seen it.
    pub exit: Arc<ProcessExit>,
}

/// The agent's side of a new process's stdio while the helper runs.
enum PendingStdio {
    /// The socket the init sends its terminal's master to.
    Console {
        socket: PathBuf,
        listener: std::os::unix::net::UnixListener,
    },
    /// The agent's ends of three pipes.
    Pipes {
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
}

#[derive(Debug)]
struct Container {
    id: String,
    bundle: PathBuf,
    mounts: Vec<PathBuf>,
    cgroup_path: PathBuf,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Option<Arc<Process>>>>,
    /// Serialises libcontainer state changes of this container.
    ops: tokio::sync::Mutex<()>,
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    reaper: Arc<Reaper>,
    oom: Arc<OomWatcher>,
    /// `None` while a container is being created or removed.
    containers: Mutex<HashMap<String, Option<Arc<Container>>>>,
    cgroup_v2: bool,
}

/// Checks a container or exec ID: 1–128 of `[A-Za-z0-9_.-]`, not
/// starting with a dot (it names directories and cgroups).
pub fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            format!("{id:?}: must be 1-128 of A-Z a-z 0-9 _ . - and not start with a dot"),
        ))
    }
}

/// Parses a container's OCI spec (JSON) and gives its process the
/// terminal the request asks for.
pub fn parse_spec(json: &[u8], terminal: bool) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_slice(json).map_err(|e| invalid("OCI spec", e))?;
    let Some(mut process) = spec.process().clone() else {
        return Err(invalid("OCI spec", "it has no process"));
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("OCI spec", "process.args is empty"));
    }
    process.set_terminal(Some(terminal));
    spec.set_process(Some(process));
    Ok(spec)
}

/// Parses an exec's OCI process (JSON).
pub fn parse_process(json: &[u8], terminal: bool) -> Result<OciProcess> {
    let mut process: OciProcess =
        serde_json::from_slice(json).map_err(|e| invalid("OCI process", e))?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(invalid("OCI process", "args is empty"));
    }
    process.set_terminal(Some(terminal));
    Ok(process)
}

/// Parses OCI linux resources (JSON).
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources> {
    serde_json::from_slice(json).map_err(|e| invalid("OCI resources", e))
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| invalid(what, format!("{s:?} contains a NUL byte")))
}

/// Mounts `request` on `target`.
fn mount(request: &MountRequest, target: &Path) -> Result<()> {
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    let bind = request.fstype.is_empty() || request.fstype == "bind";
    if bind {
        flags |= libc::MS_BIND | libc::MS_REC;
    }
    for option in &request.options {
        match option.as_str() {
            "ro" => flags |= libc::MS_RDONLY,
            "rw" => {}
            "bind" | "rbind" => flags |= libc::MS_BIND | libc::MS_REC,
            "nosuid" => flags |= libc::MS_NOSUID,
            "nodev" => flags |= libc::MS_NODEV,
            "noexec" => flags |= libc::MS_NOEXEC,
            other => data.push(other.to_string()),
        }
    }
    let what = format!(
        "mount {:?} ({}) on {}",
        request.source,
        if bind { "bind" } else { &request.fstype },
        target.display()
    );
    let source = cstring("mount source", &request.source)?;
    let fstype = cstring("mount fstype", &request.fstype)?;
    let target_c = cstring("mount target", &target.to_string_lossy())?;
    let data = cstring("mount options", &data.join(","))?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags & !libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io_err(what)(io::Error::last_os_error()));
    }
    if bind && flags & libc::MS_RDONLY != 0 {
        // A bind mount takes MS_RDONLY only on a remount.
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            unmount(target);
            return Err(io_err(format!("{what}: read-only remount"))(source));
        }
    }
    Ok(())
}

/// Detaches whatever is mounted on `target`, if anything.
fn unmount(target: &Path) {
    if let Ok(target) = CString::new(target.to_string_lossy().as_bytes()) {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn lc_error(what: String) -> impl FnOnce(libcontainer::error::LibcontainerError) -> EngineError {
    move |e| match e {
        libcontainer::error::LibcontainerError::IncorrectStatus(status) => {
            EngineError::Precondition(format!("{what}: the container is {status}"))
        }
        other => EngineError::Runtime(format!("{what}: {other}")),
    }
}

/// Runs blocking work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EngineError::Runtime(format!("blocking task failed: {e}")))?
}

/// Receives one fd sent with SCM_RIGHTS on `stream`.
fn receive_fd(stream: &std::os::unix::net::UnixStream) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(&fd) = fds.first() {
                for &extra in &fds[1..] {
                    // SAFETY: the kernel just gave us these fds.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                // SAFETY: as above; this one is now ours alone.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no terminal fd in the console socket message",
    ))
}

impl Engine {
    /// An engine keeping state under `config.state_dir`.
    pub fn new(
        config: EngineConfig,
        reaper: Arc<Reaper>,
        oom: Arc<OomWatcher>,
    ) -> io::Result<Engine> {
        for dir in ["bundles", "containers", "consoles"] {
            std::fs::create_dir_all(config.state_dir.join(dir))?;
        }
        let cgroup_v2 = matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified));
        Ok(Engine {
            config,
            reaper,
            oom,
            containers: Mutex::new(HashMap::new()),
            cgroup_v2,
        })
    }

    fn lc_root(&self) -> PathBuf {
        self.config.state_dir.join("containers")
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Arc<Container>>>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        match self.containers().get(id) {
            Some(Some(container)) => Ok(container.clone()),
            Some(None) => Err(EngineError::Precondition(format!(
                "container {id:?} is being created or removed"
            ))),
            None => Err(EngineError::NotFound(id.to_string())),
        }
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let container = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(container.init.clone());
        }
        let execs = container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match execs.get(exec_id) {
            Some(Some(process)) => Ok(process.clone()),
            _ => Err(EngineError::ProcessNotFound {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// Creates a container from an OCI spec; its init waits for
    /// [`Engine::start`].
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs: Option<MountRequest>,
        mounts: Vec<MountRequest>,
        terminal: bool,
    ) -> Result<()> {
        check_id("container ID", id)?;
        {
            let mut containers = self.containers();
            if containers.contains_key(id) {
                return Err(EngineError::AlreadyExists(id.to_string()));
            }
            containers.insert(id.to_string(), None);
        }
        let bundle = self.config.state_dir.join("bundles").join(id);
        let mut mounted = Vec::new();
        let result = self
            .create_inner(
                id,
                &bundle,
                spec_json,
                rootfs,
                mounts,
                terminal,
                &mut mounted,
            )
            .await;
        match result {
            Ok(container) => {
                self.containers()
                    .insert(id.to_string(), Some(Arc::new(container)));
                Ok(())
            }
            Err(e) => {
                self.clean_up_failed_create(id, &bundle, &mounted).await;
                self.containers().remove(id);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_inner(
        &self,
        id: &str,
        bundle: &Path,
        spec_json: &[u8],
        rootfs: Option<MountRequest>,
        mounts: Vec<MountRequest>,
        terminal: bool,
        mounted: &mut Vec<PathBuf>,
    ) -> Result<Container> {
        let mut spec = parse_spec(spec_json, terminal)?;

        std::fs::create_dir_all(bundle).map_err(io_err(format!("create {}", bundle.display())))?;
        match rootfs.filter(|r| !r.source.is_empty()) {
            Some(rootfs) => {
                let target = bundle.join("rootfs");
                std::fs::create_dir_all(&target)
                    .map_err(io_err(format!("create {}", target.display())))?;
                mount(&rootfs, &target)?;
                mounted.push(target.clone());
                let mut root = spec.root().clone().unwrap_or_default();
                root.set_path(target);
                spec.set_root(Some(root));
            }
            None => {
                let path = spec.root().as_ref().map(|r| r.path().clone());
                match path {
                    Some(p) if p.is_absolute() && p.is_dir() => {}
                    other => {
                        return Err(invalid(
                            "rootfs",
                            format!(
                                "no rootfs mount given and the spec's root.path {other:?} is not an absolute directory"
                            ),
                        ))
                    }
                }
            }
        }
        for request in &mounts {
            let target = PathBuf::from(&request.destination);
            if !target.is_absolute() {
                return Err(invalid(
                    "mount",
                    format!("destination {:?} is not absolute", request.destination),
                ));
            }
            std::fs::create_dir_all(&target)
                .map_err(io_err(format!("create {}", target.display())))?;
            mount(request, &target)?;
            mounted.push(target);
        }

        let mut linux = spec.linux().clone().unwrap_or_default();
        let cgroup_path = match linux.cgroups_path() {
            Some(path) if path.is_absolute() => path.clone(),
            Some(path) => {
                return Err(invalid(
                    "OCI spec",
                    format!("linux.cgroupsPath {path:?} is not absolute"),
                ))
            }
            None => PathBuf::from(format!(
                "{}/{id}",
                self.config.cgroup_parent.trim_end_matches('/')
            )),
        };
        linux.set_cgroups_path(Some(cgroup_path.clone()));
        spec.set_linux(Some(linux));
        let config = bundle.join("config.json");
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| invalid("OCI spec", e))?;
        std::fs::write(&config, json).map_err(io_err(format!("write {}", config.display())))?;

        let init = self
            .run_helper(helper::CREATE, id, bundle, terminal)
            .await?;
        if self.cgroup_v2 {
            let dir = cgroup_v2_dir(&cgroup_path);
            self.oom
                .watch(id, &dir)
                .map_err(io_err(format!("watch {} for OOM kills", dir.display())))?;
        }
        Ok(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            mounts: mounted.clone(),
            cgroup_path,
            init: Arc::new(init),
            execs: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
        })
    }

    async fn clean_up_failed_create(&self, id: &str, bundle: &Path, mounted: &[PathBuf]) {
        self.oom.unwatch(id);
        let state = self.lc_root().join(id);
        if state.exists() {
            let _ = blocking(move || {
                if let Ok(mut container) = LcContainer::load(state.clone()) {
                    let _ = container.delete(true);
                }
                let _ = std::fs::remove_dir_all(&state);
                Ok(())
            })
            .await;
        }
        for target in mounted.iter().rev() {
            unmount(target);
        }
        let _ = std::fs::remove_dir_all(bundle);
    }

    /// Runs the helper and returns the new process's PID and stdio.
    async fn run_helper(
        &self,
        command: &str,
        id: &str,
        path: &Path,
        terminal: bool,
    ) -> Result<Process> {
        let (report_read, report_write) = stdio::pipe().map_err(io_err("report pipe"))?;
        let spawned_at = std::time::SystemTime::now();
        // Taken before the helper (and so the process) exists: only exits
        // reaped after it can be theirs.
        let mark = self.reaper.mark();
        let mut cmd = std::process::Command::new(&self.config.agent_exe);
        cmd.arg(command).arg(self.lc_root()).arg(id).arg(path);
        let pending = if terminal {
            let socket = self.config.state_dir.join("consoles").join(format!(
                "{id}-{}.sock",
                spawned_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ));
            let listener = std::os::unix::net::UnixListener::bind(&socket)
                .map_err(io_err(format!("console socket {}", socket.display())))?;
            cmd.arg(&socket)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            PendingStdio::Console { socket, listener }
        } else {
            let (stdin_r, stdin) = stdio::pipe().map_err(io_err("stdin pipe"))?;
            let (stdout, stdout_w) = stdio::pipe().map_err(io_err("stdout pipe"))?;
            let (stderr, stderr_w) = stdio::pipe().map_err(io_err("stderr pipe"))?;
            cmd.arg("-")
                .stdin(stdin_r)
                .stdout(stdout_w)
                .stderr(stderr_w);
            PendingStdio::Pipes {
                stdin,
                stdout,
                stderr,
            }
        };
        let report_fd = report_write.as_raw_fd();
        // SAFETY: the closure only calls async-signal-safe dup2/fcntl.
        unsafe {
            cmd.pre_exec(move || {
                if report_fd == helper::REPORT_FD {
                    if libc::fcntl(report_fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(report_fd, helper::REPORT_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err(format!(
            "start helper {}",
            self.config.agent_exe.display()
        )))?;
        self.reaper.child_spawned();
        // The helper and the process hold the other ends now.
        drop(cmd);
        drop(report_write);
        let helper_pid = child.id() as i32;
        drop(child);
        let helper_exit = self.reaper.watch(helper_pid, mark);
        let exit = helper_exit.wait_timeout(HELPER_TIMEOUT).await;
        // A terminal sent by now waits in the listener's backlog; the path
        // is no longer needed, whatever the outcome.
        if let PendingStdio::Console { socket, .. } = &pending {
            let _ = std::fs::remove_file(socket);
        }
        let Some(exit) = exit else {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(helper_pid, libc::SIGKILL) };
            return Err(EngineError::Runtime(format!(
                "{command} {id:?}: the helper did not finish within {HELPER_TIMEOUT:?}"
            )));
        };
        let report = read_report(report_read);
        let (pid, exit) = match report.strip_prefix("ok ").map(|p| p.trim().parse::<i32>()) {
            Some(Ok(pid)) if pid > 0 => (pid, self.reaper.watch(pid, mark)),
            _ => {
                let message = report
                    .strip_prefix("error ")
                    .map(|m| m.trim().to_string())
                    .unwrap_or_else(|| {
                        format!("the helper exited with {} and no report", exit.status)
                    });
                return Err(EngineError::Runtime(message));
            }
        };
        let stdio = match pending {
            PendingStdio::Console { listener, .. } => {
                listener
                    .set_nonblocking(true)
                    .map_err(io_err("console socket"))?;
                let (stream, _) = listener.accept().map_err(io_err(format!(
                    "{command} {id:?}: the terminal was not sent to the console socket"
                )))?;
                stream
                    .set_nonblocking(false)
                    .map_err(io_err("console socket"))?;
                let master = receive_fd(&stream).map_err(io_err("receive the terminal"))?;
                Stdio::Tty {
                    master: Stream::new(master).map_err(io_err("terminal"))?,
                }
            }
            PendingStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => Stdio::Pipes {
                stdin: Mutex::new(Some(Stream::new(stdin).map_err(io_err("stdin"))?)),
                stdout: Stream::new(stdout).map_err(io_err("stdout"))?,
                stderr: Stream::new(stderr).map_err(io_err("stderr"))?,
            },
        };
        Ok(Process { pid, stdio, exit })
    }

    /// Starts a created container's init.
    pub async fn start(&self, id: &str) -> Result<()> {
        // libcontainer refuses (IncorrectStatus) anything but a created
        // container.
        self.lc_op(id, format!("start container {id:?}"), |lc| lc.start())
            .await
    }

    /// Sends `signal` to a process, or with `all` to every process of the
    /// container.
    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| NixSignal::try_from(s).ok())
            .ok_or_else(|| invalid("signal", format!("{signal} is not a signal number")))?;
        let process = self.process(id, exec_id)?;
        if all && exec_id.is_empty() {
            return self
                .lc_op(
                    id,
                    format!("signal {signal} to every process of {id:?}"),
                    move |lc| lc.kill(Signal::from(signal), true),
                )
                .await;
        }
        let sent = self
            .reaper
            .signal_unreaped(process.pid, &process.exit, signal as i32)
            .map_err(io_err(format!(
                "signal {signal} to process {exec_id:?} of {id:?} (PID {})",
                process.pid
            )))?;
        if !sent {
            return Err(EngineError::Precondition(format!(
                "process {exec_id:?} of container {id:?} has already exited"
            )));
        }
        Ok(())
    }

    /// Waits for a process to exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let process = self.process(id, exec_id)?;
        Ok(process.exit.wait().await)
    }

    /// Reads a process's stdout (`stderr == false`) or stderr.
    pub async fn read(&self, id: &str, exec_id: &str, stderr: bool, max: usize) -> Result<Vec<u8>> {
        let process = self.process(id, exec_id)?;
        let stream = match (&process.stdio, stderr) {
            (Stdio::Pipes { stdout, .. }, false) => stdout.clone(),
            (Stdio::Pipes { stderr, .. }, true) => stderr.clone(),
            (Stdio::Tty { master }, false) => master.clone(),
            // A terminal merges stderr into its output.
            (Stdio::Tty { .. }, true) => return Ok(Vec::new()),
        };
        stream
            .read(max)
            .await
            .map_err(io_err(format!("read output of {exec_id:?} in {id:?}")))
    }

    /// Writes to a process's stdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let process = self.process(id, exec_id)?;
        let stream = match &process.stdio {
            Stdio::Pipes { stdin, .. } => stdin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .ok_or_else(|| {
                    EngineError::Precondition(format!("stdin of {exec_id:?} in {id:?} is closed"))
                })?,
            Stdio::Tty { master } => master.clone(),
        };
        stream
            .write_all(data)
            .await
            .map_err(io_err(format!("write stdin of {exec_id:?} in {id:?}")))
    }

    /// Closes a process's stdin (for a terminal: sends end-of-file).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let process = self.process(id, exec_id)?;
        match &process.stdio {
            Stdio::Pipes { stdin, .. } => {
                stdin.lock().unwrap_or_else(PoisonError::into_inner).take();
                Ok(())
            }
            Stdio::Tty { master } => {
                master
                    .write_all(&[4])
                    .await
                    .map(|_| ())
                    .map_err(io_err(format!(
                        "send EOF to the terminal of {exec_id:?} in {id:?}"
                    )))
            }
        }
    }

    /// Resizes a process's terminal.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let process = self.process(id, exec_id)?;
        let Stdio::Tty { master } = &process.stdio else {
            return Err(EngineError::Precondition(format!(
                "process {exec_id:?} of {id:?} has no terminal"
            )));
        };
        let rows = u16::try_from(rows).map_err(|_| invalid("rows", rows))?;
        let columns = u16::try_from(columns).map_err(|_| invalid("columns", columns))?;
        stdio::resize(master, rows, columns).map_err(io_err(format!(
            "resize the terminal of {exec_id:?} in {id:?}"
        )))
    }

    /// Runs a new process in a running container.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        terminal: bool,
    ) -> Result<()> {
        check_id("exec ID", exec_id)?;
        let container = self.container(id)?;
        let process = parse_process(process_json, terminal)?;
        {
            let mut execs = container
                .execs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if execs.contains_key(exec_id) {
                return Err(EngineError::ProcessExists {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                });
            }
            execs.insert(exec_id.to_string(), None);
        }
        let result = self
            .exec_inner(&container, exec_id, &process, terminal)
            .await;
        let mut execs = container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(started) => {
                execs.insert(exec_id.to_string(), Some(Arc::new(started)));
                Ok(())
            }
            Err(e) => {
                execs.remove(exec_id);
                Err(e)
            }
        }
    }

    async fn exec_inner(
        &self,
        container: &Container,
        exec_id: &str,
        process: &OciProcess,
        terminal: bool,
    ) -> Result<Process> {
        let _ops = container.ops.lock().await;
        if container.init.exit.get().is_some() {
            return Err(EngineError::Precondition(format!(
                "exec in container {:?}: its init has exited",
                container.id
            )));
        }
        let path = container.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(process).map_err(|e| invalid("OCI process", e))?;
        std::fs::write(&path, json).map_err(io_err(format!("write {}", path.display())))?;
        let result = self
            .run_helper(helper::EXEC, &container.id, &path, terminal)
            .await;
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Forgets an exec that has exited: the agent's ends of its stdio
    /// close and its exit record goes, and its exec ID is free again. A
    /// running exec is refused (signal and wait for it first); the init
    /// goes with [`Engine::remove`].
    pub fn delete_exec(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(invalid(
                "exec ID",
                "empty: the init process is deleted with RemoveContainer",
            ));
        }
        let container = self.container(id)?;
        let mut execs = container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match execs.get(exec_id) {
            Some(Some(process)) if process.exit.get().is_some() => {
                execs.remove(exec_id);
                Ok(())
            }
            Some(Some(process)) => Err(EngineError::Precondition(format!(
                "delete process {exec_id:?} of container {id:?}: it is still running (PID {})",
                process.pid
            ))),
            Some(None) => Err(EngineError::Precondition(format!(
                "delete process {exec_id:?} of container {id:?}: it is being started"
            ))),
            None => Err(EngineError::ProcessNotFound {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }),
        }
    }

    /// How many processes the reaper watches and how many unclaimed exits
    /// it keeps.
    pub fn reaper_counts(&self) -> (usize, usize) {
        let (unclaimed, watched) = self.reaper.counts();
        (watched, unclaimed)
    }

    /// Freezes every process of a container.
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.lc_op(id, format!("pause container {id:?}"), |lc| lc.pause())
            .await
    }

    /// Thaws a paused container.
    pub async fn resume(&self, id: &str) -> Result<()> {
        self.lc_op(id, format!("resume container {id:?}"), |lc| lc.resume())
            .await
    }

    async fn lc_op(
        &self,
        id: &str,
        what: String,
        op: impl FnOnce(
                &mut LcContainer,
            ) -> std::result::Result<(), libcontainer::error::LibcontainerError>
            + Send
            + 'static,
    ) -> Result<()> {
        let container = self.container(id)?;
        let _ops = container.ops.lock().await;
        let state = self.lc_root().join(id);
        blocking(move || {
            let mut lc = LcContainer::load(state).map_err(lc_error(what.clone()))?;
            op(&mut lc).map_err(lc_error(what))
        })
        .await
    }

    /// Stops (after `timeout` of SIGTERM, then SIGKILL) and removes a
    /// container: its processes, cgroup, mounts, bundle and state.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<()> {
        let container = {
            let mut containers = self.containers();
            match containers.get_mut(id) {
                Some(slot @ Some(_)) => slot
                    .take()
                    .ok_or_else(|| EngineError::NotFound(id.to_string()))?,
                Some(None) => {
                    return Err(EngineError::Precondition(format!(
                        "container {id:?} is being created or removed"
                    )))
                }
                None => return Err(EngineError::NotFound(id.to_string())),
            }
        };
        let result = self.remove_inner(&container, timeout).await;
        let mut containers = self.containers();
        match result {
            Ok(()) => {
                containers.remove(id);
                Ok(())
            }
            Err(e) => {
                containers.insert(id.to_string(), Some(container));
                Err(e)
            }
        }
    }

    async fn remove_inner(&self, container: &Container, timeout: Duration) -> Result<()> {
        let _ops = container.ops.lock().await;
        let id = container.id.clone();
        let init = container.init.pid;
        let init_exit = &container.init.exit;
        let state = self.lc_root().join(&id);
        let kill_all = |signal: NixSignal| {
            let state = state.clone();
            let what = format!("signal {signal} to every process of {id:?}");
            blocking(move || {
                let mut lc = LcContainer::load(state).map_err(lc_error(what.clone()))?;
                match lc.kill(Signal::from(signal), true) {
                    Ok(()) | Err(libcontainer::error::LibcontainerError::IncorrectStatus(_)) => {
                        Ok(())
                    }
                    Err(e) => Err(lc_error(what)(e)),
                }
            })
        };
        if init_exit.get().is_none() && !timeout.is_zero() {
            kill_all(NixSignal::SIGTERM).await?;
            init_exit.wait_timeout(timeout).await;
        }
        if init_exit.get().is_none() {
            kill_all(NixSignal::SIGKILL).await?;
            if init_exit.wait_timeout(KILL_TIMEOUT).await.is_none() {
                return Err(EngineError::Runtime(format!(
                    "remove container {id:?}: init (PID {init}) did not exit within {KILL_TIMEOUT:?} of SIGKILL"
                )));
            }
        }
        let what = format!("delete container {id:?}");
        let state_dir = state.clone();
        blocking(move || {
            let mut lc = LcContainer::load(state_dir).map_err(lc_error(what.clone()))?;
            lc.delete(true).map_err(lc_error(what))
        })
        .await?;
        self.oom.unwatch(&id);
        for target in container.mounts.iter().rev() {
            unmount(target);
        }
        let _ = std::fs::remove_dir_all(&container.bundle);
        Ok(())
    }

    fn cgroup(&self, container: &Container) -> Result<libcgroups::common::AnyCgroupManager> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: container.cgroup_path.clone(),
            systemd_cgroup: false,
            container_name: container.id.clone(),
        })
        .map_err(|e| {
            EngineError::Runtime(format!(
                "cgroup {} of {:?}: {e}",
                container.cgroup_path.display(),
                container.id
            ))
        })
    }

    /// The PIDs of every process in a container's cgroup.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let container = self.container(id)?;
        let manager = self.cgroup(&container)?;
        let pids = blocking(move || {
            manager
                .get_all_pids()
                .map_err(|e| EngineError::Runtime(format!("list processes: {e}")))
        })
        .await?;
        Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
    }

    /// The cgroup statistics of a container.
    pub async fn stats(&self, id: &str) -> Result<ContainerStats> {
        let container = self.container(id)?;
        let what = format!("stats of {id:?}");
        if self.cgroup_v2 {
            // Read the files directly: libcgroups' v2 stats also insist on
            // PSI and hugetlb files a small guest kernel may not have.
            let dir = cgroup_v2_dir(&container.cgroup_path);
            return blocking(move || {
                ContainerStats::from_cgroup_v2(&dir)
                    .map_err(io_err(format!("{what}: read {}", dir.display())))
            })
            .await;
        }
        let manager = self.cgroup(&container)?;
        blocking(move || {
            let stats = manager
                .stats()
                .map_err(|e| EngineError::Runtime(format!("{what}: {e}")))?;
            Ok(ContainerStats::from_cgroup_v1(&stats))
        })
        .await
    }

    /// Applies new resource limits to a container's cgroup.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let resources = parse_resources(resources_json)?;
        let container = self.container(id)?;
        let _ops = container.ops.lock().await;
        let manager = self.cgroup(&container)?;
        let what = format!("update resources of {id:?}");
        blocking(move || {
            manager
                .apply(&ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| EngineError::Runtime(format!("{what}: {e}")))
        })
        .await
    }

    /// Waits for the next container OOM kill.
    pub async fn next_oom(&self) -> Option<String> {
        self.oom.next().await
    }
}

/// The directory of a cgroup v2 path (`/moat/ID`) in the mounted hierarchy.
fn cgroup_v2_dir(cgroup_path: &Path) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(cgroup_path.strip_prefix("/").unwrap_or(cgroup_path))
}

fn read_report(fd: OwnedFd) -> String {
    // The helper has exited, so its line is in the pipe; the container's
    // init may still hold the write end, so read what is there, without
    // waiting for end of file.
    let _ = stdio::set_nonblocking(&fd);
    let mut file = std::fs::File::from(fd);
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// A container's statistics, in the protocol's units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// CPU time, user and system, in microseconds.
    pub cpu_usage_usec: u64,
    /// User CPU time in microseconds.
    pub cpu_user_usec: u64,
    /// System CPU time in microseconds.
    pub cpu_system_usec: u64,
    /// CFS periods.
    pub nr_periods: u64,
    /// Throttled periods.
    pub nr_throttled: u64,
    /// Time throttled, in microseconds.
    pub throttled_usec: u64,
    /// Memory in use, in bytes.
    pub memory_current: u64,
    /// The memory limit (u64::MAX if none).
    pub memory_max: u64,
    /// Anonymous memory.
    pub memory_anon: u64,
    /// Page cache.
    pub memory_file: u64,
    /// OOM kills in the cgroup.
    pub oom_kills: u64,
    /// Processes.
    pub pids_current: u64,
    /// The process limit (u64::MAX if none).
    pub pids_max: u64,
    /// Bytes read from block devices.
    pub io_read_bytes: u64,
    /// Bytes written.
    pub io_write_bytes: u64,
    /// Read requests.
    pub io_read_ios: u64,
    /// Write requests.
    pub io_write_ios: u64,
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// A single value, where `max` means no limit.
fn limit(text: &str) -> u64 {
    match text.trim() {
        "max" => u64::MAX,
        n => n.parse().unwrap_or(0),
    }
}

impl ContainerStats {
    /// Reads a cgroup v2 directory. Files of controllers the cgroup does
    /// not have count as zero; a missing directory is an error.
    pub fn from_cgroup_v2(dir: &Path) -> io::Result<ContainerStats> {
        let cpu = std::fs::read_to_string(dir.join("cpu.stat"))?;
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let memory = read("memory.stat");
        let io = read("io.stat");
        let io_sum = |key: &str| -> u64 {
            io.split_whitespace()
                .filter_map(|field| field.strip_prefix(key)?.strip_prefix('='))
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        };
        Ok(ContainerStats {
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            nr_periods: keyed(&cpu, "nr_periods"),
            nr_throttled: keyed(&cpu, "nr_throttled"),
            throttled_usec: keyed(&cpu, "throttled_usec"),
            memory_current: limit(&read("memory.current")),
            memory_max: limit(&read("memory.max")),
            memory_anon: keyed(&memory, "anon"),
            memory_file: keyed(&memory, "file"),
            oom_kills: crate::oom::oom_kills(&dir.join("memory.events")),
            pids_current: limit(&read("pids.current")),
            pids_max: limit(&read("pids.max")),
            io_read_bytes: io_sum("rbytes"),
            io_write_bytes: io_sum("wbytes"),
            io_read_ios: io_sum("rios"),
            io_write_ios: io_sum("wios"),
        })
    }

    fn from_cgroup_v1(stats: &libcgroups::stats::Stats) -> ContainerStats {
        // v1 reports CPU time in nanoseconds.
        let cpu = |v: u64| v / 1000;
        let memory_stat = |key: &str| stats.memory.stats.get(key).copied().unwrap_or(0);
        let io_sum = |list: &[libcgroups::stats::BlkioDeviceStat], op: &str| {
            list.iter()
                .filter(|s| {
                    s.op_type
                        .as_deref()
                        .is_some_and(|t| t.eq_ignore_ascii_case(op))
                })
                .map(|s| s.value)
                .sum()
        };
        ContainerStats {
            cpu_usage_usec: cpu(stats.cpu.usage.usage_total),
            cpu_user_usec: cpu(stats.cpu.usage.usage_user),
            cpu_system_usec: cpu(stats.cpu.usage.usage_kernel),
            nr_periods: stats.cpu.throttling.periods,
            nr_throttled: stats.cpu.throttling.throttled_periods,
            throttled_usec: cpu(stats.cpu.throttling.throttled_time),
            memory_current: stats.memory.memory.usage,
            memory_max: stats.memory.memory.limit,
            memory_anon: memory_stat("rss"),
            memory_file: memory_stat("cache"),
            oom_kills: memory_stat("oom_kill"),
            pids_current: stats.pids.current,
            pids_max: stats.pids.limit,
            io_read_bytes: io_sum(&stats.blkio.service_bytes, "read"),
            io_write_bytes: io_sum(&stats.blkio.service_bytes, "write"),
            io_read_ios: io_sum(&stats.blkio.serviced, "read"),
            io_write_ios: io_sum(&stats.blkio.serviced, "write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_files_are_read() {
        let dir = std::env::temp_dir().join(format!("moat-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = [
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 10\nnr_throttled 4\nthrottled_usec 900\n"),
            ("memory.current", "8192\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 4096\nfile 2048\nanon_thp 0\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "20\n"),
            ("io.stat", "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n254:16 rbytes=1 wbytes=1 rios=1 wios=1 dbytes=0 dios=0\n"),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let stats = ContainerStats::from_cgroup_v2(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            stats,
            ContainerStats {
                cpu_usage_usec: 1500,
                cpu_user_usec: 1000,
                cpu_system_usec: 500,
                nr_periods: 10,
                nr_throttled: 4,
                throttled_usec: 900,
                memory_current: 8192,
                memory_max: u64::MAX,
                memory_anon: 4096,
                memory_file: 2048,
                oom_kills: 1,
                pids_current: 3,
                pids_max: 20,
                io_read_bytes: 4097,
                io_write_bytes: 8193,
                io_read_ios: 2,
                io_write_ios: 3,
            }
        );
        assert!(ContainerStats::from_cgroup_v2(Path::new("/nonexistent/cgroup")).is_err());
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("container ID", "pod-1_a.b").is_ok());
        for bad in ["", ".hidden", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id("container ID", bad).is_err(), "{bad:?}");
        }
    }
}
