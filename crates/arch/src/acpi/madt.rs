//! The MADT ("APIC" table): the interrupt controllers and the CPUs.
//!
//! The guest kernel learns its CPUs only from here (it is built without MP
//! table support), so there is one enabled Processor Local APIC entry per
//! vCPU, with ACPI processor UIDs and APIC IDs both `0..n`.
//!
//! Interrupt routing follows KVM's default in-kernel irqchip routing, in
//! which GSI n drives IOAPIC pin n (and, below 16, PIC pin n), so ISA IRQ n
//! is GSI n:
//!
//! - There is deliberately no IRQ0 -> GSI2 override. QEMU announces one
//!   because it routes the PIT to IOAPIC pin 2 itself; with KVM's default
//!   routing the in-kernel PIT raises GSI 0, i.e. pin 0, which is exactly
//!   what the guest assumes when no override is present. An override would
//!   send the guest looking for its timer on pin 2, where nothing arrives.
//! - The SCI (IRQ 9) gets an override that only sets its polarity and
//!   trigger: ACPI's default for the SCI is level, active low, but the KVM
//!   IOAPIC pin is driven active high.
//!
//! The IOAPIC's ID is 0, which is what KVM's in-kernel IOAPIC reports in its
//! ID register after reset. On x86_64 Linux IOAPIC IDs need only be unique
//! among IOAPICs, not distinct from the local APIC IDs, so 0 clashes with
//! nothing and the guest has no reason to reprogram it.

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{ACPI_SCI_IRQ, APIC_START, IOAPIC_START};

/// MADT revision 5 (ACPI 6.3 and later).
const MADT_REVISION: u8 = 5;
/// Header, local APIC address, flags.
const MADT_HEADER_LEN: u32 = 44;
/// The platform also has dual 8259 PICs (KVM's in-kernel PIC).
const PCAT_COMPAT: u32 = 1;

/// The IOAPIC's ID, as KVM's in-kernel IOAPIC reports it after reset.
pub const IOAPIC_ID: u8 = 0;

// Interrupt controller structure types.
const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;

const LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags: polarity active high (bits 0-1 = 01), level triggered
/// (bits 2-3 = 11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0b1101;
/// MPS INTI flags: conforms to the bus (edge, active high for ISA).
const INTI_CONFORMS: u16 = 0;
/// The ISA bus, source of every override.
const BUS_ISA: u8 = 0;
/// A processor UID that means "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// NMIs arrive on each local APIC's LINT1 pin.
const NMI_LINT: u8 = 1;

fn local_apic(uid: u8, apic_id: u8) -> Vec<u8> {
    let mut entry = vec![TYPE_LOCAL_APIC, 8, uid, apic_id];
    entry.extend_from_slice(&LOCAL_APIC_ENABLED.to_le_bytes());
    entry
}

fn io_apic(id: u8, address: u32, gsi_base: u32) -> Vec<u8> {
    let mut entry = vec![TYPE_IO_APIC, 12, id, 0];
    entry.extend_from_slice(&address.to_le_bytes());
    entry.extend_from_slice(&gsi_base.to_le_bytes());
    entry
}

fn interrupt_override(isa_irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut entry = vec![TYPE_INTERRUPT_OVERRIDE, 10, BUS_ISA, isa_irq];
    entry.extend_from_slice(&gsi.to_le_bytes());
    entry.extend_from_slice(&flags.to_le_bytes());
    entry
}

fn local_apic_nmi(uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut entry = vec![TYPE_LOCAL_APIC_NMI, 6, uid];
    entry.extend_from_slice(&flags.to_le_bytes());
    entry.push(lint);
    entry
}

/// The MADT for `num_cpus` vCPUs.
pub fn madt(num_cpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.write_u32(36, APIC_START as u32);
    table.write_u32(40, PCAT_COMPAT);
    for cpu in 0..num_cpus {
        table.append_slice(&local_apic(cpu, cpu));
    }
    table.append_slice(&io_apic(IOAPIC_ID, IOAPIC_START as u32, 0));
    let sci = ACPI_SCI_IRQ as u8;
    table.append_slice(&interrupt_override(
        sci,
        ACPI_SCI_IRQ,
        INTI_ACTIVE_HIGH_LEVEL,
    ));
    table.append_slice(&local_apic_nmi(ALL_PROCESSORS, INTI_CONFORMS, NMI_LINT));
    table.as_slice().to_vec()
}
