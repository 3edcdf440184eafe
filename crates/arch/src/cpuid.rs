//! CPUID shaping: what each vCPU reports, built from the set KVM supports.
//!
//! The guest sees one socket with one core per vCPU and one thread per core.
//! APIC ids are the vCPU indices. The hypervisor bit is set.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the package has more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// KVM leaf 0x40000001 EAX: port 0x80 delays are not needed. Without it
/// Linux writes port 0x80 after many legacy port accesses, each a wasted exit
/// that would also be mistaken for a boot marker.
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
/// Leaf 0xB/0x1F ECX level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The number of APIC id bits needed to number `count` cores.
pub fn apic_id_shift(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    32 - (count - 1).leading_zeros()
}

/// Rewrites KVM's supported CPUID for vCPU `index` of `count`.
pub fn shape(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count32 = u32::from(count.max(1));
    let shift = apic_id_shift(count);
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ecx |= ECX_HYPERVISOR;
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
                if count32 > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads sharing this cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count32 - 1 } else { 0 };
                // Both fields are narrow (6 and 12 bits): clamp, don't wrap.
                let cores = (count32 - 1).min(0x3f);
                entry.eax = (entry.eax & 0x3ff) | (cores << 26) | (sharing.min(0xfff) << 14);
            }
            0xb | 0x1f => shape_topology_leaf(entry, apic_id, count32, shift),
            0x4000_0001 => entry.eax |= KVM_FEATURE_NOP_IO_DELAY,
            0x8000_0008 => {
                // ECX: [15:12] APIC id size, [7:0] cores per package - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | (shift << 12) | (count32 - 1);
            }
            0x8000_001e => {
                // EAX: extended APIC id; EBX: core id, one thread per core; ECX: node 0.
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

fn shape_topology_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, shift: u32) {
    entry.edx = apic_id;
    match entry.index {
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = LEVEL_TYPE_SMT << 8;
        }
        1 => {
            entry.eax = shift;
            entry.ebx = count;
            entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
        }
        level => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = level;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x0000_0121,
            ebx: 0x0001_0800,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn shaped(index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
        let mut entries = vec![
            leaf(1, 0),
            leaf(4, 0),
            leaf(4, 3),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0x8000_0008, 0),
            leaf(0x4000_0001, 0),
        ];
        // Leaf 4, subleaf 3: a level-3 cache.
        entries[2].eax = (3 << 5) | 0x3;
        shape(&mut entries, index, count);
        entries
    }

    #[test]
    fn hypervisor_bit_and_apic_id_are_set() {
        let entries = shaped(3, 4);
        let l1 = find(&entries, 1, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size is kept");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let entries = shaped(0, 1);
        assert_eq!(find(&entries, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx & 0xff, 0);
    }

    #[test]
    fn topology_leaf_counts_cores() {
        let entries = shaped(1, 3);
        let smt = find(&entries, 0xb, 0);
        let core = find(&entries, 0xb, 1);
        let end = find(&entries, 0xb, 2);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, LEVEL_TYPE_SMT, 1));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 3, LEVEL_TYPE_CORE));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0), "level 2 ends the list");
    }

    #[test]
    fn cache_and_extended_leaves_match_core_count() {
        let entries = shaped(0, 2);
        assert_eq!(find(&entries, 4, 0).eax >> 26, 1);
        assert_eq!(
            (find(&entries, 4, 3).eax >> 14) & 0xfff,
            1,
            "L3 shared by both"
        );
        let ext = find(&entries, 0x8000_0008, 0);
        assert_eq!((ext.ecx & 0xff, (ext.ecx >> 12) & 0xf), (1, 1));
    }

    #[test]
    fn port_0x80_delay_is_declared_unneeded() {
        let entries = shaped(0, 1);
        assert_ne!(
            find(&entries, 0x4000_0001, 0).eax & KVM_FEATURE_NOP_IO_DELAY,
            0
        );
    }

    #[test]
    fn apic_id_shift_rounds_up() {
        assert_eq!(apic_id_shift(1), 0);
        assert_eq!(apic_id_shift(2), 1);
        assert_eq!(apic_id_shift(3), 2);
        assert_eq!(apic_id_shift(8), 3);
        assert_eq!(apic_id_shift(9), 4);
    }
}
