//! A guest's port: a vhost-user-net backend on its own socket. The frontend
//! (the guest's VMM) hands over the guest's memory and its two queues; the
//! port's worker thread reads frames from the transmit queue (TX, queue 1)
//! into the switch, and the switch writes frames for the port straight into
//! its receive queue (RX, queue 0) from whichever thread switched them.
//!
//! Locks are always taken in one order: a port's TX vring, then the switch,
//! then a destination's RX slot and its vring. Nothing waits for a full
//! receive queue: the frame is refused and counted.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use switch::{Offload, PortId, PortTx, Switch, TxDropped};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::{self, ChainError};
use crate::lock;

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// The largest queue a frontend may ask for.
const MAX_QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors of a port's socket.
#[derive(Debug, thiserror::Error)]
pub enum PortSocketError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot start the thread of port `{port}`: {source}")]
    Thread { port: String, source: io::Error },
}

/// A connected frontend's receive queue and the guest memory it lives in.
struct RxRing {
    vring: VringRwLock<Mem>,
    mem: Mem,
}

/// What the port's threads and the switch share.
#[derive(Default)]
pub struct PortState {
    connected: AtomicBool,
    removed: AtomicBool,
    /// The virtio features the connected frontend accepted.
    acked: AtomicU64,
    /// Transmit chains dropped before reaching the switch (bad descriptors).
    bad_chains: AtomicU64,
    rx: Mutex<Option<RxRing>>,
    conn: Mutex<Option<ShutdownHandle>>,
}

impl std::fmt::Debug for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortState")
            .field("connected", &self.connected())
            .field("bad_chains", &self.bad_chains())
            .finish_non_exhaustive()
    }
}

impl PortState {
    /// Whether a frontend is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Transmit chains the port refused as malformed.
    pub fn bad_chains(&self) -> u64 {
        self.bad_chains.load(Ordering::Relaxed)
    }
}

/// The switch's handle on a port's receive queue.
#[derive(Debug)]
pub struct VhostTx {
    state: Arc<PortState>,
    /// The chains a mergeable frame took, kept between frames so that the
    /// receive path allocates nothing per frame.
    used: Vec<(u16, u32)>,
}

impl VhostTx {
    pub fn new(state: Arc<PortState>) -> VhostTx {
        VhostTx {
            state,
            used: Vec::new(),
        }
    }
}

/// The offloads the port offers: checksums and TCP segmentation both
/// ways, so that guests on one switch pass 64 KiB segments to each other
/// as they would through taps, and mergeable receive buffers, so that a
/// 64 KiB segment takes page-sized buffers rather than a chain of 17.
pub const OFFLOADS: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN;

/// Whether a driver that accepted `acked` can take a frame with `offload`.
pub fn takes(acked: u64, offload: &Offload) -> bool {
    let has = |bit: u32| acked & (1 << bit) != 0;
    if offload.needs_csum() && !has(VIRTIO_NET_F_GUEST_CSUM) {
        return false;
    }
    let ecn = offload.gso_type() & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    if ecn && !has(VIRTIO_NET_F_GUEST_ECN) {
        return false;
    }
    match u32::from(offload.gso_type() & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    }
}

impl VhostTx {
    /// Writes `frame` with `hdr` into the port's receive queue: into one
    /// chain, or across as many as it takes when the driver accepted
    /// mergeable receive buffers.
    fn deliver(&mut self, hdr: &[u8; chain::NET_HDR_LEN], frame: &[u8]) -> Result<(), TxDropped> {
        let slot = lock(&self.state.rx);
        let ring = slot.as_ref().ok_or(TxDropped)?;
        let mem = ring.mem.memory();
        let mut state = ring.vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Err(TxDropped);
        }
        let mergeable =
            self.state.acked.load(Ordering::Acquire) & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let queue = state.get_queue_mut();
        let written = if mergeable {
            fill_mergeable(queue, &*mem, (hdr, frame), &mut self.used)
        } else {
            let chain = queue.pop_descriptor_chain(mem.clone()).ok_or(TxDropped)?;
            let head = chain.head_index();
            let written = chain::write_rx(&*mem, chain, hdr, frame);
            // A chain too small or bad is given back unused, so the guest
            // does not lose the buffer.
            queue
                .add_used(&*mem, head, *written.as_ref().unwrap_or(&0))
                .map_err(|_| TxDropped)?;
            written.map(drop).map_err(|_| TxDropped)
        };
        // With EVENT_IDX the driver says when it wants an interrupt.
        if queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue().map_err(|_| TxDropped)?;
        }
        written
    }
}

/// Writes a frame across as many receive chains as it takes, with
/// `num_buffers` in its header. Without enough chains the queue is put back
/// as it was and the frame refused; a bad chain is given back unused (with
/// the ones taken before it) and the frame refused.
fn fill_mergeable<M>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
    (hdr, frame): (&[u8; chain::NET_HDR_LEN], &[u8]),
    used: &mut Vec<(u16, u32)>,
) -> Result<(), TxDropped>
where
    M: vm_memory::GuestMemory,
{
    let first = queue.next_avail();
    let total = chain::NET_HDR_LEN + frame.len();
    used.clear();
    let (mut done, mut num_buffers_at) = (0usize, None);
    while done < total {
        let Some(next) = queue.pop_descriptor_chain(mem) else {
            queue.set_next_avail(first);
            return Err(TxDropped);
        };
        let head = next.head_index();
        match chain::fill_rx(mem, next, hdr, frame, done) {
            Ok((n, at)) if n > 0 => {
                num_buffers_at = num_buffers_at.or(at);
                used.push((head, n));
                done += n as usize;
            }
            _ => {
                for &(h, _) in used.iter().chain([&(head, 0)]) {
                    let _ = queue.add_used(mem, h, 0);
                }
                return Err(TxDropped);
            }
        }
    }
    let count = u16::try_from(used.len()).map_err(|_| TxDropped)?;
    if let Some(at) = num_buffers_at {
        chain::set_num_buffers(mem, at, count).map_err(|_| TxDropped)?;
    }
    for &(head, n) in used.iter() {
        queue.add_used(mem, head, n).map_err(|_| TxDropped)?;
    }
    Ok(())
}

impl PortTx for VhostTx {
    fn transmit(&mut self, frame: &[u8]) -> Result<(), TxDropped> {
        self.deliver(&chain::RX_HDR, frame)
    }

    fn transmit_offloaded(&mut self, offload: &Offload, frame: &[u8]) -> Result<(), TxDropped> {
        if !takes(self.state.acked.load(Ordering::Acquire), offload) {
            return Err(TxDropped);
        }
        let mut hdr = offload.0;
        // One buffer per frame (no mergeable buffers).
        hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
        self.deliver(&hdr, frame)
    }
}

/// The backend of one frontend connection.
struct Backend {
    state: Arc<PortState>,
    switch: Arc<Mutex<Switch>>,
    id: PortId,
    mem: Mem,
    /// The frame being switched (one worker thread per connection).
    scratch: Mutex<Vec<u8>>,
}

impl Backend {
    /// Switches every frame the guest has queued for transmission.
    fn drain_tx(&self, vring: &VringRwLock<Mem>) -> io::Result<()> {
        let mem = self.mem.memory();
        let mut buf = lock(&self.scratch);
        let mut state = vring.get_mut();
        let mut hdr = [0u8; chain::NET_HDR_LEN];
        // Kicks stay off while the queue is drained; the guest is asked for
        // one again only when nothing is left (with EVENT_IDX, through
        // avail_event), and checked once more after that.
        loop {
            let _ = state.get_queue_mut().disable_notification(&*mem);
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                match chain::read_tx(&*mem, chain, &mut buf, &mut hdr) {
                    Ok(()) => {
                        let offload = Offload(hdr);
                        lock(&self.switch).receive_offloaded(self.id, offload, &buf);
                    }
                    Err(ChainError::OutOfBounds | ChainError::Broken | ChainError::WriteOnly)
                    | Err(ChainError::Short | ChainError::TooLong)
                    | Err(ChainError::ReadOnly | ChainError::NoRoom) => {
                        self.state.bad_chains.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The head came from the avail ring, so it is a valid index.
                let _ = state.get_queue_mut().add_used(&*mem, head, 0);
            }
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if state
            .get_queue_mut()
            .needs_notification(&*mem)
            .unwrap_or(true)
        {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | OFFLOADS
    }

    fn acked_features(&self, features: u64) {
        self.state.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        // `self.mem` is the same atomic handle, already updated.
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The first event of a connection makes its receive queue the
        // switch's (a driver kicks RX once it has posted buffers).
        {
            let mut rx = lock(&self.state.rx);
            if rx.is_none() {
                if let Some(vring) = vrings.get(RX_QUEUE) {
                    *rx = Some(RxRing {
                        vring: vring.clone(),
                        mem: self.mem.clone(),
                    });
                }
            }
        }
        if usize::from(device_event) == TX_QUEUE {
            if let Some(vring) = vrings.get(TX_QUEUE) {
                // A failed call signal is the frontend's problem; it must
                // not stop the worker.
                let _ = self.drain_tx(vring);
            }
        }
        Ok(())
    }
}

/// A port's socket and the thread that serves it.
pub struct VhostPort {
    pub state: Arc<PortState>,
    pub socket: PathBuf,
    listener_fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostPort")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl VhostPort {
    /// Listens on `socket` (0600) for the frontends of switch port `id`.
    pub fn start(
        name: &str,
        socket: &Path,
        state: Arc<PortState>,
        switch: Arc<Mutex<Switch>>,
        id: PortId,
    ) -> Result<VhostPort, PortSocketError> {
        let listen_err = |source| PortSocketError::Listen {
            path: socket.to_path_buf(),
            source,
        };
        let listener = Listener::new(socket, true).map_err(listen_err)?;
        let listener_fd = listener.as_raw_fd();
        let thread_state = state.clone();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("port-{name}"))
            .spawn(move || serve(thread_name, listener, thread_state, switch, id))
            .map_err(|source| PortSocketError::Thread {
                port: name.to_string(),
                source,
            })?;
        Ok(VhostPort {
            state,
            socket: socket.to_path_buf(),
            listener_fd,
            thread: Some(thread),
        })
    }

    /// Disconnects the frontend, stops listening and removes the socket.
    pub fn stop(mut self) {
        self.state.removed.store(true, Ordering::Release);
        if let Some(conn) = lock(&self.state.conn).as_ref() {
            conn.shutdown();
        }
        // SAFETY: shutting down a socket the thread owns until it is joined
        // below; the call only wakes the thread's accept.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        *lock(&self.state.rx) = None;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Accepts one frontend at a time, each with fresh queues and memory, until
/// the port is removed.
fn serve(
    name: String,
    mut listener: Listener,
    state: Arc<PortState>,
    switch: Arc<Mutex<Switch>>,
    id: PortId,
) {
    while !state.removed.load(Ordering::Acquire) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(Backend {
            state: state.clone(),
            switch: switch.clone(),
            id,
            mem: mem.clone(),
            scratch: Mutex::new(Vec::with_capacity(chain::MAX_TX_LEN)),
        });
        let mut daemon = match VhostUserDaemon::new(name.clone(), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("switch: port `{name}`: {e}");
                return;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            if !state.removed.load(Ordering::Acquire) {
                eprintln!("switch: port `{name}`: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        *lock(&state.conn) = daemon.shutdown_handle();
        state.connected.store(true, Ordering::Release);
        if state.removed.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        if let Err(e) = daemon.wait() {
            eprintln!("switch: port `{name}`: the frontend left: {e}");
        }
        state.connected.store(false, Ordering::Release);
        *lock(&state.conn) = None;
        *lock(&state.rx) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(flags: u8, gso: u8) -> Offload {
        let mut h = [0u8; 12];
        h[0] = flags;
        h[1] = gso;
        Offload(h)
    }

    #[test]
    fn a_port_takes_only_the_offloads_its_driver_accepted() {
        let csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
        let tso4 = csum | 1 << VIRTIO_NET_F_GUEST_TSO4;
        assert!(takes(0, &Offload::NONE));
        assert!(
            !takes(0, &request(1, 0)),
            "checksum left to a driver without GUEST_CSUM"
        );
        assert!(takes(csum, &request(1, 0)));
        assert!(!takes(csum, &request(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8)));
        assert!(takes(tso4, &request(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8)));
        assert!(!takes(tso4, &request(1, VIRTIO_NET_HDR_GSO_TCPV6 as u8)));
        let ecn = (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8;
        assert!(!takes(tso4, &request(1, ecn)));
        assert!(takes(tso4 | 1 << VIRTIO_NET_F_GUEST_ECN, &request(1, ecn)));
        assert!(
            !takes(u64::MAX, &request(1, 3)),
            "UDP fragmentation is not offered"
        );
    }
}
