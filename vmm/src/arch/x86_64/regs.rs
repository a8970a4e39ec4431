//! Boot register state of a vCPU for the Linux 64-bit direct entry: general
//! registers, FPU, segments, control registers, and the identity-mapped page
//! tables and GDT they point at in guest memory.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

/// Control-register and EFER bits the boot state sets.
mod bits {
    pub const X86_CR0_PE: u64 = 1 << 0;
    pub const X86_CR0_ET: u64 = 1 << 4;
    pub const X86_CR0_PG: u64 = 1 << 31;
    pub const X86_CR4_PAE: u64 = 1 << 5;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
}

/// Errors writing the boot state into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT or IDT did not fit in guest memory.
    #[error("cannot write the boot descriptor tables at {0:#x}: {1}")]
    WriteDescriptorTable(u64, vm_memory::GuestMemoryError),
    /// The boot page tables did not fit in guest memory.
    #[error("cannot write the boot page tables at {0:#x}: {1}")]
    WritePageTables(u64, vm_memory::GuestMemoryError),
}

/// General registers at the 64-bit entry: `rip` at the kernel entry, `rsi`
/// at the zero page, a stack below the page tables, and only the reserved
/// bit of `rflags` set.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at reset: x87 control word 0x37f, SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the boot GDT, an empty IDT and a 1 GiB identity mapping into guest
/// memory, and returns `sregs` switched to 64-bit long mode over them.
pub fn setup_boot_sregs(
    mem: &GuestMemoryMmap,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    write_descriptor_tables(mem)?;
    write_identity_page_tables(mem)?;

    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= bits::X86_CR4_PAE;
    sregs.cr0 |= bits::X86_CR0_PE | bits::X86_CR0_ET | bits::X86_CR0_PG;
    sregs.efer |= bits::EFER_LME | bits::EFER_LMA;
    Ok(sregs)
}

fn write_descriptor_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        let addr = GDT_START + (index * 8) as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|e| RegsError::WriteDescriptorTable(addr, e))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| RegsError::WriteDescriptorTable(IDT_START, e))
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel to
/// reach its own page-table setup.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| RegsError::WritePageTables(addr, e))
    };
    write(PDPTE_START | PRESENT_WRITABLE, PML4_START)?;
    write(PDE_START | PRESENT_WRITABLE, PDPTE_START)?;
    for i in 0..512u64 {
        write((i << 21) | HUGE_PAGE | PRESENT_WRITABLE, PDE_START + i * 8)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn low_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn regs_enter_kernel_with_zero_page_in_rsi() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rsp, BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 0x2);
    }

    #[test]
    fn fpu_has_reset_control_words() {
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn sregs_enable_long_mode_paging() {
        let mem = low_memory();
        let sregs = setup_boot_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & bits::X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & bits::X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & bits::X86_CR4_PAE, 0);
        assert_eq!(
            sregs.efer & (bits::EFER_LME | bits::EFER_LMA),
            bits::EFER_LME | bits::EFER_LMA
        );
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x8, 1));
        assert_eq!(sregs.ss.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.gdt.limit, 31);
    }

    #[test]
    fn gdt_and_identity_map_are_in_guest_memory() {
        let mem = low_memory();
        setup_boot_sregs(&mem, kvm_sregs::default()).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 0x3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 0x3);
        // The last 2 MiB page maps 1 GiB - 2 MiB onto itself.
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn tables_outside_memory_are_an_error() {
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let err = setup_boot_sregs(&tiny, kvm_sregs::default()).unwrap_err();
        assert!(err.to_string().contains("page tables at 0x9000"), "{err}");
    }
}
