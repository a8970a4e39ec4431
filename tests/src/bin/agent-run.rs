//! agent-run: runs one container in a pod VM through its agent, the way
//! the shim will (hybrid vsock, agent API), streams its output and
//! returns its exit status.
//!
//!   agent-run UDS ROOTFS CMD [ARG...]
//!
//! ROOTFS is a directory inside the guest (the test image has a busybox
//! root at /busybox).

use std::io::Write;
use std::process::ExitCode;

use moat_protocol::agent::{
    CreateContainerRequest, Mount, OutputStreamRequest, RemoveContainerRequest,
    StartContainerRequest, WaitProcessRequest,
};
use moat_tests::agent_suite::{spec, Connector};

async fn run(uds: &str, rootfs: &str, args: &[&str]) -> Result<i32, String> {
    let client = Connector::Hybrid(uds.to_string(), moat_protocol::DEFAULT_AGENT_PORT).client()?;
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);
    let id = format!("demo-{}", std::process::id());
    let e = |what: &'static str| move |err: ttrpc::Error| format!("{what}: {err}");
    client
        .create_container(
            ctx(),
            &CreateContainerRequest {
                container_id: id.clone(),
                oci_spec_json: spec(args).to_string().into_bytes(),
                rootfs: Some(Mount {
                    source: rootfs.into(),
                    fstype: "bind".into(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            },
        )
        .await
        .map_err(e("create"))?;
    let mut output = client
        .output_stream(
            ctx(),
            &OutputStreamRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(e("output stream"))?;
    client
        .start_container(
            ctx(),
            &StartContainerRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(e("start"))?;
    while let Some(chunk) = output.recv().await.map_err(e("output"))? {
        let _ = std::io::stdout().write_all(&chunk.data);
    }
    let status = client
        .wait_process(
            ctx(),
            &WaitProcessRequest {
                container_id: id.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(e("wait"))?
        .status;
    client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: id,
                ..Default::default()
            },
        )
        .await
        .map_err(e("remove"))?;
    Ok(status)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: agent-run UDS ROOTFS CMD [ARG...]");
        return ExitCode::FAILURE;
    }
    let command: Vec<&str> = args[2..].iter().map(String::as_str).collect();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agent-run: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args[0], &args[1], &command)) {
        Ok(status) => {
            println!("agent-run: the container exited with status {status}");
            ExitCode::from(u8::try_from(status).unwrap_or(255))
        }
        Err(e) => {
            eprintln!("agent-run: {e}");
            ExitCode::FAILURE
        }
    }
}
