//! Local APIC set-up of a vCPU: LINT0 as ExtINT (the legacy PIC's line) and
//! LINT1 as NMI, as a PC's firmware leaves them.

use kvm_bindings::kvm_lapic_state;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn read_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(bytes)
}

fn write_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 for ExtINT and LINT1 for NMI delivery in `lapic`.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = read_reg(lapic, APIC_LVT0);
    write_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = read_reg(lapic, APIC_LVT1);
    write_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes_are_set_and_other_bits_kept() {
        let mut lapic = kvm_lapic_state::default();
        write_reg(&mut lapic, APIC_LVT0, 0x0001_0000 | (0x1 << 8));
        set_lint(&mut lapic);
        assert_eq!(read_reg(&lapic, APIC_LVT0), 0x0001_0000 | (0x7 << 8));
        assert_eq!(read_reg(&lapic, APIC_LVT1), 0x4 << 8);
    }
}
