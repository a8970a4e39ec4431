//! agent-check: waits for the agent in a VM to answer a health check
//! through the VM's hybrid vsock socket, the way the shim will reach it,
//! and reports how long that took from its own start.
//!
//!   agent-check UDS PORT TIMEOUT_SECS

use std::process::ExitCode;
use std::time::{Duration, Instant};

use moat_protocol::agent::{CheckRequest, VersionRequest};
use moat_protocol::agent_ttrpc::AgentServiceClient;

/// One attempt: connect and ask for health and version.
async fn check_once(uds: &str, port: u32) -> Result<u32, String> {
    let stream = moat_tests::af_vsock::connect_hybrid(uds, port)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| format!("connect: {e}"))?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let client = AgentServiceClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::from(stream),
    ));
    let ctx = || ttrpc::context::with_timeout(5_000_000_000);
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
    Ok(version.api_version)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(uds), Some(Ok(port)), Some(Ok(timeout))) = (
        args.first(),
        args.get(1).map(|p| p.parse::<u32>()),
        args.get(2).map(|t| t.parse::<u64>()),
    ) else {
        eprintln!("usage: agent-check UDS PORT TIMEOUT_SECS");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-check: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let deadline = start + Duration::from_secs(timeout);
    let mut last_error = String::from("no attempt");
    while Instant::now() < deadline {
        match runtime.block_on(check_once(uds, port)) {
            Ok(api) => {
                println!(
                    "agent ready: health check ok after {} ms (api version {api})",
                    start.elapsed().as_millis()
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => last_error = e,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("agent-check: no healthy agent within {timeout} s: {last_error}");
    ExitCode::FAILURE
}
