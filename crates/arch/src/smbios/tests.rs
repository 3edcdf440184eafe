//! The tables parsed back the way a guest's DMI scanner reads them.

use vm_memory::GuestMemoryMmap;

use super::*;

type Mem = GuestMemoryMmap<()>;

const UUID: &str = "6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b";

fn written() -> (Mem, u64) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let info = SmbiosInfo {
        uuid: UUID.parse().unwrap(),
    };
    let ep = create_smbios_tables(&mem, &info).unwrap();
    (mem, ep.0)
}

fn bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &x| acc.wrapping_add(x)) == 0
}

/// A parsed structure: type, formatted area, strings.
struct Parsed {
    kind: u8,
    area: Vec<u8>,
    strings: Vec<String>,
}

impl Parsed {
    /// The string a field at `offset` refers to ("" for none).
    fn string_at(&self, offset: usize) -> &str {
        match self.area[offset] {
            0 => "",
            n => &self.strings[usize::from(n) - 1],
        }
    }
}

fn parse_table(table: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < table.len() {
        let len = usize::from(table[at + 1]);
        let area = table[at..at + len].to_vec();
        let mut strings = Vec::new();
        let mut pos = at + len;
        if table[pos] == 0 {
            pos += 2;
        } else {
            while table[pos] != 0 {
                let end = pos + table[pos..].iter().position(|&b| b == 0).unwrap();
                strings.push(String::from_utf8(table[pos..end].to_vec()).unwrap());
                pos = end + 1;
            }
            pos += 1;
        }
        out.push(Parsed {
            kind: area[0],
            area,
            strings,
        });
        at = pos;
    }
    out
}

/// The 3.0 entry point, checked, and the structure table it points at.
fn table_from_sm3(mem: &Mem, ep_addr: u64) -> Vec<u8> {
    let ep = bytes(mem, ep_addr, 0x18);
    assert_eq!(&ep[..5], b"_SM3_");
    assert_eq!(ep[6], 0x18, "entry point length");
    assert!(sums_to_zero(&ep), "_SM3_ checksum");
    assert_eq!((ep[7], ep[8]), (3, 0), "SMBIOS 3.0");
    let len = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
    let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
    bytes(mem, addr, len)
}

#[test]
fn sm3_entry_point_is_on_a_16_byte_boundary_in_the_scanned_range() {
    let (mem, ep) = written();
    assert_eq!(ep % 16, 0);
    assert!((0xf0000..0x100000).contains(&ep));
    let table = table_from_sm3(&mem, ep);
    let kinds: Vec<u8> = parse_table(&table).iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [0, 1, 3, 32, 127]);
}

#[test]
fn legacy_entry_point_has_both_checksums_and_the_same_table() {
    let (mem, ep3) = written();
    // Scan the range on 16-byte boundaries, as an old tool does.
    let at = (0xf0000..0x100000u64)
        .step_by(16)
        .find(|&a| bytes(&mem, a, 4) == b"_SM_")
        .expect("an _SM_ anchor");
    let ep = bytes(&mem, at, 0x1f);
    assert_eq!(ep[5], 0x1f);
    assert!(sums_to_zero(&ep), "_SM_ checksum");
    assert_eq!(&ep[0x10..0x15], b"_DMI_");
    assert!(sums_to_zero(&ep[0x10..0x1f]), "_DMI_ checksum");
    let len = usize::from(u16::from_le_bytes([ep[0x16], ep[0x17]]));
    let addr = u64::from(u32::from_le_bytes(ep[0x18..0x1c].try_into().unwrap()));
    let count = u16::from_le_bytes([ep[0x1c], ep[0x1d]]);
    let table = bytes(&mem, addr, len);
    assert_eq!(table, table_from_sm3(&mem, ep3));
    assert_eq!(usize::from(count), parse_table(&table).len());
    let largest = parse_table(&table)
        .iter()
        .map(|s| s.area.len() + s.strings.iter().map(|t| t.len() + 1).sum::<usize>() + 1)
        .max()
        .unwrap();
    assert!(usize::from(u16::from_le_bytes([ep[8], ep[9]])) >= largest);
}

#[test]
fn system_structure_names_ferrovisor_and_carries_the_uuid() {
    let (mem, ep) = written();
    let structures = parse_table(&table_from_sm3(&mem, ep));
    let system = structures.iter().find(|s| s.kind == 1).unwrap();
    assert_eq!(system.area.len(), 0x1b);
    assert_eq!(system.string_at(4), "Ferrovisor");
    assert_eq!(system.string_at(5), "Ferrovisor VM");
    assert_eq!(
        system.string_at(7),
        "6f1c2e3d",
        "serial: the UUID's first group"
    );
    assert_eq!(system.string_at(0x1a), "Virtual Machine");
    // The UUID, first three fields little-endian, as Linux prints it back.
    assert_eq!(
        system.area[8..24],
        [
            0x3d, 0x2e, 0x1c, 0x6f, 0x5a, 0x4b, 0x78, 0x49, 0x8a, 0x1b, 0x0c, 0x2d, 0x3e, 0x4f,
            0x5a, 0x6b
        ]
    );
}

#[test]
fn bios_structure_names_the_vendor_and_says_virtual_machine() {
    let (mem, ep) = written();
    let structures = parse_table(&table_from_sm3(&mem, ep));
    let bios = structures.iter().find(|s| s.kind == 0).unwrap();
    assert_eq!(bios.string_at(4), "Ferrovisor");
    assert_eq!(bios.string_at(5), VERSION);
    assert_ne!(bios.area[0x13] & (1 << 4), 0, "VM characteristic");
    let chassis = structures.iter().find(|s| s.kind == 3).unwrap();
    assert_eq!(chassis.string_at(4), "Ferrovisor");
    let boot = structures.iter().find(|s| s.kind == 32).unwrap();
    assert_eq!(boot.area[0x0a], 0, "no boot errors");
}

#[test]
fn handles_are_unique() {
    let (mem, ep) = written();
    let structures = parse_table(&table_from_sm3(&mem, ep));
    let mut handles: Vec<u16> = structures
        .iter()
        .map(|s| u16::from_le_bytes([s.area[2], s.area[3]]))
        .collect();
    handles.sort_unstable();
    handles.dedup();
    assert_eq!(handles.len(), structures.len());
}

#[test]
fn uuid_text_round_trips_and_bad_text_is_refused() {
    let uuid: Uuid = UUID.parse().unwrap();
    assert_eq!(uuid.to_string(), UUID);
    let upper: Uuid = UUID.to_uppercase().parse().unwrap();
    assert_eq!(upper, uuid);
    for bad in [
        "",
        "6f1c2e3d4b5a49788a1b0c2d3e4f5a6b",
        "6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6",
        "6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6g",
        "+f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b",
    ] {
        assert!(bad.parse::<Uuid>().is_err(), "{bad}");
    }
}

#[test]
fn random_uuids_are_version_4_and_differ() {
    let a = Uuid::random().unwrap();
    let b = Uuid::random().unwrap();
    assert_ne!(a, b);
    for u in [a, b] {
        assert_eq!(u.0[6] >> 4, 4, "version 4");
        assert_eq!(u.0[8] >> 6, 0b10, "RFC variant");
    }
}

#[test]
fn memory_without_the_bios_area_is_an_error() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    let info = SmbiosInfo {
        uuid: UUID.parse().unwrap(),
    };
    assert!(matches!(
        create_smbios_tables(&mem, &info),
        Err(SmbiosError::Write(_))
    ));
}
