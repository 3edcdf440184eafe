//! The DSDT: the AML namespace the guest's ACPI interpreter loads.
//!
//! It holds the `\_S5_` sleep-type package, which the OS needs to power
//! off, and the devices that cannot be found by probing (the pvpanic port).
//! The body is a list of AML objects built with the `acpi_tables::aml`
//! builder.
//!
//! The PCI host bridge `\_SB.PCI0` (PNP0A08, segment 0, bus 0) owns the
//! configuration ports, an I/O window, the 32-bit MMIO window BARs live in,
//! and routes each slot's INTA-INTD to IOAPIC GSIs 16-19 through `_PRT`. A
//! motherboard resource device (PNP0C02) claims the ECAM range, which is
//! what Linux wants to see before it trusts the MCFG table.
//!
//! The legacy ISA devices are described too, with their ports and
//! interrupts, so that the guest's PNP layer knows them rather than
//! probing: the CMOS RTC (PNP0B00), COM1 (PNP0501) and the i8042 keyboard
//! controller (PNP0303).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout::{
    pci_intx_gsi, ACPI_S5_SLP_TYP, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_KBD_IRQ,
    PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE,
    PCI_MMIO_START, PVPANIC_PORT, RTC_IRQ, RTC_PORT, RTC_PORT_LEN, SERIAL_IRQ, SERIAL_PORT,
    SERIAL_PORT_LEN,
};

/// PCI device slots on bus 0 that `_PRT` describes (slot 0 is the host
/// bridge, which raises no interrupt).
const PCI_SLOTS: u32 = 32;

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

fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut aml = Vec::new();
    object.to_aml_bytes(&mut aml);
    aml
}

/// `_PRT`: pin p of slot s (address 0xSSSSFFFF) to GSI 16 + (s + p) % 4,
/// with no link device (source 0, index = the GSI).
fn pci_routing() -> Vec<u8> {
    let mut entries = Vec::new();
    for slot in 1..PCI_SLOTS {
        for pin in 0..4u32 {
            let address = (slot << 16) | 0xffff;
            let pin_byte = pin as u8;
            let source = 0u8;
            let gsi = pci_intx_gsi(slot, pin);
            entries.push(aml_bytes(&Package::new(vec![
                &address, &pin_byte, &source, &gsi,
            ])));
        }
    }
    let raws: Vec<Raw> = entries.into_iter().map(Raw).collect();
    let refs: Vec<&dyn Aml> = raws.iter().map(|r| r as &dyn Aml).collect();
    aml_bytes(&Name::new(Path::new("_PRT"), &Package::new(refs)))
}

/// The host bridge's resources: bus 0, the configuration ports, the I/O
/// space around them, and the 32-bit MMIO window.
fn pci_resources() -> Vec<u8> {
    let buses = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_port = PCI_CONFIG_PORT as u16;
    let config_io = IO::new(config_port, config_port, 1, PCI_CONFIG_PORT_LEN as u8);
    let io_low = AddressSpace::<u16>::new_io(0, config_port - 1, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let resources = ResourceTemplate::new(vec![&buses, &config_io, &io_low, &io_high, &mmio]);
    aml_bytes(&Name::new(Path::new("_CRS"), &resources))
}

/// `\_SB.PCI0`, the PCI Express host bridge.
fn pci_host_bridge() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &0u8);
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let crs = Raw(pci_resources());
    let prt = Raw(pci_routing());
    aml_bytes(&Device::new(
        Path::new("PCI0"),
        vec![&hid, &cid, &adr, &seg, &bbn, &uid, &crs, &prt],
    ))
}

/// A motherboard resource device that reserves the ECAM range.
fn ecam_reservation() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let uid = Name::new(Path::new("_UID"), &1u8);
    let ecam = Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ecam]));
    aml_bytes(&Device::new(Path::new("ECAM"), vec![&hid, &uid, &crs]))
}

/// An ISA IRQ resource without flags (edge-triggered, active high): small
/// descriptor 0x22 with a 16-bit mask of the one IRQ.
fn irq_no_flags(irq: u32) -> Raw {
    let mask = (1u16 << irq).to_le_bytes();
    Raw(vec![0x22, mask[0], mask[1]])
}

/// A legacy ISA device `name` with PNP id `hid`, the I/O ranges
/// `(port, length)` and one IRQ.
fn isa_device(name: &str, hid: &str, uid: u8, ports: &[(u64, u64)], irq: u32) -> Vec<u8> {
    let ios: Vec<IO> = ports
        .iter()
        .map(|&(port, len)| IO::new(port as u16, port as u16, 1, len as u8))
        .collect();
    let irq = irq_no_flags(irq);
    let mut resources: Vec<&dyn Aml> = ios.iter().map(|io| io as &dyn Aml).collect();
    resources.push(&irq);
    let hid = Name::new(Path::new("_HID"), &EISAName::new(hid));
    let uid = Name::new(Path::new("_UID"), &uid);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(resources));
    aml_bytes(&Device::new(Path::new(name), vec![&hid, &uid, &crs]))
}

/// The CMOS RTC, COM1 and the i8042 keyboard controller.
fn isa_devices() -> Vec<u8> {
    let mut aml = isa_device("RTC_", "PNP0B00", 0, &[(RTC_PORT, RTC_PORT_LEN)], RTC_IRQ);
    aml.extend(isa_device(
        "COM1",
        "PNP0501",
        1,
        &[(SERIAL_PORT, SERIAL_PORT_LEN)],
        SERIAL_IRQ,
    ));
    aml.extend(isa_device(
        "KBD_",
        "PNP0303",
        0,
        &[(I8042_DATA_PORT, 1), (I8042_COMMAND_PORT, 1)],
        I8042_KBD_IRQ,
    ));
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
    let pci = Raw(pci_host_bridge());
    let ecam = Raw(ecam_reservation());
    let isa = Raw(isa_devices());
    let system_bus = Scope::new(Path::new("\\_SB_"), vec![&pvpanic, &pci, &ecam, &isa]);
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
