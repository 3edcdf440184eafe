//! The `vsock` fuzz target's entry: the muxer served from a driver played
//! from fuzz bytes, with real unix sockets on the host side: a listener
//! for guest connections to port 1234, and host programs that connect and
//! send their `CONNECT` line.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use devices::fuzz_entry::Input;
use vmm_sys_util::epoll::EventSet;

use super::muxer::{Muxer, TX};
use super::packet::{Header, HOST_CID, TYPE_STREAM};
use super::QUEUE_SIZE;
use crate::fuzzing::driver::{self, Target};
use crate::queue::{QueueHandler, QueueSet};
use crate::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The guest's CID.
const CID: u64 = 3;
/// The host port a listener serves.
const HOST_PORT: u32 = 1234;
/// The most host-side sockets a run opens.
const MAX_STREAMS: usize = 16;

struct Rig {
    muxer: Muxer,
    uds: PathBuf,
    port: UnixListener,
    /// Host ends: programs that connected, and accepted guest connections.
    streams: Vec<UnixStream>,
}

/// A directory of this process's own for the sockets.
fn socket_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("ferrovisor-vsock-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir)
    })
    .as_deref()
}

fn listen(path: &Path) -> Option<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).ok()?;
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

/// The device's listening socket and the host port's listener, made once
/// per process: binding two sockets for every input would cost more than
/// the input.
struct Sockets {
    uds: PathBuf,
    device: UnixListener,
    port: UnixListener,
}

thread_local! {
    static SOCKETS: Option<Sockets> = (|| {
        let uds = socket_dir()?.join("v");
        let device = listen(&uds)?;
        let port = listen(&socket_dir()?.join(format!("v_{HOST_PORT}")))?;
        Some(Sockets { uds, device, port })
    })();
}

impl Rig {
    fn new() -> Option<Rig> {
        SOCKETS.with(|sockets| {
            let s = sockets.as_ref()?;
            // Connections left from the previous input.
            while s.port.accept().is_ok() {}
            while s.device.accept().is_ok() {}
            let muxer = Muxer::new(
                CID,
                (&s.uds, None),
                s.device.try_clone().ok()?,
                super::muxer::MAX_BUFFERED,
            )
            .ok()?;
            Some(Rig {
                muxer,
                uds: s.uds.clone(),
                port: s.port.try_clone().ok()?,
                streams: Vec::new(),
            })
        })
    }

    fn stream(&mut self, input: &mut Input) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        let i = usize::from(input.u8());
        self.streams.get_mut(i.checked_rem(n)?)
    }
}

impl Target for Rig {
    fn kick(&mut self, set: &mut QueueSet, qi: usize) {
        self.muxer.queue_event(set, qi);
    }

    /// Low three bits of the next byte: a host program connects and asks
    /// for a guest port (0), the port listener accepts (1), a host socket
    /// writes up to 255 bytes (2), reads what it was sent (3) or closes
    /// (4); then (always) the muxer handles its host events.
    fn host(&mut self, set: &mut QueueSet, input: &mut Input) {
        let op = input.u8();
        match op & 7 {
            0 if self.streams.len() < MAX_STREAMS => {
                if let Ok(mut s) = UnixStream::connect(&self.uds) {
                    let port = if op & 8 != 0 { input.u32() } else { 5000 };
                    let _ = s.set_nonblocking(true);
                    let _ = writeln!(s, "CONNECT {port}");
                    self.streams.push(s);
                }
            }
            1 if self.streams.len() < MAX_STREAMS => {
                if let Ok((s, _)) = self.port.accept() {
                    let _ = s.set_nonblocking(true);
                    self.streams.push(s);
                }
            }
            2 => {
                let len = usize::from(input.u8());
                let data = input.bytes(len);
                if let Some(s) = self.stream(input) {
                    let _ = s.write(data);
                }
            }
            3 => {
                if let Some(s) = self.stream(input) {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                }
            }
            4 if !self.streams.is_empty() => {
                let i = usize::from(input.u8()) % self.streams.len();
                self.streams.swap_remove(i);
            }
            _ => {}
        }
        self.muxer.backend_event(set, 0, EventSet::IN);
    }

    /// A packet header for the transmit queue: this guest's CID to the
    /// host, stream type, with the port, operation, length and credit
    /// taken from the input (a raw header when bit 7 of the first byte is
    /// set).
    fn header(&mut self, q: usize, input: &mut Input) -> Vec<u8> {
        if q != TX {
            return Vec::new();
        }
        let sel = input.u8();
        if sel & 0x80 != 0 {
            return input.bytes(super::packet::HDR_LEN).to_vec();
        }
        let dst_port = match sel & 3 {
            0 => HOST_PORT,
            1 => 5000,
            2 => 1 << 30,
            _ => input.u32(),
        };
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: u32::from(sel >> 2 & 3) + 1000,
            dst_port,
            len: u32::from(input.u8()),
            type_: TYPE_STREAM,
            op: u16::from(input.u8() % 8),
            flags: u32::from(input.u8() & 3),
            buf_alloc: u32::from(input.u16()) << 4,
            fwd_cnt: u32::from(input.u16()),
        }
        .to_bytes()
        .to_vec()
    }
}

/// Serves the vsock device's queues; see the driver's input format in
/// `fuzzing::driver::run`.
pub fn vsock(data: &[u8]) {
    let Some(mut rig) = Rig::new() else {
        return;
    };
    let offered = VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
    let size = QUEUE_SIZE.min(16);
    driver::run(data, &[size, size, size], offered, &mut rig);
}
