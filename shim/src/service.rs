//! The containerd task service (task API v2) for one pod.
//!
//! This module owns a shim process's view of its pod: the pod's VM (one
//! [`Sandbox`], booted by the first container: the CRI sandbox container,
//! or a plain `ctr run`'s only one), the containers in it and their
//! processes, the copying of their stdio, their exits, and the events
//! containerd gets. Every container of the pod is served by this one
//! process; `shutdown` ends it once the last container is deleted.
//!
//! A process's exit is recorded once, by whichever comes first: the
//! agent's answer to `WaitProcess` (after the process's output has been
//! copied out), or the VM's end, which gives every process still running
//! exit status 137 within [`VM_POLL`] of moat-vmm dying.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::monitor::{Subject, Subscription, Topic};
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::events::task as events;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{CodedInputStream, MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc as cttrpc;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use log::{error, info, warn};
use moat_protocol::agent;
use moat_protocol::agent_ttrpc::AgentServiceClient;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError};
use crate::mounts::{self, MountError, RootfsMount};
use crate::sandbox::{self, PodSetup, Sandbox, SandboxError};
use crate::stdio;

/// How often the VM watcher looks at moat-vmm.
pub const VM_POLL: Duration = Duration::from_millis(100);
/// How long a dead moat-vmm's status is looked for, once it shows dead.
const VM_END_WAIT: Duration = Duration::from_secs(3);
/// How long an exited process's output may take to drain before its exit
/// is reported anyway (a child that outlives an exec can hold its pipe).
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// What an agent call that should be quick may take.
const AGENT_CALL_NS: i64 = 30_000_000_000;
/// How long a shim with no container left waits for containerd's
/// Shutdown before it exits by itself.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long `RemoveContainer` lets processes exit before killing them.
const REMOVE_TIMEOUT_SECS: u32 = 10;
/// The exit status of a process whose VM went away.
const VM_GONE_STATUS: u32 = 137;

/// CRI's annotation naming a container's kind.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming a container's pod.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The config file used when containerd's runtime options name none.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/moat/config.toml";
/// The environment variable the `start` action passes the config path in.
pub const CONFIG_ENV: &str = "MOAT_CONFIG";
/// Where pods' state directories go, one per namespace and pod.
pub const POD_ROOT: &str = "/run/moat/pods";

/// What went wrong serving a task request.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or exec.
    #[error("{0} not found")]
    NotFound(String),
    /// The container or exec exists already.
    #[error("{0} already exists")]
    Exists(String),
    /// The request does not fit the process's state.
    #[error("{0}")]
    Precondition(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The shim's config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pod's VM.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Mounting a container's rootfs or volumes.
    #[error("container {id}: {source}")]
    Mount {
        /// The container.
        id: String,
        /// The error.
        source: MountError,
    },
    /// The agent refused or did not answer.
    #[error("agent {what} for {id}: {source}")]
    Agent {
        /// The call.
        what: &'static str,
        /// The container (and exec).
        id: String,
        /// The error.
        source: ttrpc::Error,
    },
    /// A request's work ended before it finished (it panicked).
    #[error("{what} ended before it finished: {why}")]
    Aborted {
        /// The request.
        what: String,
        /// Why, as tokio reports it.
        why: String,
    },
    /// Reading the bundle.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<TaskError> for cttrpc::Error {
    fn from(e: TaskError) -> Self {
        let code = match &e {
            TaskError::NotFound(_) => cttrpc::Code::NOT_FOUND,
            TaskError::Exists(_) => cttrpc::Code::ALREADY_EXISTS,
            TaskError::Precondition(_) => cttrpc::Code::FAILED_PRECONDITION,
            TaskError::Invalid(_) | TaskError::Config(_) => cttrpc::Code::INVALID_ARGUMENT,
            TaskError::Mount {
                source: MountError::Unsupported { .. },
                ..
            } => cttrpc::Code::INVALID_ARGUMENT,
            TaskError::Agent { source, .. } => agent_code(source),
            _ => cttrpc::Code::INTERNAL,
        };
        cttrpc::Error::RpcStatus(cttrpc::get_status(code, e.to_string()))
    }
}

/// The agent's status code, carried over to containerd (the two ttrpc
/// crates are distinct versions with the same codes).
fn agent_code(e: &ttrpc::Error) -> cttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(status) => {
            let value = status.code.value();
            match value {
                5 => cttrpc::Code::NOT_FOUND,
                6 => cttrpc::Code::ALREADY_EXISTS,
                3 => cttrpc::Code::INVALID_ARGUMENT,
                9 => cttrpc::Code::FAILED_PRECONDITION,
                4 => cttrpc::Code::DEADLINE_EXCEEDED,
                12 => cttrpc::Code::UNIMPLEMENTED,
                _ => cttrpc::Code::INTERNAL,
            }
        }
        _ => cttrpc::Code::UNAVAILABLE,
    }
}

type TaskResult<T> = Result<T, TaskError>;

/// A process's exit: status and time.
#[derive(Clone, Copy, Debug)]
struct Exit {
    status: u32,
    at: SystemTime,
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// One process: a container's init (empty exec ID) or an exec.
struct Process {
    container: String,
    exec: String,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// For an exec: the OCI process as JSON, sent when it starts.
    exec_spec: Vec<u8>,
    started: std::sync::atomic::AtomicBool,
    exit: watch::Sender<Option<Exit>>,
    stdin_copy: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Process {
    fn new(container: &str, exec: &str, io: ProcessIo, exec_spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Process {
            container: container.to_string(),
            exec: exec.to_string(),
            stdin: io.stdin,
            stdout: io.stdout,
            stderr: io.stderr,
            terminal: io.terminal,
            exec_spec,
            started: false.into(),
            exit: watch::channel(None).0,
            stdin_copy: std::sync::Mutex::new(None),
        })
    }

    fn name(&self) -> String {
        if self.exec.is_empty() {
            self.container.clone()
        } else {
            format!("{}/{}", self.container, self.exec)
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn is_started(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn status(&self, paused: bool) -> Status {
        match (self.exited(), self.is_started()) {
            (Some(_), _) => Status::STOPPED,
            (None, false) => Status::CREATED,
            (None, true) if paused => Status::PAUSED,
            (None, true) => Status::RUNNING,
        }
    }
}

/// A process's stdio as containerd names it.
struct ProcessIo {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

struct Container {
    bundle: PathBuf,
    /// Whether this container booted the VM (the pod sandbox, or a plain
    /// container that is its own pod).
    owns_vm: bool,
    /// Whether the shim mounted the rootfs at `bundle/rootfs`.
    mounted_rootfs: bool,
    paused: bool,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
}

struct Vm {
    sandbox: Sandbox,
    agent: AgentServiceClient,
    pid: u32,
    watcher: JoinHandle<()>,
    oom: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    vm: Option<Vm>,
    containers: HashMap<String, Container>,
}

/// The task service of one shim process.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
}

impl TaskService {
    /// A service for `namespace` that publishes through `publisher` and
    /// signals `exit` when containerd's `shutdown` finds it empty.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                namespace: namespace.to_string(),
                publisher,
                exit,
                state: Mutex::new(State::default()),
            }),
        }
    }
}

impl Inner {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(
                cttrpc::context::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await
        {
            warn!("publish {topic}: {e}");
        }
    }

    /// Records `proc`'s exit unless one is recorded, and tells containerd.
    async fn set_exit(&self, proc: &Process, exit: Exit, pid: u32) {
        let first = proc.exit.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(exit);
            true
        });
        if !first {
            return;
        }
        info!("{} exited with status {}", proc.name(), exit.status);
        if let Some(handle) = proc.stdin_copy.lock().ok().and_then(|mut h| h.take()) {
            handle.abort();
            if !proc.stdin.is_empty() {
                stdio::unblock_stdin(Path::new(&proc.stdin));
            }
        }
        let id = if proc.exec.is_empty() {
            proc.container.clone()
        } else {
            proc.exec.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(events::TaskExit {
                container_id: proc.container.clone(),
                id,
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        )
        .await;
    }

    /// Every process of the pod, for the VM watcher.
    async fn all_processes(&self) -> Vec<Arc<Process>> {
        let state = self.state.lock().await;
        state
            .containers
            .values()
            .flat_map(|c| std::iter::once(c.init.clone()).chain(c.execs.values().cloned()))
            .collect()
    }

    /// The VM's agent and moat-vmm's PID.
    async fn agent(&self) -> TaskResult<(AgentServiceClient, u32)> {
        let state = self.state.lock().await;
        state
            .vm
            .as_ref()
            .map(|vm| (vm.agent.clone(), vm.pid))
            .ok_or_else(|| TaskError::Precondition("the pod's VM is not running".into()))
    }

    async fn process(&self, id: &str, exec: &str) -> TaskResult<(Arc<Process>, bool)> {
        let state = self.state.lock().await;
        let c = state
            .containers
            .get(id)
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))?;
        if exec.is_empty() {
            Ok((c.init.clone(), c.paused))
        } else {
            c.execs
                .get(exec)
                .map(|p| (p.clone(), c.paused))
                .ok_or_else(|| TaskError::NotFound(format!("exec {exec} of container {id}")))
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(AGENT_CALL_NS)
}

fn agent_error(what: &'static str, id: &str) -> impl FnOnce(ttrpc::Error) -> TaskError {
    let id = id.to_string();
    move |source| TaskError::Agent { what, id, source }
}

/// The config file containerd's runtime options name
/// (`runtimeoptions.v1.Options`'s `config_path`, what CRI's
/// `options = { ConfigPath = ... }` and `ctr --runtime-config-path` set),
/// if they name one.
pub fn config_path_from_options(options: &Any) -> Option<PathBuf> {
    if !options.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&options.value);
    let mut path = None;
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => path = input.read_string().ok().map(PathBuf::from),
            _ => {
                let wire_type = containerd_shim::protos::protobuf::rt::WireType::new(wire)?;
                input.skip_field(wire_type).ok()?;
            }
        }
    }
    path.filter(|p| !p.as_os_str().is_empty())
}

/// A pod's state directory.
pub fn pod_dir(namespace: &str, pod: &str) -> PathBuf {
    Path::new(POD_ROOT).join(namespace).join(pod)
}

/// Reads a bundle's config.json.
pub fn read_spec(bundle: &Path) -> Result<oci_spec::runtime::Spec, TaskError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| TaskError::Io {
        what: "read",
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| {
        TaskError::Invalid(format!("{}: not an OCI runtime spec: {e}", path.display()))
    })
}

/// The pod a container belongs to: its CRI sandbox ID for a CRI
/// container, its own ID otherwise (a CRI sandbox, or a plain container
/// that is its own pod).
pub fn pod_of(id: &str, spec: &oci_spec::runtime::Spec) -> String {
    let annotations = spec.annotations().clone().unwrap_or_default();
    match (
        annotations.get(CONTAINER_TYPE).map(String::as_str),
        annotations.get(SANDBOX_ID),
    ) {
        (Some("container"), Some(pod)) if !pod.is_empty() => pod.clone(),
        _ => id.to_string(),
    }
}

/// The network namespace a CRI sandbox's spec names (the one CNI set up),
/// if it names one: the pod's VM takes its interfaces. A host-network pod
/// names none.
pub fn pod_netns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    use oci_spec::runtime::LinuxNamespaceType as Ns;
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == Ns::Network)
        .and_then(|ns| ns.path().clone())
}

/// Fits a spec's Linux namespaces to the guest. Host namespace paths mean
/// nothing there, and the VM itself is the pod's network, IPC and UTS
/// namespace: a CRI sandbox's network, IPC and UTS namespaces and every
/// namespace given by path (a CRI container joining its sandbox's) are
/// dropped, so those containers share the VM's. A hostname the container
/// would then set without a UTS namespace of its own is taken off the
/// spec and returned: it becomes the VM's hostname when the container
/// boots the VM. Plain containers (`ctr run`) keep their own namespaces.
pub fn fit_namespaces(spec: &mut oci_spec::runtime::Spec, cri_sandbox: bool) -> Option<String> {
    use oci_spec::runtime::LinuxNamespaceType as Ns;
    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| {
                let pod_level = matches!(ns.typ(), Ns::Network | Ns::Ipc | Ns::Uts);
                ns.path().is_none() && !(cri_sandbox && pod_level)
            });
        }
    }
    let private_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|n| n.iter().any(|ns| ns.typ() == Ns::Uts));
    if private_uts {
        return None;
    }
    let hostname = spec.hostname().clone();
    spec.set_hostname(None);
    hostname.filter(|h| !h.is_empty())
}

impl TaskService {
    async fn do_create(&self, req: api::CreateTaskRequest) -> TaskResult<api::CreateTaskResponse> {
        let inner = &self.inner;
        let id = req.id.clone();
        mounts::check_id(&id).map_err(|e| TaskError::Invalid(e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Invalid(format!(
                "container {id}: moat cannot restore checkpoints"
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = read_spec(&bundle)?;
        let pod = pod_of(&id, &spec);
        let owns_vm = pod == id;
        let cri_sandbox = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(CONTAINER_TYPE))
            .is_some_and(|t| t == "sandbox");
        let netns = if cri_sandbox && owns_vm {
            pod_netns(&spec)
        } else {
            None
        };
        let hostname = fit_namespaces(&mut spec, cri_sandbox);

        let mut state = inner.state.lock().await;
        if state.containers.contains_key(&id) {
            return Err(TaskError::Exists(format!("container {id}")));
        }
        if owns_vm && state.vm.is_some() {
            return Err(TaskError::Precondition(format!(
                "container {id}: this shim's pod VM is running already"
            )));
        }
        if !owns_vm && state.vm.is_none() {
            return Err(TaskError::Precondition(format!(
                "container {id}: pod {pod} has no VM in this shim"
            )));
        }

        let config_path = req
            .options
            .as_ref()
            .and_then(config_path_from_options)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));

        // The rootfs: containerd's mounts, made at bundle/rootfs, or a
        // directory the bundle already holds.
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        let rootfs_mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let mount_error = |source| TaskError::Mount {
            id: id.clone(),
            source,
        };
        // Refuse what cannot be carried before anything is mounted or
        // booted.
        let spec_mounts = spec.mounts().clone().unwrap_or_default();
        mounts::check_mounts(&spec_mounts).map_err(mount_error)?;

        let mut booted = None;
        if owns_vm {
            let config = Config::load(&config_path)?;
            let annotations: BTreeMap<String, String> = spec
                .annotations()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            let size = config.vm_size(&annotations)?;
            let dir = pod_dir(&inner.namespace, &pod);
            if dir.exists() {
                // A pod of this ID whose shim died and whose delete
                // action has not run yet.
                warn!(
                    "pod {pod}: removing the state a dead shim left at {}",
                    dir.display()
                );
                sandbox::cleanup(&dir).await?;
            }
            info!(
                "pod {pod}: booting its VM ({} vCPUs, {} MiB) with config {}",
                size.vcpus,
                size.memory_mib,
                config_path.display()
            );
            let setup = PodSetup {
                hostname: hostname.clone(),
                netns: netns.clone(),
            };
            let sandbox = Sandbox::start_pod(&config, &pod, &dir, size, &setup).await?;
            let times = sandbox.boot_times();
            info!(
                "pod {pod}: VM up, moat-vmm PID {}, guest console in {}; virtiofsd ready in {} ms, moat-vmm start to the agent's answer {} ms",
                sandbox.vmm_pid().unwrap_or(0),
                sandbox.console_path().display(),
                times.virtiofsd.as_millis(),
                times.vmm_to_agent.as_millis()
            );
            booted = Some(sandbox);
        }

        let result = async {
            let (share, agent, pid) = match (&booted, &state.vm) {
                (Some(sb), _) => (sb.share(), sb.agent().clone(), sb.vmm_pid().unwrap_or(0)),
                (None, Some(vm)) => (vm.sandbox.share(), vm.agent.clone(), vm.pid),
                (None, None) => unreachable_pod(&pod)?,
            };
            let mounted_rootfs = !rootfs_mounts.is_empty();
            if mounted_rootfs {
                std::fs::create_dir_all(&rootfs).map_err(|source| TaskError::Io {
                    what: "create",
                    path: rootfs.clone(),
                    source,
                })?;
                mounts::mount_rootfs(&rootfs_mounts, &rootfs).map_err(mount_error)?;
            }
            let added = share.add_container(&id, &rootfs, &spec_mounts);
            let (guest_mounts, guest_rootfs) = match added {
                Ok(added) => added,
                Err(e) => {
                    if mounted_rootfs {
                        let _ = mounts::unmount_all_below(&rootfs);
                    }
                    return Err(mount_error(e));
                }
            };
            spec.set_mounts(Some(guest_mounts));
            let spec_json = serde_json::to_vec(&spec)
                .map_err(|e| TaskError::Invalid(format!("container {id}: spec: {e}")))?;
            let request = agent::CreateContainerRequest {
                container_id: id.clone(),
                oci_spec_json: spec_json,
                rootfs: Some(agent::Mount {
                    source: guest_rootfs,
                    fstype: "bind".into(),
                    ..Default::default()
                })
                .into(),
                terminal: req.terminal,
                ..Default::default()
            };
            if let Err(e) = agent.create_container(ctx(), &request).await {
                let _ = share.remove_container(&id);
                if mounted_rootfs {
                    let _ = mounts::unmount_all_below(&rootfs);
                }
                return Err(agent_error("create container", &id)(e));
            }
            Ok((mounted_rootfs, pid))
        }
        .await;

        let (mounted_rootfs, pid) = match result {
            Ok(ok) => ok,
            Err(e) => {
                if let Some(sandbox) = booted {
                    if let Err(stop) = sandbox.stop().await {
                        error!("pod {pod}: stopping the VM after a failed create: {stop}");
                    }
                }
                return Err(e);
            }
        };
        if let Some(sandbox) = booted {
            let agent = sandbox.agent().clone();
            let watcher = tokio::spawn(watch_vm(
                inner.clone(),
                pod.clone(),
                pid,
                sandbox.virtiofsd_pid(),
                sandbox.console_path(),
            ));
            let oom = tokio::spawn(forward_ooms(inner.clone(), agent.clone()));
            state.vm = Some(Vm {
                sandbox,
                agent,
                pid,
                watcher,
                oom,
            });
        }
        let io = ProcessIo {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        state.containers.insert(
            id.clone(),
            Container {
                bundle: bundle.clone(),
                owns_vm,
                mounted_rootfs,
                paused: false,
                init: Process::new(&id, "", io, Vec::new()),
                execs: HashMap::new(),
            },
        );
        drop(state);
        info!("container {id} created in pod {pod}");
        inner
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(events::TaskCreate {
                    container_id: id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(events::TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn do_start(&self, req: api::StartRequest) -> TaskResult<api::StartResponse> {
        let inner = &self.inner;
        let (proc, _) = inner.process(&req.id, &req.exec_id).await?;
        let (agent, pid) = inner.agent().await?;
        if proc.exited().is_some() {
            return Err(TaskError::Precondition(format!(
                "{} has exited already",
                proc.name()
            )));
        }
        if proc.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(TaskError::Precondition(format!(
                "{} is started already",
                proc.name()
            )));
        }
        let started = if proc.exec.is_empty() {
            agent
                .start_container(
                    ctx(),
                    &agent::StartContainerRequest {
                        container_id: proc.container.clone(),
                        ..Default::default()
                    },
                )
                .await
                .map(|_| ())
                .map_err(agent_error("start container", &proc.name()))
        } else {
            agent
                .exec_process(
                    ctx(),
                    &agent::ExecProcessRequest {
                        container_id: proc.container.clone(),
                        exec_id: proc.exec.clone(),
                        oci_process_json: proc.exec_spec.clone(),
                        terminal: proc.terminal,
                        ..Default::default()
                    },
                )
                .await
                .map(|_| ())
                .map_err(agent_error("exec", &proc.name()))
        };
        if let Err(e) = started {
            proc.started
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return Err(e);
        }
        tokio::spawn(run_process(inner.clone(), agent, proc.clone(), pid));
        if proc.exec.is_empty() {
            inner
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(events::TaskStart {
                        container_id: proc.container.clone(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            inner
                .publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(events::TaskExecStarted {
                        container_id: proc.container.clone(),
                        exec_id: proc.exec.clone(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: api::DeleteRequest) -> TaskResult<api::DeleteResponse> {
        let inner = &self.inner;
        let (proc, _) = inner.process(&req.id, &req.exec_id).await?;
        let pid = inner.agent().await.map(|(_, pid)| pid).unwrap_or(0);
        if proc.is_started() && proc.exited().is_none() {
            return Err(TaskError::Precondition(format!(
                "{} is still running; kill it first",
                proc.name()
            )));
        }
        let exit = proc.exited().unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let response = api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            if let Ok((agent, _)) = inner.agent().await {
                if proc.is_started() {
                    let request = agent::DeleteProcessRequest {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        ..Default::default()
                    };
                    if let Err(e) = agent.delete_process(ctx(), &request).await {
                        warn!("{}: agent delete process: {e}", proc.name());
                    }
                }
            }
            let mut state = inner.state.lock().await;
            if let Some(c) = state.containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(response);
        }

        let mut state = inner.state.lock().await;
        let Some(container) = state.containers.remove(&req.id) else {
            return Err(TaskError::NotFound(format!("container {}", req.id)));
        };
        let mut problems = Vec::new();
        if let Some(vm) = &state.vm {
            let request = agent::RemoveContainerRequest {
                container_id: req.id.clone(),
                timeout_secs: REMOVE_TIMEOUT_SECS,
                ..Default::default()
            };
            if let Err(e) = vm.agent.remove_container(ctx(), &request).await {
                // A VM that is gone has nothing left to remove.
                if !vm.watcher.is_finished() {
                    warn!("container {}: agent remove: {e}", req.id);
                }
            }
            if let Err(e) = vm.sandbox.share().remove_container(&req.id) {
                problems.push(e.to_string());
            }
        }
        if container.mounted_rootfs {
            let rootfs = read_spec(&container.bundle)
                .ok()
                .and_then(|s| s.root().as_ref().map(|r| r.path().clone()))
                .map(|p| container.bundle.join(p))
                .unwrap_or_else(|| container.bundle.join("rootfs"));
            if let Err(e) = mounts::unmount_all_below(&rootfs) {
                problems.push(e.to_string());
            }
        }
        let last = state.containers.is_empty();
        let vm = if last || container.owns_vm && state.containers.is_empty() {
            state.vm.take()
        } else {
            None
        };
        drop(state);
        if let Some(vm) = vm {
            stop_vm(vm).await;
        }
        info!("container {} deleted", req.id);
        inner
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(events::TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        if !problems.is_empty() {
            error!("container {}: teardown: {}", req.id, problems.join("; "));
        }
        if last {
            tokio::spawn(exit_unless_shutdown(inner.clone()));
        }
        Ok(response)
    }
}

/// After the last container's delete, waits [`SHUTDOWN_GRACE`] for
/// containerd's Shutdown, then ends the shim itself if nothing new came.
/// containerd sends Shutdown under the deadline of the Delete's caller;
/// when a loaded node's teardown outlasts it (the CRI's handling of a
/// sandbox's exit gives it 10 s), containerd drops the shim's connection
/// and never sends Shutdown, and the shim, holding nothing any more,
/// would run on forever (seen with 20 pods removed at once).
async fn exit_unless_shutdown(inner: Arc<Inner>) {
    tokio::time::sleep(SHUTDOWN_GRACE).await;
    let state = inner.state.lock().await;
    if state.containers.is_empty() && state.vm.is_none() {
        info!(
            "no containers left and no Shutdown from containerd within {} s: the shim exits",
            SHUTDOWN_GRACE.as_secs()
        );
        inner.exit.signal();
    }
}

/// Runs a request's `work` on a task of its own and waits for it. The
/// ttrpc server drops a handler whose caller's deadline passes (containerd
/// gives the Delete of an exited sandbox 10 s, which a loaded node's VM
/// stop can exceed), and set-up or teardown dropped half way left a pod's
/// mounts, VM or shim behind. On its own task the work runs to its end
/// whoever stops waiting, as in containerd's Go shims, whose handlers are
/// not cancelled either.
async fn run_to_completion<T: Send + 'static>(
    what: String,
    work: impl std::future::Future<Output = TaskResult<T>> + Send + 'static,
) -> TaskResult<T> {
    tokio::spawn(work).await.map_err(|e| TaskError::Aborted {
        what,
        why: e.to_string(),
    })?
}

fn unreachable_pod<T>(pod: &str) -> TaskResult<T> {
    Err(TaskError::Precondition(format!("pod {pod} has no VM")))
}

/// Stops a pod's VM and removes its state.
async fn stop_vm(vm: Vm) {
    let id = vm.sandbox.id().to_string();
    vm.watcher.abort();
    vm.oom.abort();
    match vm.sandbox.stop().await {
        Ok(status) => info!("pod {id}: VM stopped ({status:?})"),
        Err(e) => error!("pod {id}: stopping the VM: {e}"),
    }
}

/// Copies a started process's stdio and reports its exit.
async fn run_process(inner: Arc<Inner>, agent: AgentServiceClient, proc: Arc<Process>, pid: u32) {
    let mut outputs = Vec::new();
    for (path, stderr) in [(&proc.stdout, false), (&proc.stderr, true)] {
        if path.is_empty() || (stderr && proc.terminal) {
            continue;
        }
        outputs.push(tokio::spawn(stdio::copy_output(
            agent.clone(),
            proc.container.clone(),
            proc.exec.clone(),
            stderr,
            PathBuf::from(path),
        )));
    }
    if proc.stdin.is_empty() {
        if let Err(e) = stdio::close_stdin(&agent, &proc.container, &proc.exec).await {
            warn!("{}: {e}", proc.name());
        }
    } else {
        let copy = tokio::spawn({
            let (agent, proc) = (agent.clone(), proc.clone());
            async move {
                if let Err(e) = stdio::copy_stdin(
                    agent,
                    proc.container.clone(),
                    proc.exec.clone(),
                    PathBuf::from(&proc.stdin),
                )
                .await
                {
                    warn!("{} stdin: {e}", proc.name());
                }
            }
        });
        if let Ok(mut slot) = proc.stdin_copy.lock() {
            *slot = Some(copy);
        }
    }
    let request = agent::WaitProcessRequest {
        container_id: proc.container.clone(),
        exec_id: proc.exec.clone(),
        ..Default::default()
    };
    let mut exit_rx = proc.exit.subscribe();
    let waited = tokio::select! {
        waited = agent.wait_process(ttrpc::context::Context::default(), &request) => waited,
        // The VM watcher recorded the exit: the VM is gone.
        _ = exit_rx.wait_for(Option::is_some) => return,
    };
    let exit = match waited {
        Ok(w) => Exit {
            status: w.status as u32,
            at: SystemTime::UNIX_EPOCH + Duration::from_nanos(w.exited_at_ns.max(0) as u64),
        },
        Err(e) => {
            // The agent's connection usually breaks because the VM ended;
            // the VM watcher then records the exit after logging why (a
            // guest panic, virtiofsd's death). Give it a few polls to
            // notice before taking the process as killed.
            let watcher = exit_rx.wait_for(Option::is_some);
            if tokio::time::timeout(VM_POLL * 10, watcher).await.is_ok() {
                return;
            }
            warn!("{}: wait: {e}; taking it as killed", proc.name());
            Exit {
                status: VM_GONE_STATUS,
                at: SystemTime::now(),
            }
        }
    };
    let drain = async {
        for output in outputs.iter_mut() {
            match output.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!("{} output: {e}", proc.name()),
                Err(e) => warn!("{} output task: {e}", proc.name()),
            }
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN, drain).await.is_err() {
        warn!(
            "{}: output still open {} s after exit (a child holds it); reporting the exit",
            proc.name(),
            OUTPUT_DRAIN.as_secs()
        );
        for output in &outputs {
            output.abort();
        }
    }
    inner.set_exit(&proc, exit, pid).await;
}

/// Watches moat-vmm and virtiofsd. The pod cannot run without its
/// share, so virtiofsd's death stops the VM. When moat-vmm is gone, every
/// process still running exits with 137, and the log says why the VM
/// ended.
async fn watch_vm(
    inner: Arc<Inner>,
    pod: String,
    pid: u32,
    virtiofsd: Option<u32>,
    console: PathBuf,
) {
    let mut share_lost = false;
    // containerd-shim's SIGCHLD handler reaps every child of the shim
    // (waitpid(-1)), so moat-vmm's status may be gone before vmm_end's
    // WNOWAIT look: its exit event is the other way to learn it.
    let mut exits = match monitor_subscribe(Topic::Pid).await {
        Ok(subscription) => Some(subscription),
        Err(e) => {
            warn!("pod {pod}: cannot subscribe to exit events: {e}");
            None
        }
    };
    let mut reaped = None;
    loop {
        tokio::time::sleep(VM_POLL).await;
        take_exit(&mut exits, pid, &mut reaped);
        if reaped.is_some() || !process_alive(pid) {
            break;
        }
        if let Some(fs_pid) = virtiofsd.filter(|p| !share_lost && !process_alive(*p)) {
            // virtiofsd also ends when moat-vmm does (its client went):
            // give the VMM's own end a moment to show first, and after a
            // guest panic, which moat-vmm ends by itself (closing
            // virtiofsd's connection before it exits), long enough for a
            // loaded host to let it report its own status.
            let grace = if sandbox::guest_panic(&console).is_some() {
                VM_POLL * 50
            } else {
                VM_POLL * 5
            };
            let until = Instant::now() + grace;
            while process_alive(pid) && Instant::now() < until {
                tokio::time::sleep(VM_POLL).await;
            }
            if !process_alive(pid) {
                break;
            }
            share_lost = true;
            error!("pod {pod}: virtiofsd (PID {fs_pid}) died; the pod's containers lost their filesystems, stopping the VM");
            if let Ok(vmm) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(vmm),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    // The status, from whichever reaper gets it first: the WNOWAIT look,
    // containerd-shim's exit event, or the child handle's own wait (the
    // thread group leader shows as a zombie while its other threads still
    // exit, before the process can be waited for).
    let mut end = sandbox::vmm_end(pid);
    let deadline = Instant::now() + VM_END_WAIT;
    while end.is_none() && Instant::now() < deadline {
        take_exit(&mut exits, pid, &mut reaped);
        end = reaped.map(|code| {
            if code >= 128 {
                sandbox::describe_vmm_end(libc::CLD_KILLED, code - 128)
            } else {
                sandbox::describe_vmm_end(libc::CLD_EXITED, code)
            }
        });
        if end.is_none() {
            let mut state = inner.state.lock().await;
            if let Some(Ok(Some(status))) = state.vm.as_mut().map(|vm| vm.sandbox.try_vmm_status())
            {
                end = Some(sandbox::describe_exit_status(status));
            }
        }
        if end.is_none() {
            tokio::time::sleep(VM_POLL / 5).await;
        }
    }
    if let Some(subscription) = exits {
        let _ = monitor_unsubscribe(subscription.id).await;
    }
    let end = end.unwrap_or_else(|| "its status is not known".into());
    match sandbox::guest_panic(&console) {
        Some(line) => error!(
            "pod {pod}: the guest kernel panicked ({line}); moat-vmm: {end}; console log {}",
            console.display()
        ),
        None if share_lost => error!(
            "pod {pod}: the VM stopped after virtiofsd died ({end}); console log {}",
            console.display()
        ),
        None => error!(
            "pod {pod}: moat-vmm (PID {pid}) ended while the pod ran ({end}); console log {}",
            console.display()
        ),
    }
    let now = SystemTime::now();
    for proc in inner.all_processes().await {
        if proc.is_started() || proc.exec.is_empty() {
            inner
                .set_exit(
                    &proc,
                    Exit {
                        status: VM_GONE_STATUS,
                        at: now,
                    },
                    pid,
                )
                .await;
        }
    }
}

/// Takes the exit events queued for the shim's children, keeping the
/// exit code of `pid`'s (128 + N for a signal N, as containerd-shim
/// reports it).
fn take_exit(exits: &mut Option<Subscription>, pid: u32, code: &mut Option<i32>) {
    let Some(subscription) = exits else { return };
    while let Ok(event) = subscription.rx.try_recv() {
        if matches!(event.subject, Subject::Pid(p) if u32::try_from(p) == Ok(pid)) {
            *code = Some(event.exit_code);
        }
    }
}

/// Whether `pid` runs (a zombie does not: its parent, this shim, has not
/// reaped it yet).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Forwards the agent's OOM events as TaskOOM.
async fn forward_ooms(inner: Arc<Inner>, agent: AgentServiceClient) {
    loop {
        match agent
            .get_oom_event(
                ttrpc::context::Context::default(),
                &agent::GetOomEventRequest::new(),
            )
            .await
        {
            Ok(event) => {
                info!("container {}: OOM kill", event.container_id);
                inner
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(events::TaskOOM {
                            container_id: event.container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            }
            Err(_) => return,
        }
    }
}

fn metrics(stats: agent::StatsContainerResponse) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        m.cpu = MessageField::some(cg2::CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = stats.memory.as_ref() {
        m.memory = MessageField::some(cg2::MemoryStat {
            usage: mem.current,
            usage_limit: mem.max,
            anon: mem.anon,
            file: mem.file,
            ..Default::default()
        });
        m.memory_events = MessageField::some(cg2::MemoryEvents {
            oom_kill: mem.oom_kills,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        m.pids = MessageField::some(cg2::PidsStat {
            current: pids.current,
            limit: pids.max,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        m.io = MessageField::some(cg2::IOStat {
            usage: vec![cg2::IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                rios: io.read_ios,
                wios: io.write_ios,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    m
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> cttrpc::Result<api::StateResponse> {
        let (proc, paused) = self.inner.process(&req.id, &req.exec_id).await?;
        let pid = self.inner.agent().await.map(|(_, p)| p).unwrap_or(0);
        let bundle = {
            let state = self.inner.state.lock().await;
            state
                .containers
                .get(&req.id)
                .map(|c| c.bundle.display().to_string())
                .unwrap_or_default()
        };
        let exit = proc.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid,
            status: proc.status(paused).into(),
            stdin: proc.stdin.clone(),
            stdout: proc.stdout.clone(),
            stderr: proc.stderr.clone(),
            terminal: proc.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> cttrpc::Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        let service = self.clone();
        run_to_completion(format!("create {id}"), async move {
            service.do_create(req).await
        })
        .await
        .map_err(|e| {
            error!("create {id}: {e}");
            e.into()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> cttrpc::Result<api::StartResponse> {
        let service = self.clone();
        let what = format!("start {} {}", req.id, req.exec_id);
        Ok(run_to_completion(what, async move { service.do_start(req).await }).await?)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> cttrpc::Result<api::DeleteResponse> {
        let service = self.clone();
        let what = format!("delete {} {}", req.id, req.exec_id);
        Ok(run_to_completion(what, async move { service.do_delete(req).await }).await?)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> cttrpc::Result<api::PidsResponse> {
        self.inner.process(&req.id, "").await?;
        let (agent, _) = self.inner.agent().await?;
        let pids = agent
            .list_processes(
                ctx(),
                &agent::ListProcessesRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("list processes", &req.id))?;
        Ok(api::PidsResponse {
            processes: pids
                .pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(
        &self,
        _ctx: &TtrpcContext,
        req: api::PauseRequest,
    ) -> cttrpc::Result<api::Empty> {
        self.inner.process(&req.id, "").await?;
        let (agent, _) = self.inner.agent().await?;
        agent
            .pause_container(
                ctx(),
                &agent::PauseContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("pause", &req.id))?;
        if let Some(c) = self.inner.state.lock().await.containers.get_mut(&req.id) {
            c.paused = true;
        }
        self.inner
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(events::TaskPaused {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> cttrpc::Result<api::Empty> {
        self.inner.process(&req.id, "").await?;
        let (agent, _) = self.inner.agent().await?;
        agent
            .resume_container(
                ctx(),
                &agent::ResumeContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("resume", &req.id))?;
        if let Some(c) = self.inner.state.lock().await.containers.get_mut(&req.id) {
            c.paused = false;
        }
        self.inner
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(events::TaskResumed {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> cttrpc::Result<api::Empty> {
        let (proc, _) = self.inner.process(&req.id, &req.exec_id).await?;
        if proc.exited().is_some() && !req.all {
            return Err(
                TaskError::NotFound(format!("{}: process already finished", proc.name())).into(),
            );
        }
        let (agent, _) = self.inner.agent().await?;
        agent
            .signal_process(
                ctx(),
                &agent::SignalProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    signal: req.signal,
                    all: req.all,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| match &e {
                // The process exited in the guest and its exit is still on
                // its way here: what runc's shim answers for a finished
                // process, which containerd's StopContainer takes as done.
                ttrpc::Error::RpcStatus(status) if status.code.value() == 9 && !req.all => {
                    TaskError::NotFound(format!("{}: process already finished", proc.name()))
                }
                _ => agent_error("signal", &proc.name())(e),
            })?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> cttrpc::Result<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| {
                TaskError::Invalid(format!(
                    "exec {} of {}: no process spec",
                    req.exec_id, req.id
                ))
            })?;
        mounts::check_id(&req.exec_id).map_err(|e| TaskError::Invalid(e.to_string()))?;
        {
            let mut state = self.inner.state.lock().await;
            let c = state
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| TaskError::NotFound(format!("container {}", req.id)))?;
            if c.init.exited().is_some() {
                return Err(
                    TaskError::Precondition(format!("container {} has exited", req.id)).into(),
                );
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(TaskError::Exists(format!(
                    "exec {} of container {}",
                    req.exec_id, req.id
                ))
                .into());
            }
            let io = ProcessIo {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            c.execs.insert(
                req.exec_id.clone(),
                Process::new(&req.id, &req.exec_id, io, spec),
            );
        }
        self.inner
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(events::TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> cttrpc::Result<api::Empty> {
        let (proc, _) = self.inner.process(&req.id, &req.exec_id).await?;
        let (agent, _) = self.inner.agent().await?;
        agent
            .tty_win_resize(
                ctx(),
                &agent::TtyWinResizeRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    rows: req.height,
                    columns: req.width,
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("resize", &proc.name()))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> cttrpc::Result<api::Empty> {
        let (proc, _) = self.inner.process(&req.id, &req.exec_id).await?;
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        let (agent, _) = self.inner.agent().await?;
        let copy = proc.stdin_copy.lock().ok().and_then(|mut h| h.take());
        tokio::spawn(async move {
            // containerd closes its side of the FIFO with this call: the
            // copy sees end of file and closes stdin itself, after the
            // last bytes.
            if let Some(mut copy) = copy {
                if tokio::time::timeout(Duration::from_secs(2), &mut copy)
                    .await
                    .is_ok()
                {
                    return;
                }
                copy.abort();
            }
            if proc.exited().is_none() {
                if let Err(e) = stdio::close_stdin(&agent, &proc.container, &proc.exec).await {
                    warn!("{}: {e}", proc.name());
                }
            }
        });
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> cttrpc::Result<api::Empty> {
        self.inner.process(&req.id, "").await?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| TaskError::Invalid(format!("update {}: no resources", req.id)))?;
        let (agent, _) = self.inner.agent().await?;
        agent
            .update_container(
                ctx(),
                &agent::UpdateContainerRequest {
                    container_id: req.id.clone(),
                    oci_resources_json: resources,
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("update", &req.id))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> cttrpc::Result<api::WaitResponse> {
        let (proc, _) = self.inner.process(&req.id, &req.exec_id).await?;
        let mut rx = proc.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TaskError::NotFound(proc.name()))?;
        let exit = exit.unwrap_or(Exit {
            status: VM_GONE_STATUS,
            at: SystemTime::now(),
        });
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> cttrpc::Result<api::StatsResponse> {
        self.inner.process(&req.id, "").await?;
        let (agent, _) = self.inner.agent().await?;
        let stats = agent
            .stats_container(
                ctx(),
                &agent::StatsContainerRequest {
                    container_id: req.id.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(agent_error("stats", &req.id))?;
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".into(),
            value: containerd_shim::protos::protobuf::Message::write_to_bytes(&metrics(stats))
                .map_err(|e| TaskError::Invalid(format!("stats {}: {e}", req.id)))?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> cttrpc::Result<api::ConnectResponse> {
        let pid = self.inner.agent().await.map(|(_, p)| p).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> cttrpc::Result<api::Empty> {
        let inner = self.inner.clone();
        Ok(run_to_completion("shutdown".into(), async move {
            let mut state = inner.state.lock().await;
            if !state.containers.is_empty() {
                return Ok(api::Empty::new());
            }
            let vm = state.vm.take();
            drop(state);
            if let Some(vm) = vm {
                stop_vm(vm).await;
            }
            info!("no containers left: the shim exits");
            inner.exit.signal();
            Ok(api::Empty::new())
        })
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_runs_on_when_its_caller_gives_up() {
        let (done, finished) = tokio::sync::oneshot::channel();
        let request = run_to_completion("delete p".into(), async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = done.send(());
            Ok(())
        });
        // The ttrpc server's deadline: it drops the handler's future.
        assert!(tokio::time::timeout(Duration::from_millis(5), request)
            .await
            .is_err());
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the work ended within 5 s")
            .expect("the work ran to its end after its caller gave up");
    }

    fn spec(json: serde_json::Value) -> oci_spec::runtime::Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        });
        if let (Some(base), Some(extra)) = (base.as_object_mut(), json.as_object()) {
            base.extend(extra.clone());
        }
        serde_json::from_value(base).expect("test spec")
    }

    fn namespace_types(spec: &oci_spec::runtime::Spec) -> Vec<String> {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .map(|ns| format!("{:?}", ns.typ()))
            .collect()
    }

    #[test]
    fn runtime_options_name_the_config_file() {
        let mut value = vec![0x0a, 1, b'x', 0x12, 16];
        value.extend_from_slice(b"/etc/moat/a.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: value.clone(),
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(&any),
            Some(PathBuf::from("/etc/moat/a.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&other), None);
        let garbage = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 200, b'/'],
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&garbage), None);
    }

    #[test]
    fn cri_containers_join_their_sandbox_and_others_are_their_own_pod() {
        let container = spec(serde_json::json!({"annotations": {
            CONTAINER_TYPE: "container", SANDBOX_ID: "pod-1"}}));
        assert_eq!(pod_of("c1", &container), "pod-1");
        let sandbox = spec(serde_json::json!({"annotations": {
            CONTAINER_TYPE: "sandbox", SANDBOX_ID: "pod-1"}}));
        assert_eq!(pod_of("pod-1", &sandbox), "pod-1");
        assert_eq!(pod_of("solo", &spec(serde_json::json!({}))), "solo");
    }

    #[test]
    fn only_plain_hostnames_reach_the_kernel_command_line() {
        for good in ["web-0", "a.b.c", "x"] {
            assert!(sandbox::valid_hostname(good), "{good}");
        }
        for bad in [
            "",
            "a b",
            "x moat.share=evil",
            "-a",
            "a..b",
            &"a".repeat(65),
        ] {
            assert!(!sandbox::valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn the_pod_network_is_the_namespace_cni_prepared() {
        let pod = spec(serde_json::json!({
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}]}
        }));
        assert_eq!(
            pod_netns(&pod),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        // Host network: no network namespace at all.
        let host = spec(serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}}));
        assert_eq!(pod_netns(&host), None);
        // A new, empty namespace (plain ctr run): nothing to carry.
        let fresh = spec(serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}}));
        assert_eq!(pod_netns(&fresh), None);
    }

    #[test]
    fn namespaces_fit_the_guest() {
        // A CRI sandbox with host network: the VM is its network, IPC and
        // UTS namespace, and its hostname becomes the VM's.
        let mut sandbox = spec(serde_json::json!({
            "hostname": "web-0",
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}
        }));
        assert_eq!(fit_namespaces(&mut sandbox, true), Some("web-0".into()));
        assert_eq!(namespace_types(&sandbox), ["Pid", "Mount"]);
        assert_eq!(sandbox.hostname(), &None);

        // A CRI container joins its sandbox's namespaces by host path:
        // those are dropped, its own new ones stay.
        let mut container = spec(serde_json::json!({
            "hostname": "web-0",
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "mount"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "network", "path": "/proc/42/ns/net"}]}
        }));
        assert_eq!(fit_namespaces(&mut container, false), Some("web-0".into()));
        assert_eq!(namespace_types(&container), ["Pid", "Mount"]);

        // A plain container keeps its own namespaces and hostname.
        let mut plain = spec(serde_json::json!({
            "hostname": "solo",
            "linux": {"namespaces": [{"type": "uts"}, {"type": "network"}]}
        }));
        assert_eq!(fit_namespaces(&mut plain, false), None);
        assert_eq!(namespace_types(&plain), ["Uts", "Network"]);
        assert_eq!(plain.hostname(), &Some("solo".into()));
    }
}
