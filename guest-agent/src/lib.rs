//! moat-agent: PID 1 inside every pod microVM.
//!
//! This crate will own the guest side of a pod: early mounts, cgroup v2,
//! network setup, the ttrpc server on vsock, container lifecycle, exec,
//! stdio, exit and OOM events, and stats. It must never trust the host for
//! more than the protocol allows, and never let one container's failure
//! stop it from serving the others.
//!
//! Nothing is implemented yet; this crate holds no behaviour until the agent
//! issue lands, so that nothing pretends to work.
