//! containerd-shim-moat-v2: the containerd task API (runtime v2) for moat.
//!
//! One shim process serves one pod: it boots the pod's microVM
//! ([`sandbox`]: virtiofsd and moat-vmm, until the guest agent answers),
//! carries the pod's CNI network into it ([`network`]), brings each
//! container's rootfs and volumes into the guest over virtio-fs
//! ([`mounts`]), serves containerd's task API ([`service`]), connects
//! containerd's stdio FIFOs to the agent's streams ([`stdio`]), and reads
//! its config file and sizes the VM ([`config`]). It talks to the guest
//! only through the `protocol` crate over the VM's hybrid vsock.

pub mod config;
pub mod jail;
pub mod mounts;
pub mod network;
pub mod sandbox;
pub mod service;
pub mod stdio;
