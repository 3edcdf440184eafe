//! Unit tests of the multiboot loader.

use super::testimage::{tiny_multiboot_kernel, TestKernelFormat};
use super::*;
use vm_memory::GuestMemoryMmap;

const MIB: u64 = 1 << 20;
const MEM_SIZE: u64 = 4 * MIB;
const INFO: (u64, u64) = (0x30000, 0x10000);
const FILL: u8 = 0xaa;

/// Guest memory from 0 filled with 0xaa, so zeroing can be seen.
fn memory(size: u64) -> GuestMemoryMmap {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("guest memory");
    mem.write_slice(&vec![FILL; size as usize], GuestAddress(0))
        .expect("fill");
    mem
}

/// A PC-like map: low RAM, the EBDA and BIOS area reserved, RAM from 1 MiB.
fn e820(size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x400, 2),
        (0xf0000, 0x10000, 2),
        (MIB, size - MIB, 1),
    ]
}

fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).expect("read");
    buf
}

fn word(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj::<u32>(GuestAddress(addr)).expect("read")
}

fn cstring(mem: &GuestMemoryMmap, addr: u32) -> String {
    let raw = bytes(mem, u64::from(addr), 256);
    let end = raw.iter().position(|&b| b == 0).expect("NUL");
    String::from_utf8(raw[..end].to_vec()).expect("utf8")
}

fn mb_header(flags: u32) -> Vec<u8> {
    let checksum = 0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags));
    [MULTIBOOT_HEADER_MAGIC, flags, checksum]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

fn put(buf: &mut Vec<u8>, off: usize, data: &[u8]) {
    if buf.len() < off + data.len() {
        buf.resize(off + data.len(), 0);
    }
    buf[off..off + data.len()].copy_from_slice(data);
}

/// An ELF `PT_LOAD` segment for the test builders.
struct Seg {
    paddr: u64,
    vaddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn seg(paddr: u64, data: &[u8], memsz: u64) -> Seg {
    Seg {
        paddr,
        vaddr: paddr,
        data: data.to_vec(),
        memsz,
    }
}

/// An ELF file (32- or 64-bit) with the given segments and a multiboot
/// header with `mb_flags` right after the program headers.
fn elf(is64: bool, entry: u64, segs: &[Seg], mb_flags: u32) -> Vec<u8> {
    let (ehsize, phsize) = if is64 { (64, 56) } else { (52, 32) };
    let mut f = vec![0x7f, b'E', b'L', b'F', if is64 { 2 } else { 1 }, 1, 1];
    let w = |v: u64| -> Vec<u8> {
        if is64 {
            v.to_le_bytes().to_vec()
        } else {
            (v as u32).to_le_bytes().to_vec()
        }
    };
    put(&mut f, 16, &2u16.to_le_bytes());
    put(&mut f, 18, &(if is64 { 62u16 } else { 3 }).to_le_bytes());
    put(&mut f, 24, &w(entry));
    let (phoff_at, phentsize_at) = if is64 { (32, 54) } else { (28, 42) };
    put(&mut f, phoff_at, &w(ehsize as u64));
    put(&mut f, phentsize_at, &(phsize as u16).to_le_bytes());
    put(&mut f, phentsize_at + 2, &(segs.len() as u16).to_le_bytes());
    let mb_off = (ehsize + phsize * segs.len()).next_multiple_of(4);
    put(&mut f, mb_off, &mb_header(mb_flags));
    let mut data_off = (mb_off + 12).next_multiple_of(16);
    for (i, s) in segs.iter().enumerate() {
        let ph = ehsize + i * phsize;
        let fields = [
            data_off as u64,
            s.vaddr,
            s.paddr,
            s.data.len() as u64,
            s.memsz,
        ];
        put(&mut f, ph, &PT_LOAD.to_le_bytes());
        for (n, v) in fields.iter().enumerate() {
            let at = if is64 { ph + 8 + 8 * n } else { ph + 4 + 4 * n };
            put(&mut f, at, &w(*v));
        }
        put(&mut f, data_off, &s.data);
        data_off = (data_off + s.data.len()).next_multiple_of(16);
    }
    f
}

fn elf32(entry: u64, segs: &[Seg]) -> Vec<u8> {
    elf(false, entry, segs, HEADER_FLAG_MEMORY_INFO)
}

/// A flat a.out-kludge image: `pad` bytes, the header (with address
/// fields), then `body`.
fn aout(pad: usize, fields: AddressFields, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; pad];
    f.extend(mb_header(HEADER_FLAG_ADDRESS | HEADER_FLAG_MEMORY_INFO));
    for v in [
        fields.header_addr,
        fields.load_addr,
        fields.load_end_addr,
        fields.bss_end_addr,
        fields.entry_addr,
    ] {
        f.extend(v.to_le_bytes());
    }
    f.extend_from_slice(body);
    f
}

fn load_simple(mem: &GuestMemoryMmap, image: &[u8]) -> Result<MultibootLoad> {
    load(mem, image, "", &[], MEM_SIZE, INFO, &e820(MEM_SIZE))
}

// ---- probe ----

#[test]
fn probe_finds_an_aligned_header_with_a_good_checksum() {
    let mut image = vec![0u8; 0x100];
    image.extend(mb_header(HEADER_FLAG_MEMORY_INFO));
    let header = probe(&image).expect("header");
    assert_eq!(header.offset, 0x100);
    assert_eq!(header.flags, HEADER_FLAG_MEMORY_INFO);
    assert_eq!(header.addresses, None);
}

#[test]
fn probe_rejects_a_bad_checksum() {
    let mut image = mb_header(0);
    image[8] ^= 1;
    assert_eq!(probe(&image), None);
}

#[test]
fn probe_rejects_an_unaligned_header() {
    let mut image = vec![0u8; 2];
    image.extend(mb_header(0));
    assert_eq!(probe(&image), None);
}

#[test]
fn probe_searches_only_the_first_8_kib() {
    let mut inside = vec![0u8; MULTIBOOT_SEARCH_LEN - 12];
    inside.extend(mb_header(0));
    assert_eq!(probe(&inside).map(|h| h.offset), Some(8180));
    let mut beyond = vec![0u8; MULTIBOOT_SEARCH_LEN];
    beyond.extend(mb_header(0));
    assert_eq!(probe(&beyond), None);
}

#[test]
fn probe_handles_short_and_empty_images() {
    assert_eq!(probe(&[]), None);
    assert_eq!(probe(&mb_header(0)[..11]), None);
}

// ---- ELF ----

#[test]
fn elf32_segment_is_loaded_with_bss_zeroed() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0010, &[seg(0x10_0000, &[1, 2, 3, 4, 5], 0x2000)]);
    let loaded = load_simple(&mem, &image).expect("load");
    assert_eq!(loaded.entry, 0x10_0010);
    assert_eq!(loaded.kernel_start, 0x10_0000);
    assert_eq!(loaded.kernel_end, 0x10_2000);
    assert_eq!(bytes(&mem, 0x10_0000, 5), [1, 2, 3, 4, 5]);
    assert!(bytes(&mem, 0x10_0005, 0x2000 - 5).iter().all(|&b| b == 0));
    assert_eq!(
        bytes(&mem, 0x10_2000, 1),
        [FILL],
        "past the bss is untouched"
    );
}

#[test]
fn elf_entry_is_translated_from_virtual_to_physical() {
    let mem = memory(MEM_SIZE);
    let mut s = seg(0x20_0000, &[0x90; 16], 16);
    s.vaddr = 0xc020_0000;
    let loaded = load_simple(&mem, &elf32(0xc020_0008, &[s])).expect("load");
    assert_eq!(loaded.entry, 0x20_0008);
    assert_eq!(bytes(&mem, 0x20_0000, 16), [0x90; 16]);
}

#[test]
fn elf64_with_32_bit_addresses_is_loaded() {
    let mem = memory(MEM_SIZE);
    let image = elf(true, 0x10_0000, &[seg(0x10_0000, &[7; 8], 0x100)], 0);
    let loaded = load_simple(&mem, &image).expect("load");
    assert_eq!(loaded.entry, 0x10_0000);
    assert_eq!(bytes(&mem, 0x10_0000, 9), [7, 7, 7, 7, 7, 7, 7, 7, 0]);
}

#[test]
fn elf_with_other_machine_is_refused() {
    let mem = memory(MEM_SIZE);
    let mut image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 1)]);
    image[18] = 40; // EM_ARM
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::UnsupportedElfMachine(40))
    ));
}

#[test]
fn elf_with_file_size_above_memory_size_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1; 16], 8)]);
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::FileSizeExceedsMemSize { .. })
    ));
}

// ---- a.out kludge ----

#[test]
fn aout_kludge_loads_below_1_mib_with_bss_zeroed() {
    let mem = memory(MEM_SIZE);
    // Header at file offset 0x20, loaded at 0x8020: the file starts at 0x8000.
    let body = [0xf4u8; 0x10];
    let fields = AddressFields {
        header_addr: 0x8020,
        load_addr: 0x8000,
        load_end_addr: 0x8050,
        bss_end_addr: 0x9000,
        entry_addr: 0x8040,
    };
    let image = aout(0x20, fields, &body);
    assert_eq!(image.len(), 0x50);
    let loaded = load_simple(&mem, &image).expect("load");
    assert_eq!(loaded.entry, 0x8040);
    assert_eq!((loaded.kernel_start, loaded.kernel_end), (0x8000, 0x9000));
    assert_eq!(bytes(&mem, 0x8000, 0x50), image);
    assert!(bytes(&mem, 0x8050, 0x9000 - 0x8050).iter().all(|&b| b == 0));
    assert_eq!(bytes(&mem, 0x9000, 1), [FILL]);
}

#[test]
fn aout_load_end_zero_loads_the_rest_of_the_file() {
    let mem = memory(MEM_SIZE);
    let fields = AddressFields {
        header_addr: 0x10_0000,
        load_addr: 0x10_0000,
        load_end_addr: 0,
        bss_end_addr: 0,
        entry_addr: 0x10_0020,
    };
    let image = aout(0, fields, &[0x55; 0x30]);
    let loaded = load_simple(&mem, &image).expect("load");
    assert_eq!(loaded.kernel_end, 0x10_0000 + image.len() as u64);
    assert_eq!(bytes(&mem, 0x10_0000, image.len()), image);
}

#[test]
fn aout_bad_address_fields_are_refused() {
    let mem = memory(MEM_SIZE);
    let good = AddressFields {
        header_addr: 0x10_0000,
        load_addr: 0x10_0000,
        load_end_addr: 0x10_0020,
        bss_end_addr: 0x10_1000,
        entry_addr: 0x10_0000,
    };
    let cases = [
        AddressFields {
            header_addr: 0x0f_fff0,
            ..good
        },
        AddressFields {
            load_addr: 0x0f_0000, // before the start of the file
            ..good
        },
        AddressFields {
            load_end_addr: 0x0f_0000,
            ..good
        },
        AddressFields {
            bss_end_addr: 0x10_0010,
            ..good
        },
    ];
    for fields in cases {
        let result = load_simple(&mem, &aout(0, fields, &[0; 0x20]));
        assert!(
            matches!(result, Err(MultibootError::BadAddressFields(_))),
            "{fields:?}: {result:?}"
        );
    }
}

#[test]
fn aout_header_cut_short_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = mb_header(HEADER_FLAG_ADDRESS);
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::HeaderTruncated { offset: 0 })
    ));
}

// ---- the information structure ----

#[test]
fn info_structure_describes_memory_cmdline_mmap_and_loader() {
    let mem = memory(MEM_SIZE);
    let map = e820(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x1000)]);
    let loaded = load(&mem, &image, "console=ttyS0 x", &[], MEM_SIZE, INFO, &map).expect("load");
    let info = u64::from(loaded.info_addr);
    assert_eq!(info, INFO.0);
    let field = |off: usize| word(&mem, info + off as u64);
    let want_flags = INFO_FLAG_MEMORY
        | INFO_FLAG_CMDLINE
        | INFO_FLAG_MODS
        | INFO_FLAG_MMAP
        | INFO_FLAG_BOOT_LOADER_NAME;
    assert_eq!(field(info_offset::FLAGS), want_flags);
    assert_eq!(field(info_offset::MEM_LOWER), 0x9fc00 / 1024);
    assert_eq!(
        field(info_offset::MEM_UPPER),
        ((MEM_SIZE - MIB) / 1024) as u32
    );
    assert_eq!(
        cstring(&mem, field(info_offset::CMDLINE)),
        "console=ttyS0 x"
    );
    assert_eq!(
        cstring(&mem, field(info_offset::BOOT_LOADER_NAME)),
        "ferrovisor"
    );
    assert_eq!(field(info_offset::MODS_COUNT), 0);
    assert_eq!(field(info_offset::MMAP_LENGTH), 4 * 24);
    let mmap = u64::from(field(info_offset::MMAP_ADDR));
    for (i, &(addr, len, kind)) in map.iter().enumerate() {
        let entry = mmap + 24 * i as u64;
        assert_eq!(word(&mem, entry), 20);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(entry + 4)).ok(),
            Some(addr)
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(entry + 12)).ok(),
            Some(len)
        );
        assert_eq!(word(&mem, entry + 20), kind);
    }
    assert!(u64::from(loaded.info_len) <= INFO.1);
    assert_eq!(
        bytes(&mem, info + u64::from(loaded.info_len), 1),
        [FILL],
        "nothing past the used part of the area is written"
    );
}

#[test]
fn mem_upper_stops_at_the_first_hole() {
    let map = [
        (0, 0xa0000, 1),
        (MIB, 15 * MIB, 1),
        (16 * MIB, MIB, 2),
        (17 * MIB, 100 * MIB, 1),
    ];
    assert_eq!(memory_sizes_kib(&map, 0), (640, 15 * 1024));
    // Unsorted entries are followed too.
    let unsorted = [(2 * MIB, MIB, 1), (MIB, MIB, 1), (0, 0x9fc00, 1)];
    assert_eq!(memory_sizes_kib(&unsorted, 0), (639, 2 * 1024));
}

#[test]
fn without_a_map_memory_sizes_come_from_the_ram_size() {
    assert_eq!(memory_sizes_kib(&[], 64 * MIB), (640, 63 * 1024));
    assert_eq!(memory_sizes_kib(&[], 8 << 30), (640, (4096 - 1) * 1024));
}

// ---- modules ----

#[test]
fn modules_are_page_aligned_above_the_kernel_with_their_strings() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x1800)]);
    let (first, second) = (vec![0x11u8; 0x1234], vec![0x22u8; 0x10]);
    let modules = [
        MultibootModule {
            data: &first,
            cmdline: "initrd one",
        },
        MultibootModule {
            data: &second,
            cmdline: "",
        },
    ];
    let loaded = load(&mem, &image, "k", &modules, MEM_SIZE, INFO, &e820(MEM_SIZE)).expect("load");
    let info = u64::from(loaded.info_addr);
    assert_eq!(word(&mem, info + info_offset::MODS_COUNT as u64), 2);
    let list = u64::from(word(&mem, info + info_offset::MODS_ADDR as u64));
    let entry = |i: u64, field: u64| word(&mem, list + 16 * i + field);
    assert_eq!((entry(0, 0), entry(0, 4)), (0x10_2000, 0x10_3234));
    assert_eq!((entry(1, 0), entry(1, 4)), (0x10_4000, 0x10_4010));
    assert_eq!(cstring(&mem, entry(0, 8)), "initrd one");
    assert_eq!(cstring(&mem, entry(1, 8)), "");
    assert_eq!((entry(0, 12), entry(1, 12)), (0, 0));
    assert_eq!(bytes(&mem, 0x10_2000, first.len()), first);
    assert_eq!(bytes(&mem, 0x10_4000, second.len()), second);
    assert_eq!(loaded.modules_end, 0x10_4010);
}

#[test]
fn modules_skip_the_info_area_and_reserved_memory() {
    let mem = memory(MEM_SIZE);
    // A kernel just below the info area, at 0x2f000.
    let image = elf32(0x2f000, &[seg(0x2f000, &[1], 0x1000)]);
    let small = [3u8; 0x100];
    let big = vec![4u8; 0x80000]; // too big for the RAM left below the EBDA
    let modules = [
        MultibootModule {
            data: &small,
            cmdline: "a",
        },
        MultibootModule {
            data: &big,
            cmdline: "b",
        },
    ];
    let loaded = load(&mem, &image, "", &modules, MEM_SIZE, INFO, &e820(MEM_SIZE)).expect("load");
    let list = u64::from(word(&mem, INFO.0 + info_offset::MODS_ADDR as u64));
    assert_eq!(word(&mem, list), 0x40000, "past the info area");
    assert_eq!(
        word(&mem, list + 16),
        0x10_0000,
        "past the hole below 1 MiB"
    );
    assert_eq!(loaded.modules_end, 0x18_0000);
}

#[test]
fn a_module_that_does_not_fit_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x1000)]);
    let huge = vec![0u8; MEM_SIZE as usize];
    let modules = [MultibootModule {
        data: &huge,
        cmdline: "",
    }];
    let result = load(&mem, &image, "", &modules, MEM_SIZE, INFO, &e820(MEM_SIZE));
    assert!(matches!(
        result,
        Err(MultibootError::ModuleDoesNotFit { index: 0, .. })
    ));
    assert_eq!(bytes(&mem, 0x10_0000, 1), [FILL], "nothing written");
}

#[test]
fn command_lines_with_nul_are_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x1000)]);
    let map = e820(MEM_SIZE);
    assert!(matches!(
        load(&mem, &image, "a\0b", &[], MEM_SIZE, INFO, &map),
        Err(MultibootError::CmdlineHasNul)
    ));
    let modules = [MultibootModule {
        data: &[1],
        cmdline: "x\0",
    }];
    assert!(matches!(
        load(&mem, &image, "", &modules, MEM_SIZE, INFO, &map),
        Err(MultibootError::ModuleCmdlineHasNul { index: 0 })
    ));
}

// ---- bad input ----

#[test]
fn image_without_header_is_refused() {
    let mem = memory(MEM_SIZE);
    assert!(matches!(
        load_simple(&mem, &[0u8; 64]),
        Err(MultibootError::NoHeader)
    ));
}

#[test]
fn non_elf_image_without_address_fields_is_refused() {
    let mem = memory(MEM_SIZE);
    assert!(matches!(
        load_simple(&mem, &mb_header(0)),
        Err(MultibootError::NotElf)
    ));
}

#[test]
fn unknown_required_flags_are_refused_but_video_is_ignored() {
    let mem = memory(MEM_SIZE);
    let segs = [seg(0x10_0000, &[1], 0x1000)];
    let unknown = elf(false, 0x10_0000, &segs, 1 << 3);
    assert!(matches!(
        load_simple(&mem, &unknown),
        Err(MultibootError::UnsupportedFlags { unknown: 8, .. })
    ));
    let video = elf(false, 0x10_0000, &segs, HEADER_FLAG_VIDEO_MODE | 1 << 20);
    assert!(load_simple(&mem, &video).is_ok());
}

#[test]
fn truncated_program_headers_are_refused() {
    let mem = memory(MEM_SIZE);
    let mut image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x1000)]);
    image[44] = 200; // e_phnum: the table now runs past the end of the file
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::Truncated { .. })
    ));
}

#[test]
fn truncated_segment_data_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1; 64], 0x1000)]);
    assert!(matches!(
        load_simple(&mem, &image[..image.len() - 1]),
        Err(MultibootError::Truncated { .. })
    ));
    let fields = AddressFields {
        header_addr: 0x10_0000,
        load_addr: 0x10_0000,
        load_end_addr: 0x10_1000, // past the end of the file
        bss_end_addr: 0,
        entry_addr: 0x10_0000,
    };
    assert!(matches!(
        load_simple(&mem, &aout(0, fields, &[0; 16])),
        Err(MultibootError::Truncated { .. })
    ));
}

#[test]
fn segment_outside_guest_memory_is_refused_and_nothing_is_written() {
    let mem = memory(MEM_SIZE);
    let image = elf32(
        0x10_0000,
        &[seg(0x10_0000, &[1], 0x10), seg(MEM_SIZE - 0x10, &[2], 0x20)],
    );
    let result = load_simple(&mem, &image);
    assert!(matches!(
        result,
        Err(MultibootError::SegmentOutsideMemory { addr, len: 0x20 }) if addr == MEM_SIZE - 0x10
    ));
    assert_eq!(bytes(&mem, 0x10_0000, 1), [FILL]);
    assert_eq!(bytes(&mem, INFO.0, 4), [FILL; 4]);
}

#[test]
fn segment_running_past_4_gib_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0xffff_f000, &[1], 0x2000)]);
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::SegmentOverflow {
            addr: 0xffff_f000,
            len: 0x2000
        })
    ));
    let wrap = elf(true, 0x10_0000, &[seg(u64::MAX - 0xf, &[1], 0x20)], 0);
    assert!(matches!(
        load_simple(&mem, &wrap),
        Err(MultibootError::SegmentOverflow { .. })
    ));
}

#[test]
fn segment_overlapping_the_info_area_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x2f000, &[seg(0x2f000, &[1], 0x2000)]);
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::SegmentOverlapsInfoArea { addr: 0x2f000, .. })
    ));
}

#[test]
fn entry_outside_guest_memory_is_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x8000_0000, &[seg(0x10_0000, &[1], 0x10)]);
    assert!(matches!(
        load_simple(&mem, &image),
        Err(MultibootError::EntryOutsideMemory { entry: 0x8000_0000 })
    ));
}

#[test]
fn bad_info_areas_are_refused() {
    let mem = memory(MEM_SIZE);
    let image = elf32(0x10_0000, &[seg(0x10_0000, &[1], 0x10)]);
    let map = e820(MEM_SIZE);
    let outside = load(&mem, &image, "", &[], MEM_SIZE, (MEM_SIZE, 0x1000), &map);
    assert!(matches!(
        outside,
        Err(MultibootError::InfoAreaInvalid { .. })
    ));
    let small = load(&mem, &image, "", &[], MEM_SIZE, (0x30000, 0x80), &map);
    assert!(matches!(
        small,
        Err(MultibootError::InfoAreaTooSmall { .. })
    ));
}

#[test]
fn errors_are_one_line_naming_the_problem() {
    let err = MultibootError::SegmentOutsideMemory {
        addr: 0x10_0000,
        len: 0x2000,
    };
    assert_eq!(
        err.to_string(),
        "multiboot kernel: segment 0x100000+0x2000 lies outside guest memory"
    );
}

// ---- the test kernel ----

#[test]
fn test_kernel_loads_in_both_formats() {
    for (format, addr) in [
        (TestKernelFormat::Elf32, 0x10_0000u32),
        (TestKernelFormat::AoutKludge, 0x5_0000),
    ] {
        let mem = memory(MEM_SIZE);
        let image = tiny_multiboot_kernel(format, addr);
        let loaded = load_simple(&mem, &image).expect("load");
        assert_eq!(loaded.entry, addr + 0x80);
        assert_eq!(u64::from(addr), loaded.kernel_start);
        assert!(loaded.kernel_end - loaded.kernel_start <= 0x1000);
        assert_eq!(bytes(&mem, u64::from(addr) + 0x80, 2), [0xfa, 0xfc]);
    }
}

#[test]
fn command_line_starts_with_the_image_name() {
    assert_eq!(
        command_line("/boot/kernel.elf", "console=ttyS0 quiet"),
        "/boot/kernel.elf console=ttyS0 quiet"
    );
    assert_eq!(command_line("kernel.elf", ""), "kernel.elf");
    assert_eq!(command_line("initrd.img", "rw"), "initrd.img rw");
}
