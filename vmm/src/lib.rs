//! moat-vmm: the virtual machine monitor that runs one moat microVM.
//!
//! It owns the KVM VM and its vCPUs, guest memory, the x86_64 boot of a
//! Linux kernel (ELF vmlinux by its 64-bit entry, or bzImage) with an
//! optional initramfs, and the legacy devices a microVM needs: the COM1
//! console, the i8042 reset line and a boot-time marker.
//!
//! It never trusts the guest: every guest-supplied port, length or address
//! is checked before use, everything a guest can make it hold is bounded,
//! a misbehaving guest ends only its own VM, and every thread runs under a
//! seccomp filter of its own kind ([`seccomp`], [`threads`]).

/// Writes one line to stderr like `eprintln!`, but a closed or failing
/// stderr is ignored: `eprintln!` panics then, and the VMM must not die
/// (or skip its teardown) because whoever read its log went away, as a
/// killed shim's pipe does.
#[macro_export]
macro_rules! log_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod seccomp;
pub mod shutdown;
pub mod threads;
pub mod vstate;
