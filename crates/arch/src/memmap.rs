//! Guest RAM regions and the e820 map that describes them to the guest.

use thiserror::Error;

use crate::layout::{
    BIOS_AREA_SIZE, BIOS_AREA_START, EBDA_START, HIGH_MEMORY_START, MMIO_GAP_END, MMIO_GAP_START,
    PCI_ECAM_SIZE, PCI_ECAM_START,
};

/// The smallest guest we build: room for the boot structures, a kernel and a stack.
pub const MIN_MEMORY: u64 = 16 << 20;

/// e820 entry types the guest understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
    Acpi = 3,
}

/// One entry of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Errors from laying out guest memory.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemMapError {
    /// The requested size is below what a guest needs to boot.
    #[error("guest memory of {size} bytes is too small: at least {min} MiB is needed", min = MIN_MEMORY >> 20)]
    TooSmall { size: u64 },
    /// The requested size is not a whole number of 4 KiB pages.
    #[error("guest memory of {size} bytes is not a multiple of 4 KiB")]
    Unaligned { size: u64 },
}

/// The guest RAM regions `(start, size)` for `mem_size` bytes of memory. RAM that
/// would fall into the 32-bit MMIO hole is moved above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Result<Vec<(u64, u64)>, MemMapError> {
    if mem_size < MIN_MEMORY {
        return Err(MemMapError::TooSmall { size: mem_size });
    }
    if !mem_size.is_multiple_of(4096) {
        return Err(MemMapError::Unaligned { size: mem_size });
    }
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(0, low)];
    if mem_size > MMIO_GAP_START {
        regions.push((MMIO_GAP_END, mem_size - MMIO_GAP_START));
    }
    Ok(regions)
}

/// The e820 map for the given RAM regions: conventional memory, the reserved
/// BIOS area where the ACPI and SMBIOS tables live, RAM from 1 MiB on, and the PCI ECAM
/// range, reserved so that the guest trusts the MCFG table.
pub fn e820_map(regions: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: BIOS_AREA_SIZE,
            kind: E820Type::Reserved,
        },
    ];
    for &(start, size) in regions {
        let start_hi = start.max(HIGH_MEMORY_START);
        let end = start + size;
        if end > start_hi {
            map.push(E820Entry {
                addr: start_hi,
                size: end - start_hi,
                kind: E820Type::Ram,
            });
        }
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// The end of the RAM below the 32-bit hole, where the initramfs is placed.
pub fn low_ram_end(regions: &[(u64, u64)]) -> u64 {
    regions
        .iter()
        .filter(|(start, _)| *start < MMIO_GAP_START)
        .map(|(start, size)| start + size)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ACPI_SIZE, ACPI_START, SMBIOS_SIZE, SMBIOS_START};

    #[test]
    fn small_guest_has_one_region_and_four_e820_entries() {
        let regions = ram_regions(256 << 20).unwrap();
        assert_eq!(regions, vec![(0, 256 << 20)]);
        let map = e820_map(&regions);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[1].kind, E820Type::Reserved);
        let reserved = map[1].addr..map[1].addr + map[1].size;
        assert!(reserved.start <= ACPI_START && ACPI_START + ACPI_SIZE <= reserved.end);
        assert!(reserved.start <= SMBIOS_START && SMBIOS_START + SMBIOS_SIZE <= reserved.end);
        assert_eq!(
            map[2],
            E820Entry {
                addr: HIGH_MEMORY_START,
                size: (256 << 20) - HIGH_MEMORY_START,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn ecam_is_reserved_outside_ram() {
        let map = e820_map(&ram_regions(4 << 30).unwrap());
        let ecam = map
            .iter()
            .find(|e| e.addr == PCI_ECAM_START)
            .expect("an ECAM entry");
        assert_eq!(ecam.size, PCI_ECAM_SIZE);
        assert_eq!(ecam.kind, E820Type::Reserved);
        assert!(
            map.iter()
                .filter(|e| e.kind == E820Type::Ram)
                .all(|e| e.addr + e.size <= PCI_ECAM_START
                    || e.addr >= PCI_ECAM_START + PCI_ECAM_SIZE)
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30).unwrap();
        assert_eq!(
            regions,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let map = e820_map(&regions);
        let total_ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB legacy hole below 1 MiB is RAM.
        assert_eq!(total_ram, (4 << 30) - (HIGH_MEMORY_START - EBDA_START));
        assert!(map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
        assert_eq!(low_ram_end(&regions), MMIO_GAP_START);
    }

    #[test]
    fn too_small_and_unaligned_sizes_are_refused() {
        assert_eq!(
            ram_regions(1 << 20),
            Err(MemMapError::TooSmall { size: 1 << 20 })
        );
        assert_eq!(
            ram_regions((64 << 20) + 1),
            Err(MemMapError::Unaligned {
                size: (64 << 20) + 1
            })
        );
    }
}
