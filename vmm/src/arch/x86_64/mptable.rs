//! The Intel MultiProcessor table: how a guest without ACPI finds its
//! vCPUs, its IOAPIC and how ISA interrupts are wired.
//!
//! Layout (MP spec 1.4): a 16-byte floating pointer structure, then the
//! configuration table header and its entries, all in the EBDA.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_MAX_SIZE, MPTABLE_START};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MP_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const CPU_ENTRY_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

/// The most vCPUs whose entries fit in the EBDA beside the rest of the table.
pub const MAX_VCPUS: u8 = 32;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is zero or more than the table can describe.
    #[error("an MP table describes 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the MP table at {MPTABLE_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

/// Size in bytes of the table for `vcpus` vCPUs, floating pointer included.
pub fn table_size(vcpus: u8) -> usize {
    MPF_SIZE
        + MPC_HEADER_SIZE
        + usize::from(vcpus) * CPU_ENTRY_SIZE
        + SMALL_ENTRY_SIZE // bus
        + SMALL_ENTRY_SIZE // ioapic
        + usize::from(IOAPIC_PINS) * SMALL_ENTRY_SIZE
        + 2 * SMALL_ENTRY_SIZE // local interrupts
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the table for `vcpus` vCPUs as it must appear at [`MPTABLE_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming polarity/trigger), bus, bus irq, ioapic, pin
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);

    let mpc_len = MPC_HEADER_SIZE + entries.len();
    let mut mpc = Vec::with_capacity(mpc_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(mpc_len as u16).to_le_bytes());
    mpc.push(MP_SPEC_REV);
    mpc.push(0); // checksum, filled below
    mpc.extend_from_slice(b"MOAT    "); // OEM ID
    mpc.extend_from_slice(b"MICROVM     "); // product ID
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&(entries.len() as u16 / 8).to_le_bytes()); // entry count (informational)
    mpc.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend_from_slice(&entries);
    // The entry count counts entries, not 8-byte units: fix it up.
    let count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;
    mpc[34..36].copy_from_slice(&count.to_le_bytes());
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&((MPTABLE_START as u32) + MPF_SIZE as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte paragraphs
    mpf.push(MP_SPEC_REV);
    mpf.push(0); // checksum
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: configuration table present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&mpc);
    debug_assert_eq!(mpf.len(), table_size(vcpus));
    debug_assert!(mpf.len() as u64 <= MPTABLE_MAX_SIZE);
    Ok(mpf)
}

/// Writes the MP table for `vcpus` vCPUs into guest memory.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let table = build(vcpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_structures_checksum_to_zero() {
        let table = build(4).unwrap();
        let sum = |b: &[u8]| b.iter().fold(0u8, |s, x| s.wrapping_add(*x));
        assert_eq!(sum(&table[..MPF_SIZE]), 0);
        assert_eq!(sum(&table[MPF_SIZE..]), 0);
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(&table[MPF_SIZE..MPF_SIZE + 4], b"PCMP");
        let physptr = u32::from_le_bytes(table[4..8].try_into().unwrap());
        assert_eq!(u64::from(physptr), MPTABLE_START + MPF_SIZE as u64);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let vcpus = 3;
        let table = build(vcpus).unwrap();
        let first = MPF_SIZE + MPC_HEADER_SIZE;
        for cpu in 0..usize::from(vcpus) {
            let e = &table[first + cpu * CPU_ENTRY_SIZE..][..CPU_ENTRY_SIZE];
            assert_eq!((e[0], e[1]), (MP_PROCESSOR, cpu as u8));
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
            assert_ne!(e[3] & CPU_ENABLED, 0);
        }
        let bus = first + usize::from(vcpus) * CPU_ENTRY_SIZE;
        assert_eq!(table[bus], MP_BUS);
        assert_eq!(table[bus + SMALL_ENTRY_SIZE], MP_IOAPIC);
        let length = u16::from_le_bytes(table[MPF_SIZE + 4..MPF_SIZE + 6].try_into().unwrap());
        assert_eq!(usize::from(length), table.len() - MPF_SIZE);
    }

    #[test]
    fn every_ioapic_pin_is_routed() {
        let table = build(1).unwrap();
        // Interrupt sources follow the CPU, bus and IOAPIC entries.
        let first = MPF_SIZE + MPC_HEADER_SIZE + CPU_ENTRY_SIZE + 2 * SMALL_ENTRY_SIZE;
        let sources: Vec<&[u8]> = table[first..].chunks(SMALL_ENTRY_SIZE).collect();
        let pins: Vec<u8> = sources
            .iter()
            .filter(|e| e[0] == MP_INTSRC)
            .map(|e| e[7])
            .collect();
        assert_eq!(pins, (0..IOAPIC_PINS).collect::<Vec<_>>());
        let ioapic_id = table[first - SMALL_ENTRY_SIZE + 1];
        assert!(sources
            .iter()
            .filter(|e| e[0] == MP_INTSRC)
            .all(|e| e[6] == ioapic_id));
        let lints: Vec<u8> = sources
            .iter()
            .filter(|e| e[0] == MP_LINTSRC)
            .map(|e| e[1])
            .collect();
        assert_eq!(lints, vec![MP_IRQ_EXTINT, MP_IRQ_NMI]);
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        assert!(table_size(MAX_VCPUS) as u64 <= MPTABLE_MAX_SIZE);
        assert!(build(MAX_VCPUS).is_ok());
    }

    #[test]
    fn vcpu_count_out_of_range_is_refused() {
        assert!(matches!(build(0), Err(MptableError::VcpuCount(0))));
        let err = build(MAX_VCPUS + 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "an MP table describes 1 to 32 vCPUs, not 33"
        );
    }

    #[test]
    fn table_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
