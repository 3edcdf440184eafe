//! Entry points for the fuzz targets in `fuzz/` (`rtc`, `i8042`, `serial`),
//! also called by the unit tests that replay `fuzz/regressions/`.
//!
//! Each entry turns the fuzzer's bytes into the register accesses a guest
//! makes (reads and writes of the sizes a vCPU exit carries, at offsets
//! inside and just past the device's ports), interleaved with what the host
//! side does (time passing, a key press, console input). None may panic,
//! whatever the bytes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{Clock, Rtc, Serial, I8042};

/// The fuzzer's bytes, read front to back; reads past the end give zeros
/// so every prefix of an input is itself a valid input.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte, or 0.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// The next `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let bytes = self.bytes(N);
        out[..bytes.len()].copy_from_slice(bytes);
        out
    }

    /// Up to `len` next bytes (fewer at the end).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(len.min(self.data.len()));
        self.data = tail;
        head
    }
}

/// The inputs a target's unit test replays: its seeds
/// (`fuzz/corpus/<target>/`) and every crash the fuzzer found and that was
/// fixed (`fuzz/regressions/<target>/`). Panics when there are none, so a
/// replay test cannot pass without running anything.
pub fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("listing fuzz inputs").path();
            let data = std::fs::read(&path).expect("reading a fuzz input");
            out.push((path, data));
        }
    }
    out.sort();
    assert!(
        !out.is_empty(),
        "no seeds or regressions for fuzz target {target}"
    );
    out
}

/// Access sizes a port or MMIO exit carries.
const SIZES: [usize; 4] = [1, 2, 4, 8];

/// One guest register access decoded from `op`: bit 0 says write, bits
/// 1-2 the size, and the next byte the offset (modulo `span`, which covers
/// a few offsets past the device's own registers). Returns the value read,
/// or `None` for a write.
fn access(dev: &mut dyn BusDevice, span: u64, op: u8, input: &mut Input) -> Option<u64> {
    let size = SIZES[usize::from(op >> 1) & 3];
    let offset = u64::from(input.u8()) % span;
    if op & 1 != 0 {
        let value = input.u64().to_le_bytes();
        dev.write(offset, &value[..size]);
        None
    } else {
        let mut data = [0u8; 8];
        dev.read(offset, &mut data[..size]);
        Some(u64::from_le_bytes(data))
    }
}

/// A clock the input sets and moves.
#[derive(Debug, Clone)]
struct FuzzClock(Arc<Mutex<Duration>>);

impl FuzzClock {
    fn set(&self, to: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = to;
    }

    fn get(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for FuzzClock {
    fn now(&self) -> Duration {
        self.get()
    }
}

/// The CMOS RTC on ports 0x70-0x71. Input: eight bytes of host time in
/// seconds since the epoch, then operations: low three bits 0-3 a register
/// access (see [`access`]), 4 the host clock moving forward by a 32-bit
/// count of microseconds, 5 the host clock jumping to a 64-bit count of
/// seconds (even far past any year the registers can show), 6-7 selecting
/// a register and reading it, the way a guest does.
pub fn rtc(data: &[u8]) {
    let mut input = Input::new(data);
    let clock = FuzzClock(Arc::new(Mutex::new(Duration::from_secs(input.u64()))));
    let mut rtc = Rtc::with_clock(Box::new(clock.clone()));
    while !input.is_empty() {
        let op = input.u8();
        match op & 7 {
            0..=3 => {
                let _ = access(&mut rtc, 4, op >> 3 << 1 | op & 1, &mut input);
            }
            4 => {
                let step = Duration::from_micros(u64::from(input.u32()));
                clock.set(clock.get().saturating_add(step));
            }
            5 => clock.set(Duration::from_secs(input.u64())),
            _ => {
                rtc.write(0, &[input.u8()]);
                let mut value = [0u8];
                rtc.read(1, &mut value);
            }
        }
    }
}

/// The i8042 keyboard controller on ports 0x60 and 0x64. Input:
/// operations whose low two bits pick a register access (0-1, see
/// [`access`]), a command byte written to port 0x64 followed by its data
/// byte on port 0x60 (2), or the host injecting Ctrl+Alt+Del (3).
pub fn i8042(data: &[u8]) {
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut dev = I8042::new(irq);
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        match op & 3 {
            0 | 1 => {
                let _ = access(&mut dev, 8, op >> 2 << 1 | op & 1, &mut input);
            }
            2 => {
                dev.write(4, &[input.u8()]);
                dev.write(0, &[input.u8()]);
            }
            _ => {
                let _ = dev.inject_ctrl_alt_del();
            }
        }
    }
}

/// The 16550A UART on ports 0x3f8-0x3ff. Input: operations whose low two
/// bits pick a register access (0-1, see [`access`]; offsets up to 16 so
/// multi-byte accesses run past the last register), the host typing up to
/// 64 bytes of console input (2), or the guest draining the receive FIFO
/// through the line status and data registers (3).
pub fn serial(data: &[u8]) {
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut dev = Serial::new(irq, Box::new(io::sink()));
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        match op & 3 {
            0 | 1 => {
                let _ = access(&mut dev, 16, op >> 2 << 1 | op & 1, &mut input);
            }
            2 => {
                let len = usize::from(input.u8() % 64);
                let typed = input.bytes(len);
                let _ = dev.enqueue_raw_bytes(typed);
            }
            _ => {
                for _ in 0..=dev.fifo_capacity() {
                    let mut lsr = [0u8];
                    dev.read(5, &mut lsr);
                    if lsr[0] & 1 == 0 {
                        break;
                    }
                    dev.read(0, &mut [0u8]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtc_seeds_and_regressions_replay() {
        for (_, data) in seeds("rtc") {
            rtc(&data);
        }
    }

    #[test]
    fn i8042_seeds_and_regressions_replay() {
        for (_, data) in seeds("i8042") {
            i8042(&data);
        }
    }

    #[test]
    fn serial_seeds_and_regressions_replay() {
        for (_, data) in seeds("serial") {
            serial(&data);
        }
    }

    #[test]
    fn input_pads_with_zeros_past_the_end() {
        let mut input = Input::new(&[1, 2, 3]);
        assert_eq!(input.u16(), 0x0201);
        assert_eq!(input.u32(), 3);
        assert!(input.is_empty());
        assert_eq!(input.u64(), 0);
    }

    #[test]
    fn access_reads_what_the_device_shows() {
        // Select the RTC's register 0x0d (status D: valid RAM and time)
        // and read it through a one-byte access.
        let clock = FuzzClock(Arc::new(Mutex::new(Duration::ZERO)));
        let mut rtc = Rtc::with_clock(Box::new(clock));
        let mut write = Input::new(&[0, 0x0d]);
        assert_eq!(access(&mut rtc, 4, 1, &mut write), None);
        let mut read = Input::new(&[1]);
        assert_eq!(access(&mut rtc, 4, 0, &mut read), Some(0x80));
    }
}
