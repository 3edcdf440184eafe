//! virtio-net whose queues another process serves: the frontend of
//! vhost-user-net. The guest sees the same virtio-net device as with a tap
//! (MAC and link status in the configuration space), but no VMM thread
//! touches its frames. On DRIVER_OK the device hands the backend (a switch
//! port) guest RAM's memfd, the rings' addresses and the queues' kick
//! eventfds, which are KVM ioeventfds: a guest's notify goes from KVM to the
//! backend's thread with no VMM exit. The backend signals used buffers on a
//! call eventfd per queue: with MSI-X on, the irqfd of the queue's vector,
//! so the interrupt too goes through KVM alone; otherwise an eventfd that a
//! small VMM thread turns into the queue's interrupt (INTx).
//!
//! Guest RAM must be a shared memfd: the VMM fills the [`SharedRam`] slot
//! once RAM exists, before any vCPU runs.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::queue::Worker;
use crate::{
    device_type, ActivateError, ActiveQueue, Interrupt, InterruptKind, Memory, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of each queue.
const QUEUE_SIZE: u16 = 256;
/// Ring features and network offloads passed through to the guest when
/// the backend offers them: the backend handles the rings and the frames.
const PASSED_FEATURES: u64 = VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_GUEST_UFO
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_HOST_UFO
    | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Errors of the vhost-user-net frontend.
#[derive(Debug, Error)]
pub enum VhostUserError {
    #[error("cannot connect to the switch port {path}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the switch port refused {step}")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the switch port does not offer VIRTIO_F_VERSION_1")]
    NotModern,
}

/// Guest RAM as the backend must map it: the memfd and, per region, its
/// guest address, size, address in this process and offset in the file.
pub struct SharedRam {
    /// Kept open while the regions name its descriptor.
    _file: File,
    regions: Vec<VhostUserMemoryRegionInfo>,
}

impl SharedRam {
    /// Describes `mem`, whose regions lie one after another in `file` in
    /// the order of their guest addresses (as the VMM creates them).
    pub fn new(file: File, mem: &Memory) -> SharedRam {
        let mut offset = 0;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let size = region.len();
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: size,
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: offset,
                mmap_handle: file.as_raw_fd(),
            });
            offset += size;
        }
        SharedRam {
            _file: file,
            regions,
        }
    }
}

impl std::fmt::Debug for SharedRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRam")
            .field("regions", &self.regions.len())
            .finish_non_exhaustive()
    }
}

/// Where the VMM puts guest RAM's description once it exists; shared by
/// every vhost-user device of the VM.
pub type SharedRamSlot = Arc<OnceLock<SharedRam>>;

/// A virtio-net device whose queues a vhost-user backend serves.
pub struct VhostUserNet {
    frontend: Frontend,
    mac: [u8; 6],
    /// The backend's virtio features.
    backend_features: u64,
    ram: SharedRamSlot,
    relay: Option<Worker>,
    /// Queues handed to the backend, to take back on reset.
    started: Vec<usize>,
}

impl std::fmt::Debug for VhostUserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserNet")
            .field("mac", &self.mac)
            .field("backend_features", &self.backend_features)
            .finish_non_exhaustive()
    }
}

fn protocol(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Protocol { step, source }
}

impl VhostUserNet {
    /// Connects to the backend listening at `path`.
    pub fn connect(path: &Path, mac: [u8; 6], ram: SharedRamSlot) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Self::with_stream(stream, mac, ram)
    }

    /// Takes over `stream`, already connected to the backend (handed to the
    /// VMM by the daemon), and learns what the backend offers.
    pub fn with_stream(
        stream: UnixStream,
        mac: [u8; 6],
        ram: SharedRamSlot,
    ) -> Result<Self, VhostUserError> {
        let mut frontend = Frontend::from_stream(stream, 2);
        frontend.set_owner().map_err(protocol("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(protocol("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::NotModern);
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
            // Replies to every request make a refusal show at the step
            // that caused it.
            let wanted = offered & VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(wanted)
                .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(VhostUserNet {
            frontend,
            mac,
            backend_features,
            ram,
            relay: None,
            started: Vec::new(),
        })
    }

    /// Hands the backend guest RAM and the driver's queues.
    fn start_backend(
        &mut self,
        mem: &Memory,
        queues: &[ActiveQueue],
        calls: &[EventFd],
        features: u64,
    ) -> Result<(), ActivateError> {
        let fail = |step: &'static str| {
            move |e: vhost::Error| {
                ActivateError::Backend(format!("the switch port refused {step}: {e}"))
            }
        };
        let ram = self.ram.get().ok_or_else(|| {
            ActivateError::Backend("guest RAM is not shared with the switch port".into())
        })?;
        let mut backend_features = features & self.backend_features;
        backend_features |=
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(backend_features)
            .map_err(fail("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&ram.regions)
            .map_err(fail("SET_MEM_TABLE"))?;
        let host = |addr: GuestAddress| -> Result<u64, ActivateError> {
            mem.get_host_address(addr)
                .map(|p| p as u64)
                .map_err(|_| ActivateError::Backend(format!("ring at {:#x} is not in RAM", addr.0)))
        };
        for (q, call) in queues.iter().zip(calls) {
            let i = usize::from(q.index);
            let queue = &q.queue;
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(GuestAddress(queue.desc_table()))?,
                used_ring_addr: host(GuestAddress(queue.used_ring()))?,
                avail_ring_addr: host(GuestAddress(queue.avail_ring()))?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, queue.size())
                .map_err(fail("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_base(i, queue.next_avail())
                .map_err(fail("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(fail("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(fail("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(fail("SET_VRING_KICK"))?;
            self.started.push(i);
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for q in queues {
                self.frontend
                    .set_vring_enable(usize::from(q.index), true)
                    .map_err(fail("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Takes the queues back from the backend, which stops using them.
    fn stop_backend(&mut self) {
        for i in std::mem::take(&mut self.started) {
            // A backend that is gone has stopped using the queue already.
            let _ = self.frontend.get_vring_base(i);
        }
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | (self.backend_features & PASSED_FEATURES)
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&super::config_space(self.mac), offset, data);
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
        // Each queue's call eventfd: its MSI-X vector's irqfd where the
        // transport has one (the switch then interrupts the guest through
        // KVM with no VMM thread), else an eventfd a relay thread watches.
        let mut calls = Vec::new();
        let mut relayed = Vec::new();
        for q in &queues {
            match interrupt.irqfd(InterruptKind::Queue(q.index)) {
                Some(irqfd) => calls.push(irqfd),
                None => {
                    let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
                    let relay = fd.try_clone().map_err(ActivateError::Worker)?;
                    calls.push(fd);
                    relayed.push((q.index, relay));
                }
            }
        }
        let features = features & self.device_features();
        if let Err(e) = self.start_backend(&mem, &queues, &calls, features) {
            self.stop_backend();
            return Err(e);
        }
        if relayed.is_empty() {
            return Ok(());
        }
        let (indexes, fds): (Vec<u16>, Vec<EventFd>) = relayed.into_iter().unzip();
        let relay = Worker::watch("vhost-user-net", fds, move |i, fd| {
            // Reading resets the counter; a read that finds it zero was a
            // spurious wake.
            if fd.read().is_ok() {
                if let Some(&q) = indexes.get(i) {
                    let _ = interrupt.trigger(InterruptKind::Queue(q));
                }
            }
        })
        .map_err(ActivateError::Worker)?;
        self.relay = Some(relay);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        self.stop_backend();
        self.relay.take().map(Worker::stopping)
    }
}
