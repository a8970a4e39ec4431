//! The guest physical address map of a moat microVM.
//!
//! Every fixed guest address the VMM writes lives here, with its meaning;
//! nothing else in the VMM names a magic address.

/// Start of the GDT the VMM installs for the 64-bit boot entry.
pub const GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the boot vCPU starts with.
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`) handed to the kernel in `rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU (top of the page below the tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity mapping (512 × 2 MiB pages = 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`),
/// including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; usable low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table (Intel MultiProcessor spec) lives in the EBDA, where the
/// kernel scans for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// Room for the MP table: up to the end of conventional memory.
pub const MPTABLE_MAX_SIZE: u64 = 0xa0000 - MPTABLE_START;
/// First byte of high memory: kernels load at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (device windows, IOAPIC, LAPIC);
/// guest RAM above it is relocated past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past the 32-bit space, where RAM resumes above the hole.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// The IOAPIC's MMIO base (its default, as the MP table announces it).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base (architectural default).
pub const APIC_START: u64 = 0xfee0_0000;
/// Three pages KVM needs for the TSS on Intel hosts; inside the MMIO hole
/// so that it never overlaps guest RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Highest address an initramfs may end at when the kernel does not say
/// (`initrd_addr_max` default for protocol ≥ 2.03).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// The IOAPIC's number of input pins (GSIs 0..=23).
pub const IOAPIC_PINS: u8 = 24;
/// Start of the virtio-mmio device windows (one 4 KiB window each), inside
/// the 32-bit MMIO hole.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// The first IRQ (IOAPIC pin) given to virtio devices; lower pins belong
/// to legacy ISA devices (COM1 is 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The last IOAPIC pin a virtio device can have.
pub const VIRTIO_IRQ_MAX: u32 = IOAPIC_PINS as u32 - 1;
