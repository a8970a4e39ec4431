//! x86_64 machine set-up: the memory map, the Linux zero page and e820
//! table, the MP table, and each vCPU's boot state.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use layout::{
    CMDLINE_START, DEFAULT_INITRD_ADDR_MAX, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START,
    MMIO_GAP_START, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const PAGE_SIZE: u64 = 4096;

/// Errors laying out the machine before the first vCPU runs.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The MP table could not be built or written.
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    /// The zero page could not be written.
    #[error("cannot write the zero page at {ZERO_PAGE_START:#x}: {0}")]
    ZeroPage(vm_memory::GuestMemoryError),
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error(
        "the initramfs ({size} bytes) does not fit in guest low memory between the kernel's end \
         at {kernel_end:#x} and {limit:#x}; give the VM more memory or use a smaller initramfs"
    )]
    InitrdDoesNotFit {
        /// Size of the initramfs in bytes.
        size: u64,
        /// First guest address past the loaded kernel.
        kernel_end: u64,
        /// The highest address the initramfs may end at.
        limit: u64,
    },
}

/// The guest RAM ranges for `mem_size` bytes: low memory up to the 32-bit
/// MMIO hole, and the rest above 4 GiB.
pub fn memory_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                (mem_size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// The e820 map the guest gets: conventional memory below the EBDA, then
/// every RAM range from 1 MiB up.
pub fn e820_entries(mem_size: u64) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, size: u64| boot_e820_entry {
        addr,
        size,
        r#type: E820_RAM,
    };
    let mut entries = vec![ram(0, EBDA_START)];
    for (start, len) in memory_ranges(mem_size) {
        let start = start.0.max(HIMEM_START);
        let end = if start >= FIRST_ADDR_PAST_32BITS {
            start + len as u64
        } else {
            len as u64
        };
        if end > start {
            entries.push(ram(start, end - start));
        }
    }
    entries
}

/// Where an initramfs of `size` bytes goes: page-aligned at the top of low
/// memory, below the kernel's `initrd_addr_max` and above the kernel.
pub fn initrd_load_addr(
    mem_size: u64,
    size: u64,
    kernel_end: u64,
    initrd_addr_max: Option<u32>,
) -> Result<u64, ArchError> {
    let max = initrd_addr_max.map_or(DEFAULT_INITRD_ADDR_MAX, u64::from);
    let limit = mem_size.min(MMIO_GAP_START).min(max.saturating_add(1));
    let too_big = || ArchError::InitrdDoesNotFit {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(too_big());
    }
    Ok(start)
}

/// A loaded initramfs: where it lies in guest memory and how long it is.
#[derive(Debug, Clone, Copy)]
pub struct InitrdRange {
    /// Guest physical address of its first byte.
    pub addr: u64,
    /// Its length in bytes.
    pub size: u64,
}

/// Builds the zero page: the kernel's own setup header when it came with
/// one (bzImage), the loader fields, command line, initramfs and e820 map.
pub fn boot_params_for(
    mem_size: u64,
    cmdline_size: usize,
    initrd: Option<InitrdRange>,
    kernel_header: Option<setup_header>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = kernel_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let entries = e820_entries(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&entries) {
        *slot = *entry;
    }
    params.e820_entries = entries.len() as u8;
    params
}

/// Writes the MP table and the zero page: everything the kernel reads
/// about the machine at its entry.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    vcpus: u8,
    cmdline_size: usize,
    initrd: Option<InitrdRange>,
    kernel_header: Option<setup_header>,
) -> Result<(), ArchError> {
    mptable::setup_mptable(mem, vcpus)?;
    let params = boot_params_for(mem_size, cmdline_size, initrd, kernel_header);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(ArchError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(
            memory_ranges(256 * MIB),
            vec![(GuestAddress(0), (256 * MIB) as usize)]
        );
    }

    #[test]
    fn memory_past_the_hole_moves_above_4g() {
        let ranges = memory_ranges(4096 * MIB);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1], (GuestAddress(1 << 32), (1024 * MIB) as usize));
    }

    #[test]
    fn e820_skips_the_bios_hole_and_the_mmio_hole() {
        let e = e820_entries(256 * MIB);
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].addr, e[0].size, e[0].r#type),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(
            (e[1].addr, e[1].size),
            (HIMEM_START, 256 * MIB - HIMEM_START)
        );

        let e = e820_entries(4096 * MIB);
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].addr + e[1].size, MMIO_GAP_START);
        assert_eq!((e[2].addr, e[2].size), (1 << 32, 1024 * MIB));
        let total: u64 = e.iter().map(|r| r.size).sum();
        assert_eq!(total, 4096 * MIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_memory() {
        let addr = initrd_load_addr(128 * MIB, 5000, 20 * MIB, None).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 5000 <= 128 * MIB);
        assert!(128 * MIB - addr < 5000 + PAGE_SIZE);
    }

    #[test]
    fn initrd_respects_the_kernels_address_limit() {
        let addr = initrd_load_addr(3072 * MIB, MIB, 20 * MIB, Some(0x3fff_ffff)).unwrap();
        assert!(addr + MIB <= 0x4000_0000);
        let default = initrd_load_addr(3072 * MIB, MIB, 20 * MIB, None).unwrap();
        assert!(default + MIB <= DEFAULT_INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let err = initrd_load_addr(64 * MIB, 60 * MIB, 20 * MIB, None).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(initrd_load_addr(64 * MIB, 65 * MIB, 0, None).is_err());
    }

    #[test]
    fn zero_page_has_loader_fields_cmdline_initrd_and_e820() {
        let initrd = InitrdRange {
            addr: 0x700_0000,
            size: 1234,
        };
        let p = boot_params_for(128 * MIB, 42, Some(initrd), None);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x700_0000, 1234)
        );
        assert_eq!(p.e820_entries, 2);
    }

    #[test]
    fn bzimage_header_fields_are_kept() {
        let header = setup_header {
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let p = boot_params_for(128 * MIB, 1, None, Some(header));
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn system_configuration_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&memory_ranges(64 * MIB)).unwrap();
        configure_system(&mem, 64 * MIB, 2, 10, None, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!(params.e820_entries, 2);
    }
}
