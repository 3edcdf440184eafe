//! `region`: use a shared memory region (an ivshmem PCI device, 1af4:1110)
//! from the guest's user space, through sysfs.
//!
//! The guest kit's build compiles it with `rustc` alone into a static binary
//! (the C library is linked statically; mmap is declared here).
//!
//! It finds the first ivshmem device (or the one `REGION_DEVICE=BDF`
//! names, or the directory `REGION_DEVICE=/PATH` names), enables it (`enable`, so that its BARs decode), maps BAR 2 (the
//! shared memory, `resource2`) and BAR 0 (the registers, `resource0`).
//!
//! Usage:
//! - `region info`: prints `region: DEVICE size BYTES peer ID`;
//! - `region write OFFSET TEXT`: writes TEXT's bytes at OFFSET;
//! - `region read OFFSET LEN`: prints `region: read <text>` (the bytes at
//!   OFFSET, up to LEN or the first zero byte);
//! - `region ring PEER VECTOR`: writes the Doorbell register, which rings
//!   vector VECTOR of peer PEER.
//! - `region wait SECS`: waits up to SECS seconds for a peer's doorbell and
//!   prints `region: doorbell (status S)`. Linux user space takes the
//!   interrupt through UIO: the tool binds `uio_pci_generic` to the device
//!   (INTx, which the device raises while MSI-X is off), unmasks the
//!   device's Interrupt Mask, turns INTx on in the command register (the
//!   driver turns it off in its handler) and waits on `/dev/uioN`.
//! - `region ping PEER COUNT` / `region pong PEER COUNT`: COUNT doorbell
//!   round trips (ping rings and waits, pong waits and rings back); ping
//!   prints `region: ping N doorbell round trips: p50 P us, p99 Q us`.
//! - `region send COUNT SIZE` / `region recv COUNT SIZE`: COUNT messages of
//!   SIZE bytes through a single-producer single-consumer ring in the
//!   region (counters at offsets 0 and 64, data from 4096); recv prints
//!   `region: received N messages of S B in T s: M messages/s, R MiB/s`.
//!
//! Exit status: 0 on success, 1 on bad arguments, 2 when there is no
//! device or it cannot be mapped.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 1;
const MAP_FAILED: usize = usize::MAX;
/// The registers (BAR 0).
const REG_INTR_MASK: usize = 0;
const REG_INTR_STATUS: usize = 4;
const REG_IV_POSITION: usize = 8;
const REG_DOORBELL: usize = 12;
const PAGE: usize = 4096;

const POLLIN: i16 = 1;

/// `struct pollfd`.
#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, offset: i64) -> *mut u8;
    fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
}

/// A BAR mapped through its sysfs resource file.
struct Bar {
    base: *mut u8,
    len: usize,
    _file: File,
}

impl Bar {
    fn map(device: &str, index: u8, len: usize) -> Result<Bar, String> {
        let path = format!("{device}/resource{index}");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: a fresh shared mapping of an open file; the kernel picks
        // the address and checks the length against the BAR.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base as usize == MAP_FAILED {
            return Err(format!("mmap {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(Bar {
            base,
            len,
            _file: file,
        })
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(format!(
                "{len} bytes at offset {offset} do not fit in {} bytes",
                self.len
            )),
        }
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: callers pass register offsets inside the mapped page; the
        // access is aligned and volatile (device memory).
        unsafe { std::ptr::read_volatile(self.base.add(offset) as *const u32) }
    }

    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: as in read32.
        unsafe { std::ptr::write_volatile(self.base.add(offset) as *mut u32, value) }
    }
}

fn read_hex(path: &str) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// The sysfs directory of the ivshmem device.
fn find_device() -> Result<String, String> {
    if let Ok(bdf) = std::env::var("REGION_DEVICE") {
        // A path is taken as the device's directory (copies of its sysfs
        // files, as the tool's host test uses).
        if bdf.starts_with('/') {
            return Ok(bdf);
        }
        return Ok(format!("/sys/bus/pci/devices/{bdf}"));
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map_err(|e| format!("/sys/bus/pci/devices: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| format!("/sys/bus/pci/devices/{n}"))
        .find(|d| {
            read_hex(&format!("{d}/vendor")) == Some(0x1af4)
                && read_hex(&format!("{d}/device")) == Some(0x1110)
        })
        .ok_or_else(|| "no ivshmem device (1af4:1110)".to_string())
}

/// The size of BAR `index`, from the device's `resource` table.
fn bar_size(device: &str, index: usize) -> Result<usize, String> {
    let text = std::fs::read_to_string(format!("{device}/resource"))
        .map_err(|e| format!("{device}/resource: {e}"))?;
    let line = text
        .lines()
        .nth(index)
        .ok_or_else(|| format!("no BAR {index}"))?;
    let mut fields = line
        .split_whitespace()
        .map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).unwrap_or(0));
    let (start, end) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
    if end <= start {
        return Err(format!("BAR {index} is not assigned"));
    }
    Ok((end - start + 1) as usize)
}

/// Clears the command register's INTx Disable bit through the device's
/// `config` file: `uio_pci_generic` sets it in its interrupt handler and
/// leaves turning it back on to the program.
fn enable_intx(device: &str) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    const COMMAND: u64 = 4;
    const INTX_DISABLE: u16 = 1 << 10;
    let path = format!("{device}/config");
    let config = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("open {path}: {e}"))?;
    let mut word = [0u8; 2];
    config
        .read_exact_at(&mut word, COMMAND)
        .map_err(|e| format!("read {path}: {e}"))?;
    let command = u16::from_le_bytes(word);
    if command & INTX_DISABLE != 0 {
        config
            .write_all_at(&(command & !INTX_DISABLE).to_le_bytes(), COMMAND)
            .map_err(|e| format!("write {path}: {e}"))?;
    }
    Ok(())
}

/// The device's interrupt, taken through UIO (see the module's text).
struct Uio {
    file: File,
    path: String,
}

impl Uio {
    /// Binds `uio_pci_generic` to the device, unmasks the device's
    /// Interrupt Mask and turns INTx on.
    fn open(region: &Region) -> Result<Uio, String> {
        // Already bound (a second run) is fine: the write then fails quietly.
        let _ = std::fs::write("/sys/bus/pci/drivers/uio_pci_generic/new_id", "1af4 1110");
        let uio_dir = format!("{}/uio", region.device);
        let mut name = None;
        for _ in 0..50 {
            name = std::fs::read_dir(&uio_dir)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned());
            if name.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let name = name.ok_or("uio_pci_generic did not take the device (no uio entry)")?;
        let path = format!("/dev/{name}");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        region.registers.write32(REG_INTR_MASK, 1);
        enable_intx(&region.device)?;
        Ok(Uio { file, path })
    }

    /// Waits up to `timeout_ms` for the interrupt, acknowledges it (reads
    /// Interrupt Status, which it returns) and turns INTx on again.
    fn wait(&mut self, region: &Region, timeout_ms: i32) -> Result<u32, String> {
        use std::io::Read;
        let mut fds = PollFd {
            fd: self.file.as_raw_fd(),
            events: POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { poll(&mut fds, 1, timeout_ms) };
        if ready <= 0 {
            return Err(format!("no doorbell within {timeout_ms} ms"));
        }
        let mut count = [0u8; 4];
        self.file
            .read_exact(&mut count)
            .map_err(|e| format!("read {}: {e}", self.path))?;
        let status = region.registers.read32(REG_INTR_STATUS);
        enable_intx(&region.device)?;
        Ok(status)
    }
}

/// Waits up to `secs` for a doorbell.
fn wait(region: &Region, secs: u64) -> Result<(), String> {
    let mut uio = Uio::open(region)?;
    println!("region: waiting for a doorbell");
    let timeout = i32::try_from(secs.saturating_mul(1000)).unwrap_or(i32::MAX);
    let status = uio.wait(region, timeout)?;
    println!("region: doorbell (status {status})");
    Ok(())
}

/// Doorbell round trips with `peer`: `ping` rings and waits for the answer,
/// `pong` waits and answers, `count` times; `ping` prints the latencies.
fn ping_pong(region: &Region, ping: bool, peer: u32, count: usize) -> Result<(), String> {
    let mut uio = Uio::open(region)?;
    let ring = || region.registers.write32(REG_DOORBELL, peer << 16);
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = std::time::Instant::now();
        if ping {
            ring();
            uio.wait(region, 60_000)?;
        } else {
            uio.wait(region, 120_000)?;
            ring();
        }
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    if ping {
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "region: ping {count} doorbell round trips: p50 {:.0} us, p99 {:.0} us",
            at(0.5),
            at(0.99)
        );
    } else {
        println!("region: answered {count} doorbells");
    }
    Ok(())
}

/// A single-producer single-consumer byte ring in the region: the bytes
/// sent so far at offset 0, received so far at offset 64 (both u64), data
/// from offset 4096 to the region's end.
const RING_SENT: usize = 0;
const RING_RECEIVED: usize = 64;
const RING_DATA: usize = 4096;

fn counter(region: &Region, offset: usize) -> &std::sync::atomic::AtomicU64 {
    // SAFETY: the offset is 8-aligned inside the mapping, which lives as
    // long as `region`; the other guest uses the same cell atomically.
    unsafe { &*(region.memory.base.add(offset) as *const std::sync::atomic::AtomicU64) }
}

/// Moves `count` messages of `size` bytes through the ring: `send` writes
/// them, `recv` takes them and prints the rate from its first message to
/// its last. Both sides spin (no doorbells) while the ring is full or empty.
fn stream(region: &Region, send: bool, count: usize, size: usize) -> Result<(), String> {
    use std::sync::atomic::Ordering;
    let capacity = region.memory.len.checked_sub(RING_DATA).unwrap_or(0);
    if size == 0 || size > capacity {
        return Err(format!("SIZE must be 1 to {capacity}"));
    }
    let (sent, received) = (counter(region, RING_SENT), counter(region, RING_RECEIVED));
    let mut buf = vec![0u8; size];
    let mut start = None;
    for k in 0..count {
        // Each message carries its number in every byte, so the receiver
        // checks what arrived.
        let mark = k as u8;
        if send {
            buf.fill(mark);
        }
        loop {
            let free =
                capacity as u64 - (sent.load(Ordering::Acquire) - received.load(Ordering::Acquire));
            let used = sent.load(Ordering::Acquire) - received.load(Ordering::Acquire);
            if (send && free >= size as u64) || (!send && used >= size as u64) {
                break;
            }
            std::hint::spin_loop();
        }
        start.get_or_insert_with(std::time::Instant::now);
        let position = if send { sent } else { received }.load(Ordering::Acquire) as usize;
        // At most two pieces: up to the end of the data area, then from
        // its start.
        let first = (capacity - position % capacity).min(size);
        for (from, len) in [(0, first), (first, size - first)] {
            let at = RING_DATA + (position + from) % capacity;
            // SAFETY: `at..at + len` lies inside the mapping's data area and
            // `from..from + len` inside `buf`; the two never overlap.
            unsafe {
                let ring = region.memory.base.add(at);
                let local = buf.as_mut_ptr().add(from);
                if send {
                    std::ptr::copy_nonoverlapping(local, ring, len);
                } else {
                    std::ptr::copy_nonoverlapping(ring, local, len);
                }
            }
        }
        if send {
            sent.fetch_add(size as u64, Ordering::Release);
        } else {
            received.fetch_add(size as u64, Ordering::Release);
            if buf.iter().any(|&b| b != mark) {
                return Err(format!("message {k} arrived damaged"));
            }
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    if !send {
        println!(
            "region: received {count} messages of {size} B in {secs:.3} s: {:.0} messages/s, {:.1} MiB/s",
            count as f64 / secs,
            (count * size) as f64 / secs / (1 << 20) as f64
        );
    }
    Ok(())
}

struct Region {
    device: String,
    memory: Bar,
    registers: Bar,
}

fn open() -> Result<Region, String> {
    let device = find_device()?;
    // Memory decoding on: no kernel driver is bound to the device.
    let _ = std::fs::write(format!("{device}/enable"), "1");
    let size = bar_size(&device, 2)?;
    Ok(Region {
        memory: Bar::map(&device, 2, size)?,
        registers: Bar::map(&device, 0, PAGE)?,
        device,
    })
}

fn number(text: Option<&String>, what: &str) -> Result<usize, String> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("{what}: expected a number"))
}

fn run(args: &[String]) -> Result<Result<(), String>, String> {
    let usage = "usage: region info | write OFFSET TEXT | read OFFSET LEN | ring PEER VECTOR | \
                 wait SECS | ping PEER COUNT | pong PEER COUNT | send COUNT SIZE | recv COUNT SIZE";
    let command = args.first().map(String::as_str).ok_or(usage)?;
    // Arguments first, so that a bad one is status 1 even without a device.
    let (a, b) = match command {
        "info" => (0, 0),
        "write" => (number(args.get(1), "OFFSET")?, 0),
        "read" | "ring" => (
            number(args.get(1), "first")?,
            number(args.get(2), "second")?,
        ),
        "wait" => (number(args.get(1), "SECS")?, 0),
        "ping" | "pong" | "send" | "recv" => (
            number(args.get(1), "first")?,
            number(args.get(2), "second")?,
        ),
        _ => return Err(usage.to_string()),
    };
    if command == "write" && args.get(2).is_none() {
        return Err("write: TEXT is missing".into());
    }
    let region = match open() {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    match command {
        "info" => println!(
            "region: {} size {} peer {}",
            region.device.rsplit('/').next().unwrap_or(""),
            region.memory.len,
            region.registers.read32(REG_IV_POSITION)
        ),
        "write" => {
            let text = args[2].as_bytes();
            if let Err(e) = region.memory.check(a, text.len()) {
                return Ok(Err(e));
            }
            for (i, byte) in text.iter().enumerate() {
                // SAFETY: checked above to lie inside the mapping.
                unsafe { std::ptr::write_volatile(region.memory.base.add(a + i), *byte) };
            }
            println!("region: wrote {} bytes at {a}", text.len());
        }
        "read" => {
            if let Err(e) = region.memory.check(a, b) {
                return Ok(Err(e));
            }
            let bytes: Vec<u8> = (0..b)
                // SAFETY: checked above to lie inside the mapping.
                .map(|i| unsafe { std::ptr::read_volatile(region.memory.base.add(a + i)) })
                .take_while(|&c| c != 0)
                .collect();
            println!("region: read {}", String::from_utf8_lossy(&bytes));
        }
        "wait" => {
            if let Err(e) = wait(&region, a as u64) {
                return Ok(Err(e));
            }
        }
        "ping" | "pong" => {
            if let Err(e) = ping_pong(&region, command == "ping", a as u32, b) {
                return Ok(Err(e));
            }
        }
        "send" | "recv" => {
            if let Err(e) = stream(&region, command == "send", a, b) {
                return Ok(Err(e));
            }
        }
        _ => {
            if a > 0xffff || b > 0xffff {
                return Err("ring: PEER and VECTOR are 0 to 65535".into());
            }
            region
                .registers
                .write32(REG_DOORBELL, ((a as u32) << 16) | b as u32);
            println!("region: rang peer {a} vector {b}");
        }
    }
    Ok(Ok(()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Err(e) => {
            eprintln!("region: {e}");
            std::process::exit(1);
        }
        Ok(Err(e)) => {
            eprintln!("region: {e}");
            std::process::exit(2);
        }
        Ok(Ok(())) => {}
    }
}
