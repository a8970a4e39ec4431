//! The AgentService the agent serves: it checks each request (no
//! unknown fields, valid IDs) and maps it onto the [`Engine`] and the
//! [`guest`](crate::guest) settings, turning errors into ttrpc statuses
//! whose message names what was wrong.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use moat_protocol::agent::*;
use moat_protocol::agent_ttrpc::AgentService;
use moat_protocol::API_VERSION;
use ttrpc::r#async::{ServerStreamSender, TtrpcContext};
use ttrpc::Code;

use crate::engine::{Engine, EngineError, MountRequest};
use crate::guest::{self, GuestError};

/// The most an OutputStream message carries.
const STREAM_CHUNK: usize = 256 * 1024;
/// How long an OutputStream stays silent before a keep-alive.
const STREAM_KEEPALIVE: Duration = Duration::from_secs(30);

/// The agent's service state.
#[derive(Debug)]
pub struct Agent {
    engine: Arc<Engine>,
    guest: guest::GuestConfig,
}

impl Agent {
    /// A service over `engine`, writing guest settings per `guest`.
    pub fn new(engine: Arc<Engine>, guest: guest::GuestConfig) -> Agent {
        Agent { engine, guest }
    }
}

fn status(code: Code, message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

impl From<EngineError> for ttrpc::Error {
    fn from(e: EngineError) -> ttrpc::Error {
        let code = match &e {
            EngineError::NotFound(_) | EngineError::ProcessNotFound { .. } => Code::NOT_FOUND,
            EngineError::AlreadyExists(_) | EngineError::ProcessExists { .. } => {
                Code::ALREADY_EXISTS
            }
            EngineError::Invalid { .. } => Code::INVALID_ARGUMENT,
            EngineError::Precondition(_) => Code::FAILED_PRECONDITION,
            EngineError::Io { .. } | EngineError::Runtime(_) => Code::INTERNAL,
        };
        status(code, e.to_string())
    }
}

impl From<GuestError> for ttrpc::Error {
    fn from(e: GuestError) -> ttrpc::Error {
        let code = match &e {
            GuestError::Invalid { .. } => Code::INVALID_ARGUMENT,
            GuestError::NotFound(_) => Code::NOT_FOUND,
            GuestError::Io { .. } => Code::INTERNAL,
        };
        status(code, e.to_string())
    }
}

/// Refuses a message carrying fields this agent does not know: a newer
/// shim asking for something this agent would silently ignore.
pub fn known_fields(method: &str, message: &dyn protobuf::MessageDyn) -> ttrpc::Result<()> {
    let unknown: Vec<u32> = message
        .special_fields_dyn()
        .unknown_fields()
        .iter()
        .map(|(number, _)| number)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(status(
            Code::INVALID_ARGUMENT,
            format!(
                "{method}: unknown field number(s) {unknown:?} in {} (agent API version {API_VERSION})",
                message.descriptor_dyn().name()
            ),
        ))
    }
}

/// Runs a request's `work` on a task of its own and waits for it. The
/// ttrpc server drops a handler whose caller's deadline passes, and a
/// container's set-up or removal, or a NIC's configuration, dropped half
/// way leaves the guest in a state no later request expects; on its own
/// task the work runs to its end whoever stops waiting.
async fn to_completion<T: Send + 'static>(
    method: &str,
    work: impl std::future::Future<Output = ttrpc::Result<T>> + Send + 'static,
) -> ttrpc::Result<T> {
    tokio::spawn(work).await.map_err(|e| {
        status(
            Code::INTERNAL,
            format!("{method}: ended before it finished: {e}"),
        )
    })?
}

fn mount_request(m: &Mount) -> MountRequest {
    MountRequest {
        source: m.source.clone(),
        destination: m.destination.clone(),
        fstype: m.fstype.clone(),
        options: m.options.clone(),
    }
}

#[async_trait::async_trait]
impl AgentService for Agent {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        known_fields("Check", &req)?;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|entries| entries.count().saturating_sub(1))
            .unwrap_or(0);
        let (watched, unclaimed) = self.engine.reaper_counts();
        Ok(CheckResponse {
            serving: true,
            open_fds: u32::try_from(open_fds).unwrap_or(u32::MAX),
            watched_processes: u32::try_from(watched).unwrap_or(u32::MAX),
            unclaimed_exits: u32::try_from(unclaimed).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        known_fields("Version", &req)?;
        Ok(VersionResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("CreateContainer", &req)?;
        if let Some(rootfs) = req.rootfs.as_ref() {
            known_fields("CreateContainer", rootfs)?;
        }
        for m in &req.mounts {
            known_fields("CreateContainer", m)?;
        }
        let engine = self.engine.clone();
        to_completion("CreateContainer", async move {
            engine
                .create(
                    &req.container_id,
                    &req.oci_spec_json,
                    req.rootfs.as_ref().map(mount_request),
                    req.mounts.iter().map(mount_request).collect(),
                    req.terminal,
                )
                .await?;
            Ok(Empty::new())
        })
        .await
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("StartContainer", &req)?;
        let engine = self.engine.clone();
        to_completion("StartContainer", async move {
            engine.start(&req.container_id).await?;
            Ok(Empty::new())
        })
        .await
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("RemoveContainer", &req)?;
        let engine = self.engine.clone();
        to_completion("RemoveContainer", async move {
            engine
                .remove(
                    &req.container_id,
                    Duration::from_secs(req.timeout_secs.into()),
                )
                .await?;
            Ok(Empty::new())
        })
        .await
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("PauseContainer", &req)?;
        self.engine.pause(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("ResumeContainer", &req)?;
        self.engine.resume(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("ExecProcess", &req)?;
        let engine = self.engine.clone();
        to_completion("ExecProcess", async move {
            engine
                .exec(
                    &req.container_id,
                    &req.exec_id,
                    &req.oci_process_json,
                    req.terminal,
                )
                .await?;
            Ok(Empty::new())
        })
        .await
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("SignalProcess", &req)?;
        self.engine
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        known_fields("WaitProcess", &req)?;
        let exit = self.engine.wait(&req.container_id, &req.exec_id).await?;
        let at = exit
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(WaitProcessResponse {
            status: exit.status,
            exited_at_ns: at,
            ..Default::default()
        })
    }

    async fn delete_process(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteProcessRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("DeleteProcess", &req)?;
        self.engine.delete_exec(&req.container_id, &req.exec_id)?;
        Ok(Empty::new())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        known_fields("WriteStdin", &req)?;
        let len = self
            .engine
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await?;
        Ok(WriteStreamResponse {
            len: len as u32,
            ..Default::default()
        })
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        known_fields("ReadStdout", &req)?;
        let data = self
            .engine
            .read(&req.container_id, &req.exec_id, false, req.max_len as usize)
            .await?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        known_fields("ReadStderr", &req)?;
        let data = self
            .engine
            .read(&req.container_id, &req.exec_id, true, req.max_len as usize)
            .await?;
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("CloseStdin", &req)?;
        self.engine
            .close_stdin(&req.container_id, &req.exec_id)
            .await?;
        Ok(Empty::new())
    }

    async fn output_stream(
        &self,
        _ctx: &TtrpcContext,
        req: OutputStreamRequest,
        sender: ServerStreamSender<ReadStreamResponse>,
    ) -> ttrpc::Result<()> {
        known_fields("OutputStream", &req)?;
        loop {
            let read = self
                .engine
                .read(&req.container_id, &req.exec_id, req.stderr, STREAM_CHUNK);
            // ttrpc does not cancel a stream handler whose client went
            // away. While the process is silent, an empty keep-alive
            // message finds that out (its send fails). Reads are
            // cancel-safe: no data is taken until the read returns.
            let data = match tokio::time::timeout(STREAM_KEEPALIVE, read).await {
                Err(_silent) => Vec::new(),
                Ok(data) => {
                    let data = data?;
                    if data.is_empty() {
                        return Ok(());
                    }
                    data
                }
            };
            // A client that went away ends the stream here; the process
            // and its other streams are untouched.
            sender
                .send(&ReadStreamResponse {
                    data,
                    ..Default::default()
                })
                .await?;
        }
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("TtyWinResize", &req)?;
        self.engine
            .resize(&req.container_id, &req.exec_id, req.rows, req.columns)?;
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        known_fields("ListProcesses", &req)?;
        let pids = self.engine.pids(&req.container_id).await?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("UpdateContainer", &req)?;
        self.engine
            .update(&req.container_id, &req.oci_resources_json)
            .await?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        known_fields("StatsContainer", &req)?;
        let s = self.engine.stats(&req.container_id).await?;
        Ok(StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_periods: s.nr_periods,
                nr_throttled: s.nr_throttled,
                throttled_usec: s.throttled_usec,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                current: s.memory_current,
                max: s.memory_max,
                anon: s.memory_anon,
                file: s.memory_file,
                oom_kills: s.oom_kills,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: s.pids_current,
                max: s.pids_max,
                ..Default::default()
            })
            .into(),
            io: Some(IoStats {
                read_bytes: s.io_read_bytes,
                write_bytes: s.io_write_bytes,
                read_ios: s.io_read_ios,
                write_ios: s.io_write_ios,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        req: GetOomEventRequest,
    ) -> ttrpc::Result<OomEvent> {
        known_fields("GetOomEvent", &req)?;
        match self.engine.next_oom().await {
            Some(container_id) => Ok(OomEvent {
                container_id,
                ..Default::default()
            }),
            None => Err(status(
                Code::UNAVAILABLE,
                "GetOomEvent: the OOM watcher has stopped".to_string(),
            )),
        }
    }

    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        req: SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("SetGuestDateTime", &req)?;
        guest::set_time(req.seconds, req.nanos)?;
        Ok(Empty::new())
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<Interface> {
        known_fields("UpdateInterface", &req)?;
        let Some(interface) = req.interface.into_option() else {
            return Err(status(
                Code::INVALID_ARGUMENT,
                "UpdateInterface: no interface given".to_string(),
            ));
        };
        known_fields("UpdateInterface", &interface)?;
        to_completion("UpdateInterface", async move {
            Ok(guest::update_interface(&interface).await?)
        })
        .await
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Empty> {
        known_fields("UpdateRoutes", &req)?;
        for route in &req.routes {
            known_fields("UpdateRoutes", route)?;
        }
        to_completion("UpdateRoutes", async move {
            guest::update_routes(&req.routes).await?;
            Ok(Empty::new())
        })
        .await
    }

    async fn set_dns(&self, _ctx: &TtrpcContext, req: SetDnsRequest) -> ttrpc::Result<Empty> {
        known_fields("SetDns", &req)?;
        guest::set_dns(&self.guest, &req)?;
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_runs_on_when_its_caller_gives_up() {
        let (done, finished) = tokio::sync::oneshot::channel();
        let request = to_completion("RemoveContainer", async move {
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
}
