//! Boot information for the guest kernel: the Linux zero page (`boot_params`)
//! for the 64-bit boot protocol, and the `hvm_start_info` for PVH.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use crate::memmap::E820Entry;

/// The setup header's magic ("HdrS").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector's signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader` for a loader with no assigned id.
const UNDEFINED_LOADER: u8 = 0xff;
/// `loadflags` bit: the heap end pointer is valid.
const CAN_USE_HEAP: u8 = 0x80;
/// The PVH start info magic.
const PVH_MAGIC: u32 = 0x336e_c578;

/// Errors from writing boot information.
#[derive(Debug, Error)]
pub enum BootError {
    /// More e820 entries than the zero page has room for.
    #[error("the e820 map has {0} entries, more than the boot protocol carries")]
    TooManyE820Entries(usize),
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write boot information into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Where the initramfs was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initramfs {
    pub addr: u64,
    pub size: u64,
}

/// What both boot protocols pass to the kernel.
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    pub cmdline_addr: u64,
    /// Length of the command line, without its terminating NUL.
    pub cmdline_len: usize,
    pub initramfs: Option<Initramfs>,
    pub e820: &'a [E820Entry],
    pub rsdp_addr: u64,
}

/// Builds the zero page for a bzImage from the kernel's own setup header.
pub fn zero_page(header: setup_header, info: &BootInfo) -> Result<boot_params, BootError> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    if info.e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(info.e820.len()));
    }
    params.hdr.type_of_loader = UNDEFINED_LOADER;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= CAN_USE_HEAP;
    // The heap ends where the real-mode setup area would end; unused in 64-bit boot.
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.vid_mode = 0xffff;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32;
    if let Some(initrd) = info.initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.rsdp_addr;
    for (slot, entry) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = info.e820.len() as u8;
    Ok(params)
}

/// Writes the zero page to its place in guest memory and returns its address.
pub fn write_zero_page<M: GuestMemory>(
    mem: &M,
    params: &boot_params,
) -> Result<GuestAddress, BootError> {
    let addr = GuestAddress(ZERO_PAGE_START);
    mem.write_obj(*params, addr).map_err(BootError::Write)?;
    Ok(addr)
}

/// Writes the PVH start info, its memory map and module list, and returns the
/// start info's address (the kernel finds it in `%ebx`).
pub fn write_pvh_info<M: GuestMemory>(mem: &M, info: &BootInfo) -> Result<GuestAddress, BootError> {
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let modlist_addr = PVH_MEMMAP_START + entry_size * info.e820.len() as u64;
    let mut start = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: info.cmdline_addr,
        rsdp_paddr: info.rsdp_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: info.e820.len() as u32,
        ..Default::default()
    };
    for (i, entry) in info.e820.iter().enumerate() {
        let table_entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        };
        mem.write_obj(
            table_entry,
            GuestAddress(PVH_MEMMAP_START + entry_size * i as u64),
        )
        .map_err(BootError::Write)?;
    }
    if let Some(initrd) = info.initramfs {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(BootError::Write)?;
        start.nr_modules = 1;
        start.modlist_paddr = modlist_addr;
    }
    let addr = GuestAddress(PVH_INFO_START);
    mem.write_obj(start, addr).map_err(BootError::Write)?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::{e820_map, ram_regions};
    use vm_memory::GuestMemoryMmap;

    fn info(e820: &[E820Entry]) -> BootInfo<'_> {
        BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 12,
            initramfs: Some(Initramfs {
                addr: 0x7f00_0000,
                size: 0x12345,
            }),
            e820,
            rsdp_addr: 0xe0000,
        }
    }

    #[test]
    fn zero_page_carries_cmdline_initramfs_rsdp_and_e820() {
        let e820 = e820_map(&ram_regions(4 << 30).unwrap());
        let header = setup_header {
            version: 0x020f,
            loadflags: 1,
            ..Default::default()
        };
        let params = zero_page(header, &info(&e820)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size }, 12);
        assert_eq!({ params.hdr.ramdisk_image }, 0x7f00_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ params.hdr.type_of_loader }, UNDEFINED_LOADER);
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!(
            { params.hdr.loadflags } & 1,
            1,
            "kernel's own flags are kept"
        );
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries as usize, e820.len());
        let last = params.e820_table[e820.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (1 << 32, 1 << 30, 1)
        );
    }

    #[test]
    fn pvh_info_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = e820_map(&ram_regions(64 << 20).unwrap());
        let addr = write_pvh_info(&mem, &info(&e820)).unwrap();
        let start: hvm_start_info = mem.read_obj(addr).unwrap();
        assert_eq!(start.magic, PVH_MAGIC);
        assert_eq!(start.memmap_entries as usize, e820.len());
        assert_eq!(start.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x7f00_0000, 0x12345));
        let second: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(start.memmap_paddr + 24)).unwrap();
        assert_eq!(second.addr, e820[1].addr);
        assert!(start.modlist_paddr >= start.memmap_paddr + 24 * e820.len() as u64);
    }
}
