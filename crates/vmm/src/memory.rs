//! Guest RAM: one memfd holding every region, mapped into the VMM and
//! registered with KVM.
//!
//! A memfd (rather than anonymous memory) lets later work share guest RAM with
//! other processes and write it to snapshots without copying through the VMM.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors from creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The memfd could not be created.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// The memfd could not be sized.
    #[error("cannot size the guest memory file to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// Mapping the memory into the VMM failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {0}")]
    Slot(u32, #[source] kvm_ioctls::Error),
    /// More locked memory than the host has.
    #[error("guest memory of {requested} MiB is more than this host's {host} MiB")]
    MoreThanHost { requested: u64, host: u64 },
}

/// Guest RAM in a memfd, one mapping per region.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The host's total RAM in bytes, if it can be read.
pub fn host_memory() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages > 0 && page_size > 0).then(|| pages as u64 * page_size as u64)
}

/// Checks `size` bytes of guest memory against the host's RAM. Unlocked
/// memory is committed only as the guest touches it, so more than the host
/// has is allowed: the answer is `Ok(false)`, and the caller warns. Locked
/// memory must all be resident, so then it is refused.
pub fn check_host_fits(size: u64, locked: bool) -> Result<bool, MemoryError> {
    match host_memory() {
        Some(host) if size > host && locked => Err(MemoryError::MoreThanHost {
            requested: size >> 20,
            host: host >> 20,
        }),
        Some(host) => Ok(size <= host),
        None => Ok(true),
    }
}

fn memfd(name: &CStr, size: u64) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other
    // memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    Ok(file)
}

/// Creates guest memory for `regions` (start, size), backed by one memfd.
pub fn create(regions: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let file = memfd(c"ferrovisor-guest-ram", total)?;
    let mut offset = 0;
    let mut ranges = Vec::with_capacity(regions.len());
    for &(start, size) in regions {
        let handle = file.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((
            GuestAddress(start),
            size as usize,
            Some(FileOffset::new(handle, offset)),
        ));
        offset += size;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(MemoryError::Map)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::Slot(slot, kvm_ioctls::Error::new(libc::EFAULT)))?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping behind `host` lives as long as `mem`, which the VM
        // holds until after every vCPU has stopped, and it covers `memory_size`.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|e| MemoryError::Slot(slot, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_share_one_file_and_hold_data() {
        let mem = create(&[(0, 1 << 20), (1 << 32, 1 << 20)]).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 16))
            .unwrap();
        let v: u32 = mem.read_obj(GuestAddress((1 << 32) + 16)).unwrap();
        assert_eq!(v, 0xdead_beef);
        let second = mem.iter().nth(1).unwrap();
        assert_eq!(second.file_offset().unwrap().start(), 1 << 20);
    }

    #[test]
    fn more_than_host_memory_is_allowed_unless_locked() {
        let host = host_memory().unwrap();
        assert!(!check_host_fits(host + (1 << 30), false).unwrap());
        assert!(matches!(
            check_host_fits(host + (1 << 30), true),
            Err(MemoryError::MoreThanHost { .. })
        ));
        assert!(check_host_fits(1 << 20, false).unwrap());
        assert!(check_host_fits(1 << 20, true).unwrap());
    }
}
