//! ACPI tables for the guest: RSDP, XSDT, FADT, FACS, DSDT, MADT and MCFG.
//!
//! They are written into the BIOS area at [`ACPI_START`], the RSDP first, so
//! that a guest that scans 0xE0000-0xFFFFF for "RSD PTR " finds it; the VMM
//! can also hand the RSDP's address to the kernel in the boot information.
//!
//! The platform is a PC with ACPI always on rather than a hardware-reduced
//! one: the FADT describes the fixed PM registers (emulated by the devices
//! crate's `AcpiPm` at port 0x600) and has no SMI command port, so the OS
//! never tries to switch modes. The PM timer (port 0x608, 32 bits wide, so
//! TMR_VAL_EXT is set) is emulated by the devices crate's `PmTimer`.
//! Power-off works through `\_S5_` and PM1a
//! control, reboot through the FADT reset register.
//!
//! Adding a table: build its bytes (see [`madt`] for an explicit layout, or
//! the `acpi_tables` crate's types), and add it to the list in
//! [`system_tables`]; the XSDT then points at it. The DSDT's AML body is
//! assembled in [`dsdt`].

mod dsdt;
mod madt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::{facs::FACS, mcfg::MCFG, rsdp::Rsdp, xsdt::XSDT, Aml};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{
    ACPI_PM1A_CNT_LEN, ACPI_PM1A_CNT_OFFSET, ACPI_PM1A_EVT_LEN, ACPI_PM1A_EVT_OFFSET, ACPI_PM_PORT,
    ACPI_PM_TMR_LEN, ACPI_PM_TMR_PORT, ACPI_RESET_OFFSET, ACPI_RESET_VALUE, ACPI_SCI_IRQ,
    ACPI_SIZE, ACPI_START, PCI_ECAM_START,
};

/// The OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"FERROV";
/// The OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FERROVSR";
/// The OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// The CMOS register that holds the century (the RTC model keeps it there).
const CMOS_CENTURY_INDEX: u8 = 0x32;

// FADT IAPC_BOOT_ARCH flags.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// C2 and C3 latencies above these limits mean "not supported".
const C2_NOT_SUPPORTED: u16 = 101;
const C3_NOT_SUPPORTED: u16 = 1001;

/// The FACS must be 64-byte aligned; other tables only need 16.
const FACS_ALIGN: u64 = 64;
const TABLE_ALIGN: u64 = 16;

/// Errors from writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// A machine needs at least one CPU in its MADT.
    #[error("cannot describe a machine with no vCPUs")]
    NoCpus,
    /// The tables outgrew the ACPI region of the address map.
    #[error("ACPI table {table} does not fit in the ACPI region ({size:#x} bytes at {start:#x})")]
    OutOfSpace {
        table: &'static str,
        start: u64,
        size: u64,
    },
    /// Guest memory does not cover the ACPI region.
    #[error("failed to write ACPI table {table} to guest memory")]
    Write {
        table: &'static str,
        #[source]
        source: GuestMemoryError,
    },
}

/// Places tables one after the other in the ACPI region.
struct TableWriter<'a, M> {
    mem: &'a M,
    next: u64,
    end: u64,
}

impl<'a, M: GuestMemory> TableWriter<'a, M> {
    fn new(mem: &'a M) -> Self {
        Self {
            mem,
            next: ACPI_START,
            end: ACPI_START + ACPI_SIZE,
        }
    }

    /// Claims `len` bytes at the next `align`-aligned address.
    fn reserve(&mut self, table: &'static str, len: usize, align: u64) -> Result<u64, AcpiError> {
        let start = self.next.next_multiple_of(align);
        let end = start
            .checked_add(len as u64)
            .filter(|&end| end <= self.end)
            .ok_or(AcpiError::OutOfSpace {
                table,
                start: ACPI_START,
                size: ACPI_SIZE,
            })?;
        self.next = end;
        Ok(start)
    }

    fn write_at(&self, table: &'static str, addr: u64, bytes: &[u8]) -> Result<(), AcpiError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { table, source })
    }

    /// Reserves room for `bytes` and writes them there.
    fn place(&mut self, table: &'static str, bytes: &[u8], align: u64) -> Result<u64, AcpiError> {
        let addr = self.reserve(table, bytes.len(), align)?;
        self.write_at(table, addr, bytes)?;
        Ok(addr)
    }
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The MCFG: ECAM for segment 0, bus 0 only.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&mcfg)
}

/// The tables the XSDT lists besides the FADT, with their signatures.
fn system_tables(num_cpus: u8) -> Vec<(&'static str, Vec<u8>)> {
    vec![("APIC", madt::madt(num_cpus)), ("MCFG", mcfg())]
}

fn io_register(address: u64, len: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, len * 8, 0, access, address)
}

/// The FADT: where the PM registers are, what legacy hardware exists.
/// The FACS is given in both address fields: it lies below 4 GiB, and
/// older guests read only the 32-bit one.
fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let pm1a_evt = ACPI_PM_PORT + ACPI_PM1A_EVT_OFFSET;
    let pm1a_cnt = ACPI_PM_PORT + ACPI_PM1A_CNT_OFFSET;
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        // The PM timer counts 32 bits.
        .flag(Flags::TmrValExt)
        // Processors implement WBINVD and C1 (HLT).
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No fixed-feature power or sleep button, no RTC wake status.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::FixRtc)
        .flag(Flags::ResetRegSup);
    // The builder keeps only one of the two FACS addresses; set both.
    fadt.firmware_ctrl = (facs as u32).into();
    fadt.sci_int = (ACPI_SCI_IRQ as u16).into();
    // No SMI command port: ACPI mode is always on, SCI_EN reads set.
    fadt.smi_cmd = 0.into();
    fadt.pm1a_evt_blk = (pm1a_evt as u32).into();
    fadt.pm1_evt_len = ACPI_PM1A_EVT_LEN;
    fadt.x_pm1a_evt_blk = io_register(pm1a_evt, ACPI_PM1A_EVT_LEN, AccessSize::WordAccess);
    fadt.pm1a_cnt_blk = (pm1a_cnt as u32).into();
    fadt.pm1_cnt_len = ACPI_PM1A_CNT_LEN;
    fadt.x_pm1a_cnt_blk = io_register(pm1a_cnt, ACPI_PM1A_CNT_LEN, AccessSize::WordAccess);
    fadt.pm_tmr_blk = (ACPI_PM_TMR_PORT as u32).into();
    fadt.pm_tmr_len = ACPI_PM_TMR_LEN;
    fadt.x_pm_tmr_blk = io_register(ACPI_PM_TMR_PORT, ACPI_PM_TMR_LEN, AccessSize::DwordAccess);
    // No GPE blocks.
    fadt.p_lvl2_lat = C2_NOT_SUPPORTED.into();
    fadt.p_lvl3_lat = C3_NOT_SUPPORTED.into();
    fadt.century = CMOS_CENTURY_INDEX;
    // ISA devices, an i8042 and a CMOS RTC exist; VGA does not.
    fadt.iapc_boot_arch =
        (BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_register(ACPI_PM_PORT + ACPI_RESET_OFFSET, 1, AccessSize::ByteAccess);
    fadt.reset_value = ACPI_RESET_VALUE;
    to_bytes(&fadt.finalize())
}

/// Writes the ACPI tables for a machine with `num_cpus` vCPUs (APIC IDs
/// `0..num_cpus`) into `mem`, and returns the address of the RSDP.
///
/// The FADT points at a FACS even though the guest never sleeps: the
/// platform is not hardware-reduced, so the OS takes the ACPI global lock
/// through the FACS.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    num_cpus: u8,
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    let mut writer = TableWriter::new(mem);
    // The RSDP goes first, at the start of the region; it is written last,
    // once the XSDT's address is known.
    let rsdp = writer.reserve("RSDP", Rsdp::len(), TABLE_ALIGN)?;

    let dsdt = writer.place("DSDT", &dsdt::dsdt(), TABLE_ALIGN)?;
    let facs = writer.place("FACS", &to_bytes(&FACS::new()), FACS_ALIGN)?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(writer.place("FACP", &fadt(dsdt, facs), TABLE_ALIGN)?);
    for (signature, table) in system_tables(num_cpus) {
        xsdt.add_entry(writer.place(signature, &table, TABLE_ALIGN)?);
    }
    let xsdt = writer.place("XSDT", &to_bytes(&xsdt), TABLE_ALIGN)?;

    writer.write_at("RSDP", rsdp, &to_bytes(&Rsdp::new(OEM_ID, xsdt)))?;
    Ok(GuestAddress(rsdp))
}

#[cfg(test)]
mod tests;
