//! The agent binary on the host, serving on a Unix socket (`--listen`):
//! health, version, and a clear error for what it does not implement.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_protocol::agent::{CheckRequest, CreateContainerRequest, VersionRequest};
use moat_protocol::agent_ttrpc::AgentServiceClient;
use moat_protocol::API_VERSION;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_health_and_version_and_names_unimplemented_methods() {
    let path = std::env::temp_dir().join(format!("moat-agent-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut agent = Command::new(env!("CARGO_BIN_EXE_moat-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "agent did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let address = format!("unix://{}", path.display());
    let client = AgentServiceClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap());
    let ctx = || ttrpc::context::with_timeout(5_000_000_000);
    assert!(
        client
            .check(ctx(), &CheckRequest::new())
            .await
            .unwrap()
            .serving
    );
    let version = client.version(ctx(), &VersionRequest::new()).await.unwrap();
    assert_eq!(version.api_version, API_VERSION);
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    let err = client
        .create_container(ctx(), &CreateContainerRequest::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("CreateContainer is not supported"),
        "{err}"
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    let _ = std::fs::remove_file(&path);
}
