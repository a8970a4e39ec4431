//! moat-vmm: the virtual machine monitor that runs one moat microVM.
//!
//! It owns the KVM VM and its vCPUs, guest memory, the x86_64 boot of a
//! Linux kernel (ELF vmlinux by its 64-bit entry, or bzImage) with an
//! optional initramfs, and the legacy devices a microVM needs: the COM1
//! console, the i8042 reset line and a boot-time marker.
//!
//! It never trusts the guest: every guest-supplied port, length or address
//! is checked before use, and a misbehaving guest ends only its own VM.

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod shutdown;
pub mod vstate;
