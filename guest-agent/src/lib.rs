//! moat-agent: PID 1 inside every pod microVM.
//!
//! This crate owns the guest side of a pod: the early mounts, the
//! hostname and the switch to a tmpfs root ([`init`]); the settings from
//! the kernel command line ([`settings`]); reaping every child and each
//! process's exit record ([`reaper`]); its descriptor limit ([`limits`]);
//! the container engine on youki's libcontainer ([`engine`], with the
//! single-threaded [`helper`] for the calls that clone, [`stdio`] and
//! [`oom`]); the guest's clock, network and DNS
//! ([`guest`]); and the ttrpc AgentService ([`service`]) on vsock, or on
//! a Unix socket when run on the host for tests.
//!
//! It must never trust the host for more than the protocol allows, and
//! never let one container's failure stop it from serving the others.

pub mod engine;
pub mod guest;
pub mod helper;
pub mod init;
pub mod limits;
pub mod oom;
pub mod reaper;
pub mod service;
pub mod settings;
pub mod stdio;
