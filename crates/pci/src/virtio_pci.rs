//! The virtio-pci modern transport (VirtIO 1.2, 4.1) for one [`VirtioDevice`].
//!
//! Vendor 0x1af4, device 0x1040 + type, revision 1, no legacy I/O BAR. One
//! 64-bit memory BAR (BAR 0, [`BAR_SIZE`] bytes) holds everything, each
//! region announced by a vendor capability:
//!
//! | offset | region |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue n at 0x3000 + 4n (multiplier 4) |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending-bit array |
//!
//! Each queue's notify address is given to the VMM's [`IoEvents`] so that a
//! kick signals the queue's eventfd in the kernel, without a VMM exit; the
//! same eventfd becomes [`ActiveQueue::kick`]. A notify write that reaches
//! the transport anyway (no ioeventfd) signals it too.
//!
//! A driver that breaks the rules gets refusals, not crashes: writes to queue
//! registers of a queue that does not exist, or once the queue or the device
//! is live, are dropped; FEATURES_OK is refused unless the driver accepted a
//! subset of the offered features that includes VERSION_1; a queue with a
//! bad size or addresses at DRIVER_OK sets DEVICE_NEEDS_RESET.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio::queue::Worker;
use virtio::{
    status, ActiveQueue, Interrupt, InterruptKind, Memory, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{self, BarKind, ConfigSpace, Ids};
use crate::msix::{MsiDelivery, Msix};
use crate::root::PciFunction;

/// Virtio's PCI vendor id.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// The size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_LEN: u64 = 0x1000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;
/// The most queues a device may have (the MSI-X table holds one vector per
/// queue plus one).
pub const MAX_QUEUES: usize = 256;

// Vendor capability config types.
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;
/// The PCI class code (base class, subclass, programming interface) a
/// device of virtio type `device_type` reports. These follow QEMU's
/// virtio-*-pci devices, so guest tools that sort devices by class see the
/// same machine: block is SCSI storage, net is Ethernet, console and vsock
/// are "other communication", and rng (like anything else) is unclassified.
pub fn class_code(device_type: u32) -> u32 {
    use virtio::device_type::{BLOCK, CONSOLE, NET, VSOCK};
    match device_type {
        BLOCK => 0x01_00_00,
        NET => 0x02_00_00,
        CONSOLE | VSOCK => 0x07_80_00,
        _ => 0x00_ff_00,
    }
}

// Common configuration registers.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const QUEUE_NOTIFY_DATA: u64 = 0x38;
/// Through queue_reset (0x3a), which reads 0: VIRTIO_F_RING_RESET is not offered.
const COMMON_LEN: usize = 0x3c;

/// Where the VMM registers notify addresses (KVM ioeventfds).
pub trait IoEvents: Send + Sync {
    /// Signals `fd` on every write to the guest address `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    /// Undoes [`IoEvents::register`].
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}

/// Interrupt state shared by the transport and the device's workers.
struct IrqState {
    isr: AtomicU8,
    status: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx_disabled: AtomicBool,
    msix: Mutex<Msix>,
    intx: EventFd,
}

impl IrqState {
    fn msix(&self) -> MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The [`Interrupt`] handed to the device on activation.
struct PciInterrupt(Arc<IrqState>);

impl Interrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let s = &self.0;
        let (bit, vector) = match kind {
            InterruptKind::Config => (ISR_CONFIG, s.config_vector.load(Ordering::Acquire)),
            InterruptKind::Queue(q) => match s.queue_vectors.get(usize::from(q)) {
                Some(v) => (ISR_QUEUE, v.load(Ordering::Acquire)),
                None => return Ok(()),
            },
        };
        let mut msix = s.msix();
        if msix.enabled() {
            if vector == NO_VECTOR {
                return Ok(());
            }
            return msix.trigger(vector);
        }
        drop(msix);
        s.isr.fetch_or(bit, Ordering::AcqRel);
        if s.intx_disabled.load(Ordering::Acquire) {
            return Ok(());
        }
        s.intx.write(1)
    }

    fn irqfd(&self, kind: InterruptKind) -> Option<vmm_sys_util::eventfd::EventFd> {
        let s = &self.0;
        let vector = match kind {
            InterruptKind::Config => s.config_vector.load(Ordering::Acquire),
            InterruptKind::Queue(q) => s.queue_vectors.get(usize::from(q))?.load(Ordering::Acquire),
        };
        if vector == NO_VECTOR {
            return None;
        }
        s.msix().irqfd(vector)
    }

    fn set_needs_reset(&self) {
        self.0
            .status
            .fetch_or(status::DEVICE_NEEDS_RESET, Ordering::AcqRel);
        let _ = self.trigger(InterruptKind::Config);
    }
}

/// Re-raises INTx after the guest's end of interrupt while the ISR still has
/// a bit set: with a level-triggered line asserted through a KVM irqfd with a
/// resample eventfd, KVM drops the line at EOI and signals the resample
/// eventfd, and the VMM calls [`IntxResampler::resample`].
#[derive(Clone)]
pub struct IntxResampler(Arc<IrqState>);

impl std::fmt::Debug for IntxResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxResampler").finish_non_exhaustive()
    }
}

impl IntxResampler {
    /// Asserts INTx again if the ISR is non-zero and INTx is in use.
    pub fn resample(&self) -> io::Result<()> {
        let s = &self.0;
        let pending = s.isr.load(Ordering::Acquire) != 0;
        if !pending || s.intx_disabled.load(Ordering::Acquire) || s.msix().enabled() {
            return Ok(());
        }
        s.intx.write(1)
    }
}

/// What the driver wrote for one queue.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    mem: Memory,
    irq: Arc<IrqState>,
    io_events: Arc<dyn IoEvents>,
    kicks: Vec<EventFd>,
    max_sizes: Vec<u16>,
    bar_base: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    activated: bool,
    /// The worker of a reset still finishing its last chain, and the status
    /// the driver reads until it has ended (the driver waits for 0 before
    /// it sets the device up again, so no vCPU waits for a worker, nor
    /// with the bus locked).
    resetting: Option<(Worker, u8)>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("type", &self.device.device_type())
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device declares no queues, or more than the notify region holds.
    #[error("a virtio device needs 1 to {MAX_QUEUES} queues, not {0}")]
    QueueCount(usize),
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
    /// The configuration space could not be built.
    #[error("cannot build the PCI configuration space")]
    Config(#[from] config::ConfigError),
}

fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut cap = vec![CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(len as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

fn default_queue(max: u16) -> QueueRegs {
    QueueRegs {
        size: max,
        enabled: false,
        desc: 0,
        driver: 0,
        device: 0,
    }
}

/// Replaces the 32-bit half of `value` that a write at `offset` within the
/// 64-bit field covers; `None` for an access that is neither half nor whole.
fn write_u64_part(value: u64, offset: u64, data: &[u8]) -> Option<u64> {
    match (offset, data.len()) {
        (0, 8) => Some(u64::from_le_bytes(data.try_into().ok()?)),
        (0, 4) => Some(value & !0xffff_ffff | u64::from(u32::from_le_bytes(data.try_into().ok()?))),
        (4, 4) => {
            Some(value & 0xffff_ffff | u64::from(u32::from_le_bytes(data.try_into().ok()?)) << 32)
        }
        _ => None,
    }
}

impl VirtioPciDevice {
    /// Wraps `device`. `msi` delivers its MSI-X vectors (one per queue plus
    /// one for configuration changes); `intx` is the INTA line's irqfd, used
    /// while MSI-X is off.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Memory,
        msi: Arc<dyn MsiDelivery>,
        intx: EventFd,
        io_events: Arc<dyn IoEvents>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        let n = max_sizes.len();
        if n == 0 || n > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(n));
        }
        let kicks = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(VirtioPciError::EventFd)?;
        let msix = Msix::new(n as u16 + 1, msi);
        let kind = device.device_type() as u16;
        let mut config = ConfigSpace::new(Ids {
            vendor: VIRTIO_VENDOR,
            device: DEVICE_ID_BASE + kind,
            revision: 1,
            class: class_code(device.device_type()),
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.set_interrupt_pin(1);
        config.add_bar(0, BAR_SIZE, BarKind::Memory64)?;
        let (body, wmask) = msix.capability(0, MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32);
        config.add_capability(&body, &wmask)?;
        config.add_capability(
            &virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_LEN as u64, &[]),
            &[],
        )?;
        let multiplier = NOTIFY_MULTIPLIER.to_le_bytes();
        let notify_len = n as u64 * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            &virtio_cap(CFG_NOTIFY, NOTIFY_OFFSET, notify_len, &multiplier),
            &[],
        )?;
        config.add_capability(&virtio_cap(CFG_ISR, ISR_OFFSET, 1, &[]), &[])?;
        config.add_capability(
            &virtio_cap(CFG_DEVICE, DEVICE_CFG_OFFSET, REGION_LEN, &[]),
            &[],
        )?;
        let irq = Arc::new(IrqState {
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..n).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx_disabled: AtomicBool::new(false),
            msix: Mutex::new(msix),
            intx,
        });
        Ok(Self {
            config,
            device,
            mem,
            irq,
            io_events,
            kicks,
            queues: max_sizes.iter().map(|&m| default_queue(m)).collect(),
            max_sizes,
            bar_base: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            activated: false,
            resetting: None,
        })
    }

    /// The handle that re-raises INTx after an end of interrupt.
    pub fn intx_resampler(&self) -> IntxResampler {
        IntxResampler(self.irq.clone())
    }

    /// The device status register: while a reset waits for the device's
    /// worker, the status from before the reset, so the driver sees the
    /// reset is not complete.
    pub fn status(&self) -> u8 {
        match &self.resetting {
            Some((worker, before)) if !worker.is_finished() => *before,
            _ => self.irq.status.load(Ordering::Acquire),
        }
    }

    /// Joins the worker of a pending reset once it has ended (which then
    /// does not wait).
    fn reap_reset(&mut self) {
        if self
            .resetting
            .as_ref()
            .is_some_and(|(w, _)| w.is_finished())
        {
            self.resetting = None;
        }
    }

    fn set_status_bits(&self, bits: u8) {
        self.irq.status.fetch_or(bits, Ordering::AcqRel);
    }

    /// The device's error path: DEVICE_NEEDS_RESET and a config interrupt.
    fn needs_reset(&self) {
        PciInterrupt(self.irq.clone()).set_needs_reset();
    }

    fn selected(&self) -> Option<usize> {
        let q = usize::from(self.queue_select);
        (q < self.queues.len()).then_some(q)
    }

    fn msix_vectors(&self) -> u16 {
        self.irq.msix().vectors()
    }

    fn common_image(&self) -> [u8; COMMON_LEN] {
        let mut image = [0u8; COMMON_LEN];
        let mut put = |offset: u64, bytes: &[u8]| {
            let at = offset as usize;
            image[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let features = self.device.device_features();
        let feature_word = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(
            DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(DEVICE_FEATURE, &feature_word.to_le_bytes());
        put(
            DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(DRIVER_FEATURE, &driver_word.to_le_bytes());
        let config_vector = self.irq.config_vector.load(Ordering::Acquire);
        put(CONFIG_MSIX_VECTOR, &config_vector.to_le_bytes());
        put(NUM_QUEUES, &(self.queues.len() as u16).to_le_bytes());
        put(DEVICE_STATUS, &[self.status()]);
        put(CONFIG_GENERATION, &[0]);
        put(QUEUE_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let regs = self.queues[q];
            let vector = self.irq.queue_vectors[q].load(Ordering::Acquire);
            put(QUEUE_SIZE, &regs.size.to_le_bytes());
            put(QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            put(QUEUE_ENABLE, &u16::from(regs.enabled).to_le_bytes());
            put(QUEUE_NOTIFY_OFF, &(q as u16).to_le_bytes());
            put(QUEUE_DESC, &regs.desc.to_le_bytes());
            put(QUEUE_DRIVER, &regs.driver.to_le_bytes());
            put(QUEUE_DEVICE, &regs.device.to_le_bytes());
            put(QUEUE_NOTIFY_DATA, &(q as u16).to_le_bytes());
        }
        image
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = image.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            1 => u64::from(data[0]),
            2 => u64::from(u16::from_le_bytes([data[0], data[1]])),
            4 => u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            _ => 0,
        };
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                self.irq.config_vector.store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(q) = self.selected() {
                    let vector = self.checked_vector(value as u16);
                    self.irq.queue_vectors[q].store(vector, Ordering::Release);
                }
            }
            (QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC..=0x37, _) => {
                self.write_queue(offset, data, value as u16)
            }
            _ => {}
        }
    }

    /// A vector the table has, or NO_VECTOR (which the driver reads back as
    /// the sign that the mapping failed).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, word: u32) {
        if self.status() & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = self.driver_features & !0xffff_ffff | u64::from(word),
            1 => self.driver_features = self.driver_features & 0xffff_ffff | u64::from(word) << 32,
            _ => {}
        }
    }

    fn write_queue(&mut self, offset: u64, data: &[u8], value16: u16) {
        let live = self.status() & status::DRIVER_OK != 0;
        let Some(q) = self.selected() else { return };
        let regs = &mut self.queues[q];
        if live || regs.enabled {
            return;
        }
        match (offset, data.len()) {
            (QUEUE_SIZE, 2) => regs.size = value16,
            (QUEUE_ENABLE, 2) => regs.enabled = value16 == 1,
            (QUEUE_DESC..=0x27, _) => {
                if let Some(v) = write_u64_part(regs.desc, offset - QUEUE_DESC, data) {
                    regs.desc = v;
                }
            }
            (QUEUE_DRIVER..=0x2f, _) => {
                if let Some(v) = write_u64_part(regs.driver, offset - QUEUE_DRIVER, data) {
                    regs.driver = v;
                }
            }
            (QUEUE_DEVICE..=0x37, _) => {
                if let Some(v) = write_u64_part(regs.device, offset - QUEUE_DEVICE, data) {
                    regs.device = v;
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status();
        // The driver may only add bits, and DEVICE_NEEDS_RESET is the device's.
        let mut new = value & !status::DEVICE_NEEDS_RESET;
        if new & old & !status::DEVICE_NEEDS_RESET != old & !status::DEVICE_NEEDS_RESET {
            return;
        }
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.device_features();
            let subset = self.driver_features & !offered == 0;
            if !subset || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                new &= !status::FEATURES_OK;
            }
        }
        self.set_status_bits(new);
        let starting = new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0;
        if starting {
            if new & status::FEATURES_OK == 0 {
                self.needs_reset();
            } else {
                self.activate();
            }
        }
    }

    /// Builds the enabled queues; `None` if any is invalid.
    fn build_queues(&self) -> Option<Vec<ActiveQueue>> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let mut queue = Queue::new(self.max_sizes[index]).ok()?;
            queue.try_set_size(regs.size).ok()?;
            queue
                .try_set_desc_table_address(GuestAddress(regs.desc))
                .ok()?;
            queue
                .try_set_avail_ring_address(GuestAddress(regs.driver))
                .ok()?;
            queue
                .try_set_used_ring_address(GuestAddress(regs.device))
                .ok()?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return None;
            }
            let kick = self.kicks[index].try_clone().ok()?;
            active.push(ActiveQueue {
                index: index as u16,
                queue,
                kick,
            });
        }
        Some(active)
    }

    fn activate(&mut self) {
        // A driver that did not wait for its reset to complete waits here.
        self.resetting = None;
        let Some(queues) = self.build_queues() else {
            self.needs_reset();
            return;
        };
        let interrupt: Arc<dyn Interrupt> = Arc::new(PciInterrupt(self.irq.clone()));
        let result =
            self.device
                .activate(self.mem.clone(), interrupt, queues, self.driver_features);
        match result {
            Ok(()) => self.activated = true,
            Err(_) => self.needs_reset(),
        }
    }

    /// Device reset: the device stops, every transport register returns to
    /// its default.
    fn reset(&mut self) {
        if self.activated {
            let before = self.status();
            if let Some(worker) = self.device.reset() {
                self.resetting = Some((worker, before));
            }
            self.activated = false;
        }
        self.irq.status.store(0, Ordering::Release);
        self.irq.isr.store(0, Ordering::Release);
        self.irq.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.irq.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        for (regs, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            *regs = default_queue(max);
        }
    }

    fn notify_addr(base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
    }
}

impl PciFunction for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _len: usize) {
        let disabled = self.config.command() & config::COMMAND_INTX_DISABLE != 0;
        self.irq.intx_disabled.store(disabled, Ordering::Release);
        // The MSI-X capability is the first one, at 0x40; its control word
        // sits two bytes in.
        let control = self.config.u16_at(0x42);
        self.irq.msix().set_control(control);
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.reap_reset();
        data.fill(0);
        if bar != 0 {
            return;
        }
        let region = offset & !(REGION_LEN - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.read_common(within, data),
            ISR_OFFSET if within == 0 => {
                if let Some(first) = data.first_mut() {
                    *first = self.irq.isr.swap(0, Ordering::AcqRel);
                }
            }
            DEVICE_CFG_OFFSET => self.device.read_config(within, data),
            MSIX_TABLE_OFFSET | 0x5000 => {
                self.irq.msix().read_table(offset - MSIX_TABLE_OFFSET, data)
            }
            MSIX_PBA_OFFSET => self.irq.msix().read_pba(within, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let region = offset & !(REGION_LEN - 1);
        let within = offset - region;
        match region {
            COMMON_OFFSET => self.write_common(within, data),
            DEVICE_CFG_OFFSET => self.device.write_config(within, data),
            NOTIFY_OFFSET => {
                let queue = (within / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(queue) {
                    let _ = kick.write(1);
                }
            }
            MSIX_TABLE_OFFSET | 0x5000 => self
                .irq
                .msix()
                .write_table(offset - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != 0 {
            return;
        }
        for (queue, kick) in self.kicks.iter().enumerate() {
            if let Some(base) = old {
                let _ = self
                    .io_events
                    .unregister(Self::notify_addr(base, queue), kick);
            }
            if let Some(base) = new {
                let _ = self
                    .io_events
                    .register(Self::notify_addr(base, queue), kick);
            }
        }
        self.bar_base = new;
    }
}

#[cfg(test)]
mod tests;
