//! containerd-shim-moat-v2: the containerd task API (runtime v2) for moat.
//!
//! This crate will own one sandbox (microVM) per pod: it spawns `moat-vmm`,
//! brings the pod's rootfs and volumes into the guest, maps stdio FIFOs to
//! guest streams and forwards container events to containerd. It talks to the
//! guest only through the `protocol` crate over the VM's hybrid vsock.
//!
//! Nothing is implemented yet; this crate holds no behaviour until the shim
//! issue lands, so that nothing pretends to work.
