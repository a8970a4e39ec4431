//! The agent's client suite: every AgentService call and its failure
//! paths, against a real agent running real containers.
//!
//! The same suite runs against `moat-agent --listen unix:PATH` on the
//! host (`guest-agent/tests/host.rs`) and against the agent inside a
//! microVM through the hybrid vsock (`agent-suite` in the harness). The
//! agent needs a busybox root filesystem at `rootfs` on its side.
//! Cases that need cgroup v2 (OOM events, cpu throttling, pids limit)
//! and the guest-only ones (clock, network) run where they can; the
//! caller says which with [`Target`].

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use moat_protocol::agent::*;
use moat_protocol::agent_ttrpc::AgentServiceClient;
use protobuf::Message;
use serde_json::{json, Value};
use ttrpc::Code;

/// Makes a busybox root filesystem in `dir/rootfs` (the static binary
/// from Debian's busybox-static and a link per applet) and returns it.
pub fn busybox_rootfs(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "data"] {
        std::fs::create_dir_all(rootfs.join(sub))?;
    }
    std::fs::write(rootfs.join("etc/resolv.conf"), "")?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = rootfs.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(rootfs)
}

/// How to reach the agent.
#[derive(Debug, Clone)]
pub enum Connector {
    /// `--listen unix:PATH`.
    Unix(String),
    /// A VM's hybrid vsock socket and the agent's port.
    Hybrid(String, u32),
}

impl Connector {
    /// A fresh connection.
    pub fn stream(&self) -> Result<std::os::unix::net::UnixStream, String> {
        let stream = match self {
            Connector::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| format!("connect {path}: {e}"))?,
            Connector::Hybrid(uds, port) => crate::af_vsock::connect_hybrid(uds, *port)
                .map_err(|e| format!("connect {uds} port {port}: {e}"))?,
        };
        Ok(stream)
    }

    /// A fresh ttrpc client.
    pub fn client(&self) -> Result<AgentServiceClient, String> {
        let stream = self.stream()?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
        Ok(AgentServiceClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::from(stream),
        )))
    }
}

/// Where the agent runs, which decides the cases that apply.
#[derive(Debug, Clone)]
pub struct Target {
    /// How to reach it.
    pub connector: Connector,
    /// The busybox root filesystem, a path on the agent's side.
    pub rootfs: String,
    /// The agent's `--state-dir` (where `resolv.conf` goes).
    pub state_dir: String,
    /// The agent runs on cgroup v2 (in the guest).
    pub cgroup_v2: bool,
    /// The agent is PID 1 of a guest: its clock may be set.
    pub guest: bool,
    /// A prefix for container IDs, so runs do not collide.
    pub prefix: String,
}

type CaseResult = Result<(), String>;
type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + 'a>>;

/// One outcome.
#[derive(Debug)]
pub struct Outcome {
    /// The case.
    pub name: &'static str,
    /// Ok, or what failed.
    pub result: CaseResult,
    /// How long it took.
    pub elapsed: Duration,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

fn check<T>(what: &str, result: ttrpc::Result<T>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e}"))
}

/// Asserts a call failed with `code` and a message containing `needle`.
fn expect_error<T: std::fmt::Debug>(
    what: &str,
    result: ttrpc::Result<T>,
    code: Code,
    needle: &str,
) -> CaseResult {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            if status.code() != code {
                return Err(format!(
                    "{what}: expected {code:?}, got {:?}: {}",
                    status.code(),
                    status.message()
                ));
            }
            if !status.message().contains(needle) {
                return Err(format!(
                    "{what}: message {:?} does not mention {needle:?}",
                    status.message()
                ));
            }
            Ok(())
        }
        other => Err(format!("{what}: expected {code:?}, got {other:?}")),
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> CaseResult {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Exited execs held at once by `exec_delete_frees`: three pipes each,
/// past the default 1,024 descriptors.
const EXECS_HELD: u32 = 360;

const CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// A runc-style default spec running `args`, with a read-only root.
pub fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "moat-ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// An OCI process for exec.
pub fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "noNewPrivileges": true
    })
}

/// The suite against one agent.
pub struct Suite {
    target: Target,
    client: AgentServiceClient,
}

/// What a finished container or process printed and returned.
#[derive(Debug, Default)]
pub struct Finished {
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Its status (128 + signal if killed).
    pub status: i32,
}

impl Suite {
    /// Connects to the agent.
    pub fn new(target: Target) -> Result<Suite, String> {
        let client = target.connector.client()?;
        Ok(Suite { target, client })
    }

    fn id(&self, name: &str) -> String {
        format!("{}{name}", self.target.prefix)
    }

    fn rootfs(&self) -> Mount {
        Mount {
            source: self.target.rootfs.clone(),
            fstype: "bind".into(),
            ..Default::default()
        }
    }

    /// Creates a container from `spec`.
    pub async fn create(&self, id: &str, spec: &Value, terminal: bool) -> ttrpc::Result<Empty> {
        self.client
            .create_container(
                ctx(),
                &CreateContainerRequest {
                    container_id: id.into(),
                    oci_spec_json: spec.to_string().into_bytes(),
                    rootfs: Some(self.rootfs()).into(),
                    terminal,
                    ..Default::default()
                },
            )
            .await
    }

    async fn start(&self, id: &str) -> ttrpc::Result<Empty> {
        self.client
            .start_container(
                ctx(),
                &StartContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn remove(&self, id: &str) -> ttrpc::Result<Empty> {
        self.client
            .remove_container(
                ctx(),
                &RemoveContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn read_once(&self, id: &str, exec_id: &str, stderr: bool) -> ttrpc::Result<Vec<u8>> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            max_len: 65536,
            ..Default::default()
        };
        let resp = if stderr {
            self.client.read_stderr(ctx(), &req).await?
        } else {
            self.client.read_stdout(ctx(), &req).await?
        };
        Ok(resp.data)
    }

    async fn read_to_end(&self, id: &str, exec_id: &str, stderr: bool) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            let data = check("read output", self.read_once(id, exec_id, stderr).await)?;
            if data.is_empty() {
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&data);
        }
    }

    /// Reads a terminal's output until it contains `needle`.
    async fn read_until(&self, id: &str, exec_id: &str, needle: &str) -> Result<String, String> {
        let mut out = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !out.contains(needle) {
            if Instant::now() > deadline {
                return Err(format!("no {needle:?} in output {out:?} within 30 s"));
            }
            let data = check("read output", self.read_once(id, exec_id, false).await)?;
            if data.is_empty() {
                return Err(format!("end of output before {needle:?}: {out:?}"));
            }
            out.push_str(&String::from_utf8_lossy(&data));
        }
        Ok(out)
    }

    async fn wait(&self, id: &str, exec_id: &str) -> Result<i32, String> {
        let resp = check("wait", self.wait_process(id, exec_id).await)?;
        Ok(resp.status)
    }

    async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> ttrpc::Result<Empty> {
        self.client
            .signal_process(
                ctx(),
                &SignalProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    signal,
                    all,
                    ..Default::default()
                },
            )
            .await
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &Value,
        terminal: bool,
    ) -> ttrpc::Result<Empty> {
        self.client
            .exec_process(
                ctx(),
                &ExecProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    oci_process_json: process.to_string().into_bytes(),
                    terminal,
                    ..Default::default()
                },
            )
            .await
    }

    /// Collects a process's output and status.
    async fn finish(&self, id: &str, exec_id: &str) -> Result<Finished, String> {
        let (stdout, stderr) = tokio::join!(
            self.read_to_end(id, exec_id, false),
            self.read_to_end(id, exec_id, true)
        );
        let status = self.wait(id, exec_id).await?;
        Ok(Finished {
            stdout: stdout?,
            stderr: stderr?,
            status,
        })
    }

    /// Creates, starts, finishes and removes a container.
    pub async fn run(&self, id: &str, spec: &Value) -> Result<Finished, String> {
        check("create", self.create(id, spec, false).await)?;
        let result = async {
            check("start", self.start(id).await)?;
            self.finish(id, "").await
        }
        .await;
        let removed = check("remove", self.remove(id).await);
        let finished = result?;
        removed?;
        Ok(finished)
    }

    async fn stats(&self, id: &str) -> Result<StatsContainerResponse, String> {
        check("stats", self.stats_raw(id).await)
    }

    async fn wait_process(&self, id: &str, exec_id: &str) -> ttrpc::Result<WaitProcessResponse> {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).await
    }

    async fn stats_raw(&self, id: &str) -> ttrpc::Result<StatsContainerResponse> {
        let req = StatsContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.stats_container(ctx(), &req).await
    }

    async fn write_stdin(
        &self,
        id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> ttrpc::Result<WriteStreamResponse> {
        let req = WriteStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.client.write_stdin(ctx(), &req).await
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> ttrpc::Result<Empty> {
        let req = CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.close_stdin(ctx(), &req).await
    }

    async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> ttrpc::Result<Empty> {
        let req = TtyWinResizeRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            columns,
            ..Default::default()
        };
        self.client.tty_win_resize(ctx(), &req).await
    }

    async fn list(&self, id: &str) -> ttrpc::Result<ListProcessesResponse> {
        let req = ListProcessesRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.list_processes(ctx(), &req).await
    }

    async fn pause(&self, id: &str) -> ttrpc::Result<Empty> {
        let req = PauseContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.pause_container(ctx(), &req).await
    }

    async fn resume(&self, id: &str) -> ttrpc::Result<Empty> {
        let req = ResumeContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.resume_container(ctx(), &req).await
    }

    async fn update(&self, id: &str, resources: &Value) -> ttrpc::Result<Empty> {
        self.client
            .update_container(
                ctx(),
                &UpdateContainerRequest {
                    container_id: id.into(),
                    oci_resources_json: resources.to_string().into_bytes(),
                    ..Default::default()
                },
            )
            .await
    }

    // --- the cases ------------------------------------------------------

    async fn health_and_version(&self) -> CaseResult {
        let health = check(
            "check",
            self.client.check(ctx(), &CheckRequest::new()).await,
        )?;
        ensure(health.serving, || "not serving".into())?;
        let version = check(
            "version",
            self.client.version(ctx(), &VersionRequest::new()).await,
        )?;
        ensure(version.api_version == moat_protocol::API_VERSION, || {
            format!("api_version {}", version.api_version)
        })
    }

    async fn exit_code_and_output(&self) -> CaseResult {
        let id = self.id("exit3");
        let done = self
            .run(&id, &spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]))
            .await?;
        ensure(done.status == 3, || {
            format!("status {} (want 3)", done.status)
        })?;
        ensure(done.stdout == "out\n", || {
            format!("stdout {:?}", done.stdout)
        })?;
        ensure(done.stderr == "err\n", || {
            format!("stderr {:?}", done.stderr)
        })
    }

    async fn stdin_round_trip(&self) -> CaseResult {
        let id = self.id("stdin");
        check("create", self.create(&id, &spec(&["cat"]), false).await)?;
        check("start", self.start(&id).await)?;
        let wrote = check(
            "write stdin",
            self.write_stdin(&id, "", b"hello through stdin\n").await,
        )?;
        ensure(wrote.len == 20, || format!("wrote {}", wrote.len))?;
        check("close stdin", self.close_stdin(&id, "").await)?;
        let done = self.finish(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(done.stdout == "hello through stdin\n", || {
            format!("stdout {:?}", done.stdout)
        })?;
        ensure(done.status == 0, || format!("status {}", done.status))
    }

    async fn stdio_streams(&self) -> CaseResult {
        let id = self.id("streams");
        let s = spec(&["sh", "-c", "cat; echo done-err >&2; exit 9"]);
        check("create", self.create(&id, &s, false).await)?;
        check("start", self.start(&id).await)?;
        let stdout_req = OutputStreamRequest {
            container_id: id.clone(),
            ..Default::default()
        };
        let stderr_req = OutputStreamRequest {
            container_id: id.clone(),
            stderr: true,
            ..Default::default()
        };
        let stdout = check(
            "open stdout stream",
            self.client.output_stream(ctx(), &stdout_req).await,
        )?;
        let stderr = check(
            "open stderr stream",
            self.client.output_stream(ctx(), &stderr_req).await,
        )?;
        // 1 MiB of numbered lines, in 64 KiB writes (WriteStdin calls are
        // ordered; a ttrpc client stream is not, see agent.proto).
        let payload: Vec<u8> = (0..1_000_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .take(1 << 20)
            .collect();
        let sender = async {
            let mut sent = 0usize;
            for chunk in payload.chunks(64 * 1024) {
                let wrote = check("write stdin", self.write_stdin(&id, "", chunk).await)?;
                sent += wrote.len as usize;
            }
            check("close stdin", self.close_stdin(&id, "").await)?;
            Ok::<_, String>(sent)
        };
        let drain = |mut stream: ttrpc::r#async::ClientStreamReceiver<ReadStreamResponse>| async move {
            let mut out = Vec::new();
            while let Some(msg) = check("receive", stream.recv().await)? {
                out.extend_from_slice(&msg.data);
            }
            Ok::<_, String>(out)
        };
        let (sent, out, err) = tokio::join!(sender, drain(stdout), drain(stderr));
        let sent = sent?;
        let (out, err) = (out?, err?);
        let status = self.wait(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(sent == payload.len(), || format!("agent took {sent} bytes"))?;
        ensure(out == payload, || {
            let at = out
                .iter()
                .zip(&payload)
                .position(|(a, b)| a != b)
                .unwrap_or(out.len().min(payload.len()));
            format!(
                "stdout stream gave {} bytes, not the {} sent; they differ from byte {at}",
                out.len(),
                payload.len()
            )
        })?;
        ensure(err == b"done-err\n", || {
            format!("stderr stream {:?}", String::from_utf8_lossy(&err))
        })?;
        ensure(status == 9, || format!("status {status}"))
    }

    async fn signals(&self) -> CaseResult {
        let id = self.id("signals");
        // A namespace's init ignores signals it has no handler for, so the
        // init traps SIGTERM; the exec'd sleep takes the default action.
        let init = spec(&[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.1; done",
        ]);
        check("create", self.create(&id, &init, false).await)?;
        check("start", self.start(&id).await)?;
        check(
            "exec",
            self.exec(&id, "sleeper", &process(&["sleep", "1000"]), false)
                .await,
        )?;
        check(
            "exec",
            self.exec(&id, "victim", &process(&["sleep", "1000"]), false)
                .await,
        )?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        check("SIGTERM exec", self.signal(&id, "sleeper", 15, false).await)?;
        let status = self.wait(&id, "sleeper").await?;
        ensure(status == 143, || {
            format!("exec after SIGTERM: {status} (want 143)")
        })?;
        check("SIGKILL exec", self.signal(&id, "victim", 9, false).await)?;
        let status = self.wait(&id, "victim").await?;
        ensure(status == 137, || {
            format!("exec after SIGKILL: {status} (want 137)")
        })?;
        expect_error(
            "signal an exited process",
            self.signal(&id, "victim", 9, false).await,
            Code::FAILED_PRECONDITION,
            "already exited",
        )?;
        expect_error(
            "signal 0xffff",
            self.signal(&id, "", 0xffff, false).await,
            Code::INVALID_ARGUMENT,
            "65535",
        )?;
        check("SIGTERM init", self.signal(&id, "", 15, false).await)?;
        let status = self.wait(&id, "").await?;
        ensure(status == 42, || {
            format!("init after SIGTERM: {status} (want 42)")
        })?;
        check("remove", self.remove(&id).await)?;

        let id = self.id("sigkill");
        check(
            "create",
            self.create(&id, &spec(&["sleep", "1000"]), false).await,
        )?;
        check("start", self.start(&id).await)?;
        check("SIGKILL all", self.signal(&id, "", 9, true).await)?;
        let status = self.wait(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(status == 137, || {
            format!("init after SIGKILL: {status} (want 137)")
        })
    }

    async fn exec_sees_the_container(&self) -> CaseResult {
        let id = self.id("exec");
        check(
            "create",
            self.create(&id, &spec(&["sleep", "1000"]), false).await,
        )?;
        check("start", self.start(&id).await)?;
        let script = "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; ls /bin/busybox; \
                      ls /proc | grep -c '^[0-9]'; \
                      [ \"$(cat /proc/self/cgroup)\" = \"$(cat /proc/1/cgroup)\" ] && echo same-cgroup";
        check(
            "exec",
            self.exec(&id, "look", &process(&["sh", "-c", script]), false)
                .await,
        )?;
        let done = self.finish(&id, "look").await?;
        check(
            "exec",
            self.exec(&id, "idle", &process(&["sleep", "1000"]), false)
                .await,
        )?;
        let listed = check("list processes", self.list(&id).await)?;
        check("remove", self.remove(&id).await)?;
        let lines: Vec<&str> = done.stdout.lines().collect();
        ensure(done.status == 0, || {
            format!("status {}: {done:?}", done.status)
        })?;
        ensure(lines.first() == Some(&"sleep 1000 "), || {
            format!("PID 1 of the exec's namespace is not the init: {lines:?}")
        })?;
        ensure(lines.get(1) == Some(&"moat-ctr"), || {
            format!("hostname: {lines:?}")
        })?;
        ensure(lines.get(2) == Some(&"/bin/busybox"), || {
            format!("rootfs: {lines:?}")
        })?;
        // sleep, sh, cat/ls...: a handful, not the agent's whole PID space.
        let seen: u32 = lines.get(3).and_then(|n| n.parse().ok()).unwrap_or(0);
        ensure((2..10).contains(&seen), || {
            format!("{seen} processes visible: not the container's PID namespace")
        })?;
        ensure(lines.get(4) == Some(&"same-cgroup"), || {
            format!("the exec is not in the init's cgroup: {lines:?}")
        })?;
        ensure(listed.pids.len() == 2, || {
            format!(
                "ListProcesses gave {:?}, want init and one exec",
                listed.pids
            )
        })
    }

    async fn tty_exec_resize(&self) -> CaseResult {
        let id = self.id("tty");
        check(
            "create",
            self.create(&id, &spec(&["sleep", "1000"]), false).await,
        )?;
        check("start", self.start(&id).await)?;
        let mut proc = process(&["sh", "-c", "read line; stty size; tty"]);
        proc["terminal"] = json!(true);
        check("exec with a tty", self.exec(&id, "term", &proc, true).await)?;
        check("resize", self.resize(&id, "term", 41, 101).await)?;
        check("write", self.write_stdin(&id, "term", b"go\n").await)?;
        let out = self.read_until(&id, "term", "/dev/pts/").await?;
        let status = self.wait(&id, "term").await?;
        expect_error(
            "resize a process without a terminal",
            self.resize(&id, "", 1, 1).await,
            Code::FAILED_PRECONDITION,
            "no terminal",
        )?;
        check("remove", self.remove(&id).await)?;
        ensure(out.contains("41 101"), || {
            format!("terminal output {out:?}")
        })?;
        ensure(status == 0, || format!("status {status}"))
    }

    async fn tty_init(&self) -> CaseResult {
        let id = self.id("ttyinit");
        let mut s = spec(&["sh", "-c", "tty; exit 5"]);
        s["process"]["terminal"] = json!(true);
        check("create", self.create(&id, &s, true).await)?;
        check("start", self.start(&id).await)?;
        let out = self.read_until(&id, "", "/dev/").await?;
        let status = self.wait(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(
            out.contains("/dev/pts/0") || out.contains("/dev/console"),
            || format!("tty said {out:?}"),
        )?;
        ensure(status == 5, || format!("status {status}"))
    }

    async fn spec_features(&self) -> CaseResult {
        let id = self.id("features");
        let script = "id; echo cwd=$(pwd); echo env=$GREETING; echo nofile=$(ulimit -n); \
             touch /rootfs-write 2>&1 | grep -o 'Read-only file system'; \
             echo masked=$(wc -c < /proc/version); \
             echo forward=$(cat /proc/sys/net/ipv4/ip_forward); \
             mkdir /tmp/blocked 2>&1 | grep -o 'Operation not permitted'; \
             grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; \
             ls /data/busybox";
        let mut s = spec(&["sh", "-c", script]);
        s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20]});
        s["process"]["cwd"] = json!("/tmp");
        s["process"]["env"] = json!(["PATH=/bin", "GREETING=hi"]);
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 777, "soft": 777}]);
        s["linux"]["sysctl"] = json!({"net.ipv4.ip_forward": "1"});
        s["linux"]["maskedPaths"]
            .as_array_mut()
            .ok_or("spec maskedPaths")?
            .push(json!("/proc/version"));
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        });
        s["mounts"].as_array_mut().ok_or("spec mounts")?.push(
            json!({"destination": "/data", "type": "bind",
                         "source": format!("{}/bin", self.target.rootfs),
                         "options": ["rbind", "ro"]}),
        );
        let done = self.run(&id, &s).await?;
        let out = &done.stdout;
        for want in [
            "uid=1000 gid=1000 groups=10,20",
            "cwd=/tmp",
            "env=hi",
            "nofile=777",
            "Read-only file system",
            "masked=0",
            "forward=1",
            "Operation not permitted",
            "CapEff:\t0000000000000000",
            "NoNewPrivs:\t1",
            "/data/busybox",
        ] {
            ensure(out.contains(want), || {
                format!("{want:?} missing from {out:?} (stderr {:?})", done.stderr)
            })?;
        }
        Ok(())
    }

    async fn agent_mounts(&self) -> CaseResult {
        // A volume the agent mounts before the container (as the shim does
        // for storage it attached), bind-mounted into the container by the
        // spec, and unmounted when the container is removed.
        let id = self.id("volume");
        let volume = format!("{}/volumes/{id}", self.target.state_dir);
        let mut s = spec(&[
            "sh",
            "-c",
            "echo data > /vol/file && cat /vol/file && grep -c ' /vol ' /proc/mounts",
        ]);
        s["mounts"]
            .as_array_mut()
            .ok_or("spec mounts")?
            .push(json!({
                "destination": "/vol", "type": "bind", "source": volume, "options": ["rbind", "rw"]
            }));
        let create = self
            .client
            .create_container(
                ctx(),
                &CreateContainerRequest {
                    container_id: id.clone(),
                    oci_spec_json: s.to_string().into_bytes(),
                    rootfs: Some(self.rootfs()).into(),
                    mounts: vec![Mount {
                        source: "tmpfs".into(),
                        destination: volume.clone(),
                        fstype: "tmpfs".into(),
                        options: vec!["size=1m".into(), "mode=0755".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
            .await;
        check("create with a volume", create)?;
        check("start", self.start(&id).await)?;
        let done = self.finish(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(done.stdout == "data\n1\n", || format!("volume: {done:?}"))?;
        expect_error(
            "a relative mount destination",
            self.client
                .create_container(
                    ctx(),
                    &CreateContainerRequest {
                        container_id: self.id("relvol"),
                        oci_spec_json: spec(&["true"]).to_string().into_bytes(),
                        rootfs: Some(self.rootfs()).into(),
                        mounts: vec![Mount {
                            source: "tmpfs".into(),
                            destination: "volumes/x".into(),
                            fstype: "tmpfs".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )
                .await,
            Code::INVALID_ARGUMENT,
            "volumes/x",
        )
    }

    async fn pod_shares_namespaces(&self) -> CaseResult {
        // A pod's containers join the first one's network, IPC and UTS
        // namespaces by path, as CRI asks for the sandbox's.
        let sandbox = self.id("sandbox");
        check(
            "create",
            self.create(&sandbox, &spec(&["sleep", "1000"]), false)
                .await,
        )?;
        check("start", self.start(&sandbox).await)?;
        let listed = check("list processes", self.list(&sandbox).await)?;
        let pid = *listed.pids.first().ok_or("the sandbox has no process")?;
        let show =
            "for n in net ipc uts pid; do echo $n=$(readlink /proc/self/ns/$n); done; hostname";
        check(
            "exec",
            self.exec(&sandbox, "show", &process(&["sh", "-c", show]), false)
                .await,
        )?;
        let inside = self.finish(&sandbox, "show").await?;
        let member = self.id("member");
        let mut s = spec(&["sh", "-c", show]);
        s["linux"]["namespaces"] = json!([
            {"type": "pid"}, {"type": "mount"}, {"type": "cgroup"},
            {"type": "network", "path": format!("/proc/{pid}/ns/net")},
            {"type": "ipc", "path": format!("/proc/{pid}/ns/ipc")},
            {"type": "uts", "path": format!("/proc/{pid}/ns/uts")}
        ]);
        s.as_object_mut().ok_or("spec")?.remove("hostname");
        let joined = self.run(&member, &s).await;
        check("remove", self.remove(&sandbox).await)?;
        let joined = joined?;
        let line = |out: &str, key: &str| {
            out.lines()
                .find(|l| l.starts_with(key))
                .map(str::to_string)
                .unwrap_or_default()
        };
        for ns in ["net=", "ipc=", "uts="] {
            ensure(
                !line(&inside.stdout, ns).is_empty()
                    && line(&inside.stdout, ns) == line(&joined.stdout, ns),
                || {
                    format!(
                        "{ns} differs: sandbox {:?}, member {:?}",
                        inside.stdout, joined.stdout
                    )
                },
            )?;
        }
        ensure(
            line(&inside.stdout, "pid=") != line(&joined.stdout, "pid="),
            || "the member shares the sandbox's PID namespace without asking".into(),
        )?;
        ensure(joined.stdout.trim_end().ends_with("moat-ctr"), || {
            format!(
                "the member does not have the sandbox's hostname: {:?}",
                joined.stdout
            )
        })
    }

    async fn device_rules(&self) -> CaseResult {
        // With CAP_MKNOD a container can make any device node; the device
        // cgroup (an eBPF program on v2) decides which it may open.
        let script = "mknod /dev/kmsg2 c 1 11; head -c 1 /dev/kmsg2 2>&1 | grep -o 'Operation not permitted'; \
                      mknod /dev/null2 c 1 3; echo x > /dev/null2 && echo null-ok; \
                      (echo 1 > /proc/sys/kernel/domainname) 2>&1 | grep -o 'Read-only file system'";
        let mut s = spec(&["sh", "-c", script]);
        let caps = json!(["CAP_MKNOD", "CAP_KILL"]);
        s["process"]["capabilities"] =
            json!({"bounding": caps, "effective": caps, "permitted": caps});
        let done = self.run(&self.id("devices"), &s).await?;
        ensure(
            done.stdout.contains("Operation not permitted") && done.stdout.contains("null-ok"),
            || format!("device rules not applied: {done:?}"),
        )?;
        // readonlyPaths: /proc/sys is read-only even for root.
        ensure(done.stdout.contains("Read-only file system"), || {
            format!("/proc/sys was writable: {done:?}")
        })
    }

    async fn pause_and_resume(&self) -> CaseResult {
        let id = self.id("pause");
        let s = spec(&["sh", "-c", "while true; do echo tick; sleep 0.05; done"]);
        check("create", self.create(&id, &s, false).await)?;
        check("start", self.start(&id).await)?;
        check("first output", self.read_once(&id, "", false).await)?;
        check("pause", self.pause(&id).await)?;
        // Drain what was written before the freeze, then expect silence.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ =
            tokio::time::timeout(Duration::from_millis(200), self.read_once(&id, "", false)).await;
        let silent =
            tokio::time::timeout(Duration::from_millis(700), self.read_once(&id, "", false))
                .await
                .is_err();
        check("resume", self.resume(&id).await)?;
        let after =
            tokio::time::timeout(Duration::from_secs(5), self.read_once(&id, "", false)).await;
        check("remove", self.remove(&id).await)?;
        ensure(silent, || "output went on while paused".into())?;
        ensure(matches!(after, Ok(Ok(ref d)) if !d.is_empty()), || {
            format!("no output after resume: {after:?}")
        })
    }

    async fn stats_and_update(&self) -> CaseResult {
        let id = self.id("stats");
        let s = spec(&[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo busy-done; sleep 1000",
        ]);
        check("create", self.create(&id, &s, false).await)?;
        check("start", self.start(&id).await)?;
        self.read_until(&id, "", "busy-done").await?;
        let before = self.stats(&id).await?;
        check(
            "update",
            self.update(
                &id,
                &json!({"pids": {"limit": 20}, "memory": {"limit": 268435456}}),
            )
            .await,
        )?;
        let after = self.stats(&id).await?;
        expect_error(
            "update with malformed resources",
            self.update(&id, &json!({"pids": {"limit": "many"}})).await,
            Code::INVALID_ARGUMENT,
            "OCI resources",
        )?;
        check("remove", self.remove(&id).await)?;
        let cpu = before.cpu.as_ref().map(|c| c.usage_usec).unwrap_or(0);
        let memory = before.memory.as_ref().map(|m| m.current).unwrap_or(0);
        let pids = before.pids.as_ref().map(|p| p.current).unwrap_or(0);
        ensure(cpu > 1000, || {
            format!("cpu usage {cpu} us after a busy loop")
        })?;
        ensure(memory > 4096, || format!("memory.current {memory}"))?;
        ensure(pids >= 1, || format!("pids.current {pids}"))?;
        let pids_max = after.pids.as_ref().map(|p| p.max).unwrap_or(0);
        let memory_max = after.memory.as_ref().map(|m| m.max).unwrap_or(0);
        ensure(pids_max == 20, || {
            format!("pids.max {pids_max} after update")
        })?;
        ensure(memory_max == 268435456, || {
            format!("memory limit {memory_max} after update")
        })
    }

    async fn limits_v2(&self) -> CaseResult {
        // cpu: 10% of one CPU, then a busy loop must be throttled.
        let id = self.id("cpulimit");
        let mut s = spec(&[
            "sh",
            "-c",
            "i=0; while [ $i -lt 5000 ]; do i=$((i+1)); done; echo spun; sleep 1000",
        ]);
        s["linux"]["resources"]["cpu"] = json!({"quota": 10000, "period": 100000});
        s["linux"]["resources"]["pids"] = json!({"limit": 8});
        check("create", self.create(&id, &s, false).await)?;
        check("start", self.start(&id).await)?;
        self.read_until(&id, "", "spun").await?;
        let stats = self.stats(&id).await?;
        let forks =
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 30 </dev/null >/dev/null 2>&1 & done; \
                     echo pids=$(cat /sys/fs/cgroup/pids.current)";
        check(
            "exec",
            self.exec(&id, "forks", &process(&["sh", "-c", forks]), false)
                .await,
        )?;
        let done = self.finish(&id, "forks").await?;
        check("remove", self.remove(&id).await)?;
        let throttled = stats.cpu.as_ref().map(|c| c.nr_throttled).unwrap_or(0);
        ensure(throttled > 0, || {
            format!("no throttled periods under a 10% quota: {stats:?}")
        })?;
        let pids_max = stats.pids.as_ref().map(|p| p.max).unwrap_or(0);
        ensure(pids_max == 8, || format!("pids.max {pids_max}"))?;
        ensure(
            done.stdout.contains("can't fork") || done.stderr.contains("can't fork"),
            || format!("12 forks under pids.max 8 all succeeded: {done:?}"),
        )
    }

    async fn oom_event(&self) -> CaseResult {
        let id = self.id("oom");
        // tail keeps the last line of a stream with no newline: all of it.
        let mut s = spec(&["sh", "-c", "sleep 0.3; exec tail /dev/zero"]);
        s["linux"]["resources"]["memory"] = json!({"limit": 33554432, "swap": 33554432});
        let events = self.target.connector.client()?;
        let waiter = tokio::spawn(async move {
            events
                .get_oom_event(
                    ttrpc::context::with_timeout(60_000_000_000),
                    &GetOomEventRequest::new(),
                )
                .await
        });
        check("create", self.create(&id, &s, false).await)?;
        check("start", self.start(&id).await)?;
        let done = self.finish(&id, "").await;
        let event = tokio::time::timeout(Duration::from_secs(30), waiter).await;
        let stats = self.stats(&id).await;
        check("remove", self.remove(&id).await)?;
        let done = done?;
        let event = match event {
            Ok(Ok(Ok(event))) => event,
            other => return Err(format!("no OOM event: {other:?} (container: {done:?})")),
        };
        ensure(event.container_id == id, || {
            format!("OOM event for {:?}", event.container_id)
        })?;
        ensure(done.status == 137, || {
            format!("the allocation was not OOM-killed: {done:?}")
        })?;
        let kills = stats?.memory.as_ref().map(|m| m.oom_kills).unwrap_or(0);
        ensure(kills >= 1, || format!("memory.events oom_kill {kills}"))
    }

    async fn guest_clock(&self) -> CaseResult {
        let target = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs() as i64
            + 86_400 * 365;
        check(
            "set time",
            self.client
                .set_guest_date_time(
                    ctx(),
                    &SetGuestDateTimeRequest {
                        seconds: target,
                        ..Default::default()
                    },
                )
                .await,
        )?;
        let done = self.run(&self.id("clock"), &spec(&["date", "+%s"])).await?;
        let seen: i64 = done.stdout.trim().parse().unwrap_or(0);
        ensure((target..target + 60).contains(&seen), || {
            format!("container sees {seen}, set {target}")
        })
    }

    async fn guest_network_and_dns(&self) -> CaseResult {
        let iface = check(
            "update interface",
            self.client
                .update_interface(
                    ctx(),
                    &UpdateInterfaceRequest {
                        interface: Some(Interface {
                            device: "lo".into(),
                            addresses: vec!["10.213.0.1/32".into()],
                            mtu: 65000,
                            ..Default::default()
                        })
                        .into(),
                        ..Default::default()
                    },
                )
                .await,
        )?;
        ensure(iface.device == "lo", || format!("interface {iface:?}"))?;
        check(
            "update routes",
            self.client
                .update_routes(
                    ctx(),
                    &UpdateRoutesRequest {
                        routes: vec![Route {
                            destination: "10.214.0.0/16".into(),
                            device: "lo".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )
                .await,
        )?;
        check(
            "set dns",
            self.client
                .set_dns(
                    ctx(),
                    &SetDnsRequest {
                        nameservers: vec!["10.96.0.10".into()],
                        searches: vec!["default.svc.cluster.local".into()],
                        options: vec!["ndots:5".into()],
                        ..Default::default()
                    },
                )
                .await,
        )?;
        expect_error(
            "an interface that is not there",
            self.client
                .update_interface(
                    ctx(),
                    &UpdateInterfaceRequest {
                        interface: Some(Interface {
                            device: "nosuch0".into(),
                            ..Default::default()
                        })
                        .into(),
                        ..Default::default()
                    },
                )
                .await,
            Code::NOT_FOUND,
            "nosuch0",
        )?;
        expect_error(
            "a malformed address",
            self.client
                .update_interface(
                    ctx(),
                    &UpdateInterfaceRequest {
                        interface: Some(Interface {
                            device: "lo".into(),
                            addresses: vec!["10.0.0.300/8".into()],
                            ..Default::default()
                        })
                        .into(),
                        ..Default::default()
                    },
                )
                .await,
            Code::INVALID_ARGUMENT,
            "10.0.0.300/8",
        )?;
        expect_error(
            "a malformed nameserver",
            self.client
                .set_dns(
                    ctx(),
                    &SetDnsRequest {
                        nameservers: vec!["dns.example".into()],
                        ..Default::default()
                    },
                )
                .await,
            Code::INVALID_ARGUMENT,
            "dns.example",
        )?;
        // A container in the agent's network namespace sees the address and
        // route; every container gets the DNS file by a bind mount.
        let mut s = spec(&[
            "sh",
            "-c",
            "ip addr show lo; ip route; cat /sys/class/net/lo/mtu; cat /etc/resolv.conf",
        ]);
        s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]);
        // Without a UTS namespace of its own it keeps the agent's hostname.
        s.as_object_mut().ok_or("spec")?.remove("hostname");
        s["mounts"]
            .as_array_mut()
            .ok_or("spec mounts")?
            .push(json!({
                "destination": "/etc/resolv.conf", "type": "bind",
                "source": format!("{}/resolv.conf", self.target.state_dir),
                "options": ["rbind", "ro"]
            }));
        let done = self.run(&self.id("net"), &s).await?;
        for want in [
            "10.213.0.1/32",
            "10.214.0.0/16 dev lo",
            "65000",
            "nameserver 10.96.0.10",
            "search default.svc.cluster.local",
            "options ndots:5",
        ] {
            ensure(done.stdout.contains(want), || {
                format!(
                    "{want:?} missing from {:?} ({:?})",
                    done.stdout, done.stderr
                )
            })?;
        }
        Ok(())
    }

    async fn bad_input(&self) -> CaseResult {
        let ghost = self.id("ghost");
        let not_found = |what: &str, r: ttrpc::Result<Empty>| {
            expect_error(what, r, Code::NOT_FOUND, &format!("{ghost:?}"))
        };
        not_found("start unknown", self.start(&ghost).await)?;
        not_found("remove unknown", self.remove(&ghost).await)?;
        not_found("signal unknown", self.signal(&ghost, "", 9, false).await)?;
        not_found(
            "exec unknown",
            self.exec(&ghost, "e", &process(&["true"]), false).await,
        )?;
        not_found("update unknown", self.update(&ghost, &json!({})).await)?;
        expect_error(
            "wait unknown",
            self.wait_process(&ghost, "").await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        expect_error(
            "stats unknown",
            self.stats_raw(&ghost).await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        expect_error(
            "malformed spec",
            self.client
                .create_container(
                    ctx(),
                    &CreateContainerRequest {
                        container_id: self.id("bad"),
                        oci_spec_json: b"{\"ociVersion\": 1.0, \"process\": }".to_vec(),
                        rootfs: Some(self.rootfs()).into(),
                        ..Default::default()
                    },
                )
                .await,
            Code::INVALID_ARGUMENT,
            "invalid OCI spec",
        )?;
        expect_error(
            "bad container ID",
            self.create("../escape", &spec(&["true"]), false).await,
            Code::INVALID_ARGUMENT,
            "container ID",
        )?;
        expect_error(
            "missing binary",
            self.create(&self.id("nobin"), &spec(&["/no/such/binary"]), false)
                .await,
            Code::INTERNAL,
            "no/such/binary",
        )?;
        // The failed creates left nothing behind: the IDs are free again.
        let dup = self.id("dup");
        check(
            "create",
            self.create(&dup, &spec(&["sleep", "1000"]), false).await,
        )?;
        expect_error(
            "duplicate ID",
            self.create(&dup, &spec(&["true"]), false).await,
            Code::ALREADY_EXISTS,
            &dup,
        )?;
        check("start", self.start(&dup).await)?;
        expect_error(
            "start twice",
            self.start(&dup).await,
            Code::FAILED_PRECONDITION,
            "is Running",
        )?;
        check(
            "exec",
            self.exec(&dup, "e1", &process(&["sleep", "1000"]), false)
                .await,
        )?;
        expect_error(
            "duplicate exec ID",
            self.exec(&dup, "e1", &process(&["true"]), false).await,
            Code::ALREADY_EXISTS,
            "e1",
        )?;
        expect_error(
            "malformed process",
            self.exec(&dup, "e2", &json!({"args": "not-a-list"}), false)
                .await,
            Code::INVALID_ARGUMENT,
            "OCI process",
        )?;
        expect_error(
            "unknown exec",
            self.signal(&dup, "nosuch", 9, false).await,
            Code::NOT_FOUND,
            "nosuch",
        )?;
        // A field this agent does not know is refused, not ignored.
        let mut req = StartContainerRequest {
            container_id: dup.clone(),
            ..Default::default()
        };
        req.mut_unknown_fields().add_varint(99, 1);
        expect_error(
            "unknown field",
            self.client.start_container(ctx(), &req).await,
            Code::INVALID_ARGUMENT,
            "unknown field number(s) [99]",
        )?;
        // An unknown method.
        let raw = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(
            tokio::net::UnixStream::from_std({
                let s = self.target.connector.stream()?;
                s.set_nonblocking(true).map_err(|e| e.to_string())?;
                s
            })
            .map_err(|e| e.to_string())?,
        ));
        let mut request = ttrpc::Request::new();
        request.service = "moat.agent.v1.AgentService".into();
        request.method = "LaunchMissiles".into();
        request.timeout_nano = 10_000_000_000;
        expect_error(
            "unknown method",
            raw.request(request).await,
            Code::UNIMPLEMENTED,
            "LaunchMissiles",
        )?;
        self.oversized_message().await?;
        self.disconnect_mid_read(&dup).await?;
        // After all that, the container still answers.
        check(
            "signal after bad input",
            self.signal(&dup, "", 9, true).await,
        )?;
        let status = self.wait(&dup, "").await?;
        ensure(status == 137, || format!("status {status}"))?;
        check("remove", self.remove(&dup).await)?;
        Ok(())
    }

    /// The failure paths of the calls `bad_input` does not reach.
    async fn failure_paths(&self) -> CaseResult {
        let ghost = self.id("ghost2");
        let c = &self.client;
        expect_error(
            "pause unknown",
            self.pause(&ghost).await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        expect_error(
            "resume unknown",
            self.resume(&ghost).await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        expect_error(
            "list unknown",
            self.list(&ghost).await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        expect_error(
            "close stdin unknown",
            self.close_stdin(&ghost, "").await,
            Code::NOT_FOUND,
            &ghost,
        )?;
        let stream = OutputStreamRequest {
            container_id: ghost.clone(),
            ..Default::default()
        };
        let outcome = match c.output_stream(ctx(), &stream).await {
            Ok(mut receiver) => receiver.recv().await.map(|_| Empty::new()),
            Err(e) => Err(e),
        };
        expect_error("output stream of unknown", outcome, Code::NOT_FOUND, &ghost)?;
        let time = SetGuestDateTimeRequest {
            seconds: 1,
            nanos: 2_000_000_000,
            ..Default::default()
        };
        expect_error(
            "set time with bad nanos",
            c.set_guest_date_time(ctx(), &time).await,
            Code::INVALID_ARGUMENT,
            "2000000000",
        )?;
        let routes = UpdateRoutesRequest {
            routes: vec![Route {
                destination: "10.215.0.0/16".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        expect_error(
            "route without gateway or device",
            c.update_routes(ctx(), &routes).await,
            Code::INVALID_ARGUMENT,
            "10.215.0.0/16",
        )?;

        let id = self.id("states");
        check("create", self.create(&id, &spec(&["cat"]), false).await)?;
        expect_error(
            "resume a created container",
            self.resume(&id).await,
            Code::FAILED_PRECONDITION,
            &id,
        )?;
        check("start", self.start(&id).await)?;
        check("close stdin", self.close_stdin(&id, "").await)?;
        expect_error(
            "write after close",
            self.write_stdin(&id, "", b"late").await,
            Code::FAILED_PRECONDITION,
            "closed",
        )?;
        let read = ReadStreamRequest {
            container_id: id.clone(),
            exec_id: "nosuch".into(),
            max_len: 10,
            ..Default::default()
        };
        expect_error(
            "read unknown exec",
            c.read_stdout(ctx(), &read).await,
            Code::NOT_FOUND,
            "nosuch",
        )?;
        let status = self.wait(&id, "").await?;
        check("remove", self.remove(&id).await)?;
        ensure(status == 0, || format!("cat after stdin closed: {status}"))
    }

    /// A 5 MiB frame (over ttrpc's 4 MiB limit) gets an error and the
    /// agent keeps serving.
    async fn oversized_message(&self) -> CaseResult {
        use std::io::{Read, Write};
        let mut stream = self.target.connector.stream()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let len: u32 = 5 << 20;
        let mut header = Vec::new();
        header.extend_from_slice(&len.to_be_bytes());
        header.extend_from_slice(&1u32.to_be_bytes());
        header.extend_from_slice(&[1, 0]);
        let body = vec![0u8; len as usize];
        let writer = {
            let mut w = stream.try_clone().map_err(|e| e.to_string())?;
            std::thread::spawn(move || {
                let _ = w.write_all(&header);
                let _ = w.write_all(&body);
            })
        };
        let mut reply = [0u8; 10];
        let answered = stream.read_exact(&mut reply);
        let _ = writer.join();
        let mut rest =
            vec![0u8; u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize];
        if answered.is_ok() && rest.len() < 4096 {
            let _ = stream.read_exact(&mut rest);
        }
        let text = String::from_utf8_lossy(&rest);
        ensure(answered.is_ok() && text.contains("exceed"), || {
            format!("oversized frame answered {answered:?} {text:?}")
        })?;
        let health = check(
            "check after oversize",
            self.client.check(ctx(), &CheckRequest::new()).await,
        )?;
        ensure(health.serving, || {
            "not serving after an oversized message".into()
        })
    }

    /// A client that drops its connection during a long read leaves the
    /// process and the agent as they were.
    async fn disconnect_mid_read(&self, id: &str) -> CaseResult {
        let other = self.target.connector.client()?;
        let req = ReadStreamRequest {
            container_id: id.into(),
            max_len: 100,
            ..Default::default()
        };
        let pending = tokio::spawn(async move { other.read_stdout(ctx(), &req).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        pending.abort();
        let _ = pending.await;
        let streaming = self.target.connector.client()?;
        let stream_req = OutputStreamRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let stream = check(
            "open stream",
            streaming.output_stream(ctx(), &stream_req).await,
        )?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(stream);
        drop(streaming);
        let health = check(
            "check after disconnect",
            self.client.check(ctx(), &CheckRequest::new()).await,
        )?;
        ensure(health.serving, || "not serving".into())
    }

    async fn many_containers(&self) -> CaseResult {
        for i in 0..50 {
            let id = self.id(&format!("many{i}"));
            let done = self.run(&id, &spec(&["sh", "-c", "exit 7"])).await?;
            ensure(done.status == 7, || format!("{id}: status {}", done.status))?;
        }
        Ok(())
    }

    async fn health(&self) -> Result<CheckResponse, String> {
        check(
            "check",
            self.client.check(ctx(), &CheckRequest::new()).await,
        )
    }

    async fn delete_process(&self, id: &str, exec_id: &str) -> ttrpc::Result<Empty> {
        self.client
            .delete_process(
                ctx(),
                &DeleteProcessRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    /// DeleteProcess frees an exec's pipes and exit record, refuses a
    /// running exec, and frees the exec ID; the agent holds more than
    /// the default 1,024 descriptors (its raised RLIMIT_NOFILE), while a
    /// container without an RLIMIT_NOFILE in its spec still gets the
    /// limit the agent started with.
    async fn exec_delete_frees(&self) -> CaseResult {
        let id = self.id("execdel");
        let mut s = spec(&["sleep", "1000"]);
        s["process"]["rlimits"] = json!([]);
        check("create", self.create(&id, &s, false).await)?;
        let result = async {
            check("start", self.start(&id).await)?;
            let before = self.health().await?;

            let limit = self
                .finish_exec(&id, "limit", &["sh", "-c", "ulimit -n; ulimit -Hn"])
                .await?;
            // In the guest the agent started with the kernel's 1024/4096;
            // on the host it inherited this process's limit.
            let want = if self.target.guest {
                "1024\n4096\n".to_string()
            } else {
                let mut own = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit with a valid rlimit pointer.
                unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) };
                format!("{}\n{}\n", own.rlim_cur, own.rlim_max)
            };
            ensure(limit.stdout == want, || {
                format!(
                    "a container without RLIMIT_NOFILE sees {:?}, want the agent's original {want:?}",
                    limit.stdout
                )
            })?;
            check("delete limit", self.delete_process(&id, "limit").await)?;

            // A running exec is refused, an exited one goes, twice is
            // NOT_FOUND, and the ID can be used again.
            check(
                "exec sleeper",
                self.exec(&id, "sleeper", &process(&["sleep", "1000"]), false)
                    .await,
            )?;
            expect_error(
                "delete a running exec",
                self.delete_process(&id, "sleeper").await,
                Code::FAILED_PRECONDITION,
                "still running",
            )?;
            check("SIGKILL sleeper", self.signal(&id, "sleeper", 9, false).await)?;
            let status = self.wait(&id, "sleeper").await?;
            ensure(status == 137, || format!("sleeper status {status}"))?;
            check("delete sleeper", self.delete_process(&id, "sleeper").await)?;
            expect_error(
                "delete it twice",
                self.delete_process(&id, "sleeper").await,
                Code::NOT_FOUND,
                "sleeper",
            )?;
            expect_error(
                "wait on a deleted exec",
                self.wait_process(&id, "sleeper").await,
                Code::NOT_FOUND,
                "sleeper",
            )?;
            expect_error(
                "delete the init",
                self.delete_process(&id, "").await,
                Code::INVALID_ARGUMENT,
                "RemoveContainer",
            )?;
            let again = self
                .finish_exec(&id, "sleeper", &["echo", "again"])
                .await?;
            ensure(again.stdout == "again\n", || {
                format!("reused exec ID printed {:?}", again.stdout)
            })?;
            check("delete reused", self.delete_process(&id, "sleeper").await)?;

            // More execs held at once than 1,024 descriptors allow (three
            // pipes each), then all deleted: the descriptors come back.
            for i in 0..EXECS_HELD {
                let exec_id = format!("held{i}");
                let done = self
                    .finish_exec(&id, &exec_id, &["true"])
                    .await
                    .map_err(|e| format!("exec {i} of {EXECS_HELD} held: {e}"))?;
                ensure(done.status == 0, || format!("{exec_id}: status {}", done.status))?;
            }
            let held = self.health().await?;
            ensure(held.open_fds >= before.open_fds + 3 * EXECS_HELD, || {
                format!(
                    "{EXECS_HELD} exited execs held {} descriptors, {} before: each should still hold its pipes",
                    held.open_fds, before.open_fds
                )
            })?;
            for i in 0..EXECS_HELD {
                check("delete held", self.delete_process(&id, &format!("held{i}")).await)?;
            }
            let after = self.health().await?;
            ensure(after.open_fds <= before.open_fds + 4, || {
                format!(
                    "after deleting every exec the agent holds {} descriptors, {} before",
                    after.open_fds, before.open_fds
                )
            })?;
            ensure(after.watched_processes <= before.watched_processes, || {
                format!(
                    "{} processes watched after, {} before",
                    after.watched_processes, before.watched_processes
                )
            })
        }
        .await;
        let removed = check("remove", self.remove(&id).await);
        result?;
        removed.map(drop)
    }

    /// Runs an exec to its end and returns what it printed and its status.
    async fn finish_exec(
        &self,
        id: &str,
        exec_id: &str,
        args: &[&str],
    ) -> Result<Finished, String> {
        check(
            &format!("exec {exec_id}"),
            self.exec(id, exec_id, &process(args), false).await,
        )?;
        self.finish(id, exec_id).await
    }

    /// Runs every case that applies to the target, in order.
    pub async fn run_all(&self, only: Option<&str>) -> Vec<Outcome> {
        let mut cases: Vec<(&'static str, CaseFuture<'_>)> = vec![
            ("health_and_version", Box::pin(self.health_and_version())),
            (
                "exit_code_and_output",
                Box::pin(self.exit_code_and_output()),
            ),
            ("stdin_round_trip", Box::pin(self.stdin_round_trip())),
            ("stdio_streams", Box::pin(self.stdio_streams())),
            ("signals", Box::pin(self.signals())),
            (
                "exec_sees_the_container",
                Box::pin(self.exec_sees_the_container()),
            ),
            ("tty_exec_resize", Box::pin(self.tty_exec_resize())),
            ("tty_init", Box::pin(self.tty_init())),
            ("spec_features", Box::pin(self.spec_features())),
            ("agent_mounts", Box::pin(self.agent_mounts())),
            ("device_rules", Box::pin(self.device_rules())),
            (
                "pod_shares_namespaces",
                Box::pin(self.pod_shares_namespaces()),
            ),
            ("pause_and_resume", Box::pin(self.pause_and_resume())),
            ("stats_and_update", Box::pin(self.stats_and_update())),
            ("bad_input", Box::pin(self.bad_input())),
            ("failure_paths", Box::pin(self.failure_paths())),
            ("network_and_dns", Box::pin(self.guest_network_and_dns())),
            ("many_containers", Box::pin(self.many_containers())),
            ("exec_delete_frees", Box::pin(self.exec_delete_frees())),
        ];
        if self.target.cgroup_v2 {
            cases.push(("limits_v2", Box::pin(self.limits_v2())));
            cases.push(("oom_event", Box::pin(self.oom_event())));
        }
        if self.target.guest {
            cases.push(("guest_clock", Box::pin(self.guest_clock())));
        }
        let mut outcomes = Vec::new();
        for (name, case) in cases {
            if only.is_some_and(|o| !name.contains(o)) {
                continue;
            }
            let start = Instant::now();
            let result = case.await;
            outcomes.push(Outcome {
                name,
                result,
                elapsed: start.elapsed(),
            });
        }
        outcomes
    }
}
