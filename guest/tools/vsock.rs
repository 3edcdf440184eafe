//! `vsock`: exchange one line over an AF_VSOCK stream socket.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary
//! (the C library is linked statically; the socket calls are declared here).
//!
//! Usage:
//! - `vsock connect CID PORT LINE`: connects to (CID, PORT), sends LINE and a
//!   newline, then prints `vsock: received <reply>` for the first line back.
//! - `vsock listen PORT LINE`: listens on PORT (any CID), prints
//!   `vsock: listening on PORT`, accepts one connection, prints
//!   `vsock: received <line>` for the first line it reads, then answers LINE.
//!
//! Exit status: 0 after the exchange, 1 on bad arguments, 2 on a socket error.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;

#[path = "vsock_sys.rs"]
mod vsock_sys;
use vsock_sys::*;

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn vsock_socket() -> Result<i32, String> {
    // SAFETY: plain system call with constant arguments.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(os_error("socket(AF_VSOCK)"));
    }
    Ok(fd)
}

/// Sends `line` and a newline, reads the first line back.
fn exchange_sending_first(stream: File, line: &str) -> Result<String, String> {
    let mut writer = stream.try_clone().map_err(|e| format!("dup: {e}"))?;
    writeln!(writer, "{line}").map_err(|e| format!("send: {e}"))?;
    read_line(stream)
}

fn read_line(stream: File) -> Result<String, String> {
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("receive: {e}"))?;
    if reply.is_empty() {
        return Err("receive: the peer closed the connection".into());
    }
    Ok(reply.trim_end().to_string())
}

fn do_connect(cid: u32, port: u32, line: &str) -> Result<(), String> {
    let fd = vsock_socket()?;
    // SAFETY: `fd` is a socket we own and nothing else uses it.
    let stream = unsafe { File::from_raw_fd(fd) };
    let addr = address(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { connect(fd, &addr, ADDR_LEN) } != 0 {
        return Err(os_error(&format!("connect to cid {cid} port {port}")));
    }
    let reply = exchange_sending_first(stream, line)?;
    println!("vsock: received {reply}");
    Ok(())
}

fn do_listen(port: u32, line: &str) -> Result<(), String> {
    let fd = vsock_socket()?;
    // SAFETY: `fd` is a socket we own and nothing else uses it.
    let _listener = unsafe { File::from_raw_fd(fd) };
    let addr = address(VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { bind(fd, &addr, ADDR_LEN) } != 0 {
        return Err(os_error(&format!("bind port {port}")));
    }
    // SAFETY: plain system call on our socket.
    if unsafe { listen(fd, 1) } != 0 {
        return Err(os_error("listen"));
    }
    println!("vsock: listening on {port}");
    let _ = std::io::stdout().flush();
    let mut peer = address(0, 0);
    let mut len = ADDR_LEN;
    // SAFETY: `peer` and `len` are valid for writing a sockaddr_vm.
    let conn = unsafe { accept(fd, &mut peer, &mut len) };
    if conn < 0 {
        return Err(os_error("accept"));
    }
    // SAFETY: `conn` is a new socket we own.
    let stream = unsafe { File::from_raw_fd(conn) };
    let mut writer = stream.try_clone().map_err(|e| format!("dup: {e}"))?;
    let got = read_line(stream)?;
    println!("vsock: received {got} (from cid {})", peer.cid);
    writeln!(writer, "{line}").map_err(|e| format!("send: {e}"))?;
    Ok(())
}

fn number(text: &str) -> Result<u32, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a number"))
}

fn run(args: &[String]) -> Result<Result<(), String>, String> {
    match args {
        [cmd, cid, port, line] if cmd == "connect" => {
            Ok(do_connect(number(cid)?, number(port)?, line))
        }
        [cmd, port, line] if cmd == "listen" => Ok(do_listen(number(port)?, line)),
        _ => Err("usage: vsock connect CID PORT LINE | vsock listen PORT LINE".into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(&args) {
        Err(usage) => {
            eprintln!("vsock: {usage}");
            1
        }
        Ok(Err(e)) => {
            eprintln!("vsock: {e}");
            2
        }
        Ok(Ok(())) => 0,
    };
    std::process::exit(code);
}
