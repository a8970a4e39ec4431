//! moat-protocol: the agent's wire API, shared by the shim and the agent.
//!
//! This crate will own the `.proto` service (shaped after Kata's
//! AgentService) and the Rust code ttrpc-codegen generates from it, without
//! protoc. Both ends depend on it, so a change here is a protocol change and
//! carries a version bump.
//!
//! Nothing is defined yet; the service arrives with the agent issue.
