//! Connections from the guest to other guests through a router: a real
//! unix socket stands in for the daemon's router, and a socket pair for
//! the peer guest's device.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::super::packet::{op, Header, HOST_CID};
use super::super::ROUTE_TIMEOUT;
use super::{hdr, read_exact, Guest, CID};

const PEER: u32 = 7;

/// A guest packet header from `src` to port `dst` of guest `PEER`.
fn to_peer(src: u32, dst: u32, op: u16) -> Header {
    Header {
        dst_cid: u64::from(PEER),
        ..hdr(src, dst, op)
    }
}

/// The fake router: listens where the device looks for the daemon's.
fn router(g: &Guest) -> UnixListener {
    let path: PathBuf = g.uds.with_file_name("route.sock");
    UnixListener::bind(path).expect("router socket")
}

/// Accepts the device's request and returns it with the line it sent.
fn request(router: &UnixListener) -> (UnixStream, String) {
    let (s, _) = router.accept().expect("the device asks the router");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("line");
    (s, line)
}

/// Answers `OK` with one end of a new socket pair; returns the other end,
/// which plays the peer guest's device.
fn accept_route(s: &UnixStream) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    s.send_with_fd(&b"OK\n"[..], theirs.as_raw_fd())
        .expect("pass the stream");
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    ours
}

/// The guest's connection from `gport` to (PEER, `pport`), accepted by
/// the router; returns the peer's end.
fn routed(g: &mut Guest, r: &UnixListener, gport: u32, pport: u32) -> UnixStream {
    g.send(to_peer(gport, pport, op::REQUEST), &[]);
    let (s, line) = request(r);
    assert_eq!(line, format!("CONNECT {PEER} {pport}\n"));
    let peer = accept_route(&s);
    let (h, _) = g.recv_any();
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_port),
        (op::RESPONSE, u64::from(PEER), pport, gport)
    );
    peer
}

#[test]
fn guest_connects_to_another_guest_through_the_router_and_data_flows_both_ways() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    let mut peer = routed(&mut g, &r, 1234, 5000);
    g.send(to_peer(1234, 5000, op::RW), b"hello peer");
    assert_eq!(read_exact(&mut peer, 10), b"hello peer");
    peer.write_all(b"hello guest").expect("write");
    let (h, data) = g.recv_any();
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_port),
        (op::RW, u64::from(PEER), 5000, 1234)
    );
    assert_eq!(data, b"hello guest");
    // The peer closing reaches the guest as SHUTDOWN from the peer.
    drop(peer);
    let (h, _) = g.recv_any();
    assert_eq!((h.op, h.src_cid), (op::SHUTDOWN, u64::from(PEER)));
}

#[test]
fn a_connection_the_router_refuses_is_reset_in_the_guest() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    g.send(to_peer(1234, 6000, op::REQUEST), &[]);
    let (s, line) = request(&r);
    assert_eq!(line, format!("CONNECT {PEER} 6000\n"));
    drop(s);
    let (h, _) = g.recv_any();
    assert_eq!(
        (h.op, h.src_cid, h.src_port, h.dst_port),
        (op::RST, u64::from(PEER), 6000, 1234)
    );
    // The same ports can be asked for again.
    let mut peer = routed(&mut g, &r, 1234, 6000);
    g.send(to_peer(1234, 6000, op::RW), b"again");
    assert_eq!(read_exact(&mut peer, 5), b"again");
}

#[test]
fn an_answer_without_a_stream_is_a_refusal() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    g.send(to_peer(1234, 6001, op::REQUEST), &[]);
    let (mut s, _) = request(&r);
    s.write_all(b"OK\n").expect("answer without a descriptor");
    let (h, _) = g.recv_any();
    assert_eq!(
        (h.op, h.src_cid, h.src_port),
        (op::RST, u64::from(PEER), 6001)
    );
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).expect("read"), 0, "the device hung up");
}

#[test]
fn a_router_that_does_not_answer_in_time_is_given_up_on() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    g.send(to_peer(1234, 6002, op::REQUEST), &[]);
    let (mut s, _) = request(&r);
    s.set_read_timeout(Some(ROUTE_TIMEOUT * 4))
        .expect("timeout");
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).expect("read"), 0, "the device hung up");
    let (h, _) = g.recv_any();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 6002, 1234));
}

#[test]
fn without_a_router_listening_other_guests_are_unreachable() {
    let mut g = Guest::new_routed();
    g.send(to_peer(1234, 5000, op::REQUEST), &[]);
    let (h, _) = g.recv_any();
    assert_eq!(
        (h.op, h.src_cid, h.src_port),
        (op::RST, u64::from(PEER), 5000)
    );
}

#[test]
fn the_guest_itself_and_reserved_cids_are_not_routed() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    r.set_nonblocking(true).expect("non-blocking");
    for cid in [CID, 0, 1, u64::from(u32::MAX), 1 << 32] {
        let req = Header {
            dst_cid: cid,
            ..hdr(1234, 5000, op::REQUEST)
        };
        g.send(req, &[]);
        let (h, _) = g.recv_any();
        assert_eq!((h.op, h.src_cid), (op::RST, cid), "CID {cid}");
    }
    assert!(r.accept().is_err(), "the router was asked");
}

#[test]
fn a_host_connection_and_a_guest_connection_on_the_same_ports_are_apart() {
    let mut g = Guest::new_routed();
    let r = router(&g);
    let mut host = g.connect(1234, 5000);
    let mut peer = routed(&mut g, &r, 1234, 5000);
    g.send(to_peer(1234, 5000, op::RW), b"to peer");
    g.send(hdr(1234, 5000, op::RW), b"to host");
    assert_eq!(read_exact(&mut peer, 7), b"to peer");
    assert_eq!(read_exact(&mut host, 7), b"to host");
    peer.write_all(b"p").expect("write");
    let (h, data) = g.recv_any();
    assert_eq!((h.src_cid, data.as_slice()), (u64::from(PEER), &b"p"[..]));
    host.write_all(b"h").expect("write");
    let (h, data) = g.recv_any();
    assert_eq!((h.src_cid, data.as_slice()), (HOST_CID, &b"h"[..]));
}
