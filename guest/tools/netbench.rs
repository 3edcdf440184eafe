//! `netbench`: TCP throughput and request latency between two guests.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary.
//!
//! Usage:
//! - `netbench serve PORT`: serves connections one after another, for ever.
//!   A connection's first byte says what it wants: `S` (a stream of frames,
//!   each a 4-byte little-endian length and that many bytes, ended by an
//!   empty frame; the answer is the byte count as 8 bytes, little-endian) or `E`
//!   (echo: a 4-byte little-endian size N, then messages of N bytes, each
//!   sent back whole).
//! - `netbench stream HOST PORT SECS`: sends for SECS seconds and prints
//!   `netbench: stream BYTES bytes in SECS s: MBIT Mbit/s`, timed from the
//!   first byte to the server's count.
//! - `netbench rr HOST PORT COUNT SIZE`: COUNT round trips of SIZE bytes and
//!   prints `netbench: rr COUNT x SIZE B: p50 P50 us, p99 P99 us, mean MEAN us`.
//!
//! A HOST of the form `vsock:CID` reaches the server over AF_VSOCK instead
//! (`netbench serve-vsock PORT` on the server's side), for guest-to-guest
//! vsock.
//!
//! Clients try to connect for up to 120 s, so that the server's guest may
//! boot later. Exit status: 0 on success, 1 on bad arguments, 2 on a socket
//! error.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

#[path = "vsock_sys.rs"]
mod vsock_sys;
use vsock_sys::*;

/// A fresh AF_VSOCK stream socket.
fn vsock_socket() -> std::io::Result<File> {
    // SAFETY: plain system call with constant arguments.
    let fd = unsafe { socket(AF_VSOCK, SOCK_STREAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A connection over TCP or AF_VSOCK.
enum Conn {
    Tcp(TcpStream),
    Vsock(File),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Vsock(f) => f.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Vsock(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves AF_VSOCK clients on `port`, one after another, for ever.
fn serve_vsock(port: u32) -> Result<(), String> {
    let listener = vsock_socket().map_err(|e| format!("socket(AF_VSOCK): {e}"))?;
    let addr = address(VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { bind(listener.as_raw_fd(), &addr, ADDR_LEN) } != 0
        // SAFETY: plain system call on our socket.
        || unsafe { listen(listener.as_raw_fd(), 4) } != 0
    {
        return Err(format!(
            "bind vsock port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    println!("netbench: serving on vsock port {port}");
    loop {
        let mut peer = address(0, 0);
        let mut len = ADDR_LEN;
        // SAFETY: `peer` and `len` are valid storage for the address.
        let fd = unsafe { accept(listener.as_raw_fd(), &mut peer, &mut len) };
        if fd < 0 {
            continue;
        }
        // SAFETY: `fd` is the accepted socket, owned from here on.
        let mut conn = Conn::Vsock(unsafe { File::from_raw_fd(fd) });
        if let Err(e) = serve_one(&mut conn) {
            eprintln!("netbench: connection: {e}");
        }
    }
}

/// The size of one write of a stream.
const CHUNK: usize = 64 << 10;
/// The largest echo message.
const MAX_MESSAGE: usize = 1 << 20;

fn serve(port: u16) -> Result<(), String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind port {port}: {e}"))?;
    println!("netbench: serving on port {port}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let mut conn = Conn::Tcp(conn);
        // One bad client never stops the server.
        if let Err(e) = serve_one(&mut conn) {
            eprintln!("netbench: connection: {e}");
        }
    }
    Ok(())
}

fn serve_one(conn: &mut Conn) -> std::io::Result<()> {
    let mut mode = [0u8; 1];
    conn.read_exact(&mut mode)?;
    match mode[0] {
        b'S' => {
            // Frames of a 4-byte little-endian length and that many bytes,
            // up to an empty one: the stream's end needs no half-close
            // (which not every transport carries).
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let mut len = [0u8; 4];
                conn.read_exact(&mut len)?;
                let len = u32::from_le_bytes(len) as usize;
                if len == 0 {
                    break;
                }
                if len > CHUNK {
                    return Err(std::io::Error::other(format!("bad frame length {len}")));
                }
                conn.read_exact(&mut buf[..len])?;
                total += len as u64;
            }
            conn.write_all(&total.to_le_bytes())
        }
        b'E' => {
            let mut size = [0u8; 4];
            conn.read_exact(&mut size)?;
            let size = u32::from_le_bytes(size) as usize;
            if size == 0 || size > MAX_MESSAGE {
                return Err(std::io::Error::other(format!("bad message size {size}")));
            }
            let mut buf = vec![0u8; size];
            loop {
                match conn.read_exact(&mut buf) {
                    Ok(()) => conn.write_all(&buf)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        other => Err(std::io::Error::other(format!("unknown mode byte {other}"))),
    }
}

/// Connects to `host` (`vsock:CID`, or a TCP host) on `port`.
fn connect_to(host: &str, port: u32) -> Result<Conn, String> {
    let start = Instant::now();
    loop {
        let attempt = match host.strip_prefix("vsock:") {
            Some(cid) => {
                let cid: u32 = cid.parse().map_err(|_| format!("{host}: not a CID"))?;
                vsock_socket().and_then(|f| {
                    let addr = address(cid, port);
                    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes.
                    match unsafe { connect(f.as_raw_fd(), &addr, ADDR_LEN) } {
                        0 => Ok(Conn::Vsock(f)),
                        _ => Err(std::io::Error::last_os_error()),
                    }
                })
            }
            None => {
                let port = u16::try_from(port).map_err(|_| format!("port {port}: too large"))?;
                TcpStream::connect((host, port)).map(|s| {
                    let _ = s.set_nodelay(true);
                    Conn::Tcp(s)
                })
            }
        };
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) if start.elapsed() > Duration::from_secs(120) => {
                return Err(format!("connect {host} port {port}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn stream(host: &str, port: u32, secs: u64) -> Result<(), String> {
    let mut conn = connect_to(host, port)?;
    let io = |e: std::io::Error| format!("stream: {e}");
    conn.write_all(b"S").map_err(io)?;
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    while Instant::now() < until {
        conn.write_all(&(CHUNK as u32).to_le_bytes()).map_err(io)?;
        conn.write_all(&buf).map_err(io)?;
    }
    conn.write_all(&0u32.to_le_bytes()).map_err(io)?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count).map_err(io)?;
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = u64::from_le_bytes(count);
    println!(
        "netbench: stream {bytes} bytes in {elapsed:.2} s: {:.1} Mbit/s",
        bytes as f64 * 8.0 / elapsed / 1e6
    );
    Ok(())
}

fn round_trips(host: &str, port: u32, count: usize, size: usize) -> Result<(), String> {
    if count == 0 || size == 0 || size > MAX_MESSAGE {
        return Err(format!(
            "rr: COUNT must be positive and SIZE 1 to {MAX_MESSAGE}"
        ));
    }
    let mut conn = connect_to(host, port)?;
    let io = |e: std::io::Error| format!("rr: {e}");
    conn.write_all(b"E").map_err(io)?;
    conn.write_all(&(size as u32).to_le_bytes()).map_err(io)?;
    let message = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        conn.write_all(&message).map_err(io)?;
        conn.read_exact(&mut back).map_err(io)?;
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "netbench: rr {count} x {size} B: p50 {:.0} us, p99 {:.0} us, mean {mean:.0} us",
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn number<T: std::str::FromStr>(text: Option<&String>, what: &str) -> Result<T, String> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("{what}: expected a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: netbench serve PORT | serve-vsock PORT | stream HOST PORT SECS | \
                 rr HOST PORT COUNT SIZE (HOST may be vsock:CID)";
    let parsed = match args.first().map(String::as_str) {
        Some("serve") => number(args.get(1), "PORT").map(|p| serve(p)),
        Some("serve-vsock") => number(args.get(1), "PORT").map(|p| serve_vsock(p)),
        Some("stream") => number(args.get(2), "PORT").and_then(|p| {
            let secs = number(args.get(3), "SECS")?;
            Ok(stream(&args[1], p, secs))
        }),
        Some("rr") => number(args.get(2), "PORT").and_then(|p| {
            let count = number(args.get(3), "COUNT")?;
            let size = number(args.get(4), "SIZE")?;
            Ok(round_trips(&args[1], p, count, size))
        }),
        _ => Err(usage.to_string()),
    };
    match parsed {
        Err(e) => {
            eprintln!("netbench: {e}");
            std::process::exit(1);
        }
        Ok(Err(e)) => {
            eprintln!("netbench: {e}");
            std::process::exit(2);
        }
        Ok(Ok(())) => {}
    }
}
