//! moat-agent: PID 1 inside every pod microVM.
//!
//! This crate owns the guest side of a pod. Today that is the early
//! mounts, the hostname and orphan reaping ([`init`]), the settings from
//! the kernel command line ([`settings`]), and the ttrpc AgentService
//! ([`service`]) on vsock, or on a Unix socket when run on the host for
//! tests. Health and version are served; the container methods answer
//! NOT_FOUND naming themselves until the container engine lands.
//!
//! It must never trust the host for more than the protocol allows, and
//! never let one container's failure stop it from serving the others.

pub mod init;
pub mod service;
pub mod settings;
