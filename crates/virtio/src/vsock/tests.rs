use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vm_memory::GuestAddress;

use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::*;
use crate::testing::{Buf, MockDriver, Used};

const CID: u64 = 3;
const RX: usize = 0;
const TX: usize = 1;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("fv-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's side: a mock driver on an active device.
struct Guest {
    drv: MockDriver,
    dev: Vsock,
    rx_bufs: HashMap<u32, GuestAddress>,
    /// Used receive entries not looked at yet.
    pending: VecDeque<Used>,
    uds: PathBuf,
    _dir: TempDir,
}

impl Guest {
    fn new() -> Guest {
        Guest::new_with_budget(MAX_BUFFERED)
    }

    /// A guest whose device buffers at most `budget` bytes for the host.
    fn new_with_budget(budget: usize) -> Guest {
        Guest::build(budget, false)
    }

    /// A guest whose device has a router at `route.sock` in its directory
    /// (nothing listens there until the test binds it).
    fn new_routed() -> Guest {
        Guest::build(MAX_BUFFERED, true)
    }

    fn build(budget: usize, routed: bool) -> Guest {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let mut dev = Vsock::new(CID, &uds).expect("vsock");
        if routed {
            dev = dev.with_route(&dir.0.join("route.sock"));
        }
        dev.set_buffer_budget(budget);
        let mut drv = MockDriver::new(64 << 20, &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
        let features = dev.device_features();
        drv.activate(&mut dev, features).expect("activate");
        let mut g = Guest {
            drv,
            dev,
            rx_bufs: HashMap::new(),
            pending: VecDeque::new(),
            uds,
            _dir: dir,
        };
        for _ in 0..8 {
            g.post_rx();
        }
        g.drv.kick(RX);
        g
    }

    fn post_rx(&mut self) {
        let a = self.drv.alloc(RX_BUF);
        let head = self.drv.add_chain(RX, &[Buf::writable(a, RX_BUF)]);
        self.rx_bufs.insert(u32::from(head), a);
    }

    /// The guest sends a packet with its payload.
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend(payload);
        let a = self.drv.put(&bytes);
        self.drv
            .add_chain(TX, &[Buf::readable(a, bytes.len() as u32)]);
        self.drv.kick(TX);
    }

    /// The next packet the device sent the guest, from the host's CID to
    /// the guest's, of stream type; the buffer is posted again.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let (hdr, data) = self.recv_any();
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (HOST_CID, CID, TYPE_STREAM)
        );
        (hdr, data)
    }

    /// The next packet the device sent the guest, whatever its addresses.
    fn recv_any(&mut self) -> (Header, Vec<u8>) {
        if self.pending.is_empty() {
            self.pending.extend(self.drv.wait_used(RX, 1));
        }
        let used = self
            .pending
            .pop_front()
            .expect("the device sent the guest nothing");
        let addr = self.rx_bufs[&used.id];
        let bytes = self.drv.read(addr, used.len as usize);
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(&bytes[..HDR_LEN]);
        let hdr = Header::parse(&raw);
        assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN);
        assert_eq!(hdr.dst_cid, CID);
        self.post_rx();
        self.drv.kick(RX);
        (hdr, bytes[HDR_LEN..].to_vec())
    }

    /// Takes every packet the device sends until it falls quiet.
    fn drain_rx(&mut self) {
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let new = self.drv.take_used(RX);
            if new.is_empty() && self.pending.is_empty() {
                return;
            }
            self.pending.extend(new);
            while !self.pending.is_empty() {
                self.recv_any();
            }
        }
    }

    /// Asserts the device sends nothing for a moment.
    fn expect_silence(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        assert!(self.pending.is_empty(), "unexpected packet");
        assert!(self.drv.take_used(RX).is_empty(), "unexpected packet");
    }

    /// A unix socket listening for guest connections to host `port`.
    fn listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).expect("port listener")
    }

    /// Connects guest port `gport` to host port `hport`, whose listener
    /// accepts; returns the host end.
    fn connect(&mut self, gport: u32, hport: u32) -> UnixStream {
        let l = self.listen(hport);
        self.connect_via(&l, gport, hport)
    }

    /// Like [`Guest::connect`] with an existing listener.
    fn connect_via(&mut self, l: &UnixListener, gport: u32, hport: u32) -> UnixStream {
        self.send(hdr(gport, hport, op::REQUEST), &[]);
        let (h, _) = self.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, hport, gport));
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    }
}

/// A guest packet header from `src` to host port `dst`.
fn hdr(src: u32, dst: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).expect("read from the host socket");
    v
}

#[test]
fn guest_connects_to_a_host_port_and_data_flows_both_ways() {
    let mut g = Guest::new();
    let mut host = g.connect(1234, 5000);
    g.send(hdr(1234, 5000, op::RW), b"hello host");
    assert_eq!(read_exact(&mut host, 10), b"hello host");
    host.write_all(b"hello guest").expect("write");
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, 5000, 1234));
    assert_eq!(data, b"hello guest");
    assert_eq!(h.buf_alloc, BUF_ALLOC);
    assert_eq!(h.fwd_cnt, 10, "the guest learns what the host took");
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_gets_rst() {
    let mut g = Guest::new();
    g.send(hdr(1234, 6000, op::REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 6000, 1234));
    assert!(!g.drv.interrupt().needs_reset());
}

#[test]
fn host_program_connects_with_connect_line() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).expect("connect");
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    host.write_all(b"CONNECT 52\n").expect("write");
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
    assert!(req.src_port >= 1 << 30);
    // The guest accepts.
    let mut resp = hdr(52, req.src_port, op::RESPONSE);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    let mut line = String::new();
    BufReader::new(&mut host)
        .read_line(&mut line)
        .expect("OK line");
    assert_eq!(line, format!("OK {}\n", req.src_port));
    // Data both ways.
    host.write_all(b"ping").expect("write");
    let (h, data) = g.recv();
    assert_eq!(
        (h.op, h.dst_port, data.as_slice()),
        (op::RW, 52, &b"ping"[..])
    );
    g.send(hdr(52, req.src_port, op::RW), b"pong");
    assert_eq!(read_exact(&mut host, 4), b"pong");
}

#[test]
fn host_program_refused_by_the_guest_is_hung_up_on() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).expect("connect");
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    host.write_all(b"CONNECT 53\n").expect("write");
    let (req, _) = g.recv();
    g.send(hdr(53, req.src_port, op::RST), &[]);
    let mut buf = [0u8; 16];
    assert_eq!(
        host.read(&mut buf).expect("read"),
        0,
        "expected end-of-file"
    );
}

#[test]
fn host_program_unanswered_by_the_guest_is_hung_up_on() {
    let mut g = Guest::new();
    let mut host = UnixStream::connect(&g.uds).expect("connect");
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    host.write_all(b"CONNECT 54\n").expect("write");
    let (req, _) = g.recv();
    assert_eq!(req.op, op::REQUEST);
    // The guest never answers.
    let mut buf = [0u8; 16];
    assert_eq!(
        host.read(&mut buf).expect("read"),
        0,
        "expected end-of-file"
    );
    let (rst, _) = g.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 54)
    );
}

#[test]
fn host_program_that_never_sends_its_line_is_hung_up_on() {
    let mut g = Guest::new();
    let mut idle = UnixStream::connect(&g.uds).expect("connect");
    idle.set_read_timeout(Some(HANDSHAKE_TIMEOUT * 3))
        .expect("timeout");
    let mut buf = [0u8; 16];
    assert_eq!(
        idle.read(&mut buf).expect("hung up on, not timed out"),
        0,
        "expected end-of-file"
    );
    g.expect_silence();
    // Its slot is free again: a program that does send its line connects.
    let mut host = UnixStream::connect(&g.uds).expect("connect");
    host.write_all(b"CONNECT 55\n").expect("write");
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 55));
}

#[test]
fn host_program_with_a_bad_line_is_hung_up_on() {
    let mut g = Guest::new();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'C'; 40]] {
        let mut host = UnixStream::connect(&g.uds).expect("connect");
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        host.write_all(line).expect("write");
        let mut buf = [0u8; 16];
        // Closed with unread bytes the peer sees a reset, else end-of-file.
        match host.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("{line:?}: not hung up on: {other:?}"),
        }
    }
    g.expect_silence();
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_forgets_the_connection() {
    let mut g = Guest::new();
    let host = g.connect(1234, 5001);
    drop(host);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.flags),
        (op::SHUTDOWN, shutdown::RCV | shutdown::SEND)
    );
    g.send(hdr(1234, 5001, op::RST), &[]);
    g.expect_silence();
    // The connection is gone: data for it gets RST.
    g.send(hdr(1234, 5001, op::RW), b"late");
    assert_eq!(g.recv().0.op, op::RST);
}

#[test]
fn guest_shutdown_flushes_closes_the_host_socket_and_answers_rst() {
    let mut g = Guest::new();
    let mut host = g.connect(1234, 5002);
    g.send(hdr(1234, 5002, op::RW), b"last words");
    let mut sd = hdr(1234, 5002, op::SHUTDOWN);
    sd.flags = shutdown::RCV | shutdown::SEND;
    g.send(sd, &[]);
    assert_eq!(g.recv().0.op, op::RST);
    let mut all = Vec::new();
    host.read_to_end(&mut all).expect("read");
    assert_eq!(all, b"last words");
}

#[test]
fn guest_send_shutdown_gives_the_host_end_of_file() {
    let mut g = Guest::new();
    let mut host = g.connect(1234, 5003);
    g.send(hdr(1234, 5003, op::RW), b"abc");
    let mut sd = hdr(1234, 5003, op::SHUTDOWN);
    sd.flags = shutdown::SEND;
    g.send(sd, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).expect("read");
    assert_eq!(all, b"abc");
    // The other direction still works.
    host.write_all(b"reply").expect("write");
    assert_eq!(g.recv().1, b"reply");
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut g = Guest::new();
    for o in [op::RW, op::CREDIT_UPDATE, op::RESPONSE, op::SHUTDOWN] {
        g.send(hdr(777, 888, o), b"");
        let (h, _) = g.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 888, 777));
    }
    // Another CID or socket type: RST from that address, of that type.
    let mut other = hdr(777, 888, op::REQUEST);
    other.dst_cid = 5;
    g.send(other, &[]);
    let (h, _) = g.recv_any();
    assert_eq!((h.op, h.src_cid, h.type_), (op::RST, 5, TYPE_STREAM));
    let mut seq = hdr(777, 888, op::REQUEST);
    seq.type_ = 2;
    g.send(seq, &[]);
    let (h, _) = g.recv_any();
    assert_eq!((h.op, h.src_cid, h.type_), (op::RST, HOST_CID, 2));
    // RST for an unknown connection is not answered.
    g.send(hdr(777, 888, op::RST), &[]);
    // Nor is a packet claiming another guest's CID.
    let mut spoof = hdr(777, 888, op::REQUEST);
    spoof.src_cid = 9;
    g.send(spoof, &[]);
    g.expect_silence();
}

#[test]
fn host_to_guest_data_respects_the_guest_credit() {
    let mut g = Guest::new();
    let l = g.listen(5004);
    let mut req = hdr(1234, 5004, op::REQUEST);
    req.buf_alloc = 10;
    g.send(req, &[]);
    assert_eq!(g.recv().0.op, op::RESPONSE);
    let (mut host, _) = l.accept().expect("accept");
    host.write_all(&[7u8; 25]).expect("write");
    let (h, data) = g.recv();
    assert_eq!((h.op, data.len()), (op::RW, 10));
    g.expect_silence();
    // The guest consumed 10 bytes and says so.
    let mut upd = hdr(1234, 5004, op::CREDIT_UPDATE);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    g.send(upd, &[]);
    assert_eq!(g.recv().1.len(), 10);
    upd.fwd_cnt = 20;
    g.send(upd, &[]);
    assert_eq!(g.recv().1.len(), 5);
}

#[test]
fn credit_request_gets_credit_update() {
    let mut g = Guest::new();
    let _host = g.connect(1234, 5005);
    g.send(hdr(1234, 5005, op::CREDIT_REQUEST), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.buf_alloc), (op::CREDIT_UPDATE, BUF_ALLOC));
}

#[test]
fn device_reports_freed_credit_as_the_host_reads() {
    let mut g = Guest::new();
    let mut host = g.connect(1234, 5006);
    let chunk = vec![1u8; 32 * 1024];
    let reader = std::thread::spawn(move || {
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while total < 6 * 32 * 1024 {
            total += host.read(&mut buf).expect("read");
        }
        total
    });
    for _ in 0..6 {
        g.send(hdr(1234, 5006, op::RW), &chunk);
    }
    let (h, _) = g.recv();
    assert_eq!(h.op, op::CREDIT_UPDATE);
    assert!(h.fwd_cnt >= BUF_ALLOC / 2, "fwd_cnt {}", h.fwd_cnt);
    assert_eq!(reader.join().expect("reader"), 6 * 32 * 1024);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new();
    let _host = g.connect(1234, 5007);
    // The host never reads: its socket buffer fills, then the device's.
    let chunk = vec![2u8; MAX_PAYLOAD];
    let mut ops = Vec::new();
    for _ in 0..64 {
        g.send(hdr(1234, 5007, op::RW), &chunk);
        std::thread::sleep(Duration::from_millis(2));
        let new = g.drv.take_used(RX);
        g.pending.extend(new);
        while !g.pending.is_empty() {
            ops.push(g.recv().0.op);
        }
        if ops.contains(&op::RST) {
            break;
        }
    }
    // 4 MiB sent against 256 KiB of credit plus a socket buffer: the
    // answer comes, however slowly the device runs.
    while !ops.contains(&op::RST) {
        ops.push(g.recv().0.op);
    }
    // Credit updates may come first (the host socket took some); the
    // connection ends with RST.
    assert_eq!(ops.last(), Some(&op::RST), "{ops:?}");
    assert!(ops[..ops.len() - 1].iter().all(|&o| o == op::CREDIT_UPDATE));
    assert!(!g.drv.interrupt().needs_reset());
}

#[test]
fn guest_data_past_the_device_budget_waits_in_the_queue_instead_of_being_reset() {
    let mut g = Guest::new_with_budget(128 * 1024);
    let mut host = g.connect(1234, 5009);
    // The host does not read yet. The guest sends 640 KiB, within the
    // credit the device gives it (256 KiB buffered) but past the device's
    // budget: the device stops taking packets rather than buffer them.
    let chunk = vec![7u8; MAX_PAYLOAD];
    for _ in 0..10 {
        g.send(hdr(1234, 5009, op::RW), &chunk);
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut ops = Vec::new();
    g.pending.extend(g.drv.take_used(RX));
    while !g.pending.is_empty() {
        ops.push(g.recv().0.op);
    }
    // The host socket took some: credit updates, and no reset.
    assert!(ops.iter().all(|&o| o == op::CREDIT_UPDATE), "{ops:?}");
    assert!(!g.drv.interrupt().needs_reset());
    // Once the host program reads, everything arrives, in full.
    let got = read_exact(&mut host, 10 * MAX_PAYLOAD);
    assert!(got.iter().all(|&b| b == 7));
}

#[test]
fn connections_are_independent() {
    let mut g = Guest::new();
    let l = g.listen(5008);
    let mut a = g.connect_via(&l, 1000, 5008);
    let mut b = g.connect_via(&l, 1001, 5008);
    g.send(hdr(1001, 5008, op::RW), b"to b");
    g.send(hdr(1000, 5008, op::RW), b"to a");
    assert_eq!(read_exact(&mut a, 4), b"to a");
    assert_eq!(read_exact(&mut b, 4), b"to b");
    b.write_all(b"from b").expect("write");
    let (h, data) = g.recv();
    assert_eq!((h.dst_port, data.as_slice()), (1001, &b"from b"[..]));
}

fn expect_tx_reset(g: &mut Guest, bytes: &[u8], buf_len: u32) {
    let a = g.drv.alloc(buf_len.max(bytes.len() as u32));
    g.drv.memory().write_slice(bytes, a).expect("write");
    g.drv.add_chain(TX, &[Buf::readable(a, buf_len)]);
    g.drv.kick(TX);
    assert!(g.drv.interrupt().wait_needs_reset());
}

use vm_memory::Bytes;

#[test]
fn short_header_needs_reset() {
    let mut g = Guest::new();
    let bytes = hdr(1, 2, op::REQUEST).to_bytes();
    expect_tx_reset(&mut g, &bytes[..40], 40);
}

#[test]
fn length_past_the_buffer_needs_reset() {
    let mut g = Guest::new();
    let mut h = hdr(1, 2, op::RW);
    h.len = 100;
    expect_tx_reset(&mut g, &h.to_bytes(), HDR_LEN as u32 + 50);
}

#[test]
fn overflowing_length_needs_reset() {
    let mut g = Guest::new();
    let mut h = hdr(1, 2, op::RW);
    h.len = u32::MAX;
    expect_tx_reset(&mut g, &h.to_bytes(), HDR_LEN as u32 + 16);
}

#[test]
fn payload_over_64k_needs_reset() {
    let mut g = Guest::new();
    let mut h = hdr(1, 2, op::RW);
    h.len = MAX_PAYLOAD as u32 + 1;
    expect_tx_reset(&mut g, &h.to_bytes(), HDR_LEN as u32 + h.len);
}

#[test]
fn receive_buffer_shorter_than_a_header_needs_reset() {
    let dir = TempDir::new();
    let uds = dir.0.join("v.sock");
    let mut dev = Vsock::new(CID, &uds).expect("vsock");
    let mut drv = MockDriver::new(4 << 20, &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
    let features = dev.device_features();
    drv.activate(&mut dev, features).expect("activate");
    let a = drv.alloc(16);
    drv.add_chain(RX, &[Buf::writable(a, 16)]);
    // Something to say: RST to an unknown connection.
    let p = drv.put(&hdr(1, 2, op::RW).to_bytes());
    drv.add_chain(TX, &[Buf::readable(p, HDR_LEN as u32)]);
    drv.kick(TX);
    assert!(drv.interrupt().wait_needs_reset());
}

#[test]
fn config_space_holds_the_cid() {
    let dir = TempDir::new();
    let dev = Vsock::new(0x1_0000_0003 & 0xffff_ffff, &dir.0.join("c.sock")).expect("vsock");
    let mut c = [0xffu8; 10];
    dev.read_config(0, &mut c);
    assert_eq!(c, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(dev.device_type(), device_type::VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
}

#[test]
fn bad_cids_and_paths_are_one_line_errors() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let err = Vsock::new(cid, &dir.0.join("x.sock")).unwrap_err();
        assert!(matches!(err, VsockError::Cid(_)), "{cid}: {err}");
    }
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"not a socket").expect("write");
    let err = Vsock::new(3, &file).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert!(file.exists(), "a regular file must not be removed");
    let long = dir.0.join("l".repeat(MAX_UDS_PATH));
    assert!(matches!(
        Vsock::new(3, &long).unwrap_err(),
        VsockError::PathTooLong(_)
    ));
    let err = Vsock::new(3, Path::new("/nonexistent-dir/v.sock")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent-dir/v.sock"), "{err}");
}

#[test]
fn live_socket_is_in_use_and_stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.0.join("s.sock");
    let first = Vsock::new(3, &path).expect("first");
    assert!(matches!(
        Vsock::new(4, &path).unwrap_err(),
        VsockError::InUse(_)
    ));
    drop(first);
    assert!(!path.exists(), "the device removes its socket");
    // A socket file left by a process that died.
    let stale = UnixListener::bind(&path).expect("bind");
    drop(stale);
    assert!(path.exists());
    let second = Vsock::new(4, &path).expect("replaces the stale socket");
    assert!(UnixStream::connect(&path).is_ok());
    drop(second);
}

#[test]
fn a_socket_that_cannot_be_probed_is_left_alone() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new();
    let path = dir.0.join("d.sock");
    // Another program's live datagram socket: a stream connect fails, but
    // not with "refused".
    let other = UnixDatagram::bind(&path).expect("bind");
    let err = Vsock::new(3, &path).unwrap_err();
    assert!(matches!(err, VsockError::Probe { .. }), "{err:?}");
    assert!(err.to_string().contains("d.sock"), "{err}");
    let sender = UnixDatagram::unbound().expect("socket");
    sender
        .send_to(b"still here", &path)
        .expect("the socket was removed");
    let mut buf = [0u8; 16];
    assert_eq!(other.recv(&mut buf).expect("recv"), 10);
}

#[test]
fn a_listener_with_a_full_backlog_is_in_use_without_blocking() {
    let dir = TempDir::new();
    let path = dir.0.join("b.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    // Fill the backlog: non-blocking connects until one would block.
    let mut held = Vec::new();
    loop {
        match super::muxer::connect_nonblocking(&path) {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(held.len() < 100_000, "the backlog never filled");
    }
    assert!(matches!(
        Vsock::new(3, &path).unwrap_err(),
        VsockError::InUse(_)
    ));
    assert!(path.exists());
    drop(listener);
}

#[test]
fn reset_closes_connections_and_reactivation_works() {
    let mut g = Guest::new();
    let mut host = g.connect(1234, 5009);
    g.dev.reset();
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).expect("read"), 0, "connection closed");
    g.drv.reset_rings();
    let features = g.dev.device_features();
    g.drv.activate(&mut g.dev, features).expect("activate");
    g.rx_bufs.clear();
    for _ in 0..4 {
        g.post_rx();
    }
    g.drv.kick(RX);
    let _again = g.connect(1234, 5010);
}

/// A small deterministic generator for the storm test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn storm_of_well_formed_but_senseless_packets_leaves_the_device_working() {
    let mut g = Guest::new();
    let l5100 = g.listen(5100);
    let mut hosts = Vec::new();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..3000 {
        let mut h = hdr(
            1000 + rng.below(4) as u32,
            5100 + rng.below(2) as u32,
            rng.below(9) as u16,
        );
        h.flags = rng.below(4) as u32;
        h.buf_alloc = rng.next() as u32;
        h.fwd_cnt = rng.next() as u32;
        if rng.below(10) == 0 {
            h.type_ = 2;
        }
        let len = rng.below(200) as usize;
        let payload = vec![i as u8; len];
        g.send(h, &payload);
        // Like a driver, wait for the device to take the batch, take what
        // it answered, and accept what it connected.
        if i % 16 == 15 {
            assert_eq!(g.drv.wait_used(TX, 16).len(), 16);
            g.drain_rx();
            l5100.set_nonblocking(true).expect("nonblocking");
            while let Ok((s, _)) = l5100.accept() {
                hosts.push(s);
            }
        }
    }
    assert!(!g.drv.interrupt().needs_reset());
    // Still serving: a fresh connection works end to end.
    let l = g.listen(5200);
    g.drain_rx();
    g.send(hdr(4000, 5200, op::REQUEST), &[]);
    loop {
        let (h, _) = g.recv();
        if h.dst_port == 4000 {
            assert_eq!(h.op, op::RESPONSE);
            break;
        }
    }
    let (mut s, _) = l.accept().expect("accept");
    g.send(hdr(4000, 5200, op::RW), b"still alive");
    assert_eq!(read_exact(&mut s, 11), b"still alive");
}

#[test]
fn guest_not_taking_answers_pauses_its_transmit_queue_without_reset() {
    let mut g = Guest::new();
    // Eight receive buffers are posted; each packet for nobody wants an
    // RST. The device takes packets until 1,024 answers wait, then stops.
    let total = 1100u32;
    for batch in 0..10 {
        for i in 0..100 {
            g.send(hdr(batch * 100 + i, 9, op::RW), b"x");
        }
        assert_eq!(g.drv.wait_used(TX, 100).len(), 100);
    }
    for i in 1000..total {
        g.send(hdr(i, 9, op::RW), b"x");
    }
    let mut taken = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let n = g.drv.take_used(TX).len();
        if n == 0 {
            break;
        }
        taken += n;
    }
    assert!(taken < 100, "the device kept reading: {taken}");
    assert!(!g.drv.interrupt().needs_reset());
    // Once the guest takes answers the device reads on: every RST
    // arrives, in order.
    let mut ports = Vec::new();
    while ports.len() < total as usize {
        let (h, _) = g.recv();
        assert_eq!(h.op, op::RST);
        ports.push(h.dst_port);
    }
    assert_eq!(ports, (0..total).collect::<Vec<u32>>());
    assert_eq!(taken + g.drv.wait_used(TX, 100 - taken).len(), 100);
}

mod route;
