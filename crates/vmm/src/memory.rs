//! Guest RAM: its backing, its mappings in the VMM, and its KVM slots.
//!
//! The backing is chosen per guest. Anonymous private memory is the default:
//! under the host's default settings it gets transparent huge pages, which
//! is what keeps nested page faults (and boot time under nested
//! virtualization) low. Where guest RAM must be shared with another process
//! or written to a snapshot without copying, it lives in a memfd, which gets
//! transparent huge pages only where the host lets shared memory have them,
//! or in a hugetlb memfd when the guest asks for `hugepages`. The VMM reads
//! the host's settings and never changes them; when a guest cannot have huge
//! pages it says why in one line.
//!
//! Every region is placed at a 2 MiB-aligned host address: KVM maps guest
//! memory with 2 MiB pages only where guest-physical and host-virtual
//! addresses agree modulo 2 MiB. Guest RAM stays mapped for the life of the
//! process, which runs one VM.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::config::{HugePages, MemoryBacking};

/// Errors from creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The memfd could not be created.
    #[error("cannot create the guest memory file")]
    Memfd(#[source] std::io::Error),
    /// The memfd could not be sized.
    #[error("cannot size the guest memory file to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// Mapping a region into the VMM failed.
    #[error("cannot map guest memory")]
    MapRegion(#[source] vm_memory::mmap::MmapRegionError),
    /// Address space for guest memory could not be reserved.
    #[error("cannot reserve address space for guest memory")]
    Reserve(#[source] std::io::Error),
    /// A region would end past the top of the guest address space.
    #[error("a guest memory region at {0:#x} overflows the address space")]
    Overflow(u64),
    /// The regions do not form one guest memory.
    #[error("guest memory regions overlap or are empty")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
    /// The host's hugetlb pool is too small.
    #[error(
        "hugepages = {size}: guest RAM needs {needed} free huge pages of {size} and the host \
         has {free}; reserve them in /sys/kernel/mm/hugepages or choose no hugepages"
    )]
    HugetlbShort {
        size: &'static str,
        needed: u64,
        free: u64,
    },
    /// Guest RAM is not a whole number of huge pages.
    #[error("hugepages = {0}: the memory size must be a multiple of {0}")]
    HugetlbSize(&'static str),
    /// Anonymous memory was asked for together with hugetlb pages.
    #[error("memory backing 'anonymous' cannot use hugepages, which live in a hugetlb memfd")]
    AnonymousHugetlb,
    /// Anonymous memory was asked for where guest RAM must be shared.
    #[error("memory backing 'anonymous' cannot be shared with another process")]
    AnonymousShared,
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {0}")]
    Slot(u32, #[source] kvm_ioctls::Error),
    /// More locked memory than the host has.
    #[error("guest memory of {requested} MiB is more than this host's {host} MiB")]
    MoreThanHost { requested: u64, host: u64 },
    /// Locking guest RAM failed (`locked = true`).
    #[error(
        "locked = true: cannot lock {mib} MiB of guest RAM (raise RLIMIT_MEMLOCK, or run as root)"
    )]
    Lock {
        mib: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Prefaults and locks every range of guest RAM (`mlock` faults each page in
/// and keeps it resident), for guests that must never wait on a page fault.
pub fn lock(ranges: &[(usize, usize)]) -> Result<(), MemoryError> {
    for &(start, len) in ranges {
        // SAFETY: the range is a live mapping of guest RAM owned by this
        // process; mlock neither moves nor frees it.
        if unsafe { libc::mlock(start as *const libc::c_void, len) } != 0 {
            return Err(MemoryError::Lock {
                mib: (len >> 20) as u64,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Guest RAM, one mapping per region.
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

/// The alignment that lets the host and KVM map guest RAM with 2 MiB pages:
/// guest-physical and host-virtual addresses must agree modulo this.
const HUGE_ALIGN: usize = 2 << 20;

/// The backing guest RAM got, once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory with `MADV_HUGEPAGE`.
    Anonymous,
    /// A memfd (shmem) with `MADV_HUGEPAGE`.
    Memfd,
    /// A hugetlb memfd of this page size.
    Hugetlb(HugePages),
}

impl Backing {
    /// Chooses the backing: hugetlb when asked for, a memfd when asked for
    /// or when something must share guest RAM, else anonymous memory.
    pub fn choose(
        asked: MemoryBacking,
        hugepages: Option<HugePages>,
        shared: bool,
    ) -> Result<Backing, MemoryError> {
        match (asked, hugepages) {
            (MemoryBacking::Anonymous, Some(_)) => Err(MemoryError::AnonymousHugetlb),
            (MemoryBacking::Anonymous, None) if shared => Err(MemoryError::AnonymousShared),
            (_, Some(size)) => Ok(Backing::Hugetlb(size)),
            (MemoryBacking::Memfd, None) => Ok(Backing::Memfd),
            (MemoryBacking::Auto, None) if shared => Ok(Backing::Memfd),
            (MemoryBacking::Auto | MemoryBacking::Anonymous, None) => Ok(Backing::Anonymous),
        }
    }

    /// The name reported by `--stats` and `info`.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Memfd => "memfd",
            Backing::Hugetlb(HugePages::Size2M) => "hugetlb-2M",
            Backing::Hugetlb(HugePages::Size1G) => "hugetlb-1G",
        }
    }

    /// Whether another process can map this memory (it lives in a file).
    pub fn shareable(self) -> bool {
        !matches!(self, Backing::Anonymous)
    }
}

/// The host's transparent huge page settings, as sysfs shows them: the
/// bracketed word of `enabled` and `shmem_enabled`; `None` when unreadable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostThp {
    pub enabled: Option<String>,
    pub shmem_enabled: Option<String>,
}

const THP_DIR: &str = "/sys/kernel/mm/transparent_hugepage";

/// The word in brackets of a sysfs choice file such as `always [madvise] never`.
pub fn chosen_word(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let len = text[start..].find(']')?;
    Some(text[start..start + len].to_string())
}

impl HostThp {
    /// Reads this host's settings.
    pub fn read() -> HostThp {
        let word = |name: &str| {
            std::fs::read_to_string(format!("{THP_DIR}/{name}"))
                .ok()
                .and_then(|t| chosen_word(&t))
        };
        HostThp {
            enabled: word("enabled"),
            shmem_enabled: word("shmem_enabled"),
        }
    }

    /// Why guest RAM with `backing` cannot get huge pages on this host, in
    /// one line; `None` when it can. Host settings are only read, never set.
    pub fn why_no_huge_pages(&self, backing: Backing) -> Option<String> {
        match backing {
            Backing::Hugetlb(_) => None,
            Backing::Anonymous => match self.enabled.as_deref() {
                Some("always" | "madvise") => None,
                Some(word) => Some(format!(
                    "transparent huge pages are off on this host \
                     ({THP_DIR}/enabled is {word})"
                )),
                None => Some("this host kernel has no transparent huge pages".into()),
            },
            Backing::Memfd => match self.shmem_enabled.as_deref() {
                Some("always" | "within_size" | "advise" | "force") => None,
                Some(word) => Some(format!(
                    "guest RAM is a shared memfd and this host gives shared memory no \
                     transparent huge pages ({THP_DIR}/shmem_enabled is {word}); \
                     use hugepages = \"2M\" with reserved huge pages, or anonymous memory"
                )),
                None => Some("this host kernel has no transparent huge pages".into()),
            },
        }
    }
}

/// Guest RAM with its backing.
#[derive(Debug)]
pub struct GuestRam {
    pub mem: GuestMemory,
    pub backing: Backing,
    /// The memfd behind a shareable backing, for those who will map it.
    pub file: Option<File>,
    /// Why this guest gets no huge pages, when it gets none.
    pub no_huge_pages: Option<String>,
}

impl GuestRam {
    /// The host-virtual ranges (start, length) of guest RAM in this process.
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        host_ranges(&self.mem)
    }
}

/// The host-virtual ranges (start, length) of every region of `mem`.
pub fn host_ranges(mem: &GuestMemory) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect()
}

fn memfd(name: &CStr, size: u64, flags: libc::c_uint) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other
    // memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    Ok(file)
}

/// Free pages in the host's hugetlb pool of `size`, if it has one.
fn free_huge_pages(size: HugePages) -> Option<u64> {
    let kib = size.bytes() >> 10;
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
    ))
    .ok()?
    .trim()
    .parse()
    .ok()
}

/// Refuses a hugetlb backing the host's pool cannot hold, in one line.
fn check_huge_pool(size: HugePages, total: u64) -> Result<(), MemoryError> {
    if !total.is_multiple_of(size.bytes()) {
        return Err(MemoryError::HugetlbSize(size.name()));
    }
    let needed = total.div_ceil(size.bytes());
    let free = free_huge_pages(size).unwrap_or(0);
    if free < needed {
        return Err(MemoryError::HugetlbShort {
            size: size.name(),
            needed,
            free,
        });
    }
    Ok(())
}

/// Where one region's pages come from: anonymous memory, or a file at an
/// offset.
struct Source<'a> {
    file: Option<(&'a File, u64)>,
    hugetlb: bool,
}

/// Maps `size` bytes of `source` at a 2 MiB-aligned host address, as KVM
/// needs to map guest memory with 2 MiB pages: an inaccessible reservation
/// with 2 MiB of slack is made, trimmed to the aligned range, and the
/// memory is mapped over it with `MAP_FIXED`. The kernel chooses addresses
/// only for the reservation, so no other thread's mappings can interfere.
///
/// The mapping is never unmapped: it lives as long as the process, which
/// runs one VM. Device threads hold clones of guest memory, and none of them
/// can then outlive it.
fn map_aligned(size: usize, source: &Source) -> Result<MmapRegion, MemoryError> {
    let reserved = Reservation::new(size + HUGE_ALIGN)?;
    let start = reserved.addr.next_multiple_of(HUGE_ALIGN);
    let range = reserved.trim_to(start, size);
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let (fd, offset, flags) = match source.file {
        None => (
            -1,
            0,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
        Some((file, offset)) => (
            file.as_raw_fd(),
            offset,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        ),
    };
    // SAFETY: [start, start + size) is this function's own reservation
    // (`range`), which nothing else uses; MAP_FIXED replaces only it.
    let ptr = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            size,
            rw,
            flags | libc::MAP_FIXED,
            fd,
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(MemoryError::Reserve(std::io::Error::last_os_error()));
    }
    // From here the range holds guest memory for the rest of the process.
    std::mem::forget(range);
    let mut builder = MmapRegionBuilder::new(size)
        .with_mmap_prot(rw)
        .with_mmap_flags(flags)
        .with_hugetlbfs(source.hugetlb);
    if let Some((file, offset)) = source.file {
        let handle = file.try_clone().map_err(MemoryError::Memfd)?;
        builder = builder.with_file_offset(FileOffset::new(handle, offset));
    }
    // SAFETY: `ptr` is the start of the live mapping of `size` bytes just
    // made, which is never unmapped.
    unsafe { builder.with_raw_mmap_pointer(ptr.cast()) }
        .build()
        .map_err(MemoryError::MapRegion)
}

/// An inaccessible, unbacked range of address space, unmapped on drop.
struct Reservation {
    addr: usize,
    len: usize,
}

impl Reservation {
    fn new(len: usize) -> Result<Self, MemoryError> {
        // SAFETY: a fresh PROT_NONE anonymous mapping at an address of the
        // kernel's choosing touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Reserve(std::io::Error::last_os_error()));
        }
        Ok(Self {
            addr: ptr as usize,
            len,
        })
    }

    /// Gives back everything outside [start, start + len), which must lie
    /// inside, and keeps that range reserved.
    fn trim_to(self, start: usize, len: usize) -> Reservation {
        let end = self.addr + self.len;
        for (from, to) in [(self.addr, start), (start + len, end)] {
            if to > from {
                // SAFETY: [from, to) is part of this reservation, which only
                // this struct knows of.
                unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
            }
        }
        std::mem::forget(self);
        Reservation { addr: start, len }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range is this reservation's own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Asks for transparent huge pages on a mapping (a hint: the host's
/// settings decide).
fn advise_huge(region: &MmapRegion) {
    // SAFETY: the range is a live mapping owned by `region`; madvise with
    // MADV_HUGEPAGE changes no contents.
    unsafe { libc::madvise(region.as_ptr().cast(), region.size(), libc::MADV_HUGEPAGE) };
}

/// Creates guest memory for `regions` (start, size) with `backing`: one
/// file for every region when the backing is a file.
pub fn create(regions: &[(u64, u64)], backing: Backing) -> Result<GuestRam, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let file = match backing {
        Backing::Anonymous => None,
        Backing::Memfd => Some(memfd(c"ferrovisor-guest-ram", total, 0)?),
        Backing::Hugetlb(size) => {
            check_huge_pool(size, total)?;
            let flag = match size {
                HugePages::Size2M => libc::MFD_HUGE_2MB,
                HugePages::Size1G => libc::MFD_HUGE_1GB,
            };
            Some(memfd(
                c"ferrovisor-guest-ram",
                total,
                libc::MFD_HUGETLB | flag,
            )?)
        }
    };
    let mut offset = 0;
    let mut mapped = Vec::with_capacity(regions.len());
    for &(start, size) in regions {
        let source = Source {
            file: file.as_ref().map(|f| (f, offset)),
            hugetlb: matches!(backing, Backing::Hugetlb(_)),
        };
        let region = map_aligned(size as usize, &source)?;
        if !source.hugetlb {
            advise_huge(&region);
        }
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or(MemoryError::Overflow(start))?;
        mapped.push(region);
        offset += size;
    }
    let mem = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Collection)?;
    let no_huge_pages = HostThp::read().why_no_huge_pages(backing);
    Ok(GuestRam {
        mem,
        backing,
        file,
        no_huge_pages,
    })
}

/// How much of guest RAM is resident, and how much of that on huge pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HugeUsage {
    pub resident_kib: u64,
    pub huge_kib: u64,
}

/// Sums, over the mappings of an smaps text that start inside `ranges`,
/// the resident memory and the part of it on huge pages (transparent, in
/// anonymous or shared memory, or hugetlb).
pub fn huge_usage_in(smaps: &str, ranges: &[(usize, usize)]) -> HugeUsage {
    let mut usage = HugeUsage::default();
    let mut inside = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, _)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let start = usize::from_str_radix(lo, 16).unwrap_or(usize::MAX);
            inside = ranges
                .iter()
                .any(|&(base, len)| start >= base && start < base + len);
            continue;
        }
        if !inside {
            continue;
        }
        let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => usage.resident_kib += kib,
            "AnonHugePages:" | "ShmemPmdMapped:" | "FilePmdMapped:" => usage.huge_kib += kib,
            // hugetlb pages are not in Rss: they count both ways.
            "Shared_Hugetlb:" | "Private_Hugetlb:" => {
                usage.resident_kib += kib;
                usage.huge_kib += kib;
            }
            _ => {}
        }
    }
    usage
}

/// [`huge_usage_in`] for this process.
pub fn huge_usage(ranges: &[(usize, usize)]) -> HugeUsage {
    std::fs::read_to_string("/proc/self/smaps")
        .map(|s| huge_usage_in(&s, ranges))
        .unwrap_or_default()
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
    fn memfd_regions_share_one_file_and_hold_data() {
        let ram = create(&[(0, 1 << 20), (1 << 32, 1 << 20)], Backing::Memfd).unwrap();
        let mem = &ram.mem;
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beef_u32, GuestAddress((1 << 32) + 16))
            .unwrap();
        let v: u32 = mem.read_obj(GuestAddress((1 << 32) + 16)).unwrap();
        assert_eq!(v, 0xdead_beef);
        let second = mem.iter().nth(1).unwrap();
        assert_eq!(second.file_offset().unwrap().start(), 1 << 20);
        assert!(ram.file.is_some());
    }

    #[test]
    fn anonymous_regions_have_no_file_and_hold_data() {
        let ram = create(&[(0, 4 << 20), (1 << 32, 2 << 20)], Backing::Anonymous).unwrap();
        assert!(ram.file.is_none());
        assert!(ram.mem.iter().all(|r| r.file_offset().is_none()));
        ram.mem.write_obj(7u64, GuestAddress(3 << 20)).unwrap();
        assert_eq!(ram.mem.read_obj::<u64>(GuestAddress(3 << 20)).unwrap(), 7);
    }

    #[test]
    fn regions_are_placed_on_2_mib_host_boundaries() {
        for backing in [Backing::Anonymous, Backing::Memfd] {
            let ram = create(&[(0, 6 << 20), (1 << 32, 4 << 20)], backing).unwrap();
            for (start, _) in ram.host_ranges() {
                assert_eq!(start % HUGE_ALIGN, 0, "{backing:?} region at {start:#x}");
            }
        }
    }

    #[test]
    fn the_backing_follows_the_request_and_the_need_to_share() {
        use MemoryBacking::*;
        let two = Some(HugePages::Size2M);
        assert_eq!(
            Backing::choose(Auto, None, false).unwrap(),
            Backing::Anonymous
        );
        assert_eq!(Backing::choose(Auto, None, true).unwrap(), Backing::Memfd);
        assert_eq!(Backing::choose(Memfd, None, false).unwrap(), Backing::Memfd);
        assert_eq!(
            Backing::choose(Auto, two, false).unwrap(),
            Backing::Hugetlb(HugePages::Size2M)
        );
        assert!(matches!(
            Backing::choose(Anonymous, two, false),
            Err(MemoryError::AnonymousHugetlb)
        ));
        assert!(matches!(
            Backing::choose(Anonymous, None, true),
            Err(MemoryError::AnonymousShared)
        ));
    }

    #[test]
    fn the_reason_for_no_huge_pages_names_the_host_setting() {
        let host = HostThp {
            enabled: Some("madvise".into()),
            shmem_enabled: Some("never".into()),
        };
        assert_eq!(host.why_no_huge_pages(Backing::Anonymous), None);
        let why = host.why_no_huge_pages(Backing::Memfd).unwrap();
        assert!(why.contains("shmem_enabled is never"), "{why}");
        assert_eq!(
            host.why_no_huge_pages(Backing::Hugetlb(HugePages::Size2M)),
            None
        );
        let off = HostThp {
            enabled: Some("never".into()),
            shmem_enabled: Some("advise".into()),
        };
        assert!(off
            .why_no_huge_pages(Backing::Anonymous)
            .unwrap()
            .contains("enabled is never"));
        assert_eq!(off.why_no_huge_pages(Backing::Memfd), None);
        assert_eq!(
            chosen_word("always [madvise] never").as_deref(),
            Some("madvise")
        );
    }

    #[test]
    fn huge_usage_counts_only_guest_mappings() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Rss:                4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 rw-s 00000000 00:01 5 /memfd:x (deleted)
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
Private_Hugetlb:       0 kB
7f1000000000-7f1000001000 rw-p 00000000 00:00 0
Rss:                   4 kB
AnonHugePages:         0 kB
";
        let usage = huge_usage_in(smaps, &[(0x7f00_0000_0000, 6 << 20)]);
        assert_eq!(
            usage,
            HugeUsage {
                resident_kib: 6144,
                huge_kib: 4096
            }
        );
    }

    #[test]
    fn an_anonymous_guest_gets_huge_pages_where_the_host_allows_them() {
        let ram = create(&[(0, 8 << 20)], Backing::Anonymous).unwrap();
        for page in (0..8u64 << 20).step_by(4096) {
            ram.mem.write_obj(1u8, GuestAddress(page)).unwrap();
        }
        let usage = huge_usage(&ram.host_ranges());
        assert_eq!(usage.resident_kib, 8 << 10);
        if ram.no_huge_pages.is_none() {
            assert!(usage.huge_kib >= 4 << 10, "{usage:?}");
        }
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
