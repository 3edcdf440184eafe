//! virtio-vsock in the hybrid model: guest stream sockets meet host unix
//! sockets.
//!
//! * A guest program connects to host (CID 2) port P: the device connects to
//!   the unix socket `{uds_path}_{P}` and answers RESPONSE, or RST when
//!   nothing listens there.
//! * A guest program connects to another guest's CID, port P: with a
//!   router ([`Vsock::with_route`], the daemon), the device asks it with
//!   `CONNECT <cid> <port>\n` on the router's unix socket; the router
//!   decides, and on success passes the device a stream socket to the
//!   peer's device (connected the host-program way below), over which the
//!   two devices then talk directly; the guest gets RESPONSE, or RST when
//!   the router refuses. Without a router the guest gets RST.
//! * A host program connects to the unix socket `uds_path` and writes
//!   `CONNECT <port>\n`: the device sends REQUEST to the guest's port; when
//!   the guest answers RESPONSE the program reads `OK <host_port>\n`, and
//!   the stream is connected. An RST from the guest closes the program's
//!   socket.
//!
//! Data flows both ways under virtio-vsock's credit scheme: the device
//! advertises a bounded buffer per connection for guest data the host
//! socket has not taken yet, and sends the guest only as much as the guest
//! advertised room for. Packets for unknown connections get RST. A
//! malformed packet (short header, a length past its buffers or over
//! 64 KiB) is a driver error: the device asks for a reset and stops that
//! queue.

mod conn;
mod muxer;
pub mod packet;

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

use crate::queue::{QueueSet, Worker};
use crate::{
    device_type, ActivateError, ActiveQueue, Interrupt, Memory, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use conn::BUF_ALLOC;
use muxer::Muxer;
pub use muxer::{HANDSHAKE_TIMEOUT, MAX_BUFFERED, MAX_CONNS, MAX_PAYLOAD, ROUTE_TIMEOUT};

/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
/// The longest `uds_path`: the per-port paths add `_` and up to ten digits
/// and must fit a unix socket address (107 bytes).
pub const MAX_UDS_PATH: usize = 107 - 11;

/// Errors from creating a vsock device.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The CID is reserved (0, 1, 2) or does not fit 32 bits.
    #[error("invalid guest CID {0}: use 3 to 4294967294")]
    Cid(u64),
    /// The socket path is too long for a unix socket address.
    #[error("vsock socket path {0} is too long: at most {MAX_UDS_PATH} bytes")]
    PathTooLong(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; remove it or choose another vsock path")]
    NotSocket(PathBuf),
    /// Another program listens on the path.
    #[error("vsock socket {0} is in use by another program")]
    InUse(PathBuf),
    /// Whether anything listens on the existing socket could not be told
    /// (no permission, a datagram socket); the file is left alone.
    #[error("cannot check whether vsock socket {path} is in use")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    /// The router's socket: see [`Vsock::with_route`].
    route: Option<PathBuf>,
    listener: UnixListener,
    worker: Option<Worker>,
    /// Guest data all connections may buffer together.
    buffer_budget: usize,
}

impl Vsock {
    /// A device for the guest CID `guest_cid` whose host side listens on
    /// the unix socket `uds_path`. A stale socket file there (a connect is
    /// refused) is replaced; a live one, or one that cannot be checked, is
    /// an error. The check never blocks.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::Cid(guest_cid));
        }
        if uds_path.as_os_str().len() > MAX_UDS_PATH {
            return Err(VsockError::PathTooLong(uds_path.to_path_buf()));
        }
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotSocket(uds_path.to_path_buf()));
            }
            match muxer::connect_nonblocking(uds_path) {
                // Connected, or a listener whose backlog is full.
                Ok(_) => return Err(VsockError::InUse(uds_path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(VsockError::InUse(uds_path.to_path_buf()))
                }
                // Stale: left by a process that is gone.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    let _ = std::fs::remove_file(uds_path);
                }
                // Removed meanwhile: nothing to replace.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(VsockError::Probe {
                        path: uds_path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Vsock {
            cid: guest_cid,
            uds_path: uds_path.to_path_buf(),
            route: None,
            listener,
            worker: None,
            buffer_budget: muxer::MAX_BUFFERED,
        })
    }

    /// Lets the guest connect to other guests through the router listening
    /// on the unix socket `route`: the device sends it
    /// `CONNECT <cid> <port>\n` and expects `OK\n` with the stream to the
    /// peer attached, or a close (refused: the guest gets RST). Without a
    /// router, connections to any CID but the host's are refused.
    pub fn with_route(mut self, route: &Path) -> Vsock {
        self.route = Some(route.to_path_buf());
        self
    }

    /// Changes how much guest data may be buffered for host sockets.
    #[cfg(test)]
    pub(crate) fn set_buffer_budget(&mut self, bytes: usize) {
        self.buffer_budget = bytes;
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host-side listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cid.to_le_bytes();
        crate::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        crate::expect_queues(&queues, 3)?;
        self.reset();
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let paths = (self.uds_path.as_path(), self.route.as_deref());
        let muxer = Muxer::new(self.cid, paths, listener, self.buffer_budget)
            .map_err(ActivateError::Worker)?;
        let fd = muxer.epoll_fd();
        let set = QueueSet::new("virtio-vsock", mem, interrupt, queues, features);
        let worker = Worker::spawn("virtio-vsock", set, muxer, &[(fd, 0, EventSet::IN)])
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        // Told to stop; the transport waits for it off the bus lock. Its
        // state goes with it, closing every connection's socket.
        self.worker.take().map(Worker::stopping)
    }
}

#[cfg(any(test, feature = "test-utils"))]
mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub use fuzz::vsock as fuzz_entry;

#[cfg(test)]
mod tests;
