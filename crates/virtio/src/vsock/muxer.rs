//! The virtio-vsock worker: moves packets between the guest's queues and
//! host unix sockets in the hybrid model.
//!
//! All host sockets (the listening socket, host programs still sending their
//! `CONNECT` line, and connections) sit in one inner epoll set, registered
//! edge-triggered; the worker waits on that set's fd next to the queue kicks.
//! Each connection remembers that its socket may hold data until a read
//! drains it, so the worker reads only when the guest has a receive buffer
//! and credit, and never spins on a socket it cannot serve yet.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{self, Conn, State};
use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use crate::queue::{Chain, QueueError, QueueHandler, QueueSet};
use crate::Memory;

/// Queue positions.
pub(crate) const RX: usize = 0;
pub(crate) const TX: usize = 1;

/// The largest payload of one packet either way (Linux's default too).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Connections (and host programs still handshaking) at once.
pub const MAX_CONNS: usize = 1024;
/// Guest data buffered for all host sockets together: past it, the device
/// stops taking the guest's transmit queue until host programs read, so
/// the guest waits instead of the VMM holding MAX_CONNS x BUF_ALLOC. (The
/// packet that crosses it is still taken: one payload more at most.)
pub const MAX_BUFFERED: usize = 4 << 20;
/// Control packets waiting for receive buffers before the device stops
/// reading the transmit queue (each guest packet may need an answer).
const MAX_CONTROL: usize = 1024;
/// Longest `CONNECT <port>\n` line accepted from a host program.
const MAX_LINE: usize = 32;
/// First port the device gives host-initiated connections on its side.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host program's connection waits for the guest's RESPONSE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host program may take to send its `CONNECT` line before it
/// is hung up on, so idle programs cannot hold every slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waiting connections and handshakes are checked while there
/// are any.
const TICK: Duration = Duration::from_millis(250);
/// Inner-epoll tokens of the listening socket and the timer; other tokens
/// are fds.
const LISTENER: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;

/// How long a guest's connection to another guest waits for the router's
/// answer (which itself waits up to [`CONNECT_TIMEOUT`] for the peer).
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);
/// What the router answers when it accepts a connection, with the stream
/// to the peer attached.
const ROUTE_OK: &[u8] = b"OK\n";

/// (peer CID, peer-side port, guest-side port). The peer is the host
/// (CID 2) or, through the router, another guest.
type Key = (u32, u32, u32);

/// A packet without payload waiting for a receive buffer.
#[derive(Debug)]
enum Control {
    /// For a live connection; credit fields are filled in when sent.
    Conn { key: Key, op: u16, flags: u32 },
    /// A complete header (RST to a connection that is gone or never was).
    Raw(Header),
}

/// A host program that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// The worker's state.
#[derive(Debug)]
pub(crate) struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    /// The router's socket, when there is one: connections to other guests
    /// are asked of it.
    route: Option<PathBuf>,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    fds: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    control: VecDeque<Control>,
    /// A receive chain taken while there seemed to be data, kept for the
    /// next packet.
    held: Option<Chain>,
    next_port: u32,
    last_served: Option<Key>,
    tx_paused: bool,
    timer: TimerFd,
    timer_armed: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Guest data all connections may buffer together ([`MAX_BUFFERED`]).
    budget: usize,
}

impl Muxer {
    /// A muxer serving `listener` (non-blocking) for the guest `cid`.
    /// At most `budget` bytes of guest data are buffered for host sockets.
    pub fn new(
        cid: u64,
        (uds_path, route): (&Path, Option<&Path>),
        listener: UnixListener,
        budget: usize,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        let timer = TimerFd::new()?;
        // Non-blocking, so reading a tick that a re-arm just cleared cannot
        // stall the worker.
        // SAFETY: F_SETFL with O_NONBLOCK on a timerfd we own.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        Ok(Muxer {
            cid,
            uds_path: uds_path.to_path_buf(),
            route: route.map(Path::to_path_buf),
            listener,
            epoll,
            conns: HashMap::new(),
            fds: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            held: None,
            next_port: FIRST_LOCAL_PORT,
            last_served: None,
            tx_paused: false,
            timer,
            timer_armed: false,
            rx_buf: vec![0; MAX_PAYLOAD],
            tx_buf: vec![0; MAX_PAYLOAD],
            budget,
        })
    }

    /// The inner epoll set's fd, for the worker to wait on.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Serves both directions until neither can make progress.
    fn service(&mut self, set: &mut QueueSet) {
        loop {
            if !self.tx_paused {
                self.process_tx(set);
            }
            self.process_rx(set);
            if self.tx_paused
                && self.control.len() <= MAX_CONTROL / 2
                && self.buffered() < self.budget
            {
                self.tx_paused = false;
                continue;
            }
            return;
        }
    }

    // ---- guest to host -------------------------------------------------

    /// Guest data buffered for all host sockets.
    fn buffered(&self) -> usize {
        self.conns.values().map(Conn::buffered).sum()
    }

    pub(crate) fn process_tx(&mut self, set: &mut QueueSet) {
        if set.queues[TX].is_broken() {
            return;
        }
        let mut added = 0;
        let result = self.tx_chains(set, &mut added);
        if added > 0 {
            set.notify(TX);
        }
        if let Err(e) = result {
            set.fail(TX, &e);
        }
    }

    fn tx_chains(&mut self, set: &mut QueueSet, added: &mut usize) -> Result<(), QueueError> {
        let stop = set.stop_flag();
        let q = &mut set.queues[TX];
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.control.len() >= MAX_CONTROL || self.buffered() >= self.budget {
                // The guest is not taking answers, or host programs are
                // not taking its data: stop reading its requests until
                // they do (a host socket's drain wakes the worker).
                self.tx_paused = true;
                return Ok(());
            }
            let Some(chain) = q.pop(&set.mem)? else {
                if q.enable_notification(&set.mem)? {
                    continue;
                }
                return Ok(());
            };
            self.tx_packet(&set.mem, &chain)?;
            q.add_used(&set.mem, chain.head(), 0)?;
            *added += 1;
        }
    }

    /// Checks and handles one packet from the guest.
    fn tx_packet(&mut self, mem: &Memory, chain: &Chain) -> Result<(), QueueError> {
        let total = chain.readable_len() as usize;
        if total < HDR_LEN {
            return Err(QueueError::Malformed(
                "a packet is shorter than the virtio-vsock header",
            ));
        }
        let mut reader = chain.reader();
        let mut raw = [0u8; HDR_LEN];
        reader.read_exact(mem, &mut raw)?;
        let hdr = Header::parse(&raw);
        let len = hdr.len as usize;
        if len > total - HDR_LEN {
            return Err(QueueError::Malformed(
                "a packet's length runs past its buffers",
            ));
        }
        if len > MAX_PAYLOAD {
            return Err(QueueError::Malformed("a packet's payload is over 64 KiB"));
        }
        let mut payload = std::mem::take(&mut self.tx_buf);
        let read = reader.read_exact(mem, &mut payload[..len]);
        if read.is_ok() {
            self.handle_packet(hdr, &payload[..len]);
        }
        self.tx_buf = payload;
        read
    }

    /// Acts on one well-formed packet from the guest.
    fn handle_packet(&mut self, hdr: Header, payload: &[u8]) {
        if hdr.src_cid != self.cid {
            // Not from this guest's address: nobody to answer.
            return;
        }
        if !self.reachable(hdr.dst_cid) || hdr.type_ != TYPE_STREAM {
            self.rst_reply(&hdr);
            return;
        }
        let key = (hdr.dst_cid as u32, hdr.dst_port, hdr.src_port);
        if let Some(c) = self.conns.get_mut(&key) {
            c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        }
        let Some(state) = self.conns.get(&key).map(|c| c.state) else {
            match hdr.op {
                op::REQUEST if hdr.dst_cid == HOST_CID => self.guest_connect(&hdr),
                op::REQUEST => self.guest_route(&hdr),
                op::RST => {}
                _ => self.rst_reply(&hdr),
            }
            return;
        };
        match hdr.op {
            op::RESPONSE if state == State::HostConnecting => self.host_connected(key),
            op::RW if !matches!(state, State::HostConnecting | State::Routing) => {
                self.guest_data(key, payload)
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.queue_conn(key, op::CREDIT_UPDATE, 0),
            op::SHUTDOWN => self.guest_shutdown(key, hdr.flags),
            op::RST => self.remove_conn(key),
            // REQUEST on a live connection, RESPONSE out of turn, unknown
            // operations: the connection is broken.
            _ => self.reset_conn(key),
        }
    }

    /// The guest connects to host port `dst_port`: connect to the unix
    /// socket `{uds_path}_{port}`, answer RESPONSE or RST.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNS {
            self.rst_reply(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                self.rst_reply(hdr);
                return;
            }
        };
        let key = (HOST_CID as u32, hdr.dst_port, hdr.src_port);
        let mut conn = Conn::new(stream, hdr.dst_port, State::Established);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        if self.add_conn(key, conn).is_err() {
            self.rst_reply(hdr);
            return;
        }
        self.queue_conn(key, op::RESPONSE, 0);
    }

    /// Whether the guest may address `cid`: the host, or another guest when
    /// there is a router (never itself, nor a reserved or wildcard CID).
    fn reachable(&self, cid: u64) -> bool {
        cid == HOST_CID
            || (self.route.is_some() && cid != self.cid && (3..u64::from(u32::MAX)).contains(&cid))
    }

    /// The guest connects to port `dst_port` of another guest: ask the
    /// router with `CONNECT <cid> <port>\n`. The guest hears RESPONSE when
    /// the router hands over a stream to the peer, RST when it refuses
    /// (closes), or answers nothing in [`ROUTE_TIMEOUT`].
    fn guest_route(&mut self, hdr: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNS {
            self.rst_reply(hdr);
            return;
        }
        let Some(route) = &self.route else {
            self.rst_reply(hdr);
            return;
        };
        let line = format!("CONNECT {} {}\n", hdr.dst_cid, hdr.dst_port);
        // A fresh socket's send buffer takes a short line whole.
        let stream = connect_nonblocking(route)
            .and_then(|s| conn::send(&s, line.as_bytes()).map(|n| (s, n)));
        let stream = match stream {
            Ok((s, n)) if n == line.len() => s,
            _ => {
                self.rst_reply(hdr);
                return;
            }
        };
        let key = (hdr.dst_cid as u32, hdr.dst_port, hdr.src_port);
        let mut conn = Conn::new(stream, hdr.dst_port, State::Routing);
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        if self.add_conn(key, conn).is_err() {
            self.rst_reply(hdr);
            return;
        }
        self.arm_timer();
        // The answer may already be there.
        self.route_answer(key);
    }

    /// Reads the router's answer for a connection to another guest: `OK\n`
    /// with the stream to the peer attached makes that stream the
    /// connection's, and the guest hears RESPONSE; anything else (the
    /// router closed: the policy refused) resets the guest's connection.
    fn route_answer(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut buf = [0u8; 8];
        let answer = loop {
            match c.stream.recv_with_fd(&mut buf) {
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN => return,
                other => break other,
            }
        };
        let peer = match answer {
            Ok((n, Some(file))) if &buf[..n] == ROUTE_OK => UnixStream::from(OwnedFd::from(file)),
            _ => {
                self.reset_conn(key);
                return;
            }
        };
        if peer.set_nonblocking(true).is_err() {
            self.reset_conn(key);
            return;
        }
        let old = c.stream.as_raw_fd();
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, old, EpollEvent::default());
        self.fds.remove(&old);
        c.stream = peer;
        c.state = State::Established;
        c.readable = true;
        let fd = c.stream.as_raw_fd();
        if self.register(fd).is_err() {
            self.reset_conn(key);
            return;
        }
        self.fds.insert(fd, key);
        self.queue_conn(key, op::RESPONSE, 0);
    }

    /// The guest accepted a host program's connection: tell the program.
    fn host_connected(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let line = format!("OK {}\n", c.local_port);
        // A fresh socket's send buffer takes a short line whole.
        match conn::send(&c.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                c.state = State::Established;
                c.readable = true;
            }
            _ => self.reset_conn(key),
        }
    }

    fn guest_data(&mut self, key: Key, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.take_guest_data(payload).is_err() || c.flush().is_err() {
            // Overran its credit, or the host program is gone.
            self.reset_conn(key);
            return;
        }
        self.maybe_credit_update(key);
    }

    fn guest_shutdown(&mut self, key: Key, flags: u32) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.peer_shutdown |= flags & (shutdown::RCV | shutdown::SEND);
        let flushed = c.flush();
        if c.peer_shutdown == shutdown::RCV | shutdown::SEND || flushed.is_err() {
            // Both directions closed: what the host socket still takes was
            // written; finish with RST as the guest expects.
            self.reset_conn(key);
        }
    }

    // ---- host side -----------------------------------------------------

    /// Handles everything the inner epoll set reports.
    fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token == LISTENER {
                    self.accept_all();
                    continue;
                }
                if token == TIMER {
                    self.expire_connects();
                    continue;
                }
                let fd = token as RawFd;
                if self.handshakes.contains_key(&fd) {
                    self.handshake(fd);
                } else if let Some(&key) = self.fds.get(&fd) {
                    self.conn_event(key, ev.event_set());
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNS {
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self.register(fd).is_ok() {
                        let since = Instant::now();
                        let line = Vec::new();
                        self.handshakes.insert(
                            fd,
                            Handshake {
                                stream,
                                line,
                                since,
                            },
                        );
                        self.arm_timer();
                        // Its line may already be there.
                        self.handshake(fd);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n` byte by byte, so nothing
    /// it sends after the line is taken early.
    fn handshake(&mut self, fd: RawFd) {
        let Some(Handshake { stream, line, .. }) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if line.len() >= MAX_LINE => break Err(()),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break Err(()),
            }
        };
        let Some(Handshake { stream, line, .. }) = self.handshakes.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = done.ok().and_then(|()| parse_connect(&line)) else {
            // A malformed line: hang up on the program.
            return;
        };
        let local = self.free_local_port(port);
        let key = (HOST_CID as u32, local, port);
        let conn = Conn::new(stream, local, State::HostConnecting);
        if self.add_conn(key, conn).is_ok() {
            self.queue_conn(key, op::REQUEST, 0);
            self.arm_timer();
        }
    }

    /// Starts the periodic check of waiting connections and handshakes.
    fn arm_timer(&mut self) {
        if !self.timer_armed && self.timer.reset(TICK, Some(TICK)).is_ok() {
            self.timer_armed = true;
        }
    }

    /// Gives up on host programs' connections the guest did not answer in
    /// time (the program's socket is closed and the guest told with RST),
    /// and on host programs that did not send their `CONNECT` line in time.
    fn expire_connects(&mut self) {
        let _ = self.timer.wait();
        let waiting: Vec<(Key, bool)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c.state {
                State::HostConnecting => Some((*k, c.since.elapsed() >= CONNECT_TIMEOUT)),
                State::Routing => Some((*k, c.since.elapsed() >= ROUTE_TIMEOUT)),
                _ => None,
            })
            .collect();
        for &(key, expired) in &waiting {
            if expired {
                self.reset_conn(key);
            }
        }
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= HANDSHAKE_TIMEOUT)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            // Dropping the stream hangs up on the program.
            self.handshakes.remove(&fd);
        }
        let idle = waiting.iter().all(|&(_, expired)| expired) && self.handshakes.is_empty();
        if idle && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    fn conn_event(&mut self, key: Key, events: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.state == State::Routing {
            self.route_answer(key);
            return;
        }
        if events
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if c.buffered() > 0 && events.intersects(EventSet::OUT | EventSet::ERROR) {
            if c.flush().is_err() {
                self.reset_conn(key);
                return;
            }
            self.maybe_credit_update(key);
        }
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(HOST_CID as u32, p, peer)) {
                return p;
            }
        }
    }

    // ---- connections ---------------------------------------------------

    fn register(&self, fd: RawFd) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    fn add_conn(&mut self, key: Key, conn: Conn) -> io::Result<()> {
        let fd = conn.stream.as_raw_fd();
        self.register(fd)?;
        self.fds.insert(fd, key);
        self.conns.insert(key, conn);
        Ok(())
    }

    /// Forgets a connection and closes its host socket.
    fn remove_conn(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.fds.remove(&fd);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Closes a connection and tells the guest with RST.
    fn reset_conn(&mut self, key: Key) {
        self.remove_conn(key);
        self.control.push_back(Control::Raw(Header {
            src_cid: u64::from(key.0),
            dst_cid: self.cid,
            src_port: key.1,
            dst_port: key.2,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }));
    }

    /// Answers a packet that has no connection with RST, from the address
    /// and of the type it was sent to, so the guest finds its socket.
    fn rst_reply(&mut self, hdr: &Header) {
        self.control.push_back(Control::Raw(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: hdr.type_,
            op: op::RST,
            ..Header::default()
        }));
    }

    fn queue_conn(&mut self, key: Key, op: u16, flags: u32) {
        self.control.push_back(Control::Conn { key, op, flags });
    }

    fn maybe_credit_update(&mut self, key: Key) {
        let wants = self
            .conns
            .get(&key)
            .is_some_and(|c| c.wants_credit_update());
        let queued = self.control.iter().any(
            |c| matches!(c, Control::Conn { key: k, op: o, .. } if *k == key && *o == op::CREDIT_UPDATE),
        );
        if wants && !queued {
            self.queue_conn(key, op::CREDIT_UPDATE, 0);
        }
    }

    // ---- host to guest -------------------------------------------------

    pub(crate) fn process_rx(&mut self, set: &mut QueueSet) {
        if set.queues[RX].is_broken() {
            return;
        }
        let mut added = 0;
        let result = self.rx_chains(set, &mut added);
        if added > 0 {
            set.notify(RX);
        }
        if let Err(e) = result {
            self.held = None;
            set.fail(RX, &e);
        }
    }

    fn has_rx_work(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(Conn::can_send_to_guest)
    }

    fn rx_chains(&mut self, set: &mut QueueSet, added: &mut usize) -> Result<(), QueueError> {
        let stop = set.stop_flag();
        let q = &mut set.queues[RX];
        while self.has_rx_work() {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let chain = match self.held.take() {
                Some(c) => c,
                None => match q.pop(&set.mem)? {
                    Some(c) => c,
                    None => {
                        // No buffer: ask for a kick, and look once more in
                        // case one came meanwhile.
                        if q.enable_notification(&set.mem)? {
                            continue;
                        }
                        return Ok(());
                    }
                },
            };
            if (chain.writable_len() as usize) < HDR_LEN {
                return Err(QueueError::Malformed(
                    "a receive buffer is shorter than the virtio-vsock header",
                ));
            }
            match self.next_packet(&set.mem, &chain)? {
                Some(len) => {
                    q.add_used(&set.mem, chain.head(), len)?;
                    *added += 1;
                }
                None => {
                    self.held = Some(chain);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Writes the next packet for the guest into `chain`: control packets
    /// first, then data, taking connections in turn. Returns the bytes
    /// written, or `None` when there was nothing after all.
    fn next_packet(&mut self, mem: &Memory, chain: &Chain) -> Result<Option<u32>, QueueError> {
        while let Some(ctl) = self.control.pop_front() {
            let hdr = match ctl {
                Control::Raw(h) => h,
                Control::Conn { key, op, flags } => {
                    let Some(c) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    let (buf_alloc, fwd_cnt) = c.credit_fields();
                    self.conn_header(key, op, flags, 0, buf_alloc, fwd_cnt)
                }
            };
            chain.writer().write(mem, &hdr.to_bytes())?;
            return Ok(Some(HDR_LEN as u32));
        }
        let space = (chain.writable_len() as usize - HDR_LEN).min(MAX_PAYLOAD);
        if space == 0 {
            return Ok(None);
        }
        while let Some(key) = self.next_ready() {
            self.last_served = Some(key);
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let (op, flags, len) = match c.read_for_guest(&mut self.rx_buf[..space]) {
                Ok(0) => {
                    // The host program closed: the guest gets SHUTDOWN and
                    // answers with RST.
                    c.readable = false;
                    c.state = State::Closing;
                    (op::SHUTDOWN, shutdown::RCV | shutdown::SEND, 0)
                }
                Ok(n) => (op::RW, 0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    continue;
                }
                Err(_) => {
                    self.reset_conn(key);
                    return self.next_packet(mem, chain);
                }
            };
            let (buf_alloc, fwd_cnt) = c.credit_fields();
            let hdr = self.conn_header(key, op, flags, len as u32, buf_alloc, fwd_cnt);
            let mut w = chain.writer();
            w.write(mem, &hdr.to_bytes())?;
            w.write(mem, &self.rx_buf[..len])?;
            return Ok(Some((HDR_LEN + len) as u32));
        }
        Ok(None)
    }

    /// The next connection with data for the guest, after the last one
    /// served.
    fn next_ready(&self) -> Option<Key> {
        let mut ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.can_send_to_guest())
            .map(|(k, _)| *k)
            .collect();
        ready.sort_unstable();
        let after = self
            .last_served
            .and_then(|last| ready.iter().find(|k| **k > last).copied());
        after.or_else(|| ready.first().copied())
    }

    fn conn_header(
        &self,
        key: Key,
        op: u16,
        flags: u32,
        len: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Header {
        Header {
            src_cid: u64::from(key.0),
            dst_cid: self.cid,
            src_port: key.1,
            dst_port: key.2,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }
}

impl QueueHandler for Muxer {
    fn queue_event(&mut self, set: &mut QueueSet, _qi: usize) {
        // The event queue is only held (no events are sent); any kick may
        // unblock either direction.
        self.service(set);
    }

    fn backend_event(&mut self, set: &mut QueueSet, _token: u32, _events: EventSet) {
        self.host_events();
        self.service(set);
    }
}

/// Parses `CONNECT <port>` (a trailing `\r` is allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to a unix stream socket without blocking: a listener whose
/// backlog is full refuses instead of stalling the worker.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a sockaddr_un of the size given; the fd is ours.
    let ret = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
