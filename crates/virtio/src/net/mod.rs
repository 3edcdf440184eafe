//! virtio-net: an Ethernet device whose frames go to a [`NetBackend`],
//! normally a host [`Tap`].
//!
//! The device has one receive and one transmit queue, served by one worker
//! thread that waits with epoll on the backend's file descriptor, both queue
//! kicks and a stop event. Every frame carries the 12-byte
//! `virtio_net_hdr_v1` unchanged between the guest and the backend, so the
//! checksum and segmentation offloads the backend takes are offered to the
//! guest and switched on in the backend once the guest accepts them.
//!
//! Receive buffers are not merged (no VIRTIO_NET_F_MRG_RXBUF): each frame
//! lands in one chain, and a frame larger than the chain is dropped. While
//! the driver has no receive buffer posted, the device stops reading the
//! backend, so frames wait in the backend's queue, and resumes on the
//! driver's next kick.

mod tap;
mod vhost_user;
mod worker;

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use vmm_sys_util::epoll::EventSet;

pub use tap::{tun_f, Tap, TapError};
pub use vhost_user::{SharedRam, SharedRamSlot, VhostUserError, VhostUserNet};

use crate::queue::{QueueSet, Worker};
use crate::rate_limiter::DeviceLimiter;
use crate::{
    device_type, ActivateError, ActiveQueue, Interrupt, Memory, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use worker::{NetHandler, NetLimiters, SharedBackend, BACKEND, RX_TIMER, TX_TIMER};

/// Length of `virtio_net_hdr_v1`, which precedes every frame.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame after the header: 64 KiB of segmentation-offloaded
/// payload plus an Ethernet header with a VLAN tag. A longer transmit
/// request is a driver error.
pub const MAX_FRAME_LEN: usize = 65536 + 18;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Where a virtio-net device's frames go: a tap now, a virtual switch port
/// later. Frames cross this interface with their 12-byte virtio-net header
/// in front.
pub trait NetBackend: Send + std::fmt::Debug {
    /// Sends one frame: `frame` is the header followed by the Ethernet frame,
    /// in any number of slices.
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Receives one frame, header first, into `buf`, which holds the largest
    /// frame. Fails with `WouldBlock` when no frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// A file descriptor that polls readable while a frame is waiting.
    fn raw_fd(&self) -> RawFd;
    /// The offloads the backend takes, as [`tun_f`] flags.
    fn offloads(&self) -> u32;
    /// Turns on exactly these [`tun_f`] offloads for frames the backend
    /// delivers to the guest (the guest accepted them).
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
}

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The features offered with a backend that takes `offloads`.
pub fn features_for(offloads: u32) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS);
    if offloads & tun_f::CSUM == 0 {
        return f;
    }
    f |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
    if offloads & tun_f::TSO4 != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO4);
    }
    if offloads & tun_f::TSO6 != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_HOST_TSO6);
    }
    if offloads & tun_f::TSO_ECN != 0 && offloads & (tun_f::TSO4 | tun_f::TSO6) != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_ECN) | bit(VIRTIO_NET_F_HOST_ECN);
    }
    if offloads & tun_f::UFO != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_UFO) | bit(VIRTIO_NET_F_HOST_UFO);
    }
    f
}

/// The backend offloads that match what the guest accepted for the frames
/// it receives.
pub fn offloads_for(features: u64) -> u32 {
    let has = |b: u32| features & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = tun_f::CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= tun_f::TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= tun_f::TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (tun_f::TSO4 | tun_f::TSO6) != 0 {
        flags |= tun_f::TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= tun_f::UFO;
    }
    flags
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    features: u64,
    backend: SharedBackend,
    worker: Option<Worker>,
    limiters: NetLimiters,
}

impl Net {
    /// A device with the guest MAC address `mac` whose frames go to
    /// `backend`. The offloads offered follow `backend.offloads()`.
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Net {
        Net {
            mac,
            features: features_for(backend.offloads()),
            backend: Arc::new(Mutex::new(backend)),
            worker: None,
            limiters: NetLimiters::default(),
        }
    }

    /// Limits received frames with `rx` and transmitted ones with `tx`:
    /// each frame costs its bytes (without the virtio-net header) and one
    /// operation. Frames out of tokens wait on the limiter's timer: sent
    /// frames in the transmit queue, received ones in the backend.
    pub fn with_rate_limiters(
        mut self,
        rx: Option<Arc<DeviceLimiter>>,
        tx: Option<Arc<DeviceLimiter>>,
    ) -> Net {
        self.limiters = NetLimiters { rx, tx };
        self
    }
}

/// A NIC's configuration space: its MAC, then the status (link up).
pub(crate) fn config_space(mac: [u8; 6]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c[..6].copy_from_slice(&mac);
    c[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c
}

/// A locally administered, unicast MAC address derived from `seed` (for
/// example the device's index and the process id), for a guest that was
/// given none.
pub fn local_mac(seed: u64) -> [u8; 6] {
    // FNV-1a over the seed's bytes spreads nearby seeds apart.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x52, 0x54, b[0], b[1], b[2], b[3]]
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&config_space(self.mac), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR nothing here is writable.
    }

    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        crate::expect_queues(&queues, 2)?;
        self.reset();
        let features = features & self.features;
        let fd = {
            let mut backend = self
                .backend
                .lock()
                .map_err(|_| ActivateError::Backend("the network backend was lost".into()))?;
            backend.set_offloads(offloads_for(features)).map_err(|e| {
                ActivateError::Backend(format!("cannot set the network backend's offloads: {e}"))
            })?;
            backend.raw_fd()
        };
        let set = QueueSet::new("virtio-net", mem, interrupt, queues, features);
        let handler = NetHandler::new(self.backend.clone(), features, self.limiters.clone());
        // Edge-triggered: while the guest has no receive buffer the worker
        // leaves frames in the backend, and a new frame or an rx kick wakes
        // it again.
        let mut fds = vec![(fd, BACKEND, EventSet::IN | EventSet::EDGE_TRIGGERED)];
        for (limiter, token) in [(&self.limiters.rx, RX_TIMER), (&self.limiters.tx, TX_TIMER)] {
            if let Some(l) = limiter {
                fds.push((l.timer_fd(), token, EventSet::IN));
            }
        }
        let worker =
            Worker::spawn("virtio-net", set, handler, &fds).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        // Told to stop; the transport waits for it off the bus lock.
        self.worker.take().map(Worker::stopping)
    }
}

#[cfg(any(test, feature = "test-utils"))]
mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub use fuzz::fuzz_tx;

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;
