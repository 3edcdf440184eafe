//! The ACPI power-management timer: a free-running counter at 3.579545 MHz,
//! read through one 32-bit I/O register (PM_TMR_BLK in the FADT, port 0x608
//! on our machine).
//!
//! The counter is 32 bits wide (the FADT sets TMR_VAL_EXT) and wraps. Its
//! value is computed from a monotonic clock at each read, so it needs no
//! thread and never drifts from the host's time. The model is generic over
//! the clock so that tests drive it with a fake one.
//!
//! The timer never raises an event: TMR_STS (bit 0 of PM1 status) and the
//! SCI on counter overflow are not modelled, since guests use the timer as
//! a clock source and for calibration only. Writes are ignored. Reads of 1,
//! 2 or 4 bytes return the matching bytes of the current count.

use std::time::Instant;

use crate::bus::{BusDevice, VmAction};

/// The timer's frequency in Hz, fixed by the ACPI specification.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Bytes the timer decodes.
pub const PM_TIMER_LEN: u64 = 4;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A monotonic clock: nanoseconds since some fixed start.
pub trait MonotonicClock: Send {
    /// Nanoseconds since the clock's start; never goes backwards.
    fn elapsed_ns(&self) -> u64;
}

/// The host's monotonic clock, counted from when it was made.
#[derive(Debug, Clone, Copy)]
pub struct HostMonotonic(Instant);

impl HostMonotonic {
    /// A clock that reads 0 now.
    pub fn new() -> Self {
        Self(Instant::now())
    }
}

impl Default for HostMonotonic {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock for HostMonotonic {
    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The PM timer register over clock `C`.
#[derive(Debug)]
pub struct PmTimer<C: MonotonicClock = HostMonotonic> {
    clock: C,
}

impl PmTimer<HostMonotonic> {
    /// A timer on the host's monotonic clock, counting from 0 now.
    pub fn new() -> Self {
        Self::with_clock(HostMonotonic::new())
    }
}

impl Default for PmTimer<HostMonotonic> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: MonotonicClock> PmTimer<C> {
    /// A timer that reads `clock`.
    pub fn with_clock(clock: C) -> Self {
        Self { clock }
    }

    /// The counter now: ticks of 1/3.579545 MHz since the clock's start,
    /// modulo 2^32.
    pub fn count(&self) -> u32 {
        let ticks = u128::from(self.clock.elapsed_ns()) * u128::from(PM_TIMER_HZ) / NANOS_PER_SEC;
        ticks as u32
    }
}

impl<C: MonotonicClock> BusDevice for PmTimer<C> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let count = self.count().to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *byte = count.get(at).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmAction> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        fn set_ns(&self, ns: u64) {
            self.0.store(ns, Ordering::Relaxed);
        }
    }

    impl MonotonicClock for FakeClock {
        fn elapsed_ns(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn timer() -> (PmTimer<FakeClock>, FakeClock) {
        let clock = FakeClock::default();
        (PmTimer::with_clock(clock.clone()), clock)
    }

    fn read32(timer: &mut PmTimer<FakeClock>) -> u32 {
        let mut data = [0u8; 4];
        timer.read(0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn counts_3579545_ticks_per_second() {
        let (mut timer, clock) = timer();
        assert_eq!(read32(&mut timer), 0);
        clock.set_ns(1_000_000_000);
        assert_eq!(read32(&mut timer), 3_579_545);
        // One millisecond is 3579.545 ticks: the count truncates.
        clock.set_ns(1_000_000);
        assert_eq!(read32(&mut timer), 3_579);
    }

    #[test]
    fn wraps_at_32_bits() {
        let (mut timer, clock) = timer();
        // 2^32 ticks take about 1199.86 s; one second later the count
        // has wrapped to a small value.
        let wrap_ns = ((1u128 << 32) * NANOS_PER_SEC / u128::from(PM_TIMER_HZ)) as u64;
        clock.set_ns(wrap_ns + 1_000_000_000);
        let count = read32(&mut timer);
        assert!(
            (3_579_540..=3_579_550).contains(&count),
            "count after the wrap: {count}"
        );
    }

    #[test]
    fn narrow_reads_return_the_matching_bytes() {
        let (mut timer, clock) = timer();
        clock.set_ns(5_000_000_000); // 17_897_725 = 0x0111_18fd ticks
        let mut low = [0u8; 2];
        timer.read(0, &mut low);
        assert_eq!(u16::from_le_bytes(low), 0x18fd);
        let mut third = [0u8; 1];
        timer.read(2, &mut third);
        assert_eq!(third[0], 0x11);
    }

    #[test]
    fn writes_do_not_change_the_count() {
        let (mut timer, clock) = timer();
        clock.set_ns(2_000_000_000);
        assert_eq!(timer.write(0, &[0, 0, 0, 0]), None);
        assert_eq!(read32(&mut timer), 7_159_090);
    }

    #[test]
    fn host_clock_moves_forward() {
        let mut timer = PmTimer::new();
        let mut data = [0u8; 4];
        timer.read(0, &mut data);
        let first = u32::from_le_bytes(data);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.read(0, &mut data);
        assert!(u32::from_le_bytes(data).wrapping_sub(first) >= 7_000);
    }
}
