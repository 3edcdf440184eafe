use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fv-route-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn policy_rules_are_read_and_bad_ones_name_the_field() {
    let ok = parse_policy(&json!({"allow": [{"from": "a", "to": "b", "port": 5000}]}));
    assert_eq!(
        ok,
        Ok(vec![Allow {
            from: "a".into(),
            to: "b".into(),
            port: 5000
        }])
    );
    assert_eq!(parse_policy(&json!({"allow": []})), Ok(vec![]));
    let bad = |v: Value| parse_policy(&v).unwrap_err();
    assert_eq!(bad(json!({})), "allow: not a list of rules");
    assert_eq!(
        bad(json!({"allow": [{"from": "A!", "to": "b", "port": 1}]})),
        "allow[0].from: not a guest name"
    );
    assert_eq!(
        bad(json!({"allow": [{"from": "a", "to": "a", "port": 1}]})),
        "allow[0].to: the same guest as 'from'"
    );
    for port in [json!(0), json!(4294967295u64), json!("80"), json!(-1)] {
        assert_eq!(
            bad(json!({"allow": [{"from": "a", "to": "b", "port": port}]})),
            "allow[0].port: not a port from 1 to 4294967294"
        );
    }
}

#[test]
fn request_lines() {
    assert_eq!(parse_request("CONNECT 4 5000"), Some((4, 5000)));
    assert_eq!(parse_request("CONNECT 4"), None);
    assert_eq!(parse_request("CONNECT 4 5000 6"), None);
    assert_eq!(parse_request("CONNECT +4 5000"), None);
    assert_eq!(parse_request("CONNECT 4 99999999999"), None);
    assert_eq!(parse_request("connect 4 5000"), None);
}

/// A fake target VMM: accepts host-program connections on `socket`,
/// answers `CONNECT <port>` with `OK`, and sends back what it reads.
fn fake_vmm(socket: &Path) -> std::sync::mpsc::Receiver<String> {
    let listener = UnixListener::bind(socket).expect("target socket");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            r.read_line(&mut line).expect("line");
            let _ = tx.send(line);
            s.write_all(b"OK 1073741824\n").expect("answer");
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    rx
}

/// Asks guest `runtime`'s router for (cid, port): the stream passed on
/// `OK`, or `None` when it closed the request.
fn ask(runtime: &Path, cid: u32, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(runtime.join(vmm::runtime::VSOCK_ROUTE)).expect("router");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("CONNECT {cid} {port}\n").as_bytes())
        .expect("request");
    let mut buf = [0u8; 8];
    let (n, fd) = s.recv_with_fd(&mut buf).expect("answer");
    match fd {
        Some(f) => {
            assert_eq!(&buf[..n], b"OK\n");
            Some(UnixStream::from(std::os::fd::OwnedFd::from(f)))
        }
        None => {
            assert_eq!(n, 0, "a refusal is a close");
            None
        }
    }
}

/// The policy of every test here (tests run at once and share it).
fn set_test_policy() {
    *lock(&POLICY) = parse_policy(&json!({"allow": [
        {"from": "route-a", "to": "route-b", "port": 5000},
        {"from": "flood-a", "to": "flood-b", "port": 7},
    ]}))
    .expect("policy");
}

#[test]
fn the_router_connects_allowed_guests_and_refuses_the_rest() {
    let (a, b) = (dir("ra"), dir("rb"));
    let (sock_a, sock_b) = (a.join("v.sock"), b.join("v.sock"));
    let seen_b = fake_vmm(&sock_b);
    let _seen_a = fake_vmm(&sock_a);
    set_test_policy();
    start("route-a", &a, 103, &sock_a).expect("route a");
    start("route-b", &b, 104, &sock_b).expect("route b");

    // Allowed: a's VMM gets a stream to b's device, which was asked for
    // port 5000 the host-program way.
    let mut s = ask(&a, 104, 5000).expect("allowed");
    assert_eq!(seen_b.recv().expect("b asked"), "CONNECT 5000\n");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"ping");

    // Another port, the other direction, an unknown CID: refused, and b's
    // device is not even asked.
    assert!(ask(&a, 104, 5001).is_none());
    assert!(ask(&b, 103, 5000).is_none());
    assert!(ask(&a, 999, 5000).is_none());
    assert!(seen_b.try_recv().is_err(), "b was asked for a refused one");

    // A guest that stopped is no target any more, and its router is gone.
    stop("route-b");
    assert!(ask(&a, 104, 5000).is_none());
    assert!(UnixStream::connect(b.join(vmm::runtime::VSOCK_ROUTE)).is_err());
    stop("route-a");
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn a_guest_flooding_its_router_is_refused_past_the_limit_and_served_after() {
    let (a, b) = (dir("fa"), dir("fb"));
    let _seen_b = fake_vmm(&b.join("v.sock"));
    set_test_policy();
    start("flood-a", &a, 203, &a.join("v.sock")).expect("route");
    start("flood-b", &b, 204, &b.join("v.sock")).expect("route");
    let router = a.join(vmm::runtime::VSOCK_ROUTE);
    // Requests that never send their line hold their slot until they are
    // given up on.
    let silent: Vec<UnixStream> = (0..MAX_PENDING)
        .map(|_| UnixStream::connect(&router).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&router).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 1];
    assert_eq!(extra.read(&mut buf).expect("closed at once"), 0);
    drop(silent);
    // Their slots come back: an allowed request is served again.
    std::thread::sleep(Duration::from_millis(200));
    assert!(ask(&a, 204, 7).is_some(), "served once the slots are free");
    stop("flood-a");
    stop("flood-b");
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}
