//! The virtio-net queue handler that runs on the device's worker thread:
//! frames from the backend into receive buffers, transmit chains to the
//! backend.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::EventSet;

use super::{
    NetBackend, MAX_FRAME_LEN, NET_HDR_LEN, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
};
use crate::queue::{Chain, QueueError, QueueHandler, QueueSet};
use crate::rate_limiter::DeviceLimiter;
use crate::Memory;

/// Queue positions.
pub(crate) const RX: usize = 0;
pub(crate) const TX: usize = 1;

/// Worker tokens: the backend, and the receive and transmit limiters'
/// timers.
pub(crate) const BACKEND: u32 = 0;
pub(crate) const RX_TIMER: u32 = 1;
pub(crate) const TX_TIMER: u32 = 2;

/// The rate limiters of each direction; `None` is unlimited.
#[derive(Debug, Clone, Default)]
pub(crate) struct NetLimiters {
    pub rx: Option<Arc<DeviceLimiter>>,
    pub tx: Option<Arc<DeviceLimiter>>,
}

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// The backend shared between the device and its worker, so a reset keeps
/// it (and the tap) for the next activation.
pub(crate) type SharedBackend = Arc<Mutex<Box<dyn NetBackend>>>;

/// What the worker thread owns while the device is active.
pub(crate) struct NetHandler {
    backend: SharedBackend,
    features: u64,
    /// One frame, header first, read from the backend.
    rx_buf: Vec<u8>,
    /// Length of a frame in `rx_buf` still waiting for a receive buffer.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    limiters: NetLimiters,
}

impl NetHandler {
    pub fn new(backend: SharedBackend, features: u64, limiters: NetLimiters) -> NetHandler {
        NetHandler {
            backend,
            features,
            rx_buf: vec![0; NET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
            limiters,
        }
    }

    /// Moves frames from the backend into the driver's receive buffers
    /// until either runs dry.
    fn process_rx(&mut self, set: &mut QueueSet) {
        if set.queues[RX].is_broken() {
            return;
        }
        let mut used = false;
        let result = self.rx_frames(set, &mut used);
        // No interrupt when no buffer was used (a wakeup with nothing to
        // deliver, or frames waiting for buffers).
        if used {
            set.notify(RX);
        }
        if let Err(e) = result {
            set.fail(RX, &e);
        }
    }

    /// Sets `used` once a used entry is added.
    fn rx_frames(&mut self, set: &mut QueueSet, used: &mut bool) -> Result<(), QueueError> {
        loop {
            if set.stopping() {
                return Ok(());
            }
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.recv() {
                    Some(len) => len,
                    // The backend is empty; its fd wakes the worker when a
                    // frame arrives.
                    None => return Ok(()),
                },
            };
            self.rx_pending = Some(len);
            let q = &mut set.queues[RX];
            let Some(chain) = q.pop(&set.mem)? else {
                // No buffer: stop reading the backend (frames wait in its
                // queue) and ask for a kick, checking once more in case the
                // driver added a buffer meanwhile.
                if q.enable_notification(&set.mem)? {
                    continue;
                }
                return Ok(());
            };
            let room = chain.writable_len() as usize;
            if room < NET_HDR_LEN {
                return Err(QueueError::Malformed(
                    "a receive buffer is shorter than the virtio-net header",
                ));
            }
            if let Some(limiter) = &self.limiters.rx {
                if !limiter.admit((len - NET_HDR_LEN) as u64, 1) {
                    // Out of tokens: the frame and the buffer wait for the
                    // limiter's timer; the backend is not read meanwhile.
                    q.undo_pop();
                    return Ok(());
                }
            }
            self.rx_pending = None;
            let written = if room < len {
                // Without merged buffers a frame must fit one chain: drop
                // it and hand the buffer back empty.
                0
            } else {
                // Without VIRTIO_NET_F_MRG_RXBUF every frame takes one
                // buffer: num_buffers is 1.
                self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                chain.writer().write(&set.mem, &self.rx_buf[..len])? as u32
            };
            q.add_used(&set.mem, chain.head(), written)?;
            *used = true;
        }
    }

    /// Reads one frame from the backend; `None` when it has none waiting.
    fn recv(&mut self) -> Option<usize> {
        let Ok(mut backend) = self.backend.lock() else {
            return None;
        };
        loop {
            match backend.recv(&mut self.rx_buf) {
                Ok(len) if len >= NET_HDR_LEN => return Some(len),
                // A runt without its header: skip it.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    crate::guest_log!("virtio-net: receiving from the backend failed: {e}");
                    return None;
                }
            }
        }
    }

    /// Sends every frame the driver queued.
    pub(crate) fn process_tx(&mut self, set: &mut QueueSet) {
        let backend = &self.backend;
        let buf = &mut self.tx_buf;
        let features = self.features;
        let limiter = self.limiters.tx.as_deref();
        set.drain_admitted(
            TX,
            |chain| limiter.is_none_or(|l| l.admit(frame_bytes(chain), 1)),
            |mem, chain| send_chain(mem, chain, buf, features, backend),
        );
    }
}

/// What a transmit chain costs a bandwidth limit: the frame without its
/// virtio-net header.
fn frame_bytes(chain: &Chain) -> u64 {
    u64::from(chain.readable_len()).saturating_sub(NET_HDR_LEN as u64)
}

impl QueueHandler for NetHandler {
    fn queue_event(&mut self, set: &mut QueueSet, qi: usize) {
        match qi {
            RX => self.process_rx(set),
            TX => self.process_tx(set),
            _ => {}
        }
    }

    fn backend_event(&mut self, set: &mut QueueSet, token: u32, _events: EventSet) {
        match token {
            RX_TIMER => {
                if let Some(l) = &self.limiters.rx {
                    l.timer_fired();
                }
                self.process_rx(set);
            }
            TX_TIMER => {
                if let Some(l) = &self.limiters.tx {
                    l.timer_fired();
                }
                if !set.queues[TX].is_broken() {
                    self.process_tx(set);
                }
            }
            _ => self.process_rx(set),
        }
    }
}

/// Sends one transmit chain: checks its length, copies it out of guest
/// memory and hands it to the backend. A frame the backend refuses, or whose
/// header asks for offloads that were not negotiated, is dropped.
fn send_chain(
    mem: &Memory,
    chain: &Chain,
    buf: &mut Vec<u8>,
    features: u64,
    backend: &Mutex<Box<dyn NetBackend>>,
) -> Result<u32, QueueError> {
    let len = chain.readable_len() as usize;
    if len < NET_HDR_LEN {
        return Err(QueueError::Malformed(
            "a transmit request is shorter than the virtio-net header",
        ));
    }
    if len > NET_HDR_LEN + MAX_FRAME_LEN {
        return Err(QueueError::Malformed(
            "a transmit request is longer than 64 KiB plus headers",
        ));
    }
    buf.resize(len, 0);
    chain.reader().read_exact(mem, buf)?;
    if !tx_header_ok(&buf[..NET_HDR_LEN], features) {
        return Ok(0);
    }
    if let Ok(mut backend) = backend.lock() {
        let frame = [
            IoSlice::new(&buf[..NET_HDR_LEN]),
            IoSlice::new(&buf[NET_HDR_LEN..]),
        ];
        // A full or downed backend drops the frame, as a wire would.
        let _ = backend.send(&frame);
    }
    Ok(0)
}

/// Whether a transmitted frame's header asks only for offloads the driver
/// negotiated.
fn tx_header_ok(hdr: &[u8], features: u64) -> bool {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let flags = hdr[0];
    let gso = hdr[1];
    if flags & HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return false;
    }
    if gso & GSO_ECN != 0 && !has(VIRTIO_NET_F_HOST_ECN) {
        return false;
    }
    match gso & !GSO_ECN {
        GSO_NONE => true,
        GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        GSO_UDP => has(VIRTIO_NET_F_HOST_UFO),
        _ => false,
    }
}
