//! containerd-shim-moat-v2: the containerd task API (runtime v2) for moat.
//!
//! This crate will own one sandbox (microVM) per pod: it spawns `moat-vmm`,
//! brings the pod's rootfs and volumes into the guest, maps stdio FIFOs to
//! guest streams and forwards container events to containerd. It talks to the
//! guest only through the `protocol` crate over the VM's hybrid vsock.
//!
//! What exists so far is [`config`] (the shim's config file and the sizing
//! of a pod's VM from its CRI resources) and [`mounts`] (the pod's shared
//! directory that virtiofsd serves, and each container's rootfs and bind
//! mounts in it) and [`sandbox`] (one pod's virtiofsd and moat-vmm, from
//! start to the agent's first answer, and their teardown). The task service is not built yet,
//! so containerd cannot use this crate.

pub mod config;
pub mod mounts;
pub mod network;
pub mod sandbox;
pub mod service;
pub mod stdio;
