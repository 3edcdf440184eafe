use vm_memory::GuestMemoryMmap;

use super::*;
use crate::layout::{APIC_START, IOAPIC_START};

type Mem = GuestMemoryMmap<()>;

fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn tables(num_cpus: u8) -> (Mem, u64) {
    let mem = memory();
    let rsdp = create_acpi_tables(&mem, num_cpus).unwrap();
    (mem, rsdp.0)
}

fn bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &x| acc.wrapping_add(x)) == 0
}

/// A table with a standard header, read using its own length field.
fn table(mem: &Mem, addr: u64) -> Vec<u8> {
    let header = bytes(mem, addr, 36);
    bytes(mem, addr, u32_at(&header, 4) as usize)
}

/// The tables the XSDT points at.
fn xsdt_tables(mem: &Mem, rsdp: u64) -> Vec<Vec<u8>> {
    let rsdp = bytes(mem, rsdp, 36);
    let xsdt = table(mem, u64_at(&rsdp, 24));
    (36..xsdt.len())
        .step_by(8)
        .map(|off| table(mem, u64_at(&xsdt, off)))
        .collect()
}

fn find<'a>(tables: &'a [Vec<u8>], signature: &[u8; 4]) -> &'a [u8] {
    tables
        .iter()
        .find(|t| &t[..4] == signature)
        .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(signature)))
}

/// (type, bytes) of each MADT interrupt controller structure.
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut entries = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        entries.push((madt[off], &madt[off..off + len]));
        off += len;
    }
    assert_eq!(off, madt.len(), "MADT entries overrun the table");
    entries
}

#[test]
fn rsdp_is_first_in_the_bios_area_with_valid_checksums() {
    let (mem, rsdp) = tables(1);
    assert_eq!(rsdp, ACPI_START);
    assert_eq!(rsdp % 16, 0);
    let r = bytes(&mem, rsdp, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(r[15], 2, "revision");
    assert_eq!(u32_at(&r, 20), 36, "length");
    assert!(sums_to_zero(&r[..20]), "ACPI 1.0 checksum");
    assert!(sums_to_zero(&r), "extended checksum");
}

#[test]
fn every_table_has_a_valid_checksum_and_length() {
    let (mem, rsdp) = tables(4);
    let xsdt = table(&mem, u64_at(&bytes(&mem, rsdp, 36), 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    assert!(sums_to_zero(&xsdt));
    let tables = xsdt_tables(&mem, rsdp);
    let fadt = find(&tables, b"FACP");
    let dsdt = table(&mem, u64_at(fadt, 140));
    for t in tables.iter().chain([&dsdt]) {
        let name = String::from_utf8_lossy(&t[..4]).into_owned();
        assert!(sums_to_zero(t), "{name} checksum");
        assert_eq!(u32_at(t, 4) as usize, t.len(), "{name} length");
        assert_eq!(&t[10..16], &OEM_ID, "{name} OEM ID");
    }
}

#[test]
fn xsdt_lists_fadt_madt_and_mcfg() {
    let (mem, rsdp) = tables(1);
    let signatures: Vec<_> = xsdt_tables(&mem, rsdp)
        .iter()
        .map(|t| t[..4].to_vec())
        .collect();
    assert_eq!(
        signatures,
        [b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
    );
}

#[test]
fn mcfg_points_at_the_ecam_for_bus_0() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let m = find(&tables, b"MCFG");
    assert_eq!(m.len(), 44 + 16, "header, reserved, one allocation");
    assert_eq!(u64_at(m, 44), crate::layout::PCI_ECAM_START);
    assert_eq!(u16_at(m, 52), 0, "segment");
    assert_eq!((m[54], m[55]), (0, 0), "bus range 0-0");
}

fn dsdt_bytes() -> Vec<u8> {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    table(&mem, u64_at(find(&tables, b"FACP"), 140))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn dsdt_has_a_pci_express_host_bridge() {
    let dsdt = dsdt_bytes();
    assert!(contains(&dsdt, b"PCI0"));
    // _HID EisaId("PNP0A08") and _CID EisaId("PNP0A03"), as DWord constants.
    assert!(contains(
        &dsdt,
        &[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]
    ));
    assert!(contains(
        &dsdt,
        &[b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]
    ));
    for name in [b"_SEG", b"_BBN", b"_UID", b"_CRS", b"_PRT"] {
        assert!(contains(&dsdt, name), "{}", String::from_utf8_lossy(name));
    }
}

#[test]
fn host_bridge_resources_cover_the_config_ports_and_the_mmio_window() {
    use crate::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};
    let dsdt = dsdt_bytes();
    // IO(Decode16, 0xCF8, 0xCF8, 1, 8)
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
    ));
    // DWordMemory: min and max of the window, back to back.
    let mut window = (PCI_MMIO_START as u32).to_le_bytes().to_vec();
    window.extend_from_slice(&((PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32).to_le_bytes());
    assert!(contains(&dsdt, &window));
    // WordBusNumber 0-0: type 2.
    assert!(contains(&dsdt, &[0x88, 0x0d, 0x00, 0x02]));
}

#[test]
fn prt_routes_each_slot_pin_to_gsi_16_to_19() {
    let dsdt = dsdt_bytes();
    // Package { 0x0003FFFF, 1 (INTB), 0, 16 }: slot 3 INTB goes to
    // 16 + (3 + 1) % 4 = 16.
    let entry = [
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 0x10,
    ];
    assert!(contains(&dsdt, &entry));
    // Slot 1 INTA → GSI 17.
    let entry = [
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 0x11,
    ];
    assert!(contains(&dsdt, &entry));
}

/// Writes the DSDT to `$FERROVISOR_DUMP_DSDT` for `iasl -d`, when set.
#[test]
fn dsdt_can_be_dumped_for_disassembly() {
    let dsdt = dsdt_bytes();
    assert!(sums_to_zero(&dsdt));
    if let Ok(path) = std::env::var("FERROVISOR_DUMP_DSDT") {
        std::fs::write(path, &dsdt).unwrap();
    }
}

#[test]
fn ecam_is_claimed_by_a_motherboard_resource() {
    let dsdt = dsdt_bytes();
    // _HID EisaId("PNP0C02")
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
    // Memory32Fixed(ReadOnly, ECAM base, ECAM size)
    let mut fixed = vec![0x86, 0x09, 0x00, 0x00];
    fixed.extend_from_slice(&(crate::layout::PCI_ECAM_START as u32).to_le_bytes());
    fixed.extend_from_slice(&(crate::layout::PCI_ECAM_SIZE as u32).to_le_bytes());
    assert!(contains(&dsdt, &fixed));
}

#[test]
fn fadt_describes_the_pm_block_and_legacy_hardware() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let f = find(&tables, b"FACP");
    assert_eq!(f.len(), 276, "ACPI 6.x FADT");
    assert_eq!((f[8], f[131]), (6, 5), "FADT revision 6.5");
    assert_eq!(u16_at(f, 46), 9, "SCI_INT");
    assert_eq!(u32_at(f, 48), 0, "SMI_CMD: ACPI always enabled");
    assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
    assert_eq!(
        (f[88], f[89], f[91]),
        (4, 2, 4),
        "PM1 event/control/timer lengths"
    );
    assert_eq!(f[108], 0x32, "CENTURY");
    let boot_arch = u16_at(f, 109);
    assert_ne!(boot_arch & BOOT_ARCH_8042, 0, "8042 present");
    assert_eq!(
        boot_arch & (1 << 5),
        0,
        "CMOS RTC must not be flagged absent"
    );
    let flags = u32_at(f, 112);
    assert_ne!(flags & Flags::ResetRegSup as u32, 0);
    assert_ne!(flags & Flags::TmrValExt as u32, 0, "32-bit PM timer");
    assert_eq!(
        flags & Flags::HwReducedAcpi as u32,
        0,
        "not hardware-reduced"
    );
}

#[test]
fn fadt_extended_registers_match_legacy_ones() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let f = find(&tables, b"FACP");
    // X_PM1a_EVT_BLK and X_PM1a_CNT_BLK: system I/O, width = 8 * length.
    assert_eq!((f[148], f[149]), (1, 32));
    assert_eq!(u64_at(f, 152), 0x600);
    assert_eq!((f[172], f[173]), (1, 16));
    assert_eq!(u64_at(f, 176), 0x604);
    // X_PM_TMR_BLK: system I/O, 32 bits, dword access, at PM_TMR_BLK.
    assert_eq!((f[208], f[209], f[211]), (1, 32, 3));
    assert_eq!(u64_at(f, 212), 0x608);
}

#[test]
fn fadt_reset_register_is_io_port_0x606_value_1() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let f = find(&tables, b"FACP");
    let reset_reg = &f[116..128];
    assert_eq!(reset_reg[0], 1, "system I/O space");
    assert_eq!(reset_reg[1], 8, "8 bits wide");
    assert_eq!(reset_reg[3], 1, "byte access");
    assert_eq!(u64_at(reset_reg, 4), 0x606);
    assert_eq!(f[128], 1, "RESET_VALUE");
}

#[test]
fn fadt_points_at_dsdt_and_an_aligned_facs() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let f = find(&tables, b"FACP");
    assert_eq!(u32_at(f, 40), 0, "32-bit DSDT unused when X_DSDT is set");
    assert_eq!(&table(&mem, u64_at(f, 140))[..4], b"DSDT");
    let facs_addr = u64_at(f, 132);
    assert_eq!(facs_addr % 64, 0, "FACS alignment");
    assert_eq!(
        u64::from(u32_at(f, 36)),
        facs_addr,
        "FIRMWARE_CTRL matches X_FIRMWARE_CTRL"
    );
    let facs = bytes(&mem, facs_addr, 64);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
}

#[test]
fn dsdt_defines_s5_with_the_pm_sleep_type() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let dsdt = table(&mem, u64_at(find(&tables, b"FACP"), 140));
    // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix 5
    let expected = [0x08, b'_', b'S', b'5', b'_', 0x12];
    let at = dsdt
        .windows(expected.len())
        .position(|w| w == expected)
        .expect("no _S5_ package");
    let package = &dsdt[at + expected.len()..];
    assert_eq!(package[1], 4, "four elements");
    assert_eq!(&package[2..4], &[0x0a, 5], "SLP_TYPa = 5");
}

#[test]
fn dsdt_describes_the_pvpanic_port() {
    let (mem, rsdp) = tables(1);
    let tables = xsdt_tables(&mem, rsdp);
    let dsdt = table(&mem, u64_at(find(&tables, b"FACP"), 140));
    let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"QEMU0001\0"), "pvpanic _HID");
    // IO (Decode16, 0x505, 0x505, 1, 1)
    assert!(contains(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
}

/// The body of the AML device `name` (after its NameSeg), up to the end
/// of its package.
fn aml_device<'a>(dsdt: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
    let at = (0..dsdt.len() - 6)
        .find(|&i| dsdt[i..i + 2] == [0x5b, 0x82] && dsdt[i + 3..i + 7] == name[..])
        .or_else(|| {
            (0..dsdt.len() - 7)
                .find(|&i| dsdt[i..i + 2] == [0x5b, 0x82] && dsdt[i + 4..i + 8] == name[..])
        })
        .unwrap_or_else(|| panic!("no device {}", String::from_utf8_lossy(name)));
    // DeviceOp, then PkgLength (1 or 2 bytes here).
    let lead = dsdt[at + 2];
    let (len, len_bytes) = if lead >> 6 == 0 {
        (usize::from(lead), 1)
    } else {
        (usize::from(lead & 0xf) | usize::from(dsdt[at + 3]) << 4, 2)
    };
    &dsdt[at + 2 + len_bytes + 4..at + 2 + len]
}

/// An ISA device's name, EisaId bytes, I/O descriptors and IRQ mask.
type IsaCase = (&'static [u8; 4], [u8; 4], Vec<[u8; 8]>, u16);

#[test]
fn dsdt_describes_the_rtc_com1_and_keyboard_controller() {
    let dsdt = dsdt_bytes();
    let cases: [IsaCase; 3] = [
        (
            b"RTC_",
            [0x41, 0xd0, 0x0b, 0x00],
            vec![[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]],
            1 << 8,
        ),
        (
            b"COM1",
            [0x41, 0xd0, 0x05, 0x01],
            vec![[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]],
            1 << 4,
        ),
        (
            b"KBD_",
            [0x41, 0xd0, 0x03, 0x03],
            vec![
                [0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01],
                [0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01],
            ],
            1 << 1,
        ),
    ];
    for (name, eisa, ios, irq) in cases {
        let device = aml_device(&dsdt, name);
        let what = String::from_utf8_lossy(name);
        let mut hid = b"_HID\x0c".to_vec();
        hid.extend_from_slice(&eisa);
        assert!(contains(device, &hid), "{what} _HID");
        assert!(contains(device, b"_UID"), "{what} _UID");
        assert!(contains(device, b"_CRS"), "{what} _CRS");
        for io in ios {
            assert!(contains(device, &io), "{what} I/O {io:x?}");
        }
        let mask = irq.to_le_bytes();
        assert!(contains(device, &[0x22, mask[0], mask[1]]), "{what} IRQ");
    }
}

#[test]
fn madt_has_one_enabled_local_apic_per_cpu() {
    let (mem, rsdp) = tables(3);
    let tables = xsdt_tables(&mem, rsdp);
    let madt = find(&tables, b"APIC");
    assert_eq!(u32_at(madt, 36), APIC_START as u32);
    assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT");
    let lapics: Vec<_> = madt_entries(madt)
        .into_iter()
        .filter(|(ty, _)| *ty == 0)
        .map(|(_, e)| (e[2], e[3], u32_at(e, 4)))
        .collect();
    assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
}

#[test]
fn madt_has_the_ioapic_and_sci_override_but_no_timer_override() {
    let (mem, rsdp) = tables(2);
    let tables = xsdt_tables(&mem, rsdp);
    let entries = madt_entries(find(&tables, b"APIC"));
    let ioapics: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 1).collect();
    assert_eq!(ioapics.len(), 1);
    let ioapic = ioapics[0].1;
    assert_eq!(ioapic[2], madt::IOAPIC_ID);
    assert_eq!(u32_at(ioapic, 4), IOAPIC_START as u32);
    assert_eq!(u32_at(ioapic, 8), 0, "GSI base");

    let overrides: Vec<_> = entries
        .iter()
        .filter(|(ty, _)| *ty == 2)
        .map(|(_, e)| (e[3], u32_at(e, 4), u16_at(e, 8)))
        .collect();
    assert_eq!(overrides, [(9, 9, 0b1101)], "SCI level/high; IRQ0 identity");

    let nmis: Vec<_> = entries.iter().filter(|(ty, _)| *ty == 4).collect();
    assert_eq!(nmis.len(), 1);
    assert_eq!((nmis[0].1[2], nmis[0].1[5]), (0xff, 1), "all CPUs, LINT1");
}

#[test]
fn tables_for_255_cpus_fit_in_the_region() {
    let (mem, rsdp) = tables(255);
    let tables = xsdt_tables(&mem, rsdp);
    let lapics = madt_entries(find(&tables, b"APIC"))
        .iter()
        .filter(|(ty, _)| *ty == 0)
        .count();
    assert_eq!(lapics, 255);
}

#[test]
fn zero_cpus_is_refused() {
    assert!(matches!(
        create_acpi_tables(&memory(), 0),
        Err(AcpiError::NoCpus)
    ));
}

#[test]
fn memory_without_the_bios_area_is_an_error() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        create_acpi_tables(&mem, 1),
        Err(AcpiError::Write { table: "DSDT", .. })
    ));
}
