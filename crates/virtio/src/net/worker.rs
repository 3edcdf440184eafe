//! The virtio-net worker thread: one epoll loop over the backend's file
//! descriptor, both queue kicks and a stop event.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, ChainError};
use super::{
    NetBackend, MAX_FRAME_LEN, NET_HDR_LEN, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
};
use crate::{Interrupt, InterruptKind, Memory};

/// Queue indices.
pub(crate) const RX: u16 = 0;
pub(crate) const TX: u16 = 1;

const TOKEN_STOP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
const TOKEN_BACKEND: u64 = 3;

const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// Frame counters, for tests and diagnostics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
}

/// Everything the worker owns while the device is active.
pub(crate) struct NetWorker {
    pub mem: Memory,
    pub interrupt: Arc<dyn Interrupt>,
    pub rx: Queue,
    pub tx: Queue,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub stop: EventFd,
    pub backend: Box<dyn NetBackend>,
    pub features: u64,
    pub counters: NetCounters,
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    rx_broken: bool,
    tx_broken: bool,
    backend_armed: bool,
}

impl std::fmt::Debug for NetWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("features", &self.features)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl NetWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        rx: Queue,
        tx: Queue,
        rx_kick: EventFd,
        tx_kick: EventFd,
        stop: EventFd,
        backend: Box<dyn NetBackend>,
        features: u64,
    ) -> NetWorker {
        NetWorker {
            mem,
            interrupt,
            rx,
            tx,
            rx_kick,
            tx_kick,
            stop,
            backend,
            features,
            counters: NetCounters::default(),
            rx_buf: vec![0; NET_HDR_LEN + MAX_FRAME_LEN],
            rx_pending: None,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
            rx_broken: false,
            tx_broken: false,
            backend_armed: false,
        }
    }

    /// Serves the queues until the stop event fires, then hands the backend
    /// back.
    pub fn run(mut self) -> Box<dyn NetBackend> {
        if let Err(e) = self.event_loop() {
            // The loop itself failed (epoll): nothing can be served any more.
            eprintln!("virtio-net: worker stopped: {e}");
            self.interrupt.set_needs_reset();
        }
        self.backend
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.stop.as_raw_fd(), TOKEN_STOP)?;
        add(self.rx_kick.as_raw_fd(), TOKEN_RX_KICK)?;
        add(self.tx_kick.as_raw_fd(), TOKEN_TX_KICK)?;
        self.arm_backend(&epoll, true)?;
        // Serve whatever the driver queued before activation.
        self.process_tx(&epoll)?;
        self.process_rx(&epoll)?;
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_RX_KICK => {
                        let _ = self.rx_kick.read();
                        self.process_rx(&epoll)?;
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.tx_kick.read();
                        self.process_tx(&epoll)?;
                    }
                    TOKEN_BACKEND => self.process_rx(&epoll)?,
                    _ => {}
                }
            }
        }
    }

    /// Watches the backend's fd only while there may be somewhere to put
    /// what it receives.
    fn arm_backend(&mut self, epoll: &Epoll, on: bool) -> io::Result<()> {
        if on == self.backend_armed {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        epoll.ctl(
            op,
            self.backend.raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
        )?;
        self.backend_armed = on;
        Ok(())
    }

    fn broken(&mut self, epoll: &Epoll, queue: u16, err: ChainError) -> io::Result<()> {
        eprintln!("virtio-net: driver error on queue {queue}: {err}");
        self.interrupt.set_needs_reset();
        let kick = if queue == RX {
            self.rx_broken = true;
            self.arm_backend(epoll, false)?;
            self.rx_kick.as_raw_fd()
        } else {
            self.tx_broken = true;
            self.tx_kick.as_raw_fd()
        };
        epoll.ctl(ControlOperation::Delete, kick, EpollEvent::default())
    }

    fn notify(&mut self, queue: u16) {
        let q = if queue == RX {
            &mut self.rx
        } else {
            &mut self.tx
        };
        if q.needs_notification(&self.mem).unwrap_or(true) {
            let _ = self.interrupt.trigger(InterruptKind::Queue(queue));
        }
    }

    /// Moves frames from the backend into the driver's receive buffers until
    /// either runs dry.
    pub fn process_rx(&mut self, epoll: &Epoll) -> io::Result<()> {
        if self.rx_broken {
            return Ok(());
        }
        match self.rx_frames() {
            Ok(arm) => {
                self.arm_backend(epoll, arm)?;
                self.notify(RX);
                Ok(())
            }
            Err(e) => {
                self.notify(RX);
                self.broken(epoll, RX, e)
            }
        }
    }

    /// Returns whether the backend should be watched again.
    fn rx_frames(&mut self) -> Result<bool, ChainError> {
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(len) if len >= NET_HDR_LEN => len,
                    Ok(_) => {
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.counters.rx_dropped += 1;
                        return Ok(true);
                    }
                },
            };
            self.rx_pending = Some(len);
            let before = self.rx.next_avail();
            let Some(chain) = chain::pop(&mut self.rx, &self.mem)? else {
                // No buffers: ask for a kick, and check once more in case
                // the driver added one meanwhile.
                if self.rx.enable_notification(&self.mem).unwrap_or(true) {
                    continue;
                }
                return Ok(false);
            };
            if chain.writable_len() < NET_HDR_LEN {
                return Err(ChainError::ShortHeader(chain.writable_len()));
            }
            if chain.writable_len() < len {
                // The frame does not fit: drop it and keep the buffer.
                self.rx.set_next_avail(before);
                self.rx_pending = None;
                self.counters.rx_dropped += 1;
                continue;
            }
            // Without VIRTIO_NET_F_MRG_RXBUF every frame takes one buffer.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = chain.write_at(&self.mem, 0, &self.rx_buf[..len]);
            chain::add_used(&mut self.rx, &self.mem, chain.head, written as u32)?;
            self.rx_pending = None;
            self.counters.rx_frames += 1;
        }
    }

    /// Sends every frame the driver queued.
    pub fn process_tx(&mut self, epoll: &Epoll) -> io::Result<()> {
        if self.tx_broken {
            return Ok(());
        }
        let result = self.tx_frames();
        self.notify(TX);
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.broken(epoll, TX, e),
        }
    }

    pub(crate) fn tx_frames(&mut self) -> Result<(), ChainError> {
        loop {
            while let Some(chain) = chain::pop(&mut self.tx, &self.mem)? {
                let len = chain.readable_len();
                if len < NET_HDR_LEN {
                    return Err(ChainError::ShortHeader(len));
                }
                if len > NET_HDR_LEN + MAX_FRAME_LEN {
                    return Err(ChainError::TooLong(len));
                }
                self.tx_buf.resize(len, 0);
                let got = chain.read_at(&self.mem, 0, &mut self.tx_buf);
                let ok = got == len && tx_header_ok(&self.tx_buf[..NET_HDR_LEN], self.features);
                let sent = ok
                    && self
                        .backend
                        .send(&[
                            IoSlice::new(&self.tx_buf[..NET_HDR_LEN]),
                            IoSlice::new(&self.tx_buf[NET_HDR_LEN..]),
                        ])
                        .is_ok();
                if sent {
                    self.counters.tx_frames += 1;
                } else {
                    self.counters.tx_dropped += 1;
                }
                chain::add_used(&mut self.tx, &self.mem, chain.head, 0)?;
            }
            if !self.tx.enable_notification(&self.mem).unwrap_or(false) {
                return Ok(());
            }
        }
    }
}

/// Whether a transmitted frame's header asks only for offloads the driver
/// negotiated. Frames that ask for more are dropped, like a NIC would.
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
