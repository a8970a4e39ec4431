//! Model-specific registers a vCPU starts with.

use kvm_bindings::kvm_msr_entry;

/// MSR indices the boot state writes.
mod index {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// `IA32_MISC_ENABLE`: fast-string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `MTRRdefType`: MTRRs enabled, default memory type write-back. Without
/// it the guest treats all RAM as uncached and boots many times slower.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 0x6;

/// The MSR values every vCPU starts with: syscall entry points cleared,
/// TSC at zero, fast strings on, write-back memory by default.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (index::IA32_SYSENTER_CS, 0),
        (index::IA32_SYSENTER_ESP, 0),
        (index::IA32_SYSENTER_EIP, 0),
        (index::STAR, 0),
        (index::CSTAR, 0),
        (index::KERNEL_GS_BASE, 0),
        (index::SYSCALL_MASK, 0),
        (index::LSTAR, 0),
        (index::IA32_TSC, 0),
        (index::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (index::MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_defaults_to_write_back() {
        let entries = boot_msr_entries();
        let mtrr = entries.iter().find(|e| e.index == 0x2ff).unwrap();
        assert_eq!(mtrr.data & 0x7, 6, "default type WB");
        assert_ne!(mtrr.data & (1 << 11), 0, "MTRRs enabled");
    }

    #[test]
    fn syscall_entries_start_cleared() {
        let entries = boot_msr_entries();
        for msr in [0xc000_0081u32, 0xc000_0082, 0xc000_0083, 0x174] {
            assert_eq!(entries.iter().find(|e| e.index == msr).unwrap().data, 0);
        }
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.dedup();
        assert_eq!(indices.len(), entries.len(), "no MSR written twice");
    }
}
