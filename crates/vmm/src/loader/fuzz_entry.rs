//! Entry points for the fuzz targets in `fuzz/` (`bzimage`, `pvh`,
//! `multiboot`), also called by the unit tests that replay
//! `fuzz/regressions/`.
//!
//! Each goes through [`super::load`], the path `ferrovisor run` takes: the
//! kernel and initramfs are real files (memfds, opened again by path), the
//! format is recognised from the image, and the boot information lands in
//! real guest memory. The entries shape the image so that it is recognised
//! as the format under test; the rest of it is the fuzzer's. A bad image
//! must give a [`LoaderError`](super::LoaderError), never a panic; the
//! entries return the loaded kernel when the image was good.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use arch::memmap;
use devices::fuzz_entry::Input;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::multiboot::MULTIBOOT_HEADER_MAGIC;
use super::{load, BootSpec, LoadedKernel, BZIMAGE_MAGIC_OFFSET};

/// Guest RAM for a fuzzed boot.
const MEM_SIZE: u64 = 32 << 20;
/// Where the ACPI tables would be.
const RSDP: u64 = 0xe_0000;

/// A file that lives in memory, rewritten for every input.
struct MemFile {
    file: File,
    path: PathBuf,
}

impl MemFile {
    fn new() -> Option<MemFile> {
        // SAFETY: the name is a NUL-terminated literal; memfd_create reads
        // it and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"loader-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else
        // owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Some(MemFile { file, path })
    }

    fn fill(&mut self, data: &[u8]) -> Option<()> {
        self.file.set_len(0).ok()?;
        let mut handle = &self.file;
        std::io::Seek::rewind(&mut handle).ok()?;
        handle.write_all(data).ok()
    }
}

thread_local! {
    static FILES: RefCell<Option<(MemFile, MemFile)>> =
        RefCell::new(MemFile::new().zip(MemFile::new()));
}

/// Loads `kernel` (shaped by the caller) with the command line and
/// initramfs `input` describes: a flag byte (bit 1: an initramfs
/// follows), a command line of up to 255 bytes (a length byte, then the
/// bytes), and, with bit 1, an initramfs (a little-endian u16 length,
/// then the bytes).
fn boot(flags: u8, input: &mut Input, kernel: &[u8]) -> Option<LoadedKernel> {
    let cmdline_len = usize::from(input.u8());
    let cmdline = String::from_utf8_lossy(input.bytes(cmdline_len)).into_owned();
    let initramfs = if flags & 2 != 0 {
        let len = usize::from(input.u16());
        Some(input.bytes(len).to_vec())
    } else {
        None
    };
    let regions = memmap::ram_regions(MEM_SIZE).ok()?;
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).ok()?;
    let e820 = memmap::e820_map(&regions);
    FILES.with(|files| {
        let mut files = files.borrow_mut();
        let (kernel_file, initrd_file) = files.as_mut()?;
        kernel_file.fill(kernel)?;
        let initrd = match &initramfs {
            Some(data) => {
                initrd_file.fill(data)?;
                Some(initrd_file.path.as_path())
            }
            None => None,
        };
        load(
            &mem,
            &BootSpec {
                kernel: &kernel_file.path,
                initramfs: initrd,
                cmdline: &cmdline,
                e820: &e820,
                low_ram_end: memmap::low_ram_end(&regions),
                mem_size: MEM_SIZE,
                rsdp_addr: RSDP,
            },
        )
        .ok()
    })
}

/// Splits an input into its flag byte, the framing [`boot`] reads (as
/// many bytes as the flag byte's top six bits say) and the image.
fn split(data: &[u8]) -> (u8, &[u8], Vec<u8>) {
    let Some((&flags, rest)) = data.split_first() else {
        return (0, &[], Vec::new());
    };
    let (framing, image) = rest.split_at(rest.len().min(usize::from(flags >> 2)));
    (flags, framing, image.to_vec())
}

/// Puts `value` at `offset` of `image`, growing it if needed.
fn put(image: &mut Vec<u8>, offset: usize, value: &[u8]) {
    if image.len() < offset + value.len() {
        image.resize(offset + value.len(), 0);
    }
    image[offset..offset + value.len()].copy_from_slice(value);
}

/// A bzImage: the input's framing (see [`boot`]), then the image, which
/// gets the `HdrS` magic; with flag bit 0 also a 2.15 boot protocol
/// version and the 64-bit entry flag, so the loader goes past its
/// version checks.
pub fn bzimage(data: &[u8]) -> Option<LoadedKernel> {
    let (flags, framing, mut image) = split(data);
    put(&mut image, BZIMAGE_MAGIC_OFFSET, b"HdrS");
    if flags & 1 != 0 {
        put(&mut image, 0x206, &0x020fu16.to_le_bytes());
        let xloadflags = image.get(0x236).copied().unwrap_or(0) | 1;
        put(&mut image, 0x236, &[xloadflags]);
    }
    boot(flags, &mut Input::new(framing), &image)
}

/// An ELF kernel booted through its PVH note: the input's framing (see
/// [`boot`]), then the image, which gets the ELF magic; with flag bit 0
/// also the 64-bit, little-endian, x86-64 identification.
pub fn pvh(data: &[u8]) -> Option<LoadedKernel> {
    let (flags, framing, mut image) = split(data);
    put(&mut image, 0, b"\x7fELF");
    if flags & 1 != 0 {
        put(&mut image, 4, &[2, 1, 1]);
        put(&mut image, 18, &0x3eu16.to_le_bytes());
    }
    boot(flags, &mut Input::new(framing), &image)
}

/// A multiboot kernel: the input's framing (see [`boot`]), then the
/// image; with flag bit 0 its first twelve bytes become a multiboot
/// header with the input's flags and a correct checksum.
pub fn multiboot(data: &[u8]) -> Option<LoadedKernel> {
    let (flags, framing, mut image) = split(data);
    if flags & 1 != 0 {
        let mut header = Input::new(image.get(4..8).unwrap_or(&[]));
        let header_flags = header.u32();
        let checksum = 0u32
            .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
            .wrapping_sub(header_flags);
        put(&mut image, 0, &MULTIBOOT_HEADER_MAGIC.to_le_bytes());
        put(&mut image, 4, &header_flags.to_le_bytes());
        put(&mut image, 8, &checksum.to_le_bytes());
    }
    boot(flags, &mut Input::new(framing), &image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fuzz_entry::seeds;

    use crate::loader::KernelFormat;

    /// Replays every input of `target`; those named `valid-*` must load
    /// as `format`.
    fn replay(target: &str, entry: fn(&[u8]) -> Option<LoadedKernel>, format: KernelFormat) {
        let mut valid = 0;
        for (path, data) in seeds(target) {
            let loaded = entry(&data);
            let name = path.file_name().unwrap().to_string_lossy();
            if name.starts_with("valid-") {
                assert_eq!(loaded.map(|k| k.format), Some(format), "{name}");
                valid += 1;
            }
        }
        assert!(valid > 0, "no valid-* seed for {target}");
    }

    #[test]
    fn bzimage_seeds_and_regressions_replay() {
        replay("bzimage", bzimage, KernelFormat::BzImage);
    }

    #[test]
    fn pvh_seeds_and_regressions_replay() {
        replay("pvh", pvh, KernelFormat::Pvh);
    }

    #[test]
    fn multiboot_seeds_and_regressions_replay() {
        replay("multiboot", multiboot, KernelFormat::Multiboot);
    }

    #[test]
    fn the_memory_file_is_read_back_by_path() {
        let mut f = MemFile::new().unwrap();
        f.fill(b"first, longer contents").unwrap();
        f.fill(b"second").unwrap();
        assert_eq!(std::fs::read(&f.path).unwrap(), b"second");
    }
}
