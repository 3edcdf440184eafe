//! Kernel loading: recognises the kernel's format, places it, its initramfs
//! and its command line in guest memory, and says how the boot vCPU enters it.
//!
//! Formats, in the order they are recognised:
//! - bzImage, through the Linux 64-bit boot protocol;
//! - multiboot v1 (ELF or a.out kludge), as `qemu -kernel` loads it;
//! - ELF with a PVH entry note (a Linux `vmlinux`).

pub mod fuzz_entry;
pub mod multiboot;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use arch::boot::{self, BootError, BootInfo, Initramfs};
use arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, MULTIBOOT_INFO_SIZE, MULTIBOOT_INFO_START,
};
use arch::memmap::E820Entry;
use arch::regs::EntryMode;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Offset of the setup header's "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// The initramfs limit for kernels whose header predates `initrd_addr_max`.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Errors from loading a kernel.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The kernel or initramfs file could not be read.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// A directory, pipe or device where a file was expected.
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    /// The file is in no format we boot.
    #[error("{} is not a kernel: it has no bzImage header, multiboot header or ELF magic", .0.display())]
    NotAKernel(PathBuf),
    /// linux-loader refused the bzImage.
    #[error("cannot load bzImage {}", .0.display())]
    BzImage(PathBuf, #[source] linux_loader::loader::Error),
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage {} has no 64-bit entry point (too old, or a 32-bit kernel)", .0.display())]
    Not64Bit(PathBuf),
    /// linux-loader refused the ELF.
    #[error("cannot load ELF kernel {}", .0.display())]
    Elf(PathBuf, #[source] linux_loader::loader::Error),
    /// An ELF kernel with neither a PVH note nor a multiboot header.
    #[error("ELF kernel {} has no PVH entry note and no multiboot header", .0.display())]
    NoPvhNote(PathBuf),
    /// The multiboot loader refused the kernel.
    #[error("cannot load multiboot kernel {}", .0.display())]
    Multiboot(PathBuf, #[source] multiboot::MultibootError),
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initramfs {} of {size} bytes does not fit in guest memory below {limit:#x}", .path.display())]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The bzImage cannot decompress itself in the guest's low memory.
    #[error("bzImage {} needs {needed_mib} MiB of guest memory to decompress; give a larger --memory", .path.display())]
    TooLittleMemory { path: PathBuf, needed_mib: u64 },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line of {len} bytes is longer than the kernel's limit of {max}")]
    CmdlineTooLong { len: usize, max: usize },
    /// The command line has a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing into guest memory failed.
    #[error("cannot write the {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
    /// Writing boot information failed.
    #[error(transparent)]
    Boot(#[from] BootError),
}

/// The kernel formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Multiboot,
    Pvh,
}

/// What the boot vCPU needs to enter a loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    pub mode: EntryMode,
}

/// What to boot, and the machine to boot it in.
#[derive(Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub e820: &'a [E820Entry],
    /// The end of RAM below the 32-bit hole.
    pub low_ram_end: u64,
    /// The guest's RAM size in bytes.
    pub mem_size: u64,
    pub rsdp_addr: u64,
}

/// Recognises a kernel image from its first bytes.
pub fn detect_format(image: &[u8]) -> Option<KernelFormat> {
    if image.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        Some(KernelFormat::BzImage)
    } else if multiboot::probe(image).is_some() {
        Some(KernelFormat::Multiboot)
    } else if image.starts_with(b"\x7fELF") {
        Some(KernelFormat::Pvh)
    } else {
        None
    }
}

/// Reads the first bytes of the kernel, enough to recognise any format.
fn read_head(path: &Path) -> Result<Vec<u8>, LoaderError> {
    let mut head = Vec::with_capacity(multiboot::MULTIBOOT_SEARCH_LEN);
    open(path)?
        .take(multiboot::MULTIBOOT_SEARCH_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| LoaderError::Read(path.into(), e))?;
    Ok(head)
}

/// Loads the kernel, initramfs and command line, and writes the boot
/// information for the kernel's format. Only a multiboot kernel is read
/// into the VMM's own memory; the others go straight to guest memory.
pub fn load<M: GuestMemoryBackend>(mem: &M, spec: &BootSpec) -> Result<LoadedKernel, LoaderError> {
    let head = read_head(spec.kernel)?;
    let format = detect_format(&head).ok_or_else(|| LoaderError::NotAKernel(spec.kernel.into()))?;
    if spec.cmdline.contains('\0') {
        return Err(LoaderError::CmdlineNul);
    }
    match format {
        KernelFormat::BzImage => load_bzimage(mem, spec),
        KernelFormat::Pvh => load_pvh(mem, spec),
        KernelFormat::Multiboot => {
            let image = read_all(spec.kernel)?;
            load_multiboot(mem, spec, &image)
        }
    }
}

/// Opens a kernel, initramfs or module, which must be a regular file: a
/// directory, pipe or device would give no length or block forever.
fn open(path: &Path) -> Result<File, LoaderError> {
    let file =
        crate::guest_file::open(path, false).map_err(|e| LoaderError::Read(path.into(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| LoaderError::Read(path.into(), e))?;
    if !meta.is_file() {
        return Err(LoaderError::NotRegular(path.into()));
    }
    Ok(file)
}

/// Reads a whole regular file.
fn read_all(path: &Path) -> Result<Vec<u8>, LoaderError> {
    let mut data = Vec::new();
    open(path)?
        .read_to_end(&mut data)
        .map_err(|e| LoaderError::Read(path.into(), e))?;
    Ok(data)
}

fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    max: usize,
) -> Result<(), LoaderError> {
    let max = max.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| LoaderError::Write("command line", e))
}

/// Places the initramfs as high as it may go below `limit`, above `floor`.
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    floor: u64,
    limit: u64,
) -> Result<Initramfs, LoaderError> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|e| LoaderError::Read(path.into(), e))?
        .len();
    let too_big = || LoaderError::InitramfsTooBig {
        path: path.into(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < floor {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoaderError::Write("initramfs", e))?;
    Ok(Initramfs { addr, size })
}

fn boot_info<'a>(spec: &'a BootSpec, initramfs: Option<Initramfs>) -> BootInfo<'a> {
    BootInfo {
        cmdline_addr: CMDLINE_START,
        cmdline_len: spec.cmdline.len(),
        initramfs,
        e820: spec.e820,
        rsdp_addr: spec.rsdp_addr,
    }
}

/// Where a bzImage's decompressed kernel ends: the decompressor writes
/// `init_size` bytes from the kernel's preferred address (or from where it
/// was loaded, if higher). Headers older than 2.10 do not say.
fn decompression_end(header: &linux_loader::bootparam::setup_header, load: u64) -> u64 {
    if header.version < 0x020a {
        return load;
    }
    load.max(header.pref_address)
        .saturating_add(u64::from(header.init_size))
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
) -> Result<LoadedKernel, LoaderError> {
    let path = spec.kernel;
    let mut file = open(path)?;
    let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|e| LoaderError::BzImage(path.into(), e))?;
    let header = result
        .setup_header
        .ok_or_else(|| LoaderError::NotAKernel(path.into()))?;
    if header.version < 0x020c || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::Not64Bit(path.into()));
    }
    let cmdline_max = if header.version >= 0x0206 {
        header.cmdline_size as usize
    } else {
        255
    };
    write_cmdline(mem, spec.cmdline, cmdline_max)?;
    let initrd_max = if header.version >= 0x0203 {
        u64::from(header.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    let decompressed_end = decompression_end(&header, result.kernel_load.0);
    if decompressed_end > spec.low_ram_end {
        return Err(LoaderError::TooLittleMemory {
            path: path.into(),
            needed_mib: decompressed_end.div_ceil(1 << 20),
        });
    }
    let initramfs = spec
        .initramfs
        .map(|p| {
            let limit = spec.low_ram_end.min(initrd_max + 1);
            let floor = result.kernel_end.max(decompressed_end);
            load_initramfs(mem, p, floor, limit)
        })
        .transpose()?;
    let params = boot::zero_page(header, &boot_info(spec, initramfs))?;
    let zero_page = boot::write_zero_page(mem, &params)?;
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        mode: EntryMode::Long {
            zero_page: zero_page.0,
        },
    })
}

fn load_pvh<M: GuestMemoryBackend>(mem: &M, spec: &BootSpec) -> Result<LoadedKernel, LoaderError> {
    let path = spec.kernel;
    let mut file = open(path)?;
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|e| LoaderError::Elf(path.into(), e))?;
    let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
        return Err(LoaderError::NoPvhNote(path.into()));
    };
    write_cmdline(mem, spec.cmdline, CMDLINE_MAX_SIZE)?;
    let initramfs = spec
        .initramfs
        .map(|p| load_initramfs(mem, p, result.kernel_end, spec.low_ram_end))
        .transpose()?;
    let start_info = boot::write_pvh_info(mem, &boot_info(spec, initramfs))?;
    Ok(LoadedKernel {
        format: KernelFormat::Pvh,
        entry: entry.0,
        mode: EntryMode::Pvh {
            start_info: start_info.0,
        },
    })
}

fn load_multiboot<M: GuestMemoryBackend>(
    mem: &M,
    spec: &BootSpec,
    image: &[u8],
) -> Result<LoadedKernel, LoaderError> {
    let path = spec.kernel;
    let module_data = spec.initramfs.map(read_all).transpose()?;
    // The initramfs takes no arguments: its string is its file name alone.
    let module_name = spec
        .initramfs
        .map(|p| multiboot::command_line(&p.display().to_string(), ""))
        .unwrap_or_default();
    let modules: Vec<_> = module_data
        .iter()
        .map(|data| multiboot::MultibootModule {
            data,
            cmdline: &module_name,
        })
        .collect();
    let e820: Vec<_> = spec
        .e820
        .iter()
        .map(|e| (e.addr, e.size, e.kind as u32))
        .collect();
    let cmdline = multiboot::command_line(&path.display().to_string(), spec.cmdline);
    let loaded = multiboot::load(
        mem,
        image,
        &cmdline,
        &modules,
        spec.mem_size,
        (MULTIBOOT_INFO_START, MULTIBOOT_INFO_SIZE),
        &e820,
    )
    .map_err(|e| LoaderError::Multiboot(path.into(), e))?;
    Ok(LoadedKernel {
        format: KernelFormat::Multiboot,
        entry: u64::from(loaded.entry),
        mode: EntryMode::Multiboot {
            magic: multiboot::MULTIBOOT_BOOTLOADER_MAGIC,
            info: loaded.info_addr,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompression_needs_init_size_from_the_preferred_address() {
        let header = linux_loader::bootparam::setup_header {
            version: 0x020f,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        assert_eq!(decompression_end(&header, 0x10_0000), 0x300_0000);
        let old = linux_loader::bootparam::setup_header {
            version: 0x0209,
            ..header
        };
        assert_eq!(decompression_end(&old, 0x10_0000), 0x10_0000);
    }

    #[test]
    fn formats_are_recognised_by_their_magic() {
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert_eq!(detect_format(&elf), Some(KernelFormat::Pvh));
        assert_eq!(detect_format(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(detect_format(&[]), None);
    }
}
