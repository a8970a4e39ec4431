//! The CPUID a vCPU sees: what KVM supports, plus the topology and
//! paravirtual bits a Linux guest needs to find its CPUs and kvm-clock.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID leaf 1 ECX: the TSC-deadline timer. KVM emulates it but leaves it
/// out of its supported list; without it the guest uses a slower APIC timer
/// mode and, on TCG hosts, may stall calibrating it.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID leaf 1 ECX: "running under a hypervisor". The guest looks for the
/// KVM signature leaves (and so kvm-clock) only when this is set.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX: multiple logical processors per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// What one vCPU's CPUID must say about it and its machine.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// This vCPU's index, used as its APIC ID.
    pub index: u8,
    /// The number of vCPUs in the VM.
    pub count: u8,
    /// Whether KVM emulates the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
}

/// Adjusts the supported-CPUID `entries` for the vCPU described by `topo`.
pub fn apply_vcpu_cpuid(entries: &mut [kvm_cpuid_entry2], topo: VcpuTopology) {
    let apic_id = u32::from(topo.index);
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // EBX: [31:24] initial APIC ID, [23:16] logical processors.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(topo.count) << 16);
                if topo.count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Extended topology (Intel 0xb/0x1f): EDX is the x2APIC ID.
            0xb | 0x1f => entry.edx = apic_id,
            // AMD extended APIC ID.
            0x8000_001e => entry.eax = apic_id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<kvm_cpuid_entry2> {
        [0x0u32, 0x1, 0xb, 0x8000_001e]
            .into_iter()
            .map(|function| kvm_cpuid_entry2 {
                function,
                ebx: 0x0000_0800,
                edx: 0x1,
                ..Default::default()
            })
            .collect()
    }

    fn leaf(entries: &[kvm_cpuid_entry2], function: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function).unwrap()
    }

    #[test]
    fn leaf1_carries_hypervisor_bit_apic_id_and_count() {
        let mut e = entries();
        apply_vcpu_cpuid(
            &mut e,
            VcpuTopology {
                index: 3,
                count: 4,
                tsc_deadline: true,
            },
        );
        let l1 = leaf(&e, 1);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ebx >> 24, 3, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.edx & 1, 1, "other feature bits kept");
    }

    #[test]
    fn single_vcpu_has_no_htt_and_deadline_only_when_supported() {
        let mut e = entries();
        e[1].edx |= LEAF1_EDX_HTT;
        apply_vcpu_cpuid(
            &mut e,
            VcpuTopology {
                index: 0,
                count: 1,
                tsc_deadline: false,
            },
        );
        let l1 = leaf(&e, 1);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn topology_leaves_name_the_vcpu() {
        let mut e = entries();
        apply_vcpu_cpuid(
            &mut e,
            VcpuTopology {
                index: 7,
                count: 8,
                tsc_deadline: true,
            },
        );
        assert_eq!(leaf(&e, 0xb).edx, 7);
        assert_eq!(leaf(&e, 0x8000_001e).eax, 7);
        assert_eq!(leaf(&e, 0).ebx, 0x0800, "unrelated leaves untouched");
    }
}
