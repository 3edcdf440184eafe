//! Port writes that need no answer, buffered by KVM instead of exiting.
//!
//! A guest's PCI configuration access through ports is two exits: the
//! address written to 0xCF8, then the data at 0xCFC. The CMOS RTC is the
//! same: an index written to 0x70, then data at 0x71. The first write of each
//! pair changes no state the guest can see until the second access, so KVM
//! can keep it in a ring (`KVM_REGISTER_COALESCED_MMIO` on a port range)
//! instead of leaving the guest. Before the VMM handles any exit, it applies
//! the buffered writes in order, so the device sees the same sequence of
//! accesses as before, one exit later. Under nested virtualization, where an
//! exit costs about 100 µs, this halves the cost of the PCI bus scan.
//!
//! The ring is one page per VM, shared by every vCPU; it is drained under a
//! lock so that two vCPUs never apply the same entry.

use std::ptr::NonNull;
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use thiserror::Error;

/// The port ranges whose writes are buffered: (first port, length).
pub const COALESCED_PORTS: [(u64, u32); 2] = [
    // PCI configuration address; the range also covers 0xCF9, whose
    // writes no device here acts on.
    (0xcf8, 4),
    // CMOS RTC and NVRAM index.
    (0x70, 1),
];

/// Errors from setting up the ring.
#[derive(Debug, Error)]
pub enum CoalescedError {
    /// KVM refused to buffer a port range.
    #[error("KVM refused to buffer writes to port {0:#x}")]
    Register(u64, #[source] kvm_ioctls::Error),
    /// The ring page could not be mapped.
    #[error("cannot map KVM's coalesced I/O ring")]
    Map(#[source] std::io::Error),
}

/// One buffered write: its port (or address) and the bytes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferedWrite {
    pub addr: u64,
    pub len: usize,
    pub data: [u8; 8],
}

impl BufferedWrite {
    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// KVM's ring of buffered writes, mapped from a vCPU's file.
#[derive(Debug)]
pub struct CoalescedRing {
    ring: NonNull<kvm_coalesced_mmio_ring>,
    /// Bytes mapped (one page).
    len: usize,
    /// Entries the ring holds.
    entries: u32,
    /// Serialises draining between vCPU threads.
    lock: Mutex<()>,
}

// SAFETY: the ring is a shared page of the kernel's; every access goes
// through volatile reads and writes, and draining is serialised by `lock`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Registers [`COALESCED_PORTS`] with KVM and maps the ring through
    /// `vcpu`. `None` when this KVM cannot buffer port writes: every
    /// access then exits as before.
    pub fn set_up(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Result<Option<Self>, CoalescedError> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        let ring = Self::map(vcpu)?;
        for (port, len) in COALESCED_PORTS {
            vm.register_coalesced_mmio(IoEventAddress::Pio(port), len)
                .map_err(|e| CoalescedError::Register(port, e))?;
        }
        Ok(Some(ring))
    }

    fn map(vcpu: &VcpuFd) -> Result<Self, CoalescedError> {
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let offset = KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page;
        // SAFETY: a new shared mapping of one page of the vCPU file at the
        // offset KVM documents for the ring; it touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
        let entry = std::mem::size_of::<kvm_coalesced_mmio>();
        Ok(Self {
            ring: NonNull::new(ptr.cast()).ok_or_else(|| {
                CoalescedError::Map(std::io::Error::from_raw_os_error(libc::EFAULT))
            })?,
            len: page,
            entries: ((page - header) / entry) as u32,
            lock: Mutex::new(()),
        })
    }

    /// Takes every buffered write, oldest first, and hands each to `apply`.
    /// Stops early (leaving the rest for the next drain) when `apply`
    /// returns `Some`, and returns that.
    pub fn drain<T>(&self, mut apply: impl FnMut(BufferedWrite) -> Option<T>) -> Option<T> {
        let ring = self.ring.as_ptr();
        // Nearly every exit finds the ring empty: say so without the lock,
        // which every vCPU would otherwise take on every exit. A write the
        // kernel adds after this look belongs to a later exit anyway.
        // SAFETY: `ring` points to the mapped ring page, valid for the life
        // of `self`; its header fields are plain u32s.
        let (first, last) = unsafe {
            (
                std::ptr::addr_of!((*ring).first).read_volatile(),
                std::ptr::addr_of!((*ring).last).read_volatile(),
            )
        };
        if first == last {
            return None;
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `ring` points to the mapped ring page, valid for the life
        // of `self`; its header fields are plain u32s.
        let mut first = unsafe { std::ptr::addr_of!((*ring).first).read_volatile() };
        loop {
            // SAFETY: as above; the kernel advances `last` after it has
            // written an entry, so the entries before it are complete once
            // the fence below orders the reads after it.
            let last = unsafe { std::ptr::addr_of!((*ring).last).read_volatile() };
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            if first == last || first >= self.entries {
                return None;
            }
            // SAFETY: `first` is below `entries`, so the entry lies inside
            // the mapped page.
            let entry = unsafe {
                std::ptr::addr_of!((*ring).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(first as usize)
                    .read_volatile()
            };
            first = (first + 1) % self.entries;
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            // SAFETY: as above; writing `first` hands the slot back.
            unsafe { std::ptr::addr_of_mut!((*ring).first).write_volatile(first) };
            let write = BufferedWrite {
                addr: entry.phys_addr,
                len: (entry.len as usize).min(8),
                data: entry.data,
            };
            if let Some(stop) = apply(write) {
                return Some(stop);
            }
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` and nothing else unmaps it.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.len) };
    }
}
