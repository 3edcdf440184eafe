//! `ferrovisor switch-serve` as a process: its flags and its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferrovisor");

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fv-switch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

// The caller waits for the child it is handed.
#[allow(clippy::zombie_processes)]
fn start(dir: &Path) -> (Child, UnixStream) {
    let mut child = Command::new(BIN)
        .args(["switch-serve", "--name", "lan", "--mode", "bridge", "--dir"])
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .expect("start switch-serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(dir.join("control.sock")) {
            return (child, s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the control socket never appeared");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ask(stream: &mut UnixStream, line: &str) -> Value {
    writeln!(stream, "{line}").expect("send");
    let mut reply = String::new();
    BufReader::new(stream.try_clone().expect("clone"))
        .read_line(&mut reply)
        .expect("reply");
    serde_json::from_str(&reply).expect("a JSON reply")
}

#[test]
fn bad_flags_are_one_line_and_a_failure() {
    for args in [
        vec!["--name", "lan", "--mode", "ring", "--dir", "/tmp/x"],
        vec!["--name", "lan", "--mode", "hub"],
        vec![
            "--name",
            "lan",
            "--mode",
            "hub",
            "--dir",
            "/tmp/x",
            "--uplink-vlan",
            "access=1",
        ],
        vec![
            "--name", "lan", "--mode", "hub", "--dir", "/tmp/x", "--bogus", "1",
        ],
    ] {
        let out = Command::new(BIN)
            .arg("switch-serve")
            .args(&args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn control_socket_adds_shows_and_removes_ports() {
    let dir = temp_dir("ctl");
    let (mut child, mut s) = start(&dir);
    let r = ask(
        &mut s,
        r#"{"op":"add_port","port":"web-net0","mac":"52:54:00:00:00:0a","vlan":{"access":10}}"#,
    );
    assert_eq!(r["ok"], true, "{r}");
    // Set up, the process keeps no capability and cannot gain one.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    for line in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(status.contains(line), "{line:?} not in\n{status}");
    }
    let sock = dir.join("web-net0.sock");
    assert_eq!(r["socket"], sock.to_str().expect("utf-8"));
    assert!(sock.exists());
    let again = ask(
        &mut s,
        r#"{"op":"add_port","port":"web-net0","mac":"52:54:00:00:00:0a","vlan":{"access":10}}"#,
    );
    assert_eq!(again, r);
    let dup = ask(
        &mut s,
        r#"{"op":"add_port","port":"db-net0","mac":"52:54:00:00:00:0a"}"#,
    );
    assert_eq!(dup["ok"], false, "{dup}");
    let bad = ask(&mut s, "not json");
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().is_some_and(|e| !e.is_empty()));
    let show = ask(&mut s, r#"{"op":"show"}"#);
    assert_eq!(show["mode"], "bridge");
    assert_eq!(show["name"], "lan");
    let ports = show["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["port"], "web-net0");
    assert_eq!(ports[0]["vlan"]["access"], 10);
    assert_eq!(ports[0]["connected"], false);
    assert_eq!(ports[0]["rx_frames"], 0);
    assert_eq!(
        ask(&mut s, r#"{"op":"remove_port","port":"web-net0"}"#)["ok"],
        true
    );
    assert!(!sock.exists());
    assert_eq!(
        ask(&mut s, r#"{"op":"remove_port","port":"web-net0"}"#)["ok"],
        false
    );
    assert_eq!(ask(&mut s, r#"{"op":"shutdown"}"#)["ok"], true);
    assert!(child.wait().expect("wait").success());
    assert!(!dir.join("control.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
