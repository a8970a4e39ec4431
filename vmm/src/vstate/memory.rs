//! Guest memory: anonymous host mappings laid out by the x86_64 memory map
//! and registered with KVM as memory slots.

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::memory_ranges;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the guest's RAM.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size in MiB.
        mib: u64,
        /// What the mapping reported.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} at {guest_addr:#x} ({size} bytes): {source}")]
    Register {
        /// The slot number.
        slot: u32,
        /// Guest physical base of the slot.
        guest_addr: u64,
        /// Slot size in bytes.
        size: u64,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_size` bytes of guest RAM. Pages are not touched, so the host
/// only pays for what the guest uses.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&memory_ranges(mem_size)).map_err(|source| MemoryError::Map {
        mib: mem_size >> 20,
        source,
    })
}

/// Hands every region of `mem` to KVM, one slot each.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping
        // owned by `mem`, which the VM keeps alive for as long as the VM
        // exists, and slots do not overlap because the regions do not.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| {
            MemoryError::Register {
                slot,
                guest_addr: region_desc.guest_phys_addr,
                size: region_desc.memory_size,
                source,
            }
        })?;
    }
    Ok(())
}
