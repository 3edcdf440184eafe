//! x86_64 architecture setup: the guest's address map, boot structures,
//! CPUID, MSRs, page tables, ACPI and SMBIOS tables.

pub mod acpi;
pub mod boot;
pub mod cpu_features;
pub mod cpuid;
pub mod layout;
pub mod memmap;
pub mod regs;
pub mod smbios;
