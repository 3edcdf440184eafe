//! One stream connection between a guest socket and a host unix socket,
//! with virtio-vsock's credit accounting in both directions.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use thiserror::Error;

use super::packet::shutdown;

/// Bytes of guest data the device buffers per connection on the way to the
/// host socket: the receive buffer it advertises to the guest.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host program asked for it; the device sent REQUEST and waits for
    /// the guest's RESPONSE.
    HostConnecting,
    /// The guest asked for another guest; the device asked the router and
    /// waits for its answer.
    Routing,
    /// Data flows.
    Established,
    /// The host side closed; the device sent SHUTDOWN and waits for the
    /// guest's RST.
    Closing,
}

/// A connection, keyed by (host-side port, guest-side port).
#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub local_port: u32,
    pub state: State,
    /// When the connection was made (for the host-connect timeout).
    pub since: Instant,
    /// The guest's receive buffer and how much of it the guest consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard of.
    reported_fwd_cnt: Wrapping<u32>,
    /// Guest data the host socket has not taken yet (at most [`BUF_ALLOC`]).
    to_host: VecDeque<u8>,
    /// The host socket may have data: an edge was seen and not drained.
    pub readable: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket's write side was shut after the guest's SEND
    /// shutdown.
    write_shut: bool,
}

/// Errors of one connection.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConnError {
    /// The guest sent more than the credit the device gave it.
    #[error("the guest sent more than its credit of {BUF_ALLOC} bytes")]
    Overrun,
}

impl Conn {
    pub fn new(stream: UnixStream, local_port: u32, state: State) -> Conn {
        Conn {
            stream,
            local_port,
            state,
            since: Instant::now(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            reported_fwd_cnt: Wrapping(0),
            to_host: VecDeque::new(),
            readable: true,
            peer_shutdown: 0,
            write_shut: false,
        }
    }

    /// Takes the guest's credit fields from a packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The credit fields for a packet to the guest; the guest hears of the
    /// current `fwd_cnt`.
    pub fn credit_fields(&mut self) -> (u32, u32) {
        self.reported_fwd_cnt = self.fwd_cnt;
        (BUF_ALLOC, self.fwd_cnt.0)
    }

    /// Whether enough buffer was freed since the guest last heard that it
    /// should be told before it runs out.
    pub fn wants_credit_update(&self) -> bool {
        (self.fwd_cnt - self.reported_fwd_cnt).0 >= BUF_ALLOC / 2
    }

    /// Whether data from the host socket may go to the guest now.
    pub fn can_send_to_guest(&self) -> bool {
        self.state == State::Established
            && self.readable
            && self.peer_shutdown & shutdown::RCV == 0
            && self.peer_credit() > 0
    }

    /// Reads host data for the guest, at most the guest's credit and
    /// `buf.len()`. `Ok(0)` means the host closed its side.
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(self.peer_credit() as usize);
        let n = loop {
            match self.stream.read(&mut buf[..max]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.tx_cnt += Wrapping(n as u32);
        Ok(n)
    }

    /// Takes data the guest sent. Fails when the guest overran its credit.
    pub fn take_guest_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.to_host.len() + data.len() > BUF_ALLOC as usize {
            return Err(ConnError::Overrun);
        }
        self.to_host.extend(data);
        Ok(())
    }

    /// Writes buffered guest data to the host socket until it would block.
    /// Fails when the host socket is gone.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send(&self.stream, front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.peer_shutdown & shutdown::SEND != 0 && !self.write_shut {
            // The guest sends no more: the host reads end-of-file once the
            // buffered data is through.
            self.write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Bytes of guest data still waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }
}

/// Writes to a host socket without raising SIGPIPE when the program on the
/// other end has gone.
pub fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which send(2) only
    // reads; the fd is the stream's own.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // n >= 0 and at most buf.len().
    Ok(n as usize)
}
