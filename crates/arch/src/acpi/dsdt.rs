//! The DSDT: the AML namespace the guest's ACPI interpreter loads.
//!
//! It holds the `\_S5_` sleep-type package, which the OS needs to power
//! off, and the devices that cannot be found by probing (the pvpanic port).
//! The body is a list of AML objects built with the `acpi_tables::aml`
//! builder; a PCI host bridge with `_CRS`/`_PRT` is added by appending to
//! that list (or to the `\_SB` scope).

use acpi_tables::aml::{Device, Name, Package, Path, ResourceTemplate, Scope, IO};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{ACPI_S5_SLP_TYP, PVPANIC_PORT};

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

/// The pvpanic device (QEMU's ACPI ID, so the guest's pvpanic driver
/// binds to it) with its one I/O port.
fn pvpanic() -> Vec<u8> {
    let port = PVPANIC_PORT as u16;
    let io = IO::new(port, port, 1, 1);
    let resources = ResourceTemplate::new(vec![&io]);
    let hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let crs = Name::new(Path::new("_CRS"), &resources);
    let mut aml = Vec::new();
    Device::new(Path::new("PVPN"), vec![&hid, &crs]).to_aml_bytes(&mut aml);
    aml
}

/// Raw AML bytes, for objects whose builders borrow their children.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The DSDT's bytes, header and checksum included.
pub fn dsdt() -> Vec<u8> {
    let s5 = sleep_state_s5();
    let pvpanic = Raw(pvpanic());
    let system_bus = Scope::new(Path::new("\\_SB_"), vec![&pvpanic]);
    let body: Vec<&dyn Aml> = vec![&s5, &system_bus];

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
