//! `netbench`: TCP throughput and request latency between two guests.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary.
//!
//! Usage:
//! - `netbench serve PORT`: serves connections one after another, for ever.
//!   A connection's first byte says what it wants: `S` (a stream: read to
//!   the end, then answer the byte count as 8 bytes, little-endian) or `E`
//!   (echo: a 4-byte little-endian size N, then messages of N bytes, each
//!   sent back whole).
//! - `netbench stream HOST PORT SECS`: sends for SECS seconds and prints
//!   `netbench: stream BYTES bytes in SECS s: MBIT Mbit/s`, timed from the
//!   first byte to the server's count.
//! - `netbench rr HOST PORT COUNT SIZE`: COUNT round trips of SIZE bytes and
//!   prints `netbench: rr COUNT x SIZE B: p50 P50 us, p99 P99 us, mean MEAN us`.
//!
//! Clients try to connect for up to 120 s, so that the server's guest may
//! boot later. Exit status: 0 on success, 1 on bad arguments, 2 on a socket
//! error.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The size of one write of a stream.
const CHUNK: usize = 64 << 10;
/// The largest echo message.
const MAX_MESSAGE: usize = 1 << 20;

fn serve(port: u16) -> Result<(), String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind port {port}: {e}"))?;
    println!("netbench: serving on port {port}");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        // One bad client never stops the server.
        if let Err(e) = serve_one(&mut conn) {
            eprintln!("netbench: connection: {e}");
        }
    }
    Ok(())
}

fn serve_one(conn: &mut TcpStream) -> std::io::Result<()> {
    let _ = conn.set_nodelay(true);
    let mut mode = [0u8; 1];
    conn.read_exact(&mut mode)?;
    match mode[0] {
        b'S' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match conn.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
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

fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect((host, port)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if start.elapsed() > Duration::from_secs(120) => {
                return Err(format!("connect {host}:{port}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn stream(host: &str, port: u16, secs: u64) -> Result<(), String> {
    let mut conn = connect(host, port)?;
    let io = |e: std::io::Error| format!("stream: {e}");
    conn.write_all(b"S").map_err(io)?;
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    while Instant::now() < until {
        conn.write_all(&buf).map_err(io)?;
    }
    conn.shutdown(Shutdown::Write).map_err(io)?;
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

fn round_trips(host: &str, port: u16, count: usize, size: usize) -> Result<(), String> {
    if count == 0 || size == 0 || size > MAX_MESSAGE {
        return Err(format!(
            "rr: COUNT must be positive and SIZE 1 to {MAX_MESSAGE}"
        ));
    }
    let mut conn = connect(host, port)?;
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
    let usage = "usage: netbench serve PORT | stream HOST PORT SECS | rr HOST PORT COUNT SIZE";
    let parsed = match args.first().map(String::as_str) {
        Some("serve") => number(args.get(1), "PORT").map(|p| serve(p)),
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
