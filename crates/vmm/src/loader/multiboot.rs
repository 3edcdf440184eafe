//! Multiboot (version 1) kernel loader.
//!
//! Loads a kernel the way `qemu -kernel` does for a multiboot image: it finds
//! the multiboot header in the first 8 KiB of the file, loads the kernel either
//! through the header's address fields (the "a.out kludge", flag bit 16) or
//! from the ELF program headers, places the modules page-aligned above the
//! kernel, and builds the multiboot information structure in a caller-chosen
//! area of guest memory.
//!
//! The kernel file and the modules are user input. Every offset, size and
//! address taken from them is checked before use, and nothing is written to
//! guest memory until the whole load has been validated, so a bad file yields
//! an error and leaves guest memory untouched.
//!
//! # Command lines
//!
//! As GRUB and QEMU do, the kernel's command line starts with the name of its
//! image (the path as given), then a space and the user's arguments (see
//! [`command_line`]); a module's string is its file name followed by its
//! arguments, if any.
//!
//! # Machine state on entry
//!
//! This module only fills guest memory. The caller sets up the boot CPU as the
//! multiboot specification requires:
//! - 32-bit protected mode with paging off (`CR0.PE = 1`, `CR0.PG = 0`);
//! - `CS` a flat 32-bit read/execute code segment (base 0, limit 4 GiB);
//! - `DS`, `ES`, `FS`, `GS`, `SS` flat 32-bit read/write data segments;
//! - `EFLAGS.IF = 0` and `EFLAGS.VM = 0`, A20 enabled;
//! - `EAX` = [`MULTIBOOT_BOOTLOADER_MAGIC`], `EBX` = [`MultibootLoad::info_addr`],
//!   `EIP` = [`MultibootLoad::entry`]. `ESP` is undefined: the kernel sets up
//!   its own stack.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

#[cfg(test)]
mod testimage;

/// The magic number at the start of a multiboot header.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The value in `EAX` when the kernel is entered.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie within this many bytes from the start of the file.
pub const MULTIBOOT_SEARCH_LEN: usize = 8192;
/// The name we put in the info structure's `boot_loader_name`.
pub const MULTIBOOT_BOOTLOADER_NAME: &str = "ferrovisor";

/// Header flag: modules must be page aligned (we always align them).
pub const HEADER_FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants `mem_lower`/`mem_upper` (we always give them).
pub const HEADER_FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel wants a video mode (we have no framebuffer and ignore it).
pub const HEADER_FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields are valid (the "a.out kludge").
pub const HEADER_FLAG_ADDRESS: u32 = 1 << 16;
/// The low 16 header flags are requirements the loader must understand.
const HEADER_REQUIRED_MASK: u32 = 0xffff;
const HEADER_SUPPORTED_REQUIRED: u32 =
    HEADER_FLAG_PAGE_ALIGN | HEADER_FLAG_MEMORY_INFO | HEADER_FLAG_VIDEO_MODE;

/// Info flag: `mem_lower` and `mem_upper` are valid.
pub const INFO_FLAG_MEMORY: u32 = 1 << 0;
/// Info flag: `cmdline` is valid.
pub const INFO_FLAG_CMDLINE: u32 = 1 << 2;
/// Info flag: `mods_count` and `mods_addr` are valid.
pub const INFO_FLAG_MODS: u32 = 1 << 3;
/// Info flag: `mmap_length` and `mmap_addr` are valid.
pub const INFO_FLAG_MMAP: u32 = 1 << 6;
/// Info flag: `boot_loader_name` is valid.
pub const INFO_FLAG_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Byte offsets of the fields of the multiboot information structure.
pub mod info_offset {
    pub const FLAGS: usize = 0;
    pub const MEM_LOWER: usize = 4;
    pub const MEM_UPPER: usize = 8;
    pub const CMDLINE: usize = 16;
    pub const MODS_COUNT: usize = 20;
    pub const MODS_ADDR: usize = 24;
    pub const MMAP_LENGTH: usize = 44;
    pub const MMAP_ADDR: usize = 48;
    pub const BOOT_LOADER_NAME: usize = 64;
}

/// Size reserved for the information structure: the full version 1 layout
/// (framebuffer fields included, 116 bytes), rounded up to 8.
pub const INFO_STRUCT_SIZE: usize = 120;
/// Size of one module list entry: start, end, string, reserved.
pub const MODULE_ENTRY_SIZE: usize = 16;
/// Size of one memory map entry, its own `size` field (which holds 20) included.
pub const MMAP_ENTRY_SIZE: usize = 24;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const PAGE_SIZE: u64 = 0x1000;
const FOUR_GIB: u64 = 1 << 32;
const ONE_MIB: u64 = 0x10_0000;
const LOW_MEMORY_END: u64 = 640 * 1024;
/// The fixed part of a multiboot header: magic, flags, checksum.
const HEADER_CORE_LEN: usize = 12;

/// Errors from loading a multiboot kernel. Each message is one line naming
/// what is wrong.
#[derive(Debug, Error)]
pub enum MultibootError {
    #[error("multiboot kernel: no multiboot header in the first 8 KiB")]
    NoHeader,
    #[error("multiboot kernel: header at offset {offset:#x} is cut short by the end of the file")]
    HeaderTruncated { offset: usize },
    #[error("multiboot kernel: header requires unsupported features (flags {flags:#x}, unknown required bits {unknown:#x})")]
    UnsupportedFlags { flags: u32, unknown: u32 },
    #[error("multiboot kernel: bad header address fields: {0}")]
    BadAddressFields(&'static str),
    #[error("multiboot kernel: not an ELF file, and the header has no address fields")]
    NotElf,
    #[error("multiboot kernel: unsupported ELF file: {0}")]
    UnsupportedElf(&'static str),
    #[error("multiboot kernel: unsupported ELF machine {0} (want i386, or x86-64 with 32-bit addresses)")]
    UnsupportedElfMachine(u16),
    #[error("multiboot kernel: file is truncated: {what} at offset {offset:#x}+{len:#x} lies past its end ({file_len:#x} bytes)")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: usize,
    },
    #[error("multiboot kernel: no loadable segment")]
    NoLoadableSegments,
    #[error("multiboot kernel: segment {addr:#x} has {filesz:#x} bytes in the file but only {memsz:#x} in memory")]
    FileSizeExceedsMemSize { addr: u64, filesz: u64, memsz: u64 },
    #[error("multiboot kernel: segment {addr:#x}+{len:#x} runs past the 4 GiB limit of 32-bit addresses")]
    SegmentOverflow { addr: u64, len: u64 },
    #[error("multiboot kernel: segment {addr:#x}+{len:#x} lies outside guest memory")]
    SegmentOutsideMemory { addr: u64, len: u64 },
    #[error("multiboot kernel: segment {addr:#x}+{len:#x} overlaps the multiboot info area {info_start:#x}+{info_size:#x}")]
    SegmentOverlapsInfoArea {
        addr: u64,
        len: u64,
        info_start: u64,
        info_size: u64,
    },
    #[error("multiboot kernel: entry point {entry:#x} lies outside guest memory below 4 GiB")]
    EntryOutsideMemory { entry: u64 },
    #[error("multiboot info area {start:#x}+{size:#x} is not in guest memory below 4 GiB")]
    InfoAreaInvalid { start: u64, size: u64 },
    #[error("multiboot info area is too small: {needed:#x} bytes needed, {size:#x} available")]
    InfoAreaTooSmall { needed: u64, size: u64 },
    #[error("multiboot kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("multiboot module {index}: command line contains a NUL byte")]
    ModuleCmdlineHasNul { index: usize },
    #[error("multiboot module {index}: {len:#x} bytes do not fit in guest RAM below 4 GiB above the kernel")]
    ModuleDoesNotFit { index: usize, len: u64 },
    #[error("multiboot: cannot write guest memory at {addr:#x}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

type Result<T> = std::result::Result<T, MultibootError>;

/// The address fields of a multiboot header (valid with [`HEADER_FLAG_ADDRESS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressFields {
    /// Physical address the header itself is loaded at.
    pub header_addr: u32,
    /// Physical address of the start of the text segment.
    pub load_addr: u32,
    /// End of the data segment; 0 means the rest of the file.
    pub load_end_addr: u32,
    /// End of the bss; 0 means no bss.
    pub bss_end_addr: u32,
    /// Physical address to jump to.
    pub entry_addr: u32,
}

/// A multiboot header found in a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// Offset of the header's magic in the file.
    pub offset: usize,
    /// The header's flags.
    pub flags: u32,
    /// The address fields, read when [`HEADER_FLAG_ADDRESS`] is set and the
    /// file holds them; `None` otherwise.
    pub addresses: Option<AddressFields>,
}

impl MultibootHeader {
    /// Whether the header asks to be loaded through its address fields.
    pub fn has_address_fields(&self) -> bool {
        self.flags & HEADER_FLAG_ADDRESS != 0
    }
}

/// The command line of a multiboot image named `image_name` given the
/// arguments `args`: `"NAME ARGS"`, or `"NAME"` alone when there are no
/// arguments (GRUB's form; QEMU adds a space even then). Kernels such as
/// Xen and many hobby kernels skip the first word.
pub fn command_line(image_name: &str, args: &str) -> String {
    if args.is_empty() {
        image_name.to_string()
    } else {
        format!("{image_name} {args}")
    }
}

/// A module to hand to the kernel.
#[derive(Debug, Clone, Copy)]
pub struct MultibootModule<'a> {
    /// The module's contents.
    pub data: &'a [u8],
    /// The module's string in the module list: its file name, then its
    /// arguments (see [`command_line`]).
    pub cmdline: &'a str,
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootLoad {
    /// Physical address to start executing at (`EIP`).
    pub entry: u32,
    /// Physical address of the information structure (`EBX`).
    pub info_addr: u32,
    /// Bytes of the info area used (structure, memory map, module list, strings).
    pub info_len: u32,
    /// Lowest physical address the kernel occupies.
    pub kernel_start: u64,
    /// End (exclusive) of the kernel, bss included.
    pub kernel_end: u64,
    /// End (exclusive) of the last module, or `kernel_end` when there are none.
    pub modules_end: u64,
}

fn read_u16(buf: &[u8], off: usize) -> Option<u16> {
    let bytes = buf.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(buf: &[u8], off: usize) -> Option<u32> {
    let bytes = buf.get(off..off.checked_add(4)?)?;
    let mut arr = [0u8; 4];
    arr.copy_from_slice(bytes);
    Some(u32::from_le_bytes(arr))
}

fn read_u64(buf: &[u8], off: usize) -> Option<u64> {
    let bytes = buf.get(off..off.checked_add(8)?)?;
    let mut arr = [0u8; 8];
    arr.copy_from_slice(bytes);
    Some(u64::from_le_bytes(arr))
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

fn ranges_overlap(a_start: u64, a_end: u64, b_start: u64, b_end: u64) -> bool {
    a_start < b_end && b_start < a_end
}

/// Looks for a multiboot header: the magic, 4-byte aligned, within the first
/// 8 KiB, with a valid checksum. Returns `None` if there is none, so the
/// caller can try other formats.
pub fn probe(image: &[u8]) -> Option<MultibootHeader> {
    let search = &image[..image.len().min(MULTIBOOT_SEARCH_LEN)];
    let last = search.len().checked_sub(HEADER_CORE_LEN)?;
    (0..=last).step_by(4).find_map(|offset| {
        if read_u32(search, offset)? != MULTIBOOT_HEADER_MAGIC {
            return None;
        }
        let flags = read_u32(search, offset + 4)?;
        let checksum = read_u32(search, offset + 8)?;
        let sum = MULTIBOOT_HEADER_MAGIC
            .wrapping_add(flags)
            .wrapping_add(checksum);
        if sum != 0 {
            return None;
        }
        let addresses = if flags & HEADER_FLAG_ADDRESS != 0 {
            read_address_fields(image, offset)
        } else {
            None
        };
        Some(MultibootHeader {
            offset,
            flags,
            addresses,
        })
    })
}

fn read_address_fields(image: &[u8], offset: usize) -> Option<AddressFields> {
    let field = |n: usize| read_u32(image, offset.checked_add(12 + 4 * n)?);
    Some(AddressFields {
        header_addr: field(0)?,
        load_addr: field(1)?,
        load_end_addr: field(2)?,
        bss_end_addr: field(3)?,
        entry_addr: field(4)?,
    })
}

/// One piece of the kernel to place in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// Physical address it is loaded at.
    paddr: u64,
    /// Virtual address it is linked at (equal to `paddr` for the a.out kludge).
    vaddr: u64,
    /// Where its bytes start in the file.
    file_offset: usize,
    /// How many bytes come from the file.
    filesz: usize,
    /// How many bytes it occupies in memory; the rest past `filesz` is zeroed.
    memsz: u64,
}

/// The kernel, parsed and bounds-checked against the file.
#[derive(Debug)]
struct KernelImage {
    segments: Vec<Segment>,
    entry: u64,
}

fn truncated(what: &'static str, offset: u64, len: u64, image: &[u8]) -> MultibootError {
    MultibootError::Truncated {
        what,
        offset,
        len,
        file_len: image.len(),
    }
}

/// Checks that `offset..offset+len` lies in the file and returns it as usize.
fn file_range(image: &[u8], what: &'static str, offset: u64, len: u64) -> Result<(usize, usize)> {
    let end = offset.checked_add(len);
    match (usize::try_from(offset), usize::try_from(len), end) {
        (Ok(off), Ok(l), Some(end)) if end <= image.len() as u64 => Ok((off, l)),
        _ => Err(truncated(what, offset, len, image)),
    }
}

/// Reads the kernel through the header's address fields (the a.out kludge).
fn parse_aout(image: &[u8], header: &MultibootHeader) -> Result<KernelImage> {
    let fields = header.addresses.ok_or(MultibootError::HeaderTruncated {
        offset: header.offset,
    })?;
    let load_addr = u64::from(fields.load_addr);
    let delta = fields.header_addr.checked_sub(fields.load_addr).ok_or(
        MultibootError::BadAddressFields("header_addr is below load_addr"),
    )?;
    let file_offset = (header.offset as u64).checked_sub(u64::from(delta)).ok_or(
        MultibootError::BadAddressFields("load_addr lies before the start of the file"),
    )?;
    let load_size = if fields.load_end_addr != 0 {
        let size = fields.load_end_addr.checked_sub(fields.load_addr).ok_or(
            MultibootError::BadAddressFields("load_end_addr is below load_addr"),
        )?;
        u64::from(size)
    } else {
        // Zero means the text and data run to the end of the file.
        (image.len() as u64).saturating_sub(file_offset)
    };
    let (file_offset, filesz) = file_range(image, "kernel text and data", file_offset, load_size)?;
    let memsz = if fields.bss_end_addr != 0 {
        u64::from(fields.bss_end_addr)
            .checked_sub(load_addr)
            .filter(|&memsz| memsz >= load_size)
            .ok_or(MultibootError::BadAddressFields(
                "bss_end_addr is below load_end_addr",
            ))?
    } else {
        load_size
    };
    if memsz == 0 {
        return Err(MultibootError::NoLoadableSegments);
    }
    Ok(KernelImage {
        segments: vec![Segment {
            paddr: load_addr,
            vaddr: load_addr,
            file_offset,
            filesz,
            memsz,
        }],
        entry: u64::from(fields.entry_addr),
    })
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF32_EHDR_SIZE: usize = 52;
const ELF64_EHDR_SIZE: usize = 64;
const ELF32_PHDR_SIZE: usize = 32;
const ELF64_PHDR_SIZE: usize = 56;

/// Field positions of an ELF header or program header, by class.
#[derive(Debug, Clone, Copy)]
struct ElfLayout {
    is64: bool,
    ehdr_size: usize,
    phdr_size: usize,
}

impl ElfLayout {
    /// Reads a word-sized field: 4 bytes in ELF32, 8 in ELF64.
    fn word(&self, buf: &[u8], off32: usize, off64: usize) -> Option<u64> {
        if self.is64 {
            read_u64(buf, off64)
        } else {
            read_u32(buf, off32).map(u64::from)
        }
    }
}

/// Reads the kernel from its ELF program headers (loaded at `p_paddr`).
fn parse_elf(image: &[u8]) -> Result<KernelImage> {
    if image.get(..4) != Some(ELF_MAGIC.as_slice()) {
        return Err(MultibootError::NotElf);
    }
    let layout = match image.get(4) {
        Some(&ELFCLASS32) => ElfLayout {
            is64: false,
            ehdr_size: ELF32_EHDR_SIZE,
            phdr_size: ELF32_PHDR_SIZE,
        },
        Some(&ELFCLASS64) => ElfLayout {
            is64: true,
            ehdr_size: ELF64_EHDR_SIZE,
            phdr_size: ELF64_PHDR_SIZE,
        },
        _ => return Err(MultibootError::UnsupportedElf("unknown ELF class")),
    };
    if image.len() < layout.ehdr_size {
        return Err(truncated("ELF header", 0, layout.ehdr_size as u64, image));
    }
    if image[5] != ELFDATA2LSB {
        return Err(MultibootError::UnsupportedElf("not little-endian"));
    }
    let machine = read_u16(image, 18).unwrap_or_default();
    let expected = if layout.is64 { EM_X86_64 } else { EM_386 };
    if machine != expected {
        return Err(MultibootError::UnsupportedElfMachine(machine));
    }
    // The header is complete, so these reads cannot fail.
    let entry = layout.word(image, 24, 24).unwrap_or_default();
    let phoff = layout.word(image, 28, 32).unwrap_or_default();
    let (phentsize, phnum) = if layout.is64 {
        (read_u16(image, 54), read_u16(image, 56))
    } else {
        (read_u16(image, 42), read_u16(image, 44))
    };
    let phentsize = usize::from(phentsize.unwrap_or_default());
    let phnum = usize::from(phnum.unwrap_or_default());
    if phentsize < layout.phdr_size {
        return Err(MultibootError::UnsupportedElf(
            "program header entries are too small",
        ));
    }
    let table_len = (phentsize * phnum) as u64;
    let (phoff, _) = file_range(image, "program header table", phoff, table_len)?;
    let mut segments = Vec::new();
    for index in 0..phnum {
        let ph = &image[phoff + index * phentsize..][..layout.phdr_size];
        if let Some(segment) = parse_program_header(image, layout, ph)? {
            segments.push(segment);
        }
    }
    if segments.is_empty() {
        return Err(MultibootError::NoLoadableSegments);
    }
    Ok(KernelImage {
        entry: translate_entry(entry, &segments),
        segments,
    })
}

/// Returns the segment a `PT_LOAD` program header describes, or `None` for
/// other program headers and empty segments.
fn parse_program_header(image: &[u8], layout: ElfLayout, ph: &[u8]) -> Result<Option<Segment>> {
    // `ph` holds a whole program header, so these reads cannot fail.
    if read_u32(ph, 0) != Some(PT_LOAD) {
        return Ok(None);
    }
    let offset = layout.word(ph, 4, 8).unwrap_or_default();
    let vaddr = layout.word(ph, 8, 16).unwrap_or_default();
    let paddr = layout.word(ph, 12, 24).unwrap_or_default();
    let filesz = layout.word(ph, 16, 32).unwrap_or_default();
    let memsz = layout.word(ph, 20, 40).unwrap_or_default();
    if filesz > memsz {
        return Err(MultibootError::FileSizeExceedsMemSize {
            addr: paddr,
            filesz,
            memsz,
        });
    }
    if memsz == 0 {
        return Ok(None);
    }
    let (file_offset, filesz) = file_range(image, "segment data", offset, filesz)?;
    Ok(Some(Segment {
        paddr,
        vaddr,
        file_offset,
        filesz,
        memsz,
    }))
}

/// Turns a virtual entry point into a physical one when it falls in a segment
/// whose virtual and physical addresses differ (a kernel linked high but
/// loaded low), as QEMU does. Otherwise the entry is taken as physical.
fn translate_entry(entry: u64, segments: &[Segment]) -> u64 {
    segments
        .iter()
        .filter(|s| s.vaddr != s.paddr)
        .find_map(|s| {
            let delta = entry.checked_sub(s.vaddr)?;
            (delta < s.memsz).then(|| s.paddr.checked_add(delta))?
        })
        .unwrap_or(entry)
}

/// A range of guest physical memory, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    start: u64,
    end: u64,
}

fn check_info_area<M: GuestMemory>(mem: &M, (start, size): (u64, u64)) -> Result<Area> {
    let in_memory = usize::try_from(size)
        .is_ok_and(|len| len > 0 && mem.check_range(GuestAddress(start), len, Permissions::Write));
    match start.checked_add(size) {
        Some(end) if end <= FOUR_GIB && in_memory => Ok(Area { start, end }),
        _ => Err(MultibootError::InfoAreaInvalid { start, size }),
    }
}

/// Checks that every segment lies in guest memory below 4 GiB and clear of
/// the info area. Returns the span the kernel occupies.
fn check_segments<M: GuestMemory>(mem: &M, segments: &[Segment], info: Area) -> Result<Area> {
    let mut span: Option<Area> = None;
    for s in segments {
        let (addr, len) = (s.paddr, s.memsz);
        let end = addr
            .checked_add(len)
            .filter(|&end| end <= FOUR_GIB)
            .ok_or(MultibootError::SegmentOverflow { addr, len })?;
        let in_memory = usize::try_from(len)
            .is_ok_and(|l| mem.check_range(GuestAddress(addr), l, Permissions::Write));
        if !in_memory {
            return Err(MultibootError::SegmentOutsideMemory { addr, len });
        }
        if ranges_overlap(addr, end, info.start, info.end) {
            return Err(MultibootError::SegmentOverlapsInfoArea {
                addr,
                len,
                info_start: info.start,
                info_size: info.end - info.start,
            });
        }
        span = Some(match span {
            None => Area { start: addr, end },
            Some(a) => Area {
                start: a.start.min(addr),
                end: a.end.max(end),
            },
        });
    }
    span.ok_or(MultibootError::NoLoadableSegments)
}

/// The usable-RAM ranges of the e820 map, sorted and merged.
fn ram_ranges(e820: &[(u64, u64, u32)]) -> Vec<Area> {
    let mut ranges: Vec<Area> = e820
        .iter()
        .filter(|&&(_, len, kind)| kind == E820_RAM && len > 0)
        .map(|&(addr, len, _)| Area {
            start: addr,
            end: addr.saturating_add(len),
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Area> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Finds the lowest page-aligned address at or above `from` where `len`
/// bytes fit in RAM below 4 GiB, clear of the info area. The module's end
/// must itself be a 32-bit address, so it stays strictly below 4 GiB.
fn place_module<M: GuestMemory>(
    mem: &M,
    len: u64,
    from: u64,
    ram: &[Area],
    info: Area,
) -> Option<u64> {
    let mut addr = align_up(from, PAGE_SIZE)?;
    loop {
        let end = addr.checked_add(len).filter(|&end| end < FOUR_GIB)?;
        if ranges_overlap(addr, end.max(addr + 1), info.start, info.end) {
            addr = align_up(info.end, PAGE_SIZE)?;
            continue;
        }
        if !ram.is_empty() {
            let fits = ram
                .iter()
                .any(|r| r.start <= addr && end <= r.end && addr < r.end);
            if !fits {
                // Every step moves strictly upwards, so the loop ends.
                let next = ram.iter().map(|r| r.start).filter(|&s| s > addr).min()?;
                addr = align_up(next, PAGE_SIZE)?;
                continue;
            }
        }
        let check_len = usize::try_from(len.max(1)).ok()?;
        return mem
            .check_range(GuestAddress(addr), check_len, Permissions::Write)
            .then_some(addr);
    }
}

/// Places the modules one after another, page aligned, above `kernel_end`.
fn place_modules<M: GuestMemory>(
    mem: &M,
    modules: &[MultibootModule],
    kernel_end: u64,
    info: Area,
    e820: &[(u64, u64, u32)],
) -> Result<Vec<Area>> {
    let ram = ram_ranges(e820);
    let mut cursor = kernel_end;
    let mut placed = Vec::with_capacity(modules.len());
    for (index, module) in modules.iter().enumerate() {
        if module.cmdline.contains('\0') {
            return Err(MultibootError::ModuleCmdlineHasNul { index });
        }
        let len = module.data.len() as u64;
        let start = place_module(mem, len, cursor, &ram, info)
            .ok_or(MultibootError::ModuleDoesNotFit { index, len })?;
        // `place_module` checked that `start + len` stays below 4 GiB.
        let end = start + len;
        placed.push(Area { start, end });
        cursor = end;
    }
    Ok(placed)
}

/// The end of the RAM that runs without a gap from `from`, following the
/// e820 map's usable entries that start below 4 GiB, capped at 4 GiB.
fn contiguous_ram_end(e820: &[(u64, u64, u32)], from: u64) -> u64 {
    let mut end = from;
    // The map need not be sorted: rescan until no entry extends the run.
    while let Some(next) = e820
        .iter()
        .filter(|&&(addr, _, kind)| kind == E820_RAM && addr < FOUR_GIB)
        .map(|&(addr, len, _)| (addr, addr.saturating_add(len)))
        .find(|&(addr, entry_end)| addr <= end && end < entry_end)
        .map(|(_, entry_end)| entry_end)
    {
        end = next;
    }
    end.min(FOUR_GIB)
}

/// `mem_lower` and `mem_upper` in KiB: the RAM from 0 (at most 640 KiB) and
/// the RAM from 1 MiB up to the first hole, from the e820 map. Without a map,
/// 640 KiB and all of `mem_size_bytes` above 1 MiB (below 4 GiB).
fn memory_sizes_kib(e820: &[(u64, u64, u32)], mem_size_bytes: u64) -> (u32, u32) {
    let (lower_end, upper_end) = if e820.is_empty() {
        (LOW_MEMORY_END, mem_size_bytes.min(FOUR_GIB))
    } else {
        (
            contiguous_ram_end(e820, 0).min(LOW_MEMORY_END),
            contiguous_ram_end(e820, ONE_MIB),
        )
    };
    // Both values are below 4 GiB, so in KiB they fit in 32 bits.
    let kib = |bytes: u64| (bytes / 1024) as u32;
    (kib(lower_end), kib(upper_end.saturating_sub(ONE_MIB)))
}

/// Inputs of the information structure.
#[derive(Debug)]
struct InfoInputs<'a> {
    cmdline: &'a str,
    modules: &'a [MultibootModule<'a>],
    placed: &'a [Area],
    e820: &'a [(u64, u64, u32)],
    mem_lower_kib: u32,
    mem_upper_kib: u32,
}

/// Lays out the info area: the structure, then the memory map, the module
/// list and the strings. Returns the bytes to write at `info.start`.
fn build_info(info: Area, inputs: &InfoInputs) -> Result<Vec<u8>> {
    let mmap_off = INFO_STRUCT_SIZE;
    let mmap_len = inputs.e820.len().saturating_mul(MMAP_ENTRY_SIZE);
    let mods_off = mmap_off.saturating_add(mmap_len);
    let mods_len = inputs.modules.len().saturating_mul(MODULE_ENTRY_SIZE);
    let strings_off = mods_off.saturating_add(mods_len);
    let strings_len = inputs
        .modules
        .iter()
        .map(|m| m.cmdline.len() + 1)
        .fold(inputs.cmdline.len() + 1, usize::saturating_add)
        .saturating_add(MULTIBOOT_BOOTLOADER_NAME.len() + 1);
    let needed = strings_off.saturating_add(strings_len);
    let size = info.end - info.start;
    if needed as u64 > size {
        return Err(MultibootError::InfoAreaTooSmall {
            needed: needed as u64,
            size,
        });
    }
    // Everything lies in the info area, which ends at or below 4 GiB, so
    // every guest address below fits in 32 bits.
    let addr_of = |off: usize| (info.start + off as u64) as u32;
    let mut buf = vec![0u8; needed];
    let put32 = |buf: &mut [u8], off: usize, v: u32| {
        buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };

    let mut strings = StringTable {
        next: strings_off,
        buf: &mut buf,
    };
    let cmdline_addr = addr_of(strings.push(inputs.cmdline));
    let mut module_strings = Vec::with_capacity(inputs.modules.len());
    for module in inputs.modules {
        module_strings.push(addr_of(strings.push(module.cmdline)));
    }
    let loader_addr = addr_of(strings.push(MULTIBOOT_BOOTLOADER_NAME));

    for (i, &(addr, len, kind)) in inputs.e820.iter().enumerate() {
        let off = mmap_off + i * MMAP_ENTRY_SIZE;
        put32(&mut buf, off, (MMAP_ENTRY_SIZE - 4) as u32);
        buf[off + 4..off + 12].copy_from_slice(&addr.to_le_bytes());
        buf[off + 12..off + 20].copy_from_slice(&len.to_le_bytes());
        put32(&mut buf, off + 20, kind);
    }
    for (i, (area, &string)) in inputs.placed.iter().zip(&module_strings).enumerate() {
        let off = mods_off + i * MODULE_ENTRY_SIZE;
        // Modules were placed below 4 GiB.
        put32(&mut buf, off, area.start as u32);
        put32(&mut buf, off + 4, area.end as u32);
        put32(&mut buf, off + 8, string);
    }

    let flags = INFO_FLAG_MEMORY
        | INFO_FLAG_CMDLINE
        | INFO_FLAG_MODS
        | INFO_FLAG_MMAP
        | INFO_FLAG_BOOT_LOADER_NAME;
    put32(&mut buf, info_offset::FLAGS, flags);
    put32(&mut buf, info_offset::MEM_LOWER, inputs.mem_lower_kib);
    put32(&mut buf, info_offset::MEM_UPPER, inputs.mem_upper_kib);
    put32(&mut buf, info_offset::CMDLINE, cmdline_addr);
    put32(
        &mut buf,
        info_offset::MODS_COUNT,
        inputs.modules.len() as u32,
    );
    put32(&mut buf, info_offset::MODS_ADDR, addr_of(mods_off));
    put32(&mut buf, info_offset::MMAP_LENGTH, mmap_len as u32);
    put32(&mut buf, info_offset::MMAP_ADDR, addr_of(mmap_off));
    put32(&mut buf, info_offset::BOOT_LOADER_NAME, loader_addr);
    Ok(buf)
}

/// Appends NUL-terminated strings to the info area buffer.
#[derive(Debug)]
struct StringTable<'a> {
    next: usize,
    buf: &'a mut [u8],
}

impl StringTable<'_> {
    /// Copies `s` and its NUL; returns its offset. The buffer was sized for it.
    fn push(&mut self, s: &str) -> usize {
        let off = self.next;
        self.buf[off..off + s.len()].copy_from_slice(s.as_bytes());
        self.next = off + s.len() + 1;
        off
    }
}

fn write_bytes<M: GuestMemory>(mem: &M, data: &[u8], addr: u64) -> Result<()> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| MultibootError::GuestMemory { addr, source })
}

/// Zeroes `len` bytes of guest memory at `addr`, 64 KiB at a time.
fn zero_guest<M: GuestMemory>(mem: &M, addr: u64, len: u64) -> Result<()> {
    static ZEROES: [u8; 0x1_0000] = [0; 0x1_0000];
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(ZEROES.len() as u64);
        write_bytes(mem, &ZEROES[..chunk as usize], addr + done)?;
        done += chunk;
    }
    Ok(())
}

/// Copies each segment's file bytes and zeroes the rest of it (the bss).
/// The segments were checked against the file and guest memory.
fn write_segments<M: GuestMemory>(mem: &M, image: &[u8], segments: &[Segment]) -> Result<()> {
    for s in segments {
        let data = &image[s.file_offset..s.file_offset + s.filesz];
        write_bytes(mem, data, s.paddr)?;
        let filesz = s.filesz as u64;
        zero_guest(mem, s.paddr + filesz, s.memsz - filesz)?;
    }
    Ok(())
}

fn check_header_flags(flags: u32) -> Result<()> {
    let unknown = flags & HEADER_REQUIRED_MASK & !HEADER_SUPPORTED_REQUIRED;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedFlags { flags, unknown });
    }
    // HEADER_FLAG_VIDEO_MODE: there is no framebuffer, so the request is
    // left unanswered (no framebuffer info flag), as QEMU does.
    Ok(())
}

/// Loads a multiboot kernel, its modules and the information structure into
/// guest memory.
///
/// - `cmdline` becomes the info structure's `cmdline` string as is: make it
///   with [`command_line`] to give the kernel its image's name first.
/// - `modules` are placed page aligned above the kernel, in order.
/// - `mem_size_bytes` gives `mem_upper` only when `e820` is empty.
/// - `info_area` is `(start, size)` of guest memory, below 4 GiB, reserved for
///   the info structure, the memory map, the module list and the strings. The
///   kernel must not overlap it; modules skip over it.
/// - `e820` is `(addr, len, type)` (1 = RAM, 2 = reserved). It becomes the
///   memory map, gives `mem_lower`/`mem_upper`, and limits where modules go.
///
/// Nothing is written to guest memory unless the whole load is valid.
pub fn load<M: GuestMemory>(
    mem: &M,
    image: &[u8],
    cmdline: &str,
    modules: &[MultibootModule],
    mem_size_bytes: u64,
    info_area: (u64, u64),
    e820: &[(u64, u64, u32)],
) -> Result<MultibootLoad> {
    let header = probe(image).ok_or(MultibootError::NoHeader)?;
    check_header_flags(header.flags)?;
    if cmdline.contains('\0') {
        return Err(MultibootError::CmdlineHasNul);
    }
    let info = check_info_area(mem, info_area)?;
    let kernel = if header.has_address_fields() {
        parse_aout(image, &header)?
    } else {
        parse_elf(image)?
    };
    let span = check_segments(mem, &kernel.segments, info)?;
    let entry = u32::try_from(kernel.entry)
        .ok()
        .filter(|&e| mem.check_range(GuestAddress(u64::from(e)), 1, Permissions::Read))
        .ok_or(MultibootError::EntryOutsideMemory {
            entry: kernel.entry,
        })?;
    let placed = place_modules(mem, modules, span.end, info, e820)?;
    let (mem_lower_kib, mem_upper_kib) = memory_sizes_kib(e820, mem_size_bytes);
    let info_bytes = build_info(
        info,
        &InfoInputs {
            cmdline,
            modules,
            placed: &placed,
            e820,
            mem_lower_kib,
            mem_upper_kib,
        },
    )?;

    write_segments(mem, image, &kernel.segments)?;
    for (module, area) in modules.iter().zip(&placed) {
        write_bytes(mem, module.data, area.start)?;
    }
    write_bytes(mem, &info_bytes, info.start)?;

    Ok(MultibootLoad {
        entry,
        // The info area lies below 4 GiB and holds the bytes just built.
        info_addr: info.start as u32,
        info_len: info_bytes.len() as u32,
        kernel_start: span.start,
        kernel_end: span.end,
        modules_end: placed.last().map_or(span.end, |a| a.end),
    })
}

#[cfg(test)]
mod tests;
