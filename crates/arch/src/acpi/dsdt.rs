//! The DSDT: the AML namespace the guest's ACPI interpreter loads.
//!
//! For now it holds only the `\_S5_` sleep-type package, which the OS needs
//! to power off. The body is a list of AML objects built with the
//! `acpi_tables::aml` builder; PCI host bridge `_CRS`/`_PRT` and other
//! devices are added by appending to that list.

use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::ACPI_S5_SLP_TYP;

/// Revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
const HEADER_LEN: u32 = 36;

/// `Name (\_S5, Package { SLP_TYPa, SLP_TYPb, 0, 0 })`: the PM1a_CNT.SLP_TYP
/// value for soft-off. There is no PM1b block, so SLP_TYPb is unused.
fn sleep_state_s5() -> Name {
    let sleep_type = ACPI_S5_SLP_TYP;
    let unused = 0u8;
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&sleep_type, &unused, &unused, &unused]),
    )
}

/// The DSDT's bytes, header and checksum included.
pub fn dsdt() -> Vec<u8> {
    let s5 = sleep_state_s5();
    let body: Vec<&dyn Aml> = vec![&s5];

    let mut table = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    for object in body {
        let mut aml = Vec::new();
        object.to_aml_bytes(&mut aml);
        table.append_slice(&aml);
    }
    table.as_slice().to_vec()
}
