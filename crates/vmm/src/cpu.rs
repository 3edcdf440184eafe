//! The guest's CPU model: the CPUID every vCPU starts from, and the MSRs
//! hidden with the features the guest file or flags remove.
//!
//! It starts from KVM's supported CPUID, adds what KVM supports but leaves
//! out of that set (the TSC-deadline timer, the host's brand string), then
//! applies the guest's feature edits. When a removed feature has MSRs of
//! its own and no remaining feature provides them, and KVM can filter MSRs,
//! a filter makes the guest's accesses to them fault, as on a CPU without
//! the feature. The per-vCPU topology is shaped later, in `vcpu`.

use arch::cpu_features;
pub use arch::cpu_features::{parse_list, Feature, FeatureEdit, FeatureError, Reg, FEATURES};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use thiserror::Error;

/// Errors in building the guest's CPU model.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM call failed.
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A feature edit cannot be honoured on this host.
    #[error("CPU features")]
    Features(#[source] FeatureError),
}

/// What this host can give a guest: KVM's supported CPUID with the
/// TSC-deadline timer (when KVM has it) and the host's brand string.
/// Adding a feature needs it here.
pub fn host_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| CpuError::Kvm("read KVM's supported CPUID", e))?;
    let entries = cpuid.as_mut_slice();
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        arch::cpuid::add_tsc_deadline(entries);
    }
    arch::cpuid::fill_brand(entries, &arch::cpuid::host_brand());
    Ok(cpuid)
}

/// [`host_cpuid`] from a fresh handle on /dev/kvm.
pub fn open_host_cpuid() -> Result<CpuId, CpuError> {
    let kvm = Kvm::new().map_err(|e| CpuError::Kvm("open /dev/kvm", e))?;
    host_cpuid(&kvm)
}

/// The CPUID the guest's vCPUs start from, with `edits` applied; installs
/// the MSR filter that goes with it.
pub fn guest_cpuid(kvm: &Kvm, vm: &VmFd, edits: &[FeatureEdit]) -> Result<CpuId, CpuError> {
    let host = host_cpuid(kvm)?;
    let mut cpuid = host.clone();
    cpu_features::apply(edits, cpuid.as_mut_slice()).map_err(CpuError::Features)?;
    let removed = cpu_features::removed_msrs(host.as_slice(), cpuid.as_slice());
    if !removed.is_empty() && kvm.check_extension(Cap::X86MsrFilter) {
        hide_msrs(vm, &removed)?;
    }
    Ok(cpuid)
}

/// Denies the guest reads and writes of `ranges`; every other MSR is left
/// as KVM handles it. Host-side (VMM) accesses are not filtered.
fn hide_msrs(vm: &VmFd, ranges: &[cpu_features::MsrRange]) -> Result<(), CpuError> {
    if ranges.is_empty() {
        return Ok(());
    }
    // One bit per MSR, all zero: denied.
    let bitmaps: Vec<Vec<u8>> = ranges
        .iter()
        .map(|r| vec![0u8; r.count.div_ceil(8) as usize])
        .collect();
    let filter: Vec<MsrFilterRange> = ranges
        .iter()
        .zip(&bitmaps)
        .map(|(r, bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: r.base,
            msr_count: r.count,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &filter)
        .map_err(|e| CpuError::Kvm("set the MSR filter for the removed CPU features", e))
}
