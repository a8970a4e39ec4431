//! Global Descriptor Table entries for the 64-bit boot entry, and their
//! translation into KVM segment registers.

use kvm_bindings::kvm_segment;

/// Flags of a 64-bit code segment: present, DPL 0, code exec/read,
/// accessed, long mode (L), 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flags of a flat data segment: present, DPL 0, data read/write,
/// accessed, 32-bit default size, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;
/// Flags of a 64-bit busy TSS descriptor.
pub const TSS_FLAGS: u16 = 0x808b;

/// The boot GDT: null, code, data and TSS descriptors, in that order.
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(CODE64_FLAGS, 0, 0xfffff),
    gdt_entry(DATA_FLAGS, 0, 0xfffff),
    gdt_entry(TSS_FLAGS, 0, 0xfffff),
];
/// Index of the code descriptor in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 1;
/// Index of the data descriptor in [`BOOT_GDT`].
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS descriptor in [`BOOT_GDT`].
pub const TSS_INDEX: u8 = 3;

/// Encodes a GDT descriptor from its flags (access byte and the
/// granularity/size nibble), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if bits(entry, 55, 1) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// Decodes GDT descriptor `entry`, found at `table_index`, into the segment
/// register KVM loads from it.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let present = bits(entry, 47, 1);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(table_index) * 8,
        type_: bits(entry, 40, 4),
        present,
        dpl: bits(entry, 45, 2),
        db: bits(entry, 54, 1),
        s: bits(entry, 44, 1),
        l: bits(entry, 53, 1),
        g: bits(entry, 55, 1),
        avl: bits(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_decodes_to_flat_long_mode() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(
            (seg.present, seg.dpl, seg.s, seg.l, seg.db, seg.g),
            (1, 0, 1, 1, 0, 1)
        );
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn data_and_tss_segments_decode() {
        let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l, data.s),
            (0x10, 0x3, 1, 0, 1)
        );
        let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 1));
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, 5);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde, "byte granularity keeps the raw limit");
        assert_eq!(seg.selector, 40);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = kvm_segment_from_gdt(0, 0);
        assert_eq!((seg.present, seg.unusable), (0, 1));
    }
}
