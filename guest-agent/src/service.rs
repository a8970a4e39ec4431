//! The AgentService the agent serves. Methods not implemented here answer
//! NOT_FOUND with the method's name (the generated default).

use moat_protocol::agent::{CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use moat_protocol::agent_ttrpc::AgentService;
use moat_protocol::API_VERSION;
use ttrpc::r#async::TtrpcContext;

/// The agent's service state.
#[derive(Debug, Default)]
pub struct Agent;

#[async_trait::async_trait]
impl AgentService for Agent {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }
}
