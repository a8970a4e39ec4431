//! containerd-shim-moat-v2: the binary containerd starts for
//! `runtime_type = "io.containerd.moat.v2"`.
//!
//! containerd runs it three ways: `start` (answer with the address of the
//! pod's shim, starting one if the pod has none), `delete` (clean up after
//! a shim that died), and as the long-running shim itself, which serves
//! the task API ([`moat_shim::service`]) for every container of one pod.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{run, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::{Config, Error, Flags, StartOpts};
use moat_shim::service::{self, TaskService};
use tokio::io::AsyncReadExt;

/// The runtime's name as containerd knows it.
const RUNTIME_ID: &str = "io.containerd.moat.v2";

struct MoatShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for MoatShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        MoatShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd hands the runtime options on stdin.
        let mut options = Vec::new();
        std::io::stdin()
            .read_to_end(&mut options)
            .map_err(|e| Error::Other(format!("read runtime options from stdin: {e}")))?;
        let config_path = if options.is_empty() {
            None
        } else {
            Any::parse_from_bytes(&options)
                .ok()
                .and_then(|any| service::config_path_from_options(&any))
        };
        let spec = service::read_spec(&self.bundle).map_err(|e| Error::Other(e.to_string()))?;
        let pod = service::pod_of(&opts.id, &spec);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &pod);
        let socket = address.trim_start_matches("unix://").to_string();
        if Path::new(&socket).exists() && tokio::net::UnixStream::connect(&socket).await.is_ok() {
            // The pod's shim runs: this container joins it.
            write_address(&address)?;
            return Ok(address);
        }
        let exe = std::env::current_exe().map_err(|e| Error::Other(format!("own path: {e}")))?;
        let mut command = tokio::process::Command::new(exe);
        command
            .current_dir(&self.bundle)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .args([
                "-namespace",
                &opts.namespace,
                "-id",
                &pod,
                "-address",
                &opts.address,
                "-socket",
                &address,
            ]);
        if opts.debug {
            command.arg("-debug");
        }
        if let Some(path) = config_path {
            command.env(service::CONFIG_ENV, path);
        }
        let mut child = command
            .spawn()
            .map_err(|e| Error::Other(format!("spawn the pod's shim: {e}")))?;
        // The shim closes this pipe once it serves its socket.
        if let Some(mut out) = child.stdout.take() {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink).await;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Other(format!(
                "the pod's shim exited at start ({status})"
            )));
        }
        write_address(&address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd's cleanup after a shim that died: take down what the
        // pod left (a VM without its shim), if this container owned it.
        let spec = service::read_spec(&self.bundle).ok();
        let pod = spec
            .as_ref()
            .map(|s| service::pod_of(&self.id, s))
            .unwrap_or_else(|| self.id.clone());
        let dir = service::pod_dir(&self.namespace, &pod);
        if pod == self.id {
            moat_shim::sandbox::cleanup(&dir)
                .await
                .map_err(|e| Error::Other(e.to_string()))?;
        } else if dir.exists() {
            moat_shim::mounts::PodShare::open(&dir.join("share"))
                .remove_container(&self.id)
                .map_err(|e| Error::Other(e.to_string()))?;
        }
        let root = spec
            .as_ref()
            .and_then(|s| s.root().as_ref().map(|r| r.path().clone()))
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = self.bundle.join(root);
        if rootfs.exists() {
            moat_shim::mounts::unmount_all_below(&rootfs)
                .map_err(|e| Error::Other(e.to_string()))?;
        }
        remove_dead_socket().await;
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 137,
            exited_at: MessageField::some(Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        TaskService::new(&self.namespace, publisher, self.exit.clone())
    }
}

/// Removes the socket named by the bundle's `address` file once nothing
/// answers on it: a shim killed with SIGKILL cannot remove its own, and a
/// socket left in /run/containerd/s outlives the pod. A socket that still
/// answers belongs to a live shim (another container of the pod) and stays.
async fn remove_dead_socket() {
    let Ok(address) = std::fs::read_to_string("address") else {
        return;
    };
    let socket = address.trim().trim_start_matches("unix://").to_string();
    if socket.is_empty() || !Path::new(&socket).exists() {
        return;
    }
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return;
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        eprintln!("{RUNTIME_ID}: remove the dead shim's socket {socket}: {e}");
    }
}

fn write_address(address: &str) -> Result<(), Error> {
    std::fs::write("address", address)
        .map_err(|e| Error::Other(format!("write the address file: {e}")))
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = Config {
        // Children (moat-vmm, virtiofsd) are tokio's to reap; a reaper
        // waiting for any child would take their exit statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    runtime.block_on(run::<MoatShim>(RUNTIME_ID, Some(config)));
    // Dropping the runtime would wait for every blocking task; a stdin
    // FIFO whose writer never came would hold the shim forever.
    std::process::exit(0);
}
