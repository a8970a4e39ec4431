//! The KVM state of a VM: the host's KVM, the VM and its guest memory, and
//! the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
