//! `blkbench`: block-device throughput and IOPS, measured inside the guest.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary.
//!
//! Usage: `blkbench DEVICE SIZE_MIB SECONDS`
//!
//! All I/O bypasses the guest's page cache (`O_DIRECT`) and is synchronous,
//! one request in flight at a time (queue depth 1):
//! 1. `seq_write`: SIZE_MIB writes of 1 MiB from the device's start, then
//!    `fdatasync` (a cache flush to the device), all inside the timing;
//! 2. `seq_read`: the same range read back in 1 MiB requests;
//! 3. `rand_read`: 4 KiB reads at random 4 KiB-aligned offsets inside that
//!    range for SECONDS seconds.
//!
//! Each step prints one line `blkbench: NAME VALUE UNIT (detail)` with UNIT
//! `MiB/s` or `IOPS`. The data written is checked when read back.
//! Exit status: 0 on success, 1 on bad arguments, 2 on an I/O error.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

const O_DIRECT: i32 = 0o40000;
const MIB: usize = 1 << 20;
const SMALL: usize = 4096;

/// A buffer of `len` bytes aligned to 4 KiB, as O_DIRECT wants.
struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + SMALL];
        let start = (SMALL - storage.as_ptr() as usize % SMALL) % SMALL;
        Aligned {
            storage,
            start,
            len,
        }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The byte written at `offset` of the device.
fn pattern(offset: u64) -> u8 {
    (offset / 4096 % 251) as u8 ^ (offset % 4096 % 253) as u8
}

fn fill(buf: &mut [u8], base: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(base + i as u64);
    }
}

fn open(device: &str, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(O_DIRECT)
        .open(device)
        .map_err(|e| format!("cannot open {device} with O_DIRECT: {e}"))
}

fn seq_write(device: &str, mib: usize) -> Result<f64, String> {
    let file = open(device, true)?;
    let mut buf = Aligned::new(MIB);
    let start = Instant::now();
    for i in 0..mib {
        let offset = (i * MIB) as u64;
        // Filling is part of the loop but cheap next to the device.
        fill(buf.get(), offset);
        file.write_all_at(buf.get(), offset)
            .map_err(|e| format!("write at {offset}: {e}"))?;
    }
    file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    Ok(start.elapsed().as_secs_f64())
}

fn seq_read(device: &str, mib: usize) -> Result<f64, String> {
    let file = open(device, false)?;
    let mut buf = Aligned::new(MIB);
    let mut elapsed = Duration::ZERO;
    for i in 0..mib {
        let offset = (i * MIB) as u64;
        let start = Instant::now();
        file.read_exact_at(buf.get(), offset)
            .map_err(|e| format!("read at {offset}: {e}"))?;
        elapsed += start.elapsed();
        // Checked outside the timing: the data is what seq_write wrote.
        let bad = buf
            .get()
            .iter()
            .enumerate()
            .position(|(j, &b)| b != pattern(offset + j as u64));
        if let Some(j) = bad {
            return Err(format!("read back wrong data at byte {}", offset + j as u64));
        }
    }
    Ok(elapsed.as_secs_f64())
}

/// A small xorshift generator: the offsets only need to be spread out.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn rand_read(device: &str, mib: usize, secs: u64) -> Result<(u64, f64), String> {
    let file = open(device, false)?;
    let mut buf = Aligned::new(SMALL);
    let blocks = (mib * MIB / SMALL) as u64;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let limit = Duration::from_secs(secs);
    let start = Instant::now();
    let mut reads = 0u64;
    while start.elapsed() < limit {
        let offset = next(&mut state) % blocks * SMALL as u64;
        file.read_exact_at(buf.get(), offset)
            .map_err(|e| format!("read at {offset}: {e}"))?;
        reads += 1;
    }
    Ok((reads, start.elapsed().as_secs_f64()))
}

fn run(device: &str, mib: usize, secs: u64) -> Result<(), String> {
    let t = seq_write(device, mib)?;
    println!(
        "blkbench: seq_write {:.1} MiB/s ({mib} MiB in {t:.3} s, 1 MiB requests, then fdatasync)",
        mib as f64 / t
    );
    let t = seq_read(device, mib)?;
    println!(
        "blkbench: seq_read {:.1} MiB/s ({mib} MiB in {t:.3} s, 1 MiB requests)",
        mib as f64 / t
    );
    let (reads, t) = rand_read(device, mib, secs)?;
    println!(
        "blkbench: rand_read {:.0} IOPS ({reads} reads of 4 KiB in {t:.3} s, queue depth 1)",
        reads as f64 / t
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [device, mib, secs] => mib
            .parse::<usize>()
            .ok()
            .filter(|&m| m > 0)
            .zip(secs.parse::<u64>().ok())
            .map(|(m, s)| (device.clone(), m, s)),
        _ => None,
    };
    let Some((device, mib, secs)) = parsed else {
        eprintln!("usage: blkbench DEVICE SIZE_MIB SECONDS");
        std::process::exit(1);
    };
    if let Err(e) = run(&device, mib, secs) {
        eprintln!("blkbench: {e}");
        std::process::exit(2);
    }
}
