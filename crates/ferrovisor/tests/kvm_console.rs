//! Host KVM tests of the console: a terminal on stdin is put in raw mode and
//! restored on every way out, its keys reach the guest, and SIGINT/SIGTERM
//! stop the VMM cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Pty {
    master: File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: both pointers are valid for writes; null name, termios and
    // window size are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: openpty returned two fresh descriptors that we now own.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn canonical(fd: &OwnedFd) -> bool {
    // SAFETY: zeroed termios is valid storage for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` valid storage.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ICANON != 0
}

/// A guest that prints "ready", waits for one byte on the serial port, and
/// exits through the debug-exit port with that byte as its value.
fn echo_guest() -> String {
    let code = Asm::default()
        .print("ready\n")
        .label("wait")
        .mov_dx(0x3fd)
        .in_al_dx()
        .bytes(&[0xa8, 0x01]) // test al, 1 (data ready)
        .jump(0x74, "wait")
        .mov_dx(0x3f8)
        .in_al_dx()
        .mov_dx(0xf4)
        .out_dx_al()
        .finish();
    let path = write_temp("echo.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    path.to_str().unwrap().to_string()
}

/// A guest that prints "ready" and spins forever.
fn spinning_guest() -> String {
    let code = Asm::default()
        .print("ready\n")
        .label("spin")
        .jump(0xeb, "spin")
        .finish();
    let path = write_temp("spin.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    path.to_str().unwrap().to_string()
}

fn spawn_on_pty(kernel: &str, pty: &Pty) -> Child {
    let stdin = File::from(pty.slave.try_clone().unwrap());
    Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--kernel", kernel, "--memory", "32M"])
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_ready(child: &mut Child) {
    let stdout = child.stdout.as_mut().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"ready\n") {
        assert_eq!(
            stdout.read(&mut byte).unwrap(),
            1,
            "guest output ended early"
        );
        seen.push(byte[0]);
    }
}

fn wait_with_limit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ferrovisor did not stop");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

#[test]
fn a_key_reaches_the_guest_without_enter_and_the_terminal_is_restored() {
    let mut pty = open_pty();
    assert!(canonical(&pty.slave));
    let mut child = spawn_on_pty(&echo_guest(), &pty);
    wait_for_ready(&mut child);
    assert!(
        !canonical(&pty.slave),
        "the terminal should be in raw mode while the guest runs"
    );
    // One key, no newline: only a raw terminal passes it on at once.
    pty.master.write_all(b"A").unwrap();
    let status = wait_with_limit(&mut child);
    assert_eq!(status.code(), Some(((b'A' as i32) << 1 | 1) & 0xff));
    assert!(canonical(&pty.slave), "the terminal should be restored");
}

#[test]
fn ctrl_a_x_stops_the_vmm_and_restores_the_terminal() {
    let mut pty = open_pty();
    let mut child = spawn_on_pty(&spinning_guest(), &pty);
    wait_for_ready(&mut child);
    pty.master.write_all(b"\x01x").unwrap();
    let status = wait_with_limit(&mut child);
    assert_eq!(status.code(), Some(0));
    assert!(stderr_of(&mut child).contains("Ctrl-A x"));
    assert!(canonical(&pty.slave));
}

fn stop_with(signal: libc::c_int, name: &str) {
    let pty = open_pty();
    let mut child = spawn_on_pty(&spinning_guest(), &pty);
    wait_for_ready(&mut child);
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let status = wait_with_limit(&mut child);
    assert_eq!(status.code(), Some(0), "a signal stops the VMM cleanly");
    let err = stderr_of(&mut child);
    assert!(err.contains(&format!("stopped by {name}")), "stderr: {err}");
    assert!(
        canonical(&pty.slave),
        "the terminal should be restored after {name}"
    );
}

#[test]
fn sigterm_stops_the_vmm_cleanly() {
    stop_with(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_stops_the_vmm_cleanly() {
    stop_with(libc::SIGINT, "SIGINT");
}

#[test]
fn sighup_stops_the_vmm_cleanly() {
    stop_with(libc::SIGHUP, "SIGHUP");
}

#[test]
fn sigquit_stops_the_vmm_cleanly() {
    stop_with(libc::SIGQUIT, "SIGQUIT");
}
