//! moat-protocol: the agent's wire API, shared by the shim and the agent.
//!
//! This crate owns `protos/agent.proto` (shaped after Kata's AgentService,
//! reduced to what the containerd task API needs) and the Rust code that
//! ttrpc-codegen generates from it at build time, in pure Rust without
//! protoc: the message types in [`agent`] and the async ttrpc client and
//! server in [`agent_ttrpc`]. Both ends depend on it, so a change here is a
//! protocol change: fields are only added, and a change of meaning is a new
//! field or method and a bump of [`API_VERSION`].
//!
//! A method the agent does not implement, or one it does not know, answers
//! with ttrpc status NOT_FOUND and a message naming the method.
//!
//! [`hybrid_vsock`] is how the host reaches the agent: through the VM's
//! hybrid vsock socket.

#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/mod.rs"));
}

pub use generated::{agent, agent_ttrpc};

pub mod hybrid_vsock;

/// Where the agent mounts the pod's virtio-fs share in the guest (kernel
/// parameter `moat.share=TAG`); container rootfs and volume paths the shim
/// sends lie below it.
pub const GUEST_SHARE_DIR: &str = "/run/moat/shared";

/// The version of the agent API this crate describes; the agent reports
/// its own in `Version`, and the shim refuses an agent it does not speak.
pub const API_VERSION: u32 = 2;

/// The vsock port the agent listens on unless its command line says
/// otherwise.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::agent::{
        CheckRequest, CheckResponse, CreateContainerRequest, VersionRequest, VersionResponse,
    };
    use super::agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};
    use super::API_VERSION;

    /// An agent that answers only the health and version calls.
    struct HealthOnly;

    #[async_trait::async_trait]
    impl AgentService for HealthOnly {
        async fn check(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: CheckRequest,
        ) -> ttrpc::Result<CheckResponse> {
            Ok(CheckResponse {
                serving: true,
                ..Default::default()
            })
        }

        async fn version(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: VersionRequest,
        ) -> ttrpc::Result<VersionResponse> {
            Ok(VersionResponse {
                api_version: API_VERSION,
                agent_version: "test".into(),
                ..Default::default()
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn generated_client_and_server_talk_over_a_unix_socket() {
        let path = std::env::temp_dir().join(format!("moat-protocol-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let address = format!("unix://{}", path.display());
        let mut server = ttrpc::r#async::Server::new()
            .bind(&address)
            .unwrap()
            .register_service(create_agent_service(Arc::new(HealthOnly)));
        server.start().await.unwrap();

        let client =
            AgentServiceClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap());
        let ctx = || ttrpc::context::with_timeout(5_000_000_000);
        let health = client.check(ctx(), &CheckRequest::new()).await.unwrap();
        assert!(health.serving);
        let version = client.version(ctx(), &VersionRequest::new()).await.unwrap();
        assert_eq!(version.api_version, API_VERSION);

        // A method this agent does not implement names itself in the error.
        let err = client
            .create_container(ctx(), &CreateContainerRequest::new())
            .await
            .unwrap_err();
        match err {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
                assert!(
                    status
                        .message()
                        .contains("CreateContainer is not supported"),
                    "{}",
                    status.message()
                );
            }
            other => panic!("expected an RPC status, got {other:?}"),
        }
        server.shutdown().await.unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
