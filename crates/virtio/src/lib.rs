//! VirtIO device models, independent of any transport and of KVM.
//!
//! A device implements [`VirtioDevice`]. A transport (virtio-pci in the VMM)
//! owns the registers the driver sees: it negotiates features, collects queue
//! addresses, and on DRIVER_OK hands the device its queues, each with the
//! eventfd that a guest kick signals, and an [`Interrupt`] to signal back.
//! The device then serves its queues on its own worker thread(s), never on a
//! vCPU thread. Unit tests drive a device the same way with a mock driver
//! that writes descriptors into plain guest memory.
//!
//! A driver error (a descriptor outside guest memory, a loop, a chain longer
//! than the queue, a short header, an overflowing length) makes the device
//! call [`Interrupt::set_needs_reset`] and stop serving that queue. The VMM
//! and every other device carry on.

use std::sync::Arc;

use thiserror::Error;

pub mod block;
pub mod console;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod log_limit;
pub mod queue;
pub mod rate_limiter;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod thread;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub mod net;
pub mod vsock;

/// Guest memory as devices see it.
pub type Memory = vm_memory::GuestMemoryMmap<()>;

/// VirtIO 1.x: the device complies with the modern interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The driver may use the event index fields (used_event / avail_event).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Indirect descriptors are supported.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Device status bits (VirtIO 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// VirtIO device type ids (VirtIO 1.2, 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const VSOCK: u32 = 19;
}

/// What an interrupt tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device's configuration space changed (or it needs a reset).
    Config,
    /// Used buffers are ready on this queue.
    Queue(u16),
}

/// The transport's side of signalling, given to a device on activation.
pub trait Interrupt: Send + Sync {
    /// Signals the driver. With MSI-X this is the vector the driver chose for
    /// the queue or for config changes; with INTx it sets the ISR bit and
    /// raises the line.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// The driver broke the rules: the transport sets DEVICE_NEEDS_RESET in
    /// the device status and sends a config interrupt. The device has already
    /// stopped using the queue concerned.
    fn set_needs_reset(&self);
    /// An eventfd that raises `kind`'s interrupt when another process
    /// writes it, with no VMM thread in between (the irqfd of its MSI-X
    /// vector), when the transport has one now; `None` otherwise, and the
    /// device relays through [`Interrupt::trigger`].
    fn irqfd(&self, _kind: InterruptKind) -> Option<EventFd> {
        None
    }
}

/// A queue the driver made ready, handed to the device on activation.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index within the device.
    pub index: u16,
    /// Addresses, size and event-index setting as the driver wrote them.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (an ioeventfd in the VMM).
    pub kick: EventFd,
}

/// Errors from activating a device.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver made ready a different set of queues than the device uses.
    #[error("the driver enabled {got} queues; the device needs {want}")]
    QueueCount { want: usize, got: usize },
    /// The device could not start its worker.
    #[error("cannot start the device's worker thread")]
    Worker(#[source] std::io::Error),
    /// The device's backend failed to start.
    #[error("the device's backend failed: {0}")]
    Backend(String),
}

/// A VirtIO device model.
pub trait VirtioDevice: Send {
    /// The VirtIO device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers, including [`VIRTIO_F_VERSION_1`].
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space. Bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. Writes outside the
    /// writable fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues with the features the driver accepted.
    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError>;
    /// Stops serving the queues and returns to the state before activation.
    /// It runs on the vCPU that wrote the status, with the PCI bus locked,
    /// so it must not wait: a device with a worker tells it to stop and
    /// hands it back. The worker finishes at most the chain in progress
    /// (whose work is bounded) and then no longer touches guest memory;
    /// the transport keeps the reset pending (the status does not read 0)
    /// until the worker has ended, and joins it then.
    fn reset(&mut self) -> Option<queue::Worker>;
}

/// Checks that the driver made ready exactly the `want` queues a device uses.
pub fn expect_queues(queues: &[ActiveQueue], want: usize) -> Result<(), ActivateError> {
    if queues.len() == want {
        Ok(())
    } else {
        Err(ActivateError::QueueCount {
            want,
            got: queues.len(),
        })
    }
}

/// Copies the part of a device's configuration space at `offset` into
/// `data`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}
