//! moat-tests: cross-crate scenarios and benchmarks.
//!
//! This crate owns what proves moat as a whole rather than one crate: the
//! benchmarks that measure moat against a peer in the same run, and (with
//! later issues) the containerd and CRI scenarios. It never measures
//! anything against a number fixed in advance: every figure it prints is a
//! ratio against a peer measured beside it.

pub mod af_vsock;
pub mod agent_suite;
pub mod fs_tree;
pub mod measure;
pub mod stream_check;
