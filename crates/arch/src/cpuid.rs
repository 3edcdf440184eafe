//! CPUID shaping: what each vCPU reports, built from the set KVM supports.
//!
//! The guest sees one socket with one core per vCPU and one thread per core.
//! APIC ids are the vCPU indices. The hypervisor bit is set. KVM leaves
//! two things out of its supported set that the guest should see: the
//! TSC-deadline timer (a capability of its own) and, on some hosts, the
//! processor brand string; [`add_tsc_deadline`] and [`fill_brand`] put them
//! back.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: the local APIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// The leaves that hold the 48-byte processor brand string.
const BRAND_LEAVES: [u32; 3] = [0x8000_0002, 0x8000_0003, 0x8000_0004];
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

/// Declares the TSC-deadline timer in leaf 1. Call it when KVM has
/// `KVM_CAP_TSC_DEADLINE_TIMER`: KVM emulates the mode but does not report
/// it in its supported CPUID, and without it Linux programs the local APIC
/// timer in one-shot mode, which costs more exits.
pub fn add_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries.iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= ECX_TSC_DEADLINE;
    }
}

/// The host's processor brand string, as the 12 registers of leaves
/// 0x8000_0002 to 0x8000_0004 (EAX, EBX, ECX, EDX each); all zero when the
/// host has no such leaves.
pub fn host_brand() -> [u32; 12] {
    let mut regs = [0u32; 12];
    // CPUID is always available on x86_64 and has no side effects.
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max < BRAND_LEAVES[2] {
        return regs;
    }
    for (chunk, leaf) in regs.chunks_mut(4).zip(BRAND_LEAVES) {
        let r = std::arch::x86_64::__cpuid(leaf);
        chunk.copy_from_slice(&[r.eax, r.ebx, r.ecx, r.edx]);
    }
    regs
}

/// The brand string that `regs` (as from [`host_brand`]) spell, without
/// the padding: what Linux shows as "model name".
pub fn brand_text(regs: &[u32; 12]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

/// Puts `brand` into the brand-string leaves when KVM left them all zero
/// (some KVMs do; others pass the host's through already). The leaves must
/// be in the set, which they are when leaf 0x8000_0000 reaches them.
pub fn fill_brand(entries: &mut [kvm_cpuid_entry2], brand: &[u32; 12]) {
    let is_brand = |e: &kvm_cpuid_entry2| BRAND_LEAVES.contains(&e.function);
    let empty = entries
        .iter()
        .filter(|e| is_brand(e))
        .all(|e| (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0));
    if !empty {
        return;
    }
    for entry in entries.iter_mut().filter(|e| is_brand(e)) {
        let at = (entry.function - BRAND_LEAVES[0]) as usize * 4;
        [entry.eax, entry.ebx, entry.ecx, entry.edx] =
            [brand[at], brand[at + 1], brand[at + 2], brand[at + 3]];
    }
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
    fn tsc_deadline_is_added_to_leaf_1_only() {
        let mut entries = vec![leaf(1, 0), leaf(7, 0)];
        add_tsc_deadline(&mut entries);
        assert_ne!(find(&entries, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&entries, 7, 0).ecx, 0);
    }

    fn brand_entries() -> Vec<kvm_cpuid_entry2> {
        BRAND_LEAVES
            .iter()
            .map(|&function| kvm_cpuid_entry2 {
                function,
                ..Default::default()
            })
            .collect()
    }

    /// "AMD EPYC 7B13 Test CPU" as brand-string registers.
    fn brand_regs() -> [u32; 12] {
        let mut bytes = [0u8; 48];
        let text = b"AMD EPYC 7B13 Test CPU";
        bytes[..text.len()].copy_from_slice(text);
        let mut regs = [0u32; 12];
        for (r, chunk) in regs.iter_mut().zip(bytes.chunks(4)) {
            *r = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        regs
    }

    #[test]
    fn empty_brand_leaves_get_the_given_brand() {
        let mut entries = brand_entries();
        fill_brand(&mut entries, &brand_regs());
        let mut regs = [0u32; 12];
        for (i, e) in entries.iter().enumerate() {
            regs[i * 4..i * 4 + 4].copy_from_slice(&[e.eax, e.ebx, e.ecx, e.edx]);
        }
        assert_eq!(brand_text(&regs), "AMD EPYC 7B13 Test CPU");
    }

    #[test]
    fn a_brand_kvm_already_gives_is_kept() {
        let mut entries = brand_entries();
        entries[0].eax = u32::from_le_bytes(*b"Kept");
        fill_brand(&mut entries, &brand_regs());
        assert_eq!(entries[0].eax, u32::from_le_bytes(*b"Kept"));
        assert_eq!(entries[1].eax, 0);
    }

    #[test]
    fn host_brand_is_the_hosts_model_name() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, name)| name.trim().to_string())
            .unwrap();
        assert_eq!(brand_text(&host_brand()), model);
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
