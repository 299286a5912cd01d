//! The CPUID each vCPU reports: what KVM supports, with this VM's topology.

use kvm_bindings::CpuId;

/// Leaf 1 ECX: running under a hypervisor.
const HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the logical processor count in EBX is valid.
const HTT: u32 = 1 << 28;
/// Leaf 1 ECX: TSC-deadline timer mode. KVM emulates it with the in-kernel LAPIC.
const TSC_DEADLINE: u32 = 1 << 24;

/// Adapts `base` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`:
/// APIC IDs, logical processor counts, the extended topology leaf.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    // Cores are numbered 0..count in one package, no SMT.
    let core_bits = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(count) << 16)
                    | (8 << 8); // CLFLUSH line size in 8-byte units
                e.ecx |= HYPERVISOR | TSC_DEADLINE;
                if count > 1 {
                    e.edx |= HTT;
                } else {
                    e.edx &= !HTT;
                }
            }
            0xb => {
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level.
                        e.eax = core_bits;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1, and the APIC ID bits that select one.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | u32::from(count.max(1) - 1);
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_and_counts() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = for_vcpu(&base, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & HYPERVISOR, 0);
        assert_eq!((s[1].eax, s[1].ebx, s[1].edx), (2, 4, 3));
    }
}
