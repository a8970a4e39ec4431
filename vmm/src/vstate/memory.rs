//! Guest memory: host mappings laid out by the x86_64 memory map and
//! registered with KVM as memory slots. They are anonymous and private,
//! or, when a vhost-user backend must map guest RAM itself, windows of one
//! memfd mapped shared.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    /// The memfd behind shared guest memory could not be made.
    #[error("cannot create the {mib} MiB memfd for shared guest memory: {source}")]
    Memfd {
        /// Requested size in MiB.
        mib: u64,
        /// The OS error.
        source: std::io::Error,
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

/// Maps `mem_size` bytes of guest RAM from one memfd, each region a window
/// of it mapped `MAP_SHARED`, so that a vhost-user backend handed the fd
/// maps the very same pages. Like anonymous memory, pages are only paid
/// for once touched (the memfd is sparse).
pub fn create_shared_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = mem_size >> 20;
    let memfd_err = |source| MemoryError::Memfd { mib, source };
    // SAFETY: the name is a NUL-terminated literal and the flags are valid;
    // the call returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"moat-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size).map_err(memfd_err)?;
    let mut offset = 0u64;
    let ranges: Vec<_> = memory_ranges(mem_size)
        .into_iter()
        .map(|(addr, len)| {
            let window = FileOffset::new(file.try_clone()?, offset);
            offset += len as u64;
            Ok((addr, len, Some(window)))
        })
        .collect::<std::io::Result<_>>()
        .map_err(memfd_err)?;
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Map { mib, source })
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn shared_memory_is_one_memfd_mapped_shared() {
        let mem = create_shared_guest_memory(64 << 20).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        let total: u64 = regions.iter().map(|r| r.len()).sum();
        assert_eq!(total, 64 << 20);
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let window = regions[0].file_offset().expect("a file-backed region");
        assert_eq!(window.start(), 0);
        // What another process mapping the fd would read.
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(window.file(), &mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678);
    }

    #[test]
    fn private_memory_has_no_file() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
