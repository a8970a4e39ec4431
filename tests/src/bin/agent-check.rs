//! agent-check: waits for the agent in a VM to answer a health check
//! through the VM's hybrid vsock socket, the way the shim will reach it,
//! and reports how long that took from its own start.
//!
//!   agent-check UDS PORT TIMEOUT_SECS

use std::process::ExitCode;
use std::time::{Duration, Instant};

/// One attempt: connect and ask for health and version, as the shim does.
async fn check_once(uds: &str, port: u32) -> Result<u32, String> {
    moat_shim::sandbox::check_agent(std::path::Path::new(uds), port)
        .await
        .map(|(_, api)| api)
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
