//! Named CPU features: where each lives in CPUID, and the MSRs that exist
//! only with it.
//!
//! The table is plain data (leaf, subleaf, register, bit, MSRs), named as
//! Linux names the flags in `/proc/cpuinfo`, so that it can also describe
//! CPU templates later. A guest's feature list is a sequence of edits such
//! as `-x2apic,+rdtscp`: removing is always allowed; adding needs the
//! feature in the set the host's KVM supports.

use std::fmt;

use kvm_bindings::kvm_cpuid_entry2;
use thiserror::Error;

/// Errors in a CPU feature list, or edits the host cannot honour.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FeatureError {
    /// An entry does not start with `+` or `-`.
    #[error("'{0}' needs + (add) or - (remove) in front of the feature name")]
    NoSign(String),
    /// No feature has that name.
    #[error("'{0}' is not a CPU feature this VMM knows (names as in /proc/cpuinfo flags)")]
    Unknown(String),
    /// The feature is asked for, but the host's KVM cannot give it.
    #[error("+{0}: this host's KVM does not support that feature")]
    Unsupported(&'static str),
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A range of MSR indices, `base` to `base + count - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrRange {
    pub base: u32,
    pub count: u32,
}

/// One CPUID feature bit.
#[derive(Debug, PartialEq, Eq)]
pub struct Feature {
    /// The flag's name in Linux's `/proc/cpuinfo`.
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
    /// MSRs the guest may use only when it has this feature (or another
    /// feature that lists the same MSRs).
    pub msrs: &'static [MsrRange],
}

/// IA32_TSC_AUX, read by RDTSCP and RDPID.
const MSR_TSC_AUX: &[MsrRange] = &[MsrRange {
    base: 0xc000_0103,
    count: 1,
}];
/// The x2APIC register MSRs.
const MSR_X2APIC: &[MsrRange] = &[MsrRange {
    base: 0x800,
    count: 0x100,
}];

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
        msrs: &[],
    }
}

const fn with_msrs(feature: Feature, msrs: &'static [MsrRange]) -> Feature {
    Feature { msrs, ..feature }
}

use Reg::{Ebx, Ecx, Edx};

/// Every named feature.
pub static FEATURES: &[Feature] = &[
    // Leaf 1, EDX.
    f("fpu", 1, 0, Edx, 0),
    f("vme", 1, 0, Edx, 1),
    f("de", 1, 0, Edx, 2),
    f("pse", 1, 0, Edx, 3),
    f("tsc", 1, 0, Edx, 4),
    f("msr", 1, 0, Edx, 5),
    f("pae", 1, 0, Edx, 6),
    f("mce", 1, 0, Edx, 7),
    f("cx8", 1, 0, Edx, 8),
    f("apic", 1, 0, Edx, 9),
    f("sep", 1, 0, Edx, 11),
    f("mtrr", 1, 0, Edx, 12),
    f("pge", 1, 0, Edx, 13),
    f("mca", 1, 0, Edx, 14),
    f("cmov", 1, 0, Edx, 15),
    f("pat", 1, 0, Edx, 16),
    f("pse36", 1, 0, Edx, 17),
    f("clflush", 1, 0, Edx, 19),
    f("mmx", 1, 0, Edx, 23),
    f("fxsr", 1, 0, Edx, 24),
    f("sse", 1, 0, Edx, 25),
    f("sse2", 1, 0, Edx, 26),
    // Leaf 1, ECX.
    f("pni", 1, 0, Ecx, 0),
    f("pclmulqdq", 1, 0, Ecx, 1),
    f("monitor", 1, 0, Ecx, 3),
    f("ssse3", 1, 0, Ecx, 9),
    f("fma", 1, 0, Ecx, 12),
    f("cx16", 1, 0, Ecx, 13),
    f("pcid", 1, 0, Ecx, 17),
    f("sse4_1", 1, 0, Ecx, 19),
    f("sse4_2", 1, 0, Ecx, 20),
    with_msrs(f("x2apic", 1, 0, Ecx, 21), MSR_X2APIC),
    f("movbe", 1, 0, Ecx, 22),
    f("popcnt", 1, 0, Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Ecx, 24),
    f("aes", 1, 0, Ecx, 25),
    f("xsave", 1, 0, Ecx, 26),
    f("avx", 1, 0, Ecx, 28),
    f("f16c", 1, 0, Ecx, 29),
    f("rdrand", 1, 0, Ecx, 30),
    f("hypervisor", 1, 0, Ecx, 31),
    // Leaf 7, subleaf 0, EBX.
    f("fsgsbase", 7, 0, Ebx, 0),
    f("bmi1", 7, 0, Ebx, 3),
    f("hle", 7, 0, Ebx, 4),
    f("avx2", 7, 0, Ebx, 5),
    f("smep", 7, 0, Ebx, 7),
    f("bmi2", 7, 0, Ebx, 8),
    f("erms", 7, 0, Ebx, 9),
    f("invpcid", 7, 0, Ebx, 10),
    f("rtm", 7, 0, Ebx, 11),
    f("avx512f", 7, 0, Ebx, 16),
    f("avx512dq", 7, 0, Ebx, 17),
    f("rdseed", 7, 0, Ebx, 18),
    f("adx", 7, 0, Ebx, 19),
    f("smap", 7, 0, Ebx, 20),
    f("clflushopt", 7, 0, Ebx, 23),
    f("clwb", 7, 0, Ebx, 24),
    f("avx512cd", 7, 0, Ebx, 28),
    f("sha_ni", 7, 0, Ebx, 29),
    f("avx512bw", 7, 0, Ebx, 30),
    f("avx512vl", 7, 0, Ebx, 31),
    // Leaf 7, subleaf 0, ECX.
    f("umip", 7, 0, Ecx, 2),
    f("pku", 7, 0, Ecx, 3),
    f("waitpkg", 7, 0, Ecx, 5),
    f("gfni", 7, 0, Ecx, 8),
    f("vaes", 7, 0, Ecx, 9),
    f("vpclmulqdq", 7, 0, Ecx, 10),
    with_msrs(f("rdpid", 7, 0, Ecx, 22), MSR_TSC_AUX),
    // Leaf 7, subleaf 0, EDX.
    f("fsrm", 7, 0, Edx, 4),
    f("md_clear", 7, 0, Edx, 10),
    f("serialize", 7, 0, Edx, 14),
    // Leaf 0x8000_0001, ECX.
    f("lahf_lm", 0x8000_0001, 0, Ecx, 0),
    f("cmp_legacy", 0x8000_0001, 0, Ecx, 1),
    f("svm", 0x8000_0001, 0, Ecx, 2),
    f("extapic", 0x8000_0001, 0, Ecx, 3),
    f("cr8_legacy", 0x8000_0001, 0, Ecx, 4),
    f("abm", 0x8000_0001, 0, Ecx, 5),
    f("sse4a", 0x8000_0001, 0, Ecx, 6),
    f("misalignsse", 0x8000_0001, 0, Ecx, 7),
    f("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
    f("osvw", 0x8000_0001, 0, Ecx, 9),
    f("xop", 0x8000_0001, 0, Ecx, 11),
    f("fma4", 0x8000_0001, 0, Ecx, 16),
    f("tbm", 0x8000_0001, 0, Ecx, 21),
    f("topoext", 0x8000_0001, 0, Ecx, 22),
    f("perfctr_core", 0x8000_0001, 0, Ecx, 23),
    // Leaf 0x8000_0001, EDX.
    f("syscall", 0x8000_0001, 0, Edx, 11),
    f("nx", 0x8000_0001, 0, Edx, 20),
    f("mmxext", 0x8000_0001, 0, Edx, 22),
    f("fxsr_opt", 0x8000_0001, 0, Edx, 25),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    with_msrs(f("rdtscp", 0x8000_0001, 0, Edx, 27), MSR_TSC_AUX),
    f("lm", 0x8000_0001, 0, Edx, 29),
];

/// The feature named `name`, if any.
pub fn find(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

impl Feature {
    fn register<'a>(&self, entry: &'a mut kvm_cpuid_entry2) -> &'a mut u32 {
        match self.reg {
            Reg::Eax => &mut entry.eax,
            Reg::Ebx => &mut entry.ebx,
            Reg::Ecx => &mut entry.ecx,
            Reg::Edx => &mut entry.edx,
        }
    }

    fn entry<'a>(&self, entries: &'a mut [kvm_cpuid_entry2]) -> Option<&'a mut kvm_cpuid_entry2> {
        entries
            .iter_mut()
            .find(|e| e.function == self.leaf && e.index == self.subleaf)
    }

    /// Whether `entries` report this feature.
    pub fn present_in(&self, entries: &[kvm_cpuid_entry2]) -> bool {
        let mut entry = match entries
            .iter()
            .find(|e| e.function == self.leaf && e.index == self.subleaf)
        {
            Some(e) => *e,
            None => return false,
        };
        *self.register(&mut entry) & (1 << self.bit) != 0
    }

    /// Sets or clears the feature's bit in `entries`. Setting needs the leaf
    /// to be there; clearing a missing leaf leaves nothing to clear.
    fn set_in(&self, entries: &mut [kvm_cpuid_entry2], on: bool) {
        if let Some(entry) = self.entry(entries) {
            let reg = self.register(entry);
            if on {
                *reg |= 1 << self.bit;
            } else {
                *reg &= !(1 << self.bit);
            }
        }
    }
}

/// One change to the guest's features: `+name` or `-name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureEdit {
    pub feature: &'static Feature,
    pub add: bool,
}

impl fmt::Display for FeatureEdit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.add { '+' } else { '-' };
        write!(f, "{sign}{}", self.feature.name)
    }
}

impl std::str::FromStr for FeatureEdit {
    type Err = FeatureError;

    /// Parses `+name` or `-name`.
    fn from_str(text: &str) -> Result<Self, FeatureError> {
        let (add, name) = match text.split_at_checked(1) {
            Some(("+", name)) => (true, name),
            Some(("-", name)) => (false, name),
            _ => return Err(FeatureError::NoSign(text.to_string())),
        };
        let feature = find(name).ok_or_else(|| FeatureError::Unknown(name.to_string()))?;
        Ok(Self { feature, add })
    }
}

/// Parses a comma-separated list such as `-x2apic,+rdtscp`.
pub fn parse_list(text: &str) -> Result<Vec<FeatureEdit>, FeatureError> {
    text.split(',').map(str::parse).collect()
}

/// Applies `edits` in order to `entries`, which start as the set the host
/// supports. Adding a feature that set lacks is refused, naming it.
pub fn apply(edits: &[FeatureEdit], entries: &mut [kvm_cpuid_entry2]) -> Result<(), FeatureError> {
    let supported = entries.to_vec();
    for edit in edits {
        if edit.add && !edit.feature.present_in(&supported) {
            return Err(FeatureError::Unsupported(edit.feature.name));
        }
        edit.feature.set_in(entries, edit.add);
    }
    Ok(())
}

/// The MSRs to hide from a guest whose CPUID is `entries`: those of every
/// absent feature, except MSRs that a present feature also provides.
pub fn hidden_msrs(entries: &[kvm_cpuid_entry2]) -> Vec<MsrRange> {
    let (present, absent): (Vec<&Feature>, Vec<&Feature>) =
        FEATURES.iter().partition(|f| f.present_in(entries));
    let mut hidden: Vec<MsrRange> = Vec::new();
    for range in absent.iter().flat_map(|f| f.msrs) {
        let provided = present.iter().any(|f| f.msrs.contains(range));
        if !provided && !hidden.contains(range) {
            hidden.push(*range);
        }
    }
    hidden
}

/// The MSRs that editing `host` into `guest` hides: hidden for `guest` but
/// not already for `host`. Empty when nothing with MSRs was removed.
pub fn removed_msrs(host: &[kvm_cpuid_entry2], guest: &[kvm_cpuid_entry2]) -> Vec<MsrRange> {
    let already = hidden_msrs(host);
    hidden_msrs(guest)
        .into_iter()
        .filter(|r| !already.contains(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<kvm_cpuid_entry2> {
        let leaf = |function, ecx, edx| kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        };
        vec![
            // x2apic and hypervisor, but no tsc_deadline_timer.
            leaf(1, (1 << 21) | (1 << 31), 1 << 4),
            leaf(7, 1 << 22, 0),
            // rdtscp and lm.
            leaf(0x8000_0001, 0, (1 << 27) | (1 << 29)),
        ]
    }

    fn edits(text: &str) -> Vec<FeatureEdit> {
        parse_list(text).unwrap()
    }

    #[test]
    fn names_are_unique_and_bits_distinct() {
        for (i, a) in FEATURES.iter().enumerate() {
            assert!(a.bit < 32, "{}", a.name);
            for b in &FEATURES[i + 1..] {
                assert_ne!(a.name, b.name);
                let same_bit =
                    (a.leaf, a.subleaf, a.reg, a.bit) == (b.leaf, b.subleaf, b.reg, b.bit);
                assert!(!same_bit, "{} and {} share a bit", a.name, b.name);
            }
        }
    }

    #[test]
    fn table_has_the_documented_places() {
        let at = |name| {
            let f = find(name).unwrap();
            (f.leaf, f.subleaf, f.reg, f.bit)
        };
        assert_eq!(at("x2apic"), (1, 0, Ecx, 21));
        assert_eq!(at("tsc_deadline_timer"), (1, 0, Ecx, 24));
        assert_eq!(at("rdtscp"), (0x8000_0001, 0, Edx, 27));
        assert_eq!(at("rdpid"), (7, 0, Ecx, 22));
    }

    #[test]
    fn a_list_parses_in_order_and_prints_back() {
        let list = edits("-x2apic,+rdtscp");
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].feature.name, list[0].add), ("x2apic", false));
        assert_eq!((list[1].feature.name, list[1].add), ("rdtscp", true));
        let text: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["-x2apic", "+rdtscp"]);
    }

    #[test]
    fn bad_entries_are_named() {
        assert_eq!(
            parse_list("-x2apic,+warp").unwrap_err(),
            FeatureError::Unknown("warp".into())
        );
        assert_eq!(
            parse_list("x2apic").unwrap_err(),
            FeatureError::NoSign("x2apic".into())
        );
        assert_eq!(parse_list("").unwrap_err(), FeatureError::NoSign("".into()));
        assert_eq!(
            parse_list("-x2apic,").unwrap_err(),
            FeatureError::NoSign("".into())
        );
    }

    #[test]
    fn removing_clears_the_bit_and_adding_back_sets_it() {
        let mut e = entries();
        apply(&edits("-x2apic,-rdtscp"), &mut e).unwrap();
        assert!(!find("x2apic").unwrap().present_in(&e));
        assert!(!find("rdtscp").unwrap().present_in(&e));
        assert!(find("lm").unwrap().present_in(&e), "other bits stay");
        let mut e = entries();
        apply(&edits("-x2apic,+x2apic"), &mut e).unwrap();
        assert!(find("x2apic").unwrap().present_in(&e), "the last edit wins");
    }

    #[test]
    fn adding_what_the_host_lacks_is_refused_but_removing_is_not() {
        let mut e = entries();
        assert_eq!(
            apply(&edits("+tsc_deadline_timer"), &mut e).unwrap_err(),
            FeatureError::Unsupported("tsc_deadline_timer")
        );
        assert_eq!(
            apply(&edits("+avx512f"), &mut e).unwrap_err().to_string(),
            "+avx512f: this host's KVM does not support that feature"
        );
        apply(&edits("-tsc_deadline_timer,-avx512f"), &mut e).unwrap();
        // Removing then adding back a supported one is fine.
        apply(&edits("-hypervisor,+hypervisor"), &mut e).unwrap();
    }

    #[test]
    fn msrs_hide_only_when_no_present_feature_provides_them() {
        let mut e = entries();
        assert_eq!(hidden_msrs(&e), Vec::<MsrRange>::new());
        apply(&edits("-x2apic,-rdtscp"), &mut e).unwrap();
        // rdpid still reads TSC_AUX, so only the x2APIC range hides.
        assert_eq!(hidden_msrs(&e), MSR_X2APIC.to_vec());
        apply(&edits("-rdpid"), &mut e).unwrap();
        let hidden = hidden_msrs(&e);
        assert!(hidden.contains(&MSR_TSC_AUX[0]) && hidden.contains(&MSR_X2APIC[0]));
        assert_eq!(hidden.len(), 2, "TSC_AUX is listed once");
    }

    #[test]
    fn only_msrs_the_edits_hide_are_removed() {
        // A host without rdtscp or rdpid: TSC_AUX is hidden already.
        let mut host = entries();
        apply(&edits("-rdtscp,-rdpid"), &mut host).unwrap();
        let mut guest = host.clone();
        assert!(removed_msrs(&host, &guest).is_empty());
        apply(&edits("-x2apic"), &mut guest).unwrap();
        assert_eq!(removed_msrs(&host, &guest), MSR_X2APIC.to_vec());
    }
}
