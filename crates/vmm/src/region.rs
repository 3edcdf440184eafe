//! Shared memory regions (`[[region]]` in the guest file): a file that
//! several VMMs map, which each guest sees as an ivshmem-compatible PCI
//! device (`pci::ivshmem`) with the file's memory as BAR 2.
//!
//! The file is opened and mapped (shared) before the VM exists, so a bad
//! region is one line and nothing starts. The mapping lives as long as the
//! process, which is the VM's life: KVM may reference it from a memory slot
//! until the very end. Whenever the guest's BAR 2 decodes, [`KvmRegion`]
//! puts the mapping there as a KVM memory slot, read-only
//! (`KVM_MEM_READONLY`) for a guest that may only read: its writes exit to
//! the device model, which drops them.
//!
//! A region the daemon owns arrives as inherited descriptors
//! ([`crate::region_fds`]): its memfd, one eventfd per vector of this guest
//! and every peer's. [`PeerMsi`] registers this guest's eventfds as the
//! irqfds of its MSI-X vectors, so a peer's doorbell reaches the guest with
//! no exit here; Doorbell writes signal the peers' eventfds. A region given
//! in a guest file has no peers, so its Doorbell writes are dropped (and
//! counted).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pci::{MsiDelivery, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, VmFd};
use pci::ivshmem::{RegionMapping, MIN_SIZE};

use crate::config::RegionConfig;

/// The first KVM memory slot used by regions (guest RAM takes the slots
/// below).
const FIRST_SLOT: u32 = 16;
/// The largest region: half the PCI window below 4 GiB, which holds every
/// BAR.
pub const MAX_SIZE: u64 = arch::layout::PCI_MMIO_SIZE / 2;

/// Errors from opening a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The file could not be opened or examined.
    #[error("cannot open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// The file's size is not one a region can have.
    #[error(
        "{path} holds {size} bytes; a region's file must be a power of two from 4 KiB to {} MiB (e.g. `truncate -s 1M {path}`)",
        MAX_SIZE >> 20
    )]
    Size { path: PathBuf, size: u64 },
    /// The file could not be mapped.
    #[error("cannot map {0}")]
    Map(PathBuf, #[source] std::io::Error),
    /// An inherited region's memfd has a size a region cannot have.
    #[error(
        "{region}: its memfd holds {size} bytes, not a power of two from 4 KiB to {} MiB",
        MAX_SIZE >> 20
    )]
    FdSize { region: String, size: u64 },
    /// An inherited descriptor is not open, or not what it should be.
    #[error("{region}: descriptor {fd} is not {what}")]
    Fd {
        region: String,
        fd: RawFd,
        what: &'static str,
    },
    /// The host's KVM cannot map memory read-only.
    #[error("this host's KVM cannot map memory read-only (no KVM_CAP_READONLY_MEM), so a read-only region cannot be given")]
    NoReadOnly,
}

/// How a region appears in errors: as the guest file or the command line
/// names it.
pub fn region_flag(config: &RegionConfig) -> String {
    match &config.fds {
        Some(fds) => format!("--region-fds name={}", fds.name),
        None => format!("[[region]] path = {:?}", config.path.display().to_string()),
    }
}

/// A copy of inherited descriptor `fd` that this process owns, after
/// checking what it is: `kind` is the start of its `/proc/self/fd` link
/// (`/memfd:` for a memfd, `anon_inode:[eventfd]` for an eventfd).
fn take_fd(region: &str, fd: RawFd, kind: &str, what: &'static str) -> Result<File, RegionError> {
    let error = || RegionError::Fd {
        region: region.to_string(),
        fd,
        what,
    };
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|_| error())?;
    if !link.to_string_lossy().starts_with(kind) {
        return Err(error());
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor just seen open; the new
    // descriptor is ours alone.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(error());
    }
    // SAFETY: `copy` was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(copy) })
}

fn take_eventfds(region: &str, fds: &[RawFd]) -> Result<Vec<EventFd>, RegionError> {
    fds.iter()
        .map(|&fd| {
            let file = take_fd(region, fd, "anon_inode:[eventfd]", "an eventfd")?;
            // SAFETY: the descriptor is an eventfd (checked) that `file`
            // owned; ownership passes to the EventFd.
            Ok(unsafe { EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) })
        })
        .collect()
}

/// A daemon-owned region's doorbell eventfds, taken over by this process.
#[derive(Debug)]
pub struct RegionEventFds {
    /// This guest's vectors'.
    pub own: Vec<EventFd>,
    /// Each peer's vectors'.
    pub peers: HashMap<u16, Vec<EventFd>>,
}

/// A region's file, mapped into this process.
#[derive(Debug)]
pub struct RegionBacking {
    pub config: RegionConfig,
    pub size: u64,
    /// Where the file is mapped in this process.
    host: u64,
    /// The doorbells of a region given as descriptors.
    pub eventfds: Option<RegionEventFds>,
}

impl RegionBacking {
    /// Opens and maps the region's file: read-write, or read-only for a
    /// guest that may only read.
    pub fn open(config: &RegionConfig) -> Result<Self, RegionError> {
        let path = &config.path;
        let (file, eventfds) = match &config.fds {
            Some(fds) => {
                let name = format!("region '{}'", fds.name);
                let file = take_fd(&name, fds.memory, "/memfd:", "a memfd")?;
                let mut peers = HashMap::new();
                for (id, list) in &fds.peers {
                    peers.insert(*id, take_eventfds(&name, list)?);
                }
                let own = take_eventfds(&name, &fds.own)?;
                (file, Some(RegionEventFds { own, peers }))
            }
            None => {
                // A path, or a descriptor the daemon opened (`fd:N`).
                let file = crate::guest_file::open(path, !config.readonly)
                    .map_err(|e| RegionError::Open(path.clone(), e))?;
                (file, None)
            }
        };
        let size = file
            .metadata()
            .map_err(|e| RegionError::Open(path.clone(), e))?
            .len();
        if !size.is_power_of_two() || !(MIN_SIZE..=MAX_SIZE).contains(&size) {
            if let Some(fds) = &config.fds {
                let region = format!("region '{}'", fds.name);
                return Err(RegionError::FdSize { region, size });
            }
            return Err(RegionError::Size {
                path: path.clone(),
                size,
            });
        }
        let prot = if config.readonly {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a fresh shared mapping of `size` bytes of an open file at
        // an address the kernel picks; it overlaps nothing of ours. The file
        // may be closed afterwards: the mapping keeps it.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(RegionError::Map(
                path.clone(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            config: config.clone(),
            size,
            host: host as u64,
            eventfds,
        })
    }

    /// The region's KVM placement, in slot `FIRST_SLOT + index`.
    pub fn kvm_mapping(&self, vm: &Arc<VmFd>, index: usize) -> Result<KvmRegion, RegionError> {
        if self.config.readonly && !vm.check_extension(Cap::ReadonlyMem) {
            return Err(RegionError::NoReadOnly);
        }
        Ok(KvmRegion {
            vm: vm.clone(),
            slot: FIRST_SLOT + index as u32,
            host: self.host,
            size: self.size,
            flags: if self.config.readonly {
                KVM_MEM_READONLY
            } else {
                0
            },
            last_error: Mutex::new(None),
        })
    }
}

/// Places a region in the guest as a KVM memory slot.
#[derive(Debug)]
pub struct KvmRegion {
    vm: Arc<VmFd>,
    slot: u32,
    host: u64,
    size: u64,
    flags: u32,
    /// The last error KVM gave, kept for [`KvmRegion::take_error`].
    last_error: Mutex<Option<std::io::Error>>,
}

impl KvmRegion {
    /// The last error from placing the region, if any, forgotten once
    /// taken. The device only counts such errors; the VMM checks this after
    /// the build-time placement, so a region KVM refused stops the start.
    pub fn take_error(&self) -> Option<std::io::Error> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn set(&self, gpa: u64, size: u64) -> std::io::Result<()> {
        let result = self.set_slot(gpa, size);
        if let Err(e) = &result {
            let copy = std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO));
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(copy);
        }
        result
    }

    fn set_slot(&self, gpa: u64, size: u64) -> std::io::Result<()> {
        let desc = kvm_userspace_memory_region {
            slot: self.slot,
            flags: self.flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: self.host,
        };
        // SAFETY: the mapping at `host` covers `size` bytes and is never
        // unmapped while the process lives (see the module's comment).
        unsafe { self.vm.set_user_memory_region(desc) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl RegionMapping for KvmRegion {
    fn map(&self, gpa: u64) -> std::io::Result<()> {
        self.set(gpa, self.size)
    }

    fn unmap(&self, gpa: u64) -> std::io::Result<()> {
        self.set(gpa, 0)
    }
}

/// The MSI-X vectors of a region whose peers ring this guest straight
/// through KVM: vector `v`'s interrupt source is this guest's eventfd `v`,
/// which the peers' VMMs write. The eventfd is the irqfd of the vector's
/// GSI only while the vector is deliverable: the guest masking it (or
/// turning MSI-X off) detaches it, and unmasking attaches it again. KVM
/// checks at attach time whether the eventfd was signalled meanwhile and
/// then injects at once, so a doorbell rung while the vector was masked is
/// held, not lost, as the ivshmem specification asks (the pending-bit
/// array does not show it).
#[derive(Debug)]
pub struct PeerMsi {
    vm: Arc<VmFd>,
    router: Arc<crate::pci::GsiRouter>,
    first_gsi: u32,
    irqfds: Vec<EventFd>,
    attached: Mutex<Vec<bool>>,
}

impl PeerMsi {
    /// The vectors of `irqfds` (one per vector), on fresh GSIs; every
    /// vector starts masked, so detached.
    pub(crate) fn new(
        vm: &Arc<VmFd>,
        router: &Arc<crate::pci::GsiRouter>,
        irqfds: Vec<EventFd>,
    ) -> Result<Self, crate::pci::PciError> {
        let first_gsi = router.allocate(irqfds.len() as u32)?;
        Ok(Self {
            vm: vm.clone(),
            router: router.clone(),
            first_gsi,
            attached: Mutex::new(vec![false; irqfds.len()]),
            irqfds,
        })
    }

    /// Attaches or detaches vector `v`'s irqfd, when that changes anything.
    fn attach(&self, v: usize, on: bool) -> std::io::Result<()> {
        let mut attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
        let (Some(fd), Some(state)) = (self.irqfds.get(v), attached.get_mut(v)) else {
            return Ok(());
        };
        if *state == on {
            return Ok(());
        }
        let gsi = self.first_gsi + v as u32;
        let result = if on {
            self.vm.register_irqfd(fd, gsi)
        } else {
            self.vm.unregister_irqfd(fd, gsi)
        };
        result.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        *state = on;
        Ok(())
    }
}

impl MsiDelivery for PeerMsi {
    fn route(&self, vector: u16, message: MsiMessage) -> std::io::Result<()> {
        let v = usize::from(vector);
        if v >= self.irqfds.len() {
            return Ok(());
        }
        self.router
            .set_msi(self.first_gsi + u32::from(vector), message)?;
        self.attach(v, true)
    }

    fn signal(&self, vector: u16) -> std::io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }

    fn hold(&self, vector: u16) -> std::io::Result<()> {
        self.attach(usize::from(vector), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: PathBuf, readonly: bool) -> RegionConfig {
        RegionConfig {
            path,
            id: 0,
            readonly,
            fds: None,
        }
    }

    fn temp_file(name: &str, size: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        path
    }

    #[test]
    fn a_file_of_a_power_of_two_size_is_mapped_and_shared() {
        let path = temp_file("fv-region-ok", 0x10000);
        let backing = RegionBacking::open(&config(path.clone(), false)).unwrap();
        assert_eq!(backing.size, 0x10000);
        // A write through the mapping reaches the file.
        // SAFETY: the mapping is 64 KiB, read-write, and lives on.
        unsafe { *(backing.host as *mut u32).add(1) = 0xcafe_f00d };
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[4..8], &0xcafe_f00du32.to_le_bytes());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_sizes_and_missing_files_are_one_line_naming_the_file() {
        let odd = temp_file("fv-region-odd", 0x3000);
        let err = RegionBacking::open(&config(odd.clone(), true)).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "{} holds 12288 bytes; a region's file must be a power of two",
                odd.display()
            )),
            "{err}"
        );
        std::fs::remove_file(odd).unwrap();
        let empty = temp_file("fv-region-empty", 0);
        assert!(matches!(
            RegionBacking::open(&config(empty.clone(), false)),
            Err(RegionError::Size { size: 0, .. })
        ));
        std::fs::remove_file(empty).unwrap();
        let missing = PathBuf::from("/nonexistent/region");
        let err = RegionBacking::open(&config(missing, false)).unwrap_err();
        assert_eq!(err.to_string(), "cannot open /nonexistent/region");
    }

    #[test]
    fn the_flag_names_the_file() {
        let c = config("/dev/shm/ring0".into(), false);
        assert_eq!(region_flag(&c), "[[region]] path = \"/dev/shm/ring0\"");
    }
}
