//! One pod's VM on the host: its virtiofsd, its moat-vmm, its console log
//! and the agent connection, from start to a teardown that leaves nothing.
//!
//! A pod's state directory (`dir`) holds:
//!
//! ```text
//! dir/share/          the pod's shared directory (see [`crate::mounts`])
//! dir/run/            the sockets, owned by the jail's uid; moat-vmm's /run
//! dir/run/virtiofsd.sock
//!                     virtiofsd's vhost-user socket
//! dir/run/vsock.sock  the VM's hybrid vsock socket (the agent's way in)
//! dir/jail/           empty on the host: moat-vmm's root is a tmpfs
//!                     mounted here in its own mount namespace (see
//!                     [`crate::jail`])
//! dir/cgroup          names the pod's cgroup, for teardown and [`cleanup`]
//! dir/console.log     the guest console and the VMM's and virtiofsd's
//!                     messages, capped at [`CONSOLE_LOG_MAX`] bytes
//! dir/vmm.pid, dir/virtiofsd.pid
//!                     for [`cleanup`] after the shim itself died
//! ```
//!
//! [`Sandbox::start`] is done only once the agent has answered a health
//! check and a version check within the config's boot timeout; on any
//! failure it stops what it started and removes `dir` before returning
//! the error, so a failed start leaves nothing behind.

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use moat_protocol::agent::{CheckRequest, VersionRequest};
use moat_protocol::agent_ttrpc::AgentServiceClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::config::{Config, VmSize};
use crate::jail::{spawn_in_new_pid_namespace, JailFile, JailPlan, PodCgroup, VmmJail};
use crate::mounts::{MountError, PodShare};
use crate::network::{NetworkError, PodNetwork};

/// The virtio-fs tag of the pod's share, as the agent's `moat.share=` gets it.
pub const SHARE_TAG: &str = "moat-pod";
/// The guest CID of every pod VM (each VM has its own vsock device).
pub const GUEST_CID: u32 = 3;
/// The console log's cap: beyond it, output is read and dropped, so a
/// chatty guest can neither fill the disk nor stall its VMM.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;
/// How long virtiofsd may take to create its socket. It takes milliseconds
/// alone, but 20 pods started at once in the nested harness once took over
/// 5 s; a virtiofsd that dies is noticed at once, not at this deadline.
const VIRTIOFSD_START: Duration = Duration::from_secs(30);
/// How long a stopping process gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The PID files [`cleanup`] reads.
const VMM_PID: &str = "vmm.pid";
const VIRTIOFSD_PID: &str = "virtiofsd.pid";
/// Names the pod's network namespace, so a cleanup after a dead shim can
/// remove the taps and filters made in it.
const NETNS_FILE: &str = "netns";
/// Names the pod's cgroup, so that teardown and a cleanup after a dead
/// shim find it.
const CGROUP_FILE: &str = "cgroup";
/// Where moat-vmm finds its files inside its jail.
const JAIL_VMM: &str = "/moat-vmm";
const JAIL_KERNEL: &str = "/vmlinux";
const JAIL_INITRAMFS: &str = "/initramfs";
const JAIL_VSOCK: &str = "/run/vsock.sock";
const JAIL_VIRTIOFSD: &str = "/run/virtiofsd.sock";
/// Lines of the console log quoted in an error.
const CONSOLE_TAIL_LINES: usize = 20;
/// How long the agent may take over one network setting (ns).
const AGENT_CALL_NS: i64 = 10_000_000_000;

/// What went wrong starting or stopping a pod's VM.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod's state directory exists already.
    #[error("sandbox {id}: state directory {dir} already exists")]
    Exists {
        /// The pod.
        id: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("sandbox {id}: {what} {path}: {source}")]
    Io {
        /// The pod.
        id: String,
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The pod's jail or cgroup could not be made.
    #[error("sandbox {id}: {source}")]
    Jail {
        /// The pod.
        id: String,
        /// What failed.
        source: crate::jail::JailError,
    },
    /// A binary could not be started.
    #[error("sandbox {id}: cannot start {binary}: {source}")]
    Spawn {
        /// The pod.
        id: String,
        /// The binary.
        binary: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// virtiofsd did not come up.
    #[error("sandbox {id}: virtiofsd did not create {socket} within {} s ({state}); console log:\n{console}", VIRTIOFSD_START.as_secs())]
    Virtiofsd {
        /// The pod.
        id: String,
        /// The socket it should have made.
        socket: PathBuf,
        /// Running or its exit status.
        state: String,
        /// The last lines of the console log.
        console: String,
    },
    /// moat-vmm exited before the agent answered.
    #[error("sandbox {id}: moat-vmm exited ({status}) before the agent answered; console log:\n{console}")]
    VmmExited {
        /// The pod.
        id: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of the console log.
        console: String,
    },
    /// The agent did not answer in time.
    #[error("sandbox {id}: the agent did not answer a health check within {timeout_ms} ms (vm.agent_boot_timeout_ms); last error: {last_error}; console log:\n{console}")]
    AgentTimeout {
        /// The pod.
        id: String,
        /// The timeout.
        timeout_ms: u64,
        /// Why the last attempt failed.
        last_error: String,
        /// The last lines of the console log.
        console: String,
    },
    /// The agent speaks another API version.
    #[error("sandbox {id}: the agent speaks API version {got}, this shim {want}")]
    AgentVersion {
        /// The pod.
        id: String,
        /// The agent's version.
        got: u32,
        /// Ours.
        want: u32,
    },
    /// The pod's share could not be made or removed.
    #[error("sandbox {id}: {source}")]
    Mount {
        /// The pod.
        id: String,
        /// The error.
        source: MountError,
    },
    /// The pod's network namespace could not be carried into the VM.
    #[error("sandbox {id}: {source}")]
    Network {
        /// The pod.
        id: String,
        /// The error.
        source: Box<NetworkError>,
    },
    /// The agent refused the pod's network settings.
    #[error("sandbox {id}: the guest agent could not {what}: {error}")]
    GuestNetwork {
        /// The pod.
        id: String,
        /// What was asked.
        what: String,
        /// The agent's answer.
        error: String,
    },
}

/// What a pod's VM takes from the pod besides its size.
#[derive(Debug, Clone, Default)]
pub struct PodSetup {
    /// The pod's hostname (the VM's), if a valid one.
    pub hostname: Option<String>,
    /// The network namespace CNI prepared: its interfaces become the VM's
    /// and moat-vmm runs in it. None: the VM has only loopback (host
    /// network pods, plain `ctr run`).
    pub netns: Option<PathBuf>,
}

/// A running pod VM whose agent has answered.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    share: PodShare,
    virtiofsd: Child,
    vmm: Child,
    client: AgentServiceClient,
    times: BootTimes,
}

/// Where a pod's boot went, for the log and `make bench-start`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimes {
    /// From the start to virtiofsd's socket.
    pub virtiofsd: Duration,
    /// From moat-vmm's spawn to the agent's first answer.
    pub vmm_to_agent: Duration,
}

/// The hybrid vsock socket of the pod whose state directory is `dir`.
pub fn vsock_socket(dir: &Path) -> PathBuf {
    dir.join("run/vsock.sock")
}
/// Where a pod's other files are.
fn virtiofsd_socket(dir: &Path) -> PathBuf {
    dir.join("run/virtiofsd.sock")
}
fn console_log(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

impl Sandbox {
    /// Boots pod `id`'s VM with state in `dir` (which must not exist) and
    /// waits for its agent.
    pub async fn start(
        config: &Config,
        id: &str,
        dir: &Path,
        size: VmSize,
    ) -> Result<Self, SandboxError> {
        Self::start_pod(config, id, dir, size, &PodSetup::default()).await
    }

    /// [`Sandbox::start`] for a pod: with its hostname, and with its
    /// network namespace's interfaces as the VM's, configured in the guest
    /// before this returns.
    pub async fn start_pod(
        config: &Config,
        id: &str,
        dir: &Path,
        size: VmSize,
        setup: &PodSetup,
    ) -> Result<Self, SandboxError> {
        let io = |what, path: &Path| io_error(id, what, path);
        if dir.exists() {
            return Err(SandboxError::Exists {
                id: id.to_string(),
                dir: dir.to_path_buf(),
            });
        }
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut started = Started {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            share: None,
            virtiofsd: None,
            vmm: None,
            times: BootTimes::default(),
            network: None,
        };
        let booted = match started.boot(config, size, setup).await {
            Ok(client) => started.configure_network(client).await,
            Err(e) => Err(e),
        };
        match booted {
            Ok(client) => {
                let Started {
                    share,
                    virtiofsd,
                    vmm,
                    times,
                    ..
                } = started;
                match (share, virtiofsd, vmm) {
                    (Some(share), Some(virtiofsd), Some(vmm)) => Ok(Sandbox {
                        id: id.to_string(),
                        dir: dir.to_path_buf(),
                        share,
                        virtiofsd,
                        vmm,
                        client,
                        times,
                    }),
                    (share, virtiofsd, vmm) => {
                        // boot() sets all three before it returns Ok.
                        let mut rest = Started {
                            id: id.to_string(),
                            dir: dir.to_path_buf(),
                            share,
                            virtiofsd,
                            vmm,
                            times,
                            network: None,
                        };
                        rest.teardown().await;
                        Err(SandboxError::Io {
                            id: id.to_string(),
                            what: "start",
                            path: dir.to_path_buf(),
                            source: std::io::Error::other("boot finished without its processes"),
                        })
                    }
                }
            }
            Err(e) => {
                started.teardown().await;
                Err(e)
            }
        }
    }

    /// The pod's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pod's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod's share, where containers' rootfs and volumes go.
    pub fn share(&self) -> &PodShare {
        &self.share
    }

    /// The agent.
    pub fn agent(&self) -> &AgentServiceClient {
        &self.client
    }

    /// How long the boot's phases took.
    pub fn boot_times(&self) -> BootTimes {
        self.times
    }

    /// The pod's guest console log (size-capped).
    pub fn console_path(&self) -> PathBuf {
        console_log(&self.dir)
    }

    /// moat-vmm's PID.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.id()
    }

    /// moat-vmm's exit status if it has ended (this reaps it); an error
    /// if someone else reaped it.
    pub fn try_vmm_status(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.vmm.try_wait()
    }

    /// virtiofsd's PID.
    pub fn virtiofsd_pid(&self) -> Option<u32> {
        self.virtiofsd.id()
    }

    /// Stops the VM (SIGTERM, SIGKILL after a grace period) and virtiofsd,
    /// unmounts the share and removes the state directory. Returns the
    /// VMM's exit status.
    pub async fn stop(self) -> Result<Option<ExitStatus>, SandboxError> {
        let mut started = Started {
            id: self.id,
            dir: self.dir,
            share: Some(self.share),
            virtiofsd: Some(self.virtiofsd),
            vmm: Some(self.vmm),
            times: self.times,
            network: None,
        };
        let status = started.teardown().await;
        started.check_gone()?;
        Ok(status)
    }
}

/// What a start has made so far, for teardown on failure.
struct Started {
    id: String,
    dir: PathBuf,
    share: Option<PodShare>,
    virtiofsd: Option<Child>,
    vmm: Option<Child>,
    times: BootTimes,
    /// The pod's network between its attach and the agent's set-up;
    /// teardown finds the namespace again through `NETNS_FILE`.
    network: Option<PodNetwork>,
}

impl Started {
    async fn boot(
        &mut self,
        config: &Config,
        size: VmSize,
        setup: &PodSetup,
    ) -> Result<AgentServiceClient, SandboxError> {
        let id = self.id.clone();
        let dir = self.dir.clone();
        let boot_start = Instant::now();
        let share = PodShare::create(&dir.join("share")).map_err(|source| SandboxError::Mount {
            id: id.clone(),
            source,
        })?;
        let shared_dir = share.shared_dir();
        self.share = Some(share);

        let console_path = console_log(&dir);
        let console = tokio::fs::File::create(&console_path)
            .await
            .map_err(|source| SandboxError::Io {
                id: id.clone(),
                what: "create",
                path: console_path.clone(),
                source,
            })?;
        let console = std::sync::Arc::new(tokio::sync::Mutex::new(CappedLog {
            file: console,
            written: 0,
        }));

        let jail = &config.jail;
        let io = |what, path: &Path| io_error(&id, what, path);
        let jail_error = |source| SandboxError::Jail {
            id: id.clone(),
            source,
        };
        let run_dir = dir.join("run");
        let jail_root = dir.join("jail");
        for made in [&run_dir, &jail_root] {
            std::fs::create_dir(made).map_err(io("create", made))?;
        }
        std::os::unix::fs::chown(&run_dir, Some(jail.uid), Some(jail.gid))
            .map_err(io("chown", &run_dir))?;
        std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &run_dir))?;
        let cgroup_name = cgroup_name(&dir);
        let memory_max = (size.memory_mib + jail.memory_overhead_mib) << 20;
        let cgroup =
            PodCgroup::create(&jail.cgroup_parent, &cgroup_name, memory_max, jail.pids_max)
                .map_err(jail_error)?;
        let record = dir.join(CGROUP_FILE);
        std::fs::write(&record, cgroup.path().as_os_str().as_encoded_bytes())
            .map_err(io("write", &record))?;

        let fs_socket = virtiofsd_socket(&dir);
        let mut virtiofsd = Command::new(&config.virtiofs.virtiofsd);
        virtiofsd
            .arg("--shared-dir")
            .arg(&shared_dir)
            .arg("--socket-path")
            .arg(&fs_socket)
            .arg(format!("--cache={}", config.virtiofs.cache.as_arg()))
            .arg(format!(
                "--thread-pool-size={}",
                config.virtiofs.thread_pool_size
            ));
        let plan = JailPlan::namespaces("moat-virtiofsd", &cgroup).map_err(jail_error)?;
        let child = spawn(
            &id,
            &config.virtiofs.virtiofsd,
            &mut virtiofsd,
            plan,
            &console,
        )?;
        write_pid_file(&id, &dir.join(VIRTIOFSD_PID), &child)?;
        self.virtiofsd = Some(child);
        let deadline = Instant::now() + VIRTIOFSD_START;
        while !fs_socket.exists() {
            let exited = self
                .virtiofsd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(SandboxError::Virtiofsd {
                    id,
                    socket: fs_socket,
                    state: exited.map_or("still running".into(), |s| format!("exited: {s}")),
                    console: console_tail(&console_path),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // virtiofsd runs as root; the VMM, as the jail's user, connects.
        std::os::unix::fs::chown(&fs_socket, Some(jail.uid), Some(jail.gid))
            .map_err(io("chown", &fs_socket))?;

        let vsock = vsock_socket(&dir);
        let hostname = setup
            .hostname
            .as_deref()
            .filter(|h| valid_hostname(h))
            .map(|h| format!("moat.hostname={h} "))
            .unwrap_or_default();
        let append = format!("moat.share={SHARE_TAG} {hostname}{}", config.vm.kernel_args);
        let mut vmm = Command::new(JAIL_VMM);
        vmm.arg("--kernel")
            .arg(JAIL_KERNEL)
            .arg("--initramfs")
            .arg(JAIL_INITRAMFS)
            .arg("--vcpus")
            .arg(size.vcpus.to_string())
            .arg("--memory")
            .arg(size.memory_mib.to_string())
            .arg("--vsock")
            .arg(format!("cid={GUEST_CID},path={JAIL_VSOCK}"))
            .arg("--fs")
            .arg(format!("tag={SHARE_TAG},socket={JAIL_VIRTIOFSD}"))
            .arg("--append")
            .arg(append.trim_end())
            .args(&config.vm.vmm_args);
        let mut devices = vec![Path::new("/dev/kvm")];
        // Held until moat-vmm is spawned: its pre_exec enters it.
        let mut netns_file = None;
        if let Some(netns) = &setup.netns {
            let record = dir.join(NETNS_FILE);
            std::fs::write(&record, netns.as_os_str().as_encoded_bytes())
                .map_err(io("write", &record))?;
            let path = netns.clone();
            let owner = (jail.uid, jail.gid);
            let network = tokio::task::spawn_blocking(move || PodNetwork::attach(&path, owner))
                .await
                .map_err(|e| SandboxError::Io {
                    id: id.clone(),
                    what: "attach the network of",
                    path: netns.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(|source| SandboxError::Network {
                    id: id.clone(),
                    source: Box::new(source),
                })?;
            for arg in network.vmm_net_args() {
                vmm.arg("--net").arg(arg);
            }
            if !network.endpoints.is_empty() {
                devices.push(Path::new("/dev/net/tun"));
            }
            self.network = Some(network);
            let file = std::fs::File::open(netns).map_err(io("open", netns))?;
            let fd = file.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec
            // and calls only setns(2), which is async-signal-safe; `fd`
            // stays open (netns_file) until the spawn returns.
            unsafe {
                vmm.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            netns_file = Some(file);
        }
        let mut files = vec![
            JailFile {
                host: config.vm.vmm.clone(),
                jail: JAIL_VMM.into(),
            },
            JailFile {
                host: config.vm.kernel.clone(),
                jail: JAIL_KERNEL.into(),
            },
            JailFile {
                host: config.vm.initramfs.clone(),
                jail: JAIL_INITRAMFS.into(),
            },
        ];
        let binary = config.vm.vmm.clone();
        let libraries = tokio::task::spawn_blocking(move || crate::jail::libraries(&binary))
            .await
            .map_err(|e| SandboxError::Io {
                id: id.clone(),
                what: "list the libraries of",
                path: config.vm.vmm.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(jail_error)?;
        files.extend(libraries.into_iter().map(|library| JailFile {
            jail: library.clone(),
            host: library,
        }));
        let plan = JailPlan::vmm(&VmmJail {
            root: &jail_root,
            run: &run_dir,
            files: &files,
            devices: &devices,
            uid: jail.uid,
            gid: jail.gid,
            cgroup: &cgroup,
        })
        .map_err(jail_error)?;
        self.times.virtiofsd = boot_start.elapsed();
        let vmm_start = Instant::now();
        let child = spawn(&id, &config.vm.vmm, &mut vmm, plan, &console)?;
        drop(netns_file);
        write_pid_file(&id, &dir.join(VMM_PID), &child)?;
        self.vmm = Some(child);

        let timeout = Duration::from_millis(size.agent_boot_timeout_ms);
        let deadline = Instant::now() + timeout;
        let mut last_error = String::from("no attempt");
        loop {
            if let Some(status) = self.vmm.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Let the console copy catch the VMM's last words.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Err(SandboxError::VmmExited {
                    id,
                    status,
                    console: console_tail(&console_path),
                });
            }
            if Instant::now() > deadline {
                return Err(SandboxError::AgentTimeout {
                    id,
                    timeout_ms: size.agent_boot_timeout_ms,
                    last_error,
                    console: console_tail(&console_path),
                });
            }
            match check_agent(&vsock, moat_protocol::DEFAULT_AGENT_PORT).await {
                Ok((client, api)) if api == moat_protocol::API_VERSION => {
                    self.times.vmm_to_agent = vmm_start.elapsed();
                    return Ok(client);
                }
                Ok((_, api)) => {
                    return Err(SandboxError::AgentVersion {
                        id,
                        got: api,
                        want: moat_protocol::API_VERSION,
                    })
                }
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands the pod's network settings to the agent, before any
    /// container starts: each interface (found by its MAC), then the
    /// routes.
    async fn configure_network(
        &mut self,
        client: AgentServiceClient,
    ) -> Result<AgentServiceClient, SandboxError> {
        let Some(network) = &self.network else {
            return Ok(client);
        };
        let guest_error = |what: String| {
            let id = self.id.clone();
            move |e: ttrpc::Error| SandboxError::GuestNetwork {
                id,
                what,
                error: e.to_string(),
            }
        };
        for interface in network.interfaces() {
            let what = format!(
                "configure the interface with MAC {} ({})",
                interface.mac,
                interface.addresses.join(", ")
            );
            let request = moat_protocol::agent::UpdateInterfaceRequest {
                interface: Some(interface).into(),
                ..Default::default()
            };
            client
                .update_interface(ttrpc::context::with_timeout(AGENT_CALL_NS), &request)
                .await
                .map_err(guest_error(what))?;
        }
        if !network.routes.is_empty() {
            let request = moat_protocol::agent::UpdateRoutesRequest {
                routes: network.routes.clone(),
                ..Default::default()
            };
            client
                .update_routes(ttrpc::context::with_timeout(AGENT_CALL_NS), &request)
                .await
                .map_err(guest_error(format!("add the routes {:?}", network.routes)))?;
        }
        Ok(client)
    }

    /// Stops whatever runs and removes what was made; never fails, so it
    /// can follow any error. Returns the VMM's exit status if it had one.
    async fn teardown(&mut self) -> Option<ExitStatus> {
        let status = match self.vmm.take() {
            Some(vmm) => stop_child(vmm).await,
            None => None,
        };
        // The taps and filters go once moat-vmm no longer holds the taps.
        if let Some(netns) = std::fs::read(self.dir.join(NETNS_FILE))
            .ok()
            .map(|bytes| PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()))
        {
            detach_network(&self.id, netns).await;
        }
        self.network = None;
        if let Some(mut virtiofsd) = self.virtiofsd.take() {
            // PID 1 of its namespace ignores SIGTERM, and with the VMM
            // gone it has nothing left to finish.
            let _ = virtiofsd.kill().await;
        }
        if let Err(e) = remove_cgroup(&self.dir).await {
            eprintln!("moat-shim: sandbox {}: {e}", self.id);
        }
        if let Some(share) = self.share.take() {
            if let Err(e) = share.destroy() {
                eprintln!("moat-shim: sandbox {}: {e}", self.id);
                // Keep the directory: removing it now could reach through
                // a mount; check_gone reports it.
                return status;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }

    fn check_gone(&self) -> Result<(), SandboxError> {
        match std::fs::symlink_metadata(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Io {
                id: self.id.clone(),
                what: "check",
                path: self.dir.clone(),
                source,
            }),
            Ok(_) => Err(SandboxError::Io {
                id: self.id.clone(),
                what: "remove",
                path: self.dir.clone(),
                source: std::io::Error::other("still present after teardown"),
            }),
        }
    }
}

/// Maps an I/O error of `what` on `path` into pod `id`'s error.
fn io_error(
    id: &str,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SandboxError {
    let (id, path) = (id.to_string(), path.to_path_buf());
    move |source| SandboxError::Io {
        id,
        what,
        path,
        source,
    }
}

/// Removes the taps and filters made in `netns`; a failure is logged
/// (teardown goes on: the namespace dies with the pod anyway).
async fn detach_network(id: &str, netns: PathBuf) {
    let path = netns.clone();
    match tokio::task::spawn_blocking(move || PodNetwork::detach(&path)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("sandbox {id}: {e}"),
        Err(e) => log::warn!(
            "sandbox {id}: detach the network of {}: {e}",
            netns.display()
        ),
    }
}

/// Starts `command` as PID 1 of a new PID namespace, entering `jail`
/// before it execs, with stdout and stderr copied into the capped log.
/// A jail step that fails is named in the error.
fn spawn(
    id: &str,
    binary: &Path,
    command: &mut Command,
    jail: JailPlan,
    log: &std::sync::Arc<tokio::sync::Mutex<CappedLog>>,
) -> Result<Child, SandboxError> {
    let jail = std::sync::Arc::new(jail);
    let child_jail = jail.clone();
    // SAFETY: enter() makes only raw system calls on data built before
    // the fork, and allocates nothing.
    unsafe {
        command.pre_exec(move || child_jail.enter());
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = spawn_in_new_pid_namespace(command).map_err(|source| SandboxError::Spawn {
        id: id.to_string(),
        binary: binary.to_path_buf(),
        source: match jail.failed_step() {
            Some(step) => std::io::Error::new(source.kind(), format!("jail: {step}: {source}")),
            None => source,
        },
    })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(copy_capped(out, log.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(copy_capped(err, log.clone()));
    }
    Ok(child)
}

/// The console log with its cap.
struct CappedLog {
    file: tokio::fs::File,
    written: u64,
}

/// Copies `from` into the log until EOF, dropping what passes the cap
/// (but reading it all, so the writer never blocks).
async fn copy_capped(
    mut from: impl AsyncRead + Unpin,
    log: std::sync::Arc<tokio::sync::Mutex<CappedLog>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut log = log.lock().await;
        if log.written >= CONSOLE_LOG_MAX {
            continue;
        }
        let room = usize::try_from(CONSOLE_LOG_MAX - log.written).unwrap_or(usize::MAX);
        let take = n.min(room);
        if log.file.write_all(&buf[..take]).await.is_err() {
            return;
        }
        log.written += take as u64;
        if log.written >= CONSOLE_LOG_MAX {
            let note = format!("\n[moat: console log capped at {CONSOLE_LOG_MAX} bytes]\n");
            let _ = log.file.write_all(note.as_bytes()).await;
        }
    }
}

/// The last lines of the console log, for errors.
fn console_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// SIGTERM, then SIGKILL after the grace period; reaps the child.
async fn stop_child(mut child: Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let _ = child.kill().await;
            child.wait().await.ok()
        }
    }
}

/// One health and version check of the agent on guest `port`, through
/// the VM's hybrid vsock socket `vsock`: the connected client and the
/// agent's API version.
pub async fn check_agent(vsock: &Path, port: u32) -> Result<(AgentServiceClient, u32), String> {
    let path = vsock.to_path_buf();
    let stream = tokio::task::spawn_blocking(move || {
        moat_protocol::hybrid_vsock::connect(&path, port, Duration::from_secs(1))
    })
    .await
    .map_err(|e| format!("connect task: {e}"))?
    .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("nonblocking: {e}"))?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let client = AgentServiceClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::from(stream),
    ));
    let ctx = || ttrpc::context::with_timeout(2_000_000_000);
    let health = client
        .check(ctx(), &CheckRequest::new())
        .await
        .map_err(|e| format!("check: {e}"))?;
    if !health.serving {
        return Err("agent not serving".into());
    }
    let version = client
        .version(ctx(), &VersionRequest::new())
        .await
        .map_err(|e| format!("version: {e}"))?;
    Ok((client, version.api_version))
}

fn write_pid_file(id: &str, path: &Path, child: &Child) -> Result<(), SandboxError> {
    let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    std::fs::write(path, pid).map_err(|source| SandboxError::Io {
        id: id.to_string(),
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `name` is a hostname (RFC 1123 labels) that may go on the
/// guest's kernel command line.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// How the VMM with `pid`, a child of this process, ended, in words; read
/// without reaping it (`WNOWAIT`), so whoever owns the child still gets
/// its status. `None` while it runs or if it is not our child.
pub fn vmm_end(pid: u32) -> Option<String> {
    let pid = libc::id_t::try_from(pid).ok()?;
    // SAFETY: siginfo_t is plain old data that waitid fills in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out-pointer; WNOWAIT leaves the child
    // waitable, WNOHANG makes this a poll.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` for an exited child (si_pid non-zero).
    if rc != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above; si_status is the exit status or the signal.
    let status = unsafe { info.si_status() };
    Some(describe_vmm_end(info.si_code, status))
}

/// Words for a moat-vmm end from its reaped status.
pub fn describe_exit_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => describe_vmm_end(libc::CLD_EXITED, code),
        (None, Some(signal)) => describe_vmm_end(libc::CLD_KILLED, signal),
        (None, None) => format!("{status}"),
    }
}

/// Words for a moat-vmm end: `code` is waitid's `si_code` (`CLD_EXITED`,
/// `CLD_KILLED`, `CLD_DUMPED`), `status` its exit status or signal.
pub fn describe_vmm_end(code: i32, status: i32) -> String {
    if code == libc::CLD_EXITED {
        let what = match status {
            0 => "the guest powered off or rebooted",
            1 => "the VMM failed",
            10 => "guest kernel panic",
            11 => "triple fault",
            12 => "vCPU failure",
            _ => "unknown status",
        };
        return format!("exit status {status}: {what}");
    }
    let what = match status {
        libc::SIGSYS => "a seccomp violation",
        libc::SIGKILL => "killed from outside",
        libc::SIGSEGV | libc::SIGBUS | libc::SIGABRT | libc::SIGILL => "moat-vmm crashed",
        _ => "a signal",
    };
    let name = nix::sys::signal::Signal::try_from(status)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {status}"));
    format!("killed by {name}: {what}")
}

/// The guest kernel's panic line in the console log at `path`, if the
/// guest panicked.
pub fn guest_panic(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find(|line| line.contains("Kernel panic"))
        .map(|line| line.trim().to_string())
}

/// Removes what a pod whose shim died (SIGKILL) left at `dir`: stops its
/// moat-vmm and virtiofsd (SIGTERM, then SIGKILL), unmounts its share and
/// removes the directory. This is containerd's `delete` action for a
/// dead shim; it may run any number of times, and a `dir` that is gone
/// already is not an error. A PID file is trusted only while that PID's
/// command line still names `dir`, so a reused PID is never signalled.
pub async fn cleanup(dir: &Path) -> Result<(), SandboxError> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !dir.exists() {
        return Ok(());
    }
    for name in [VMM_PID, VIRTIOFSD_PID] {
        let Some(pid) = std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .filter(|pid| *pid > 1)
        else {
            continue;
        };
        if process_names(pid, dir) {
            stop_pid(pid, dir).await;
        }
    }
    if let Ok(bytes) = std::fs::read(dir.join(NETNS_FILE)) {
        detach_network(
            &id,
            PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()),
        )
        .await;
    }
    remove_cgroup(dir)
        .await
        .map_err(|source| SandboxError::Jail {
            id: id.clone(),
            source,
        })?;
    let share = PodShare::open(&dir.join("share"));
    share.destroy().map_err(|source| SandboxError::Mount {
        id: id.clone(),
        source,
    })?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SandboxError::Io {
            id,
            what: "remove",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Kills what is left in the cgroup `dir` names (if it names one) and
/// removes it.
async fn remove_cgroup(dir: &Path) -> Result<(), crate::jail::JailError> {
    let Ok(bytes) = std::fs::read(dir.join(CGROUP_FILE)) else {
        return Ok(());
    };
    let cgroup = PodCgroup::open(Path::new(std::ffi::OsStr::from_bytes(&bytes)));
    tokio::task::spawn_blocking(move || cgroup.remove())
        .await
        .unwrap_or_else(|e| {
            Err(crate::jail::JailError::Io {
                what: "remove",
                path: PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()),
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// The name of the pod's cgroup: its namespace's and its own directory
/// names (`<ns>-<id>`), unique among pods.
fn cgroup_name(dir: &Path) -> String {
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!("{}-{}", name(dir.parent()), name(Some(dir)))
}

/// Whether `pid` runs (not a zombie) with `dir` in its command line, or
/// in the cgroup `dir` names (moat-vmm's command line holds only paths
/// inside its jail).
fn process_names(pid: i32, dir: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let zombie = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true);
    if zombie {
        return false;
    }
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    if cmdline.windows(needle.len()).any(|w| w == needle) {
        return true;
    }
    let cgroup = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap_or_default();
    let name = cgroup_name(dir);
    cgroup
        .lines()
        .any(|line| line.rsplit('/').next() == Some(name.as_str()))
}

/// SIGTERM, then SIGKILL after the grace period, for a process that is
/// not our child (its parent, the dead shim's reaper, reaps it).
async fn stop_pid(pid: i32, dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    let target = nix::unistd::Pid::from_raw(pid);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !process_names(pid, dir) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = kill(target, Signal::SIGKILL);
    for _ in 0..100 {
        if !process_names(pid, dir) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits for `child` to end and returns what `vmm_end` says of it.
    fn end_of(child: &std::process::Child) -> String {
        for _ in 0..500 {
            if let Some(end) = vmm_end(child.id()) {
                return end;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("child {} did not end", child.id());
    }

    #[test]
    fn a_reaped_status_gets_the_same_words() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit_status(ExitStatus::from_raw(libc::SIGSYS)),
            "killed by SIGSYS: a seccomp violation"
        );
        let panic = describe_exit_status(ExitStatus::from_raw(10 << 8));
        assert!(panic.contains("guest kernel panic"), "{panic}");
    }

    #[test]
    fn a_vmm_crash_status_is_named_and_the_child_stays_waitable() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 10"])
            .spawn()
            .unwrap();
        assert_eq!(end_of(&child), "exit status 10: guest kernel panic");
        // WNOWAIT: the owner still reaps it, with the same status.
        assert_eq!(child.wait().unwrap().code(), Some(10));
        assert_eq!(vmm_end(child.id()), None, "reaped: no longer ours");
    }

    #[test]
    fn a_seccomp_kill_is_named() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "kill -SYS $$"])
            .spawn()
            .unwrap();
        let end = end_of(&child);
        assert!(
            end.starts_with("killed by SIGSYS: a seccomp violation"),
            "{end}"
        );
        let _ = child.wait();
    }

    #[test]
    fn every_exit_status_of_moat_vmm_has_words() {
        assert_eq!(
            describe_vmm_end(libc::CLD_EXITED, 11),
            "exit status 11: triple fault"
        );
        assert_eq!(
            describe_vmm_end(libc::CLD_EXITED, 12),
            "exit status 12: vCPU failure"
        );
        assert_eq!(
            describe_vmm_end(libc::CLD_KILLED, libc::SIGKILL),
            "killed by SIGKILL: killed from outside"
        );
    }
}
