//! A shared-memory region as an ivshmem-compatible PCI device (vendor 0x1af4,
//! device 0x1110, revision 1), so that guest tools written for QEMU's
//! `ivshmem-doorbell` find the same device:
//!
//! | BAR | holds |
//! |---|---|
//! | 0 | registers, 256 bytes (below) |
//! | 1 | MSI-X table (offset 0) and pending-bit array (offset 0x800) |
//! | 2 | the shared memory: 64-bit, prefetchable, the region's size |
//!
//! BAR 0's registers, each 32 bits:
//!
//! | offset | register |
//! |---|---|
//! | 0x0 | Interrupt Mask (read/write; bit 0 gates INTx while MSI-X is off) |
//! | 0x4 | Interrupt Status (bit 0: a peer rang while MSI-X is off; reading clears it) |
//! | 0x8 | IVPosition (read-only): this guest's peer id on the region |
//! | 0xc | Doorbell (write-only): peer id in bits 16-31, vector in bits 0-15 |
//!
//! A Doorbell write goes to the VMM's [`Doorbells`], which signals the named
//! peer's eventfd for that vector (the peer's VMM has it as an irqfd, so the
//! receiving side runs no VMM code). A doorbell that names no peer or a
//! vector the peer does not have is dropped and counted. An interrupt
//! arriving here through the VMM ([`IvshmemDevice::ring`]) goes to MSI-X
//! when the guest enabled it (held pending while the vector is masked), or
//! to INTx with the Interrupt Status bit otherwise.
//!
//! The memory itself never passes through this model: whenever BAR 2
//! decodes, the VMM maps the region there ([`RegionMapping`], a KVM memory
//! slot, read-only for a guest that may only read). Only accesses that the
//! slot does not serve reach [`PciFunction::write_bar`]: a read-only guest's
//! writes, which are dropped and counted.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::config::{self, BarKind, ConfigError, ConfigSpace, Ids};
use crate::msix::{MsiDelivery, Msix};
use crate::root::PciFunction;

/// The vendor id (Red Hat, Inc., as QEMU's ivshmem).
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// The device id of an inter-VM shared memory device.
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// Revision 1: the shared memory is valid from the start, and IVPosition
/// never reads -1.
pub const IVSHMEM_REVISION: u8 = 1;
/// Class code: memory controller, RAM.
const CLASS_RAM: u32 = 0x05_00_00;
/// QEMU's subsystem ids.
const SUBSYSTEM_VENDOR: u16 = 0x1af4;
const SUBSYSTEM: u16 = 0x1100;

pub const REGISTERS_BAR: usize = 0;
pub const MSIX_BAR: usize = 1;
pub const MEMORY_BAR: usize = 2;
/// The size of BAR 0.
pub const REGISTERS_SIZE: u64 = 0x100;
/// The size of BAR 1, and where its PBA starts.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// The most MSI-X vectors a region's device offers (the table must end
/// before the PBA).
pub const MAX_VECTORS: u16 = (MSIX_PBA_OFFSET / crate::msix::ENTRY_SIZE) as u16;
/// The smallest region: one page.
pub const MIN_SIZE: u64 = 0x1000;

pub const REG_INTR_MASK: u64 = 0x0;
pub const REG_INTR_STATUS: u64 = 0x4;
pub const REG_IV_POSITION: u64 = 0x8;
pub const REG_DOORBELL: u64 = 0xc;
/// Interrupt Mask and Status: the peer-interrupt bit.
const INTR_PEER: u32 = 1;
/// The status register's Interrupt Status bit: INTx is asserted.
const STATUS_INTERRUPT: u16 = 1 << 3;

/// The device's interrupt state outside MSI-X: the Interrupt Mask and
/// Status registers, whether MSI-X and INTx are on, and the INTA line.
/// The VMM's doorbell watcher shares it, so that a peer's doorbell arriving
/// while MSI-X is off (a guest driver that takes INTx, such as Linux's
/// `uio_pci_generic`) sets Interrupt Status and raises INTx without a vCPU.
#[derive(Debug)]
pub struct IntxState {
    status: AtomicU32,
    mask: AtomicU32,
    msix_on: AtomicBool,
    intx_off: AtomicBool,
    intx: EventFd,
}

impl IntxState {
    fn new(intx: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            mask: AtomicU32::new(0),
            msix_on: AtomicBool::new(false),
            intx_off: AtomicBool::new(false),
            intx,
        }
    }

    /// Whether the guest has MSI-X on: its vectors' irqfds carry doorbells.
    pub fn msix_enabled(&self) -> bool {
        self.msix_on.load(Ordering::SeqCst)
    }

    /// A peer rang this guest while MSI-X is off: sets Interrupt Status and
    /// raises INTx if the mask and the command register let it through.
    pub fn peer_rang(&self) -> io::Result<()> {
        self.status.fetch_or(INTR_PEER, Ordering::SeqCst);
        self.raise_if_due()
    }

    /// Whether the device asserts INTx, as the status register shows it.
    fn pending(&self) -> bool {
        self.status.load(Ordering::SeqCst) & self.mask.load(Ordering::SeqCst) != 0
    }

    fn raise_if_due(&self) -> io::Result<()> {
        if self.pending() && !self.intx_off.load(Ordering::SeqCst) && !self.msix_enabled() {
            self.intx.write(1)?;
        }
        Ok(())
    }
}

/// Where a guest's doorbell writes go: the VMM signals the named peer's
/// eventfd for the vector.
pub trait Doorbells: Send + Sync {
    /// Interrupts `peer` on `vector`. An error means there is no such peer
    /// or vector (or it is gone); the device counts it and the guest sees
    /// nothing, as the ivshmem specification says.
    fn ring(&self, peer: u16, vector: u16) -> io::Result<()>;
}

/// Doorbells as eventfds: for each peer, one eventfd per vector, which that
/// peer's VMM has registered as the irqfd of the vector's MSI-X route.
/// Ringing writes 1 to it; KVM injects the interrupt in the peer with no
/// exit to its VMM.
#[derive(Debug, Default)]
pub struct EventFdDoorbells {
    peers: HashMap<u16, Vec<EventFd>>,
}

impl EventFdDoorbells {
    /// Doorbells for these peers: `peers[id][vector]`.
    pub fn new(peers: HashMap<u16, Vec<EventFd>>) -> Self {
        Self { peers }
    }
}

impl Doorbells for EventFdDoorbells {
    fn ring(&self, peer: u16, vector: u16) -> io::Result<()> {
        let fd = self
            .peers
            .get(&peer)
            .and_then(|fds| fds.get(usize::from(vector)))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no peer {peer} with vector {vector} on this region"),
                )
            })?;
        fd.write(1)
    }
}

/// Where the VMM maps the region into the guest.
pub trait RegionMapping: Send + Sync {
    /// Maps the region at guest physical address `gpa`.
    fn map(&self, gpa: u64) -> io::Result<()>;
    /// Removes the mapping at `gpa`.
    fn unmap(&self, gpa: u64) -> io::Result<()>;
}

/// One guest's view of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvshmemConfig {
    /// The region's size: a power of two of at least [`MIN_SIZE`].
    pub size: u64,
    /// This guest's peer id on the region (IVPosition).
    pub position: u16,
    /// MSI-X vectors: how many doorbells this guest can be rung on.
    pub vectors: u16,
    /// Whether the guest may only read the region.
    pub read_only: bool,
}

/// Errors from building the device.
#[derive(Debug, thiserror::Error)]
pub enum IvshmemError {
    /// The size is not a power of two of at least a page.
    #[error("a shared region's size must be a power of two of at least 4 KiB, not {0:#x}")]
    Size(u64),
    /// No vectors, or more than BAR 1 holds.
    #[error("a shared region needs 1 to {MAX_VECTORS} doorbell vectors, not {0}")]
    Vectors(u16),
    /// The configuration space could not be built.
    #[error("cannot build the PCI configuration space")]
    Config(#[from] ConfigError),
}

/// What the device has seen, for the VMM's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IvshmemCounters {
    /// Doorbells this guest rang that reached a peer.
    pub doorbells_sent: u64,
    /// Doorbells this guest rang that named no peer or vector.
    pub doorbells_dropped: u64,
    /// Interrupts delivered to this guest through the VMM.
    pub doorbells_received: u64,
    /// Writes to the region that did not land (a read-only guest's).
    pub writes_dropped: u64,
    /// Times the VMM failed to map or unmap the region.
    pub mapping_errors: u64,
}

/// The ivshmem device of one guest on one region.
pub struct IvshmemDevice {
    config: ConfigSpace,
    settings: IvshmemConfig,
    msix: Msix,
    intx: Arc<IntxState>,
    doorbells: Arc<dyn Doorbells>,
    mapping: Arc<dyn RegionMapping>,
    counters: IvshmemCounters,
}

impl std::fmt::Debug for IvshmemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvshmemDevice")
            .field("settings", &self.settings)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl IvshmemDevice {
    /// The device for one guest's view of a region. `msi` delivers its own
    /// MSI-X vectors, `intx` is its INTA line's irqfd, `doorbells` carries
    /// its doorbell writes to peers and `mapping` places the region.
    pub fn new(
        settings: IvshmemConfig,
        msi: Arc<dyn MsiDelivery>,
        intx: EventFd,
        doorbells: Arc<dyn Doorbells>,
        mapping: Arc<dyn RegionMapping>,
    ) -> Result<Self, IvshmemError> {
        if !settings.size.is_power_of_two() || settings.size < MIN_SIZE {
            return Err(IvshmemError::Size(settings.size));
        }
        if settings.vectors == 0 || settings.vectors > MAX_VECTORS {
            return Err(IvshmemError::Vectors(settings.vectors));
        }
        let msix = Msix::new(settings.vectors, msi);
        let mut config = ConfigSpace::new(Ids {
            vendor: IVSHMEM_VENDOR,
            device: IVSHMEM_DEVICE,
            revision: IVSHMEM_REVISION,
            class: CLASS_RAM,
            subsystem_vendor: SUBSYSTEM_VENDOR,
            subsystem: SUBSYSTEM,
        });
        config.set_interrupt_pin(1);
        config.add_bar(REGISTERS_BAR, REGISTERS_SIZE, BarKind::Memory32)?;
        config.add_bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind::Memory32)?;
        config.add_bar(MEMORY_BAR, settings.size, BarKind::Memory64)?;
        config.set_bar_prefetchable(MEMORY_BAR);
        let (body, wmask) = msix.capability(MSIX_BAR as u8, 0, MSIX_PBA_OFFSET as u32);
        config.add_capability(&body, &wmask)?;
        Ok(Self {
            config,
            settings,
            msix,
            intx: Arc::new(IntxState::new(intx)),
            doorbells,
            mapping,
            counters: IvshmemCounters::default(),
        })
    }

    /// What the device has counted.
    pub fn counters(&self) -> IvshmemCounters {
        self.counters
    }

    /// The INTx state, for the VMM's doorbell watcher.
    pub fn intx_state(&self) -> Arc<IntxState> {
        self.intx.clone()
    }

    /// A peer rang this guest on `vector` through the VMM (when the
    /// interrupt does not go straight to an irqfd): MSI-X if the guest
    /// enabled it, else the Interrupt Status bit and INTx. Vectors past the
    /// table are ignored.
    pub fn ring(&mut self, vector: u16) -> io::Result<()> {
        if vector >= self.settings.vectors {
            return Ok(());
        }
        self.counters.doorbells_received += 1;
        if self.msix.enabled() {
            return self.msix.trigger(vector);
        }
        self.intx.peer_rang()
    }

    /// Re-raises INTx after the guest's end of interrupt while a peer
    /// interrupt is still pending and unmasked (level-triggered INTx through
    /// a resampling irqfd, as for virtio-pci).
    pub fn resample(&self) -> io::Result<()> {
        self.intx.raise_if_due()
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_INTR_MASK => self.intx.mask.load(Ordering::SeqCst),
            REG_INTR_STATUS => self.intx.status.swap(0, Ordering::SeqCst),
            REG_IV_POSITION => u32::from(self.settings.position),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_INTR_MASK => {
                self.intx.mask.store(value & INTR_PEER, Ordering::SeqCst);
                let _ = self.intx.raise_if_due();
            }
            REG_INTR_STATUS => {
                self.intx.status.store(value & INTR_PEER, Ordering::SeqCst);
                let _ = self.intx.raise_if_due();
            }
            REG_DOORBELL => {
                let (peer, vector) = ((value >> 16) as u16, value as u16);
                match self.doorbells.ring(peer, vector) {
                    Ok(()) => self.counters.doorbells_sent += 1,
                    Err(_) => self.counters.doorbells_dropped += 1,
                }
            }
            _ => {}
        }
    }
}

/// The 32-bit value of an aligned 4-byte register access, else `None`.
fn register_access(offset: u64, len: usize) -> Option<u64> {
    (len == 4 && offset.is_multiple_of(4) && offset < REGISTERS_SIZE).then_some(offset)
}

impl PciFunction for IvshmemDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {
        // The MSI-X capability is the only one, at 0x40; its control word
        // sits two bytes in.
        let control = self.config.u16_at(0x42);
        self.msix.set_control(control);
        let intx_off = self.config.command() & config::COMMAND_INTX_DISABLE != 0;
        self.intx.intx_off.store(intx_off, Ordering::SeqCst);
        self.intx
            .msix_on
            .store(self.msix.enabled(), Ordering::SeqCst);
        // INTx turned back on (a driver's end of interrupt) with a peer's
        // interrupt still pending raises it again.
        let _ = self.intx.raise_if_due();
    }

    fn dynamic_status(&self) -> u16 {
        if self.intx.pending() {
            STATUS_INTERRUPT
        } else {
            0
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar {
            REGISTERS_BAR => {
                if let Some(offset) = register_access(offset, data.len()) {
                    let value = self.read_register(offset);
                    data.copy_from_slice(&value.to_le_bytes());
                }
            }
            MSIX_BAR if offset < MSIX_PBA_OFFSET => self.msix.read_table(offset, data),
            MSIX_BAR => self.msix.read_pba(offset - MSIX_PBA_OFFSET, data),
            // The region is mapped whenever BAR 2 decodes; a read that
            // reaches the model found no mapping and sees zeros.
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            REGISTERS_BAR => {
                if let Some(offset) = register_access(offset, data.len()) {
                    let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    self.write_register(offset, value);
                }
            }
            MSIX_BAR if offset < MSIX_PBA_OFFSET => self.msix.write_table(offset, data),
            MEMORY_BAR => self.counters.writes_dropped += 1,
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != MEMORY_BAR {
            return;
        }
        let unmapped = old.map_or(Ok(()), |gpa| self.mapping.unmap(gpa));
        let mapped = new.map_or(Ok(()), |gpa| self.mapping.map(gpa));
        for result in [unmapped, mapped] {
            if result.is_err() {
                self.counters.mapping_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
