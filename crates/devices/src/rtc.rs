//! The CMOS real-time clock and NVRAM (an MC146818 at ports 0x70/0x71).
//!
//! Port 0x70 selects a register (its top bit is the NMI mask, which we
//! ignore); port 0x71 reads or writes it. The clock reports the host's wall
//! clock in UTC, plus an offset that the guest sets by writing the time.
//! Register B chooses BCD or binary and 12- or 24-hour format, as on the
//! real chip; register 0x32 holds the century, which the FADT points at.
//!
//! # Why the update-in-progress bit matters for boot time
//!
//! Before Linux's `rtc_cmos` driver registers the clock it calls
//! `mc146818_does_rtc_work()`, which polls register A until the
//! update-in-progress (UIP) bit reads clear, with `udelay(100)` between
//! polls, for up to 1000 ms (10,000 rounds), and fails the probe after that.
//! Every round is several port exits. When UIP never clears, as with a
//! missing RTC whose ports read 0xff, or a model that holds UIP for a long
//! time, the probe spins through all 10,000 rounds: about a second on real
//! hardware and around ten seconds when every exit costs 100 µs or more, as
//! under nested emulation. The same loop guards every later time read.
//!
//! The real chip sets UIP only for the 244 µs before each once-a-second
//! update. This model does the same and nothing more: it keeps no update
//! cycle of its own (the time is computed from the host clock on every
//! read, so there is no window in which the registers are inconsistent), and
//! UIP is set only while the guest clock is in the last 244 µs of a second.
//! The probe's first poll therefore sees UIP clear with probability above
//! 99.9%, and a rare unlucky poll costs one 100 µs retry. Keeping the short
//! real-time window, rather than never setting UIP, keeps software that
//! waits for the UIP edge to find the start of a second working.
//! UIP always reads clear while the clock is frozen for setting (register
//! B's SET bit), as on the chip.
//!
//! Not modelled: alarm, periodic and update interrupts (IRQ 8 is never
//! raised; the alarm registers are plain storage), daylight-saving
//! adjustment, and stopping the clock through register A's divider bits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::bus::{fill_byte_register, BusDevice, VmAction};

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
const INDEX_MASK: u8 = 0x7f;

// Register indices.
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century register (the FADT's CENTURY field points here).
pub const REG_CENTURY: u8 = 0x32;

// Register A: update in progress, divider (32.768 kHz time base), rate.
const REG_A_UIP: u8 = 0x80;
const REG_A_DIVIDER_MASK: u8 = 0x70;
const REG_A_DIVIDER_NORMAL: u8 = 0x20;
const REG_A_INITIAL: u8 = REG_A_DIVIDER_NORMAL | 0x06;

// Register B.
const REG_B_SET: u8 = 0x80;
const REG_B_UPDATE_INT: u8 = 0x10;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24_HOUR: u8 = 0x02;
/// 24-hour BCD, all interrupts off: what Linux's probe requires and firmware leaves.
const REG_B_INITIAL: u8 = REG_B_24_HOUR;

// Register D: the battery is good and the RAM valid.
const REG_D_VALID_RAM: u8 = 0x80;

const HOUR_PM: u8 = 0x80;

/// How long before each second's update the chip raises UIP: 8 cycles of
/// its 32.768 kHz time base (244 µs).
pub const UIP_WINDOW: Duration = Duration::from_nanos(8 * 1_000_000_000 / 32_768);

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// Where the RTC gets the current time.
pub trait Clock: Send {
    /// The time since the Unix epoch, in UTC.
    fn now(&self) -> Duration;
}

/// The host's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        // A host clock set before 1970 reads as the epoch.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A broken-down UTC date and time, as the RTC's registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let of_day = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
        }
    }

    /// Seconds since the epoch; wide enough for any year the registers
    /// can come to show, even from a host clock set absurdly far ahead.
    fn to_unix(self) -> i128 {
        let days = i128::from(days_from_civil(self.year, self.month, self.day));
        days * 86_400
            + i128::from(self.hour) * 3600
            + i128::from(self.minute) * 60
            + i128::from(self.second)
    }

    /// Day of the week, 0 = Sunday.
    fn weekday(self) -> u8 {
        // 1970-01-01 was a Thursday.
        (days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) as u8
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    // Count from 0000-03-01 so that the leap day ends each 4-year cycle.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u8, day as u8)
}

/// The inverse of [`civil_from_days`]; out-of-range days roll over.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

fn from_bcd(value: u8) -> u8 {
    (value >> 4) * 10 + (value & 0x0f)
}

/// The MC146818 RTC and its 128 bytes of CMOS memory.
pub struct Rtc {
    index: u8,
    /// CMOS memory; the clock, status and century registers live elsewhere.
    cmos: [u8; 128],
    reg_a: u8,
    reg_b: u8,
    /// Guest time minus host time, in nanoseconds.
    offset_ns: i128,
    /// The time being set while register B's SET bit is on.
    frozen: Option<DateTime>,
    clock: Box<dyn Clock>,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc")
            .field("index", &self.index)
            .field("reg_a", &self.reg_a)
            .field("reg_b", &self.reg_b)
            .field("offset_ns", &self.offset_ns)
            .field("frozen", &self.frozen)
            .finish_non_exhaustive()
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC that follows the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemClock))
    }

    /// An RTC that reads the time from `clock`.
    pub fn with_clock(clock: Box<dyn Clock>) -> Self {
        Self {
            index: 0,
            cmos: [0; 128],
            reg_a: REG_A_INITIAL,
            reg_b: REG_B_INITIAL,
            offset_ns: 0,
            frozen: None,
            clock,
        }
    }

    fn guest_now_ns(&self) -> i128 {
        self.clock.now().as_nanos() as i128 + self.offset_ns
    }

    /// The time the registers show now.
    fn current(&self) -> DateTime {
        self.frozen.unwrap_or_else(|| {
            let secs = self.guest_now_ns().div_euclid(NANOS_PER_SEC);
            DateTime::from_unix(secs.clamp(i64::MIN.into(), i64::MAX.into()) as i64)
        })
    }

    /// Makes the guest clock read `time` from this instant on.
    fn set_time(&mut self, time: DateTime) {
        let host_ns = self.clock.now().as_nanos() as i128;
        self.offset_ns = time.to_unix() * NANOS_PER_SEC - host_ns;
    }

    fn update_in_progress(&self) -> bool {
        let running =
            self.reg_b & REG_B_SET == 0 && self.reg_a & REG_A_DIVIDER_MASK == REG_A_DIVIDER_NORMAL;
        let into_second = self.guest_now_ns().rem_euclid(NANOS_PER_SEC);
        running && into_second >= NANOS_PER_SEC - UIP_WINDOW.as_nanos() as i128
    }

    fn encode(&self, value: u8) -> u8 {
        if self.reg_b & REG_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.reg_b & REG_B_BINARY != 0 {
            value
        } else {
            from_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b & REG_B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.reg_b & REG_B_24_HOUR != 0 {
            return self.decode(value) % 24;
        }
        let twelve = self.decode(value & !HOUR_PM) % 12;
        if value & HOUR_PM != 0 {
            twelve + 12
        } else {
            twelve
        }
    }

    fn read_register(&self, index: u8) -> u8 {
        let now = self.current();
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode(now.weekday() + 1),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode(now.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(now.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A if self.update_in_progress() => self.reg_a | REG_A_UIP,
            REG_A => self.reg_a,
            REG_B => self.reg_b,
            // No interrupt sources are modelled, so no flag is ever pending.
            REG_C => 0,
            REG_D => REG_D_VALID_RAM,
            _ => self.cmos[usize::from(index)],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.write_time_field(index, value),
            // The weekday follows from the date.
            REG_WEEKDAY => {}
            REG_A => self.reg_a = value & !REG_A_UIP,
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => {}
            _ => self.cmos[usize::from(index)] = value,
        }
    }

    fn write_time_field(&mut self, index: u8, value: u8) {
        let mut time = self.current();
        let field = self.decode(value);
        match index {
            REG_SECONDS => time.second = field.min(59),
            REG_MINUTES => time.minute = field.min(59),
            REG_HOURS => time.hour = self.decode_hour(value),
            REG_DAY => time.day = field.clamp(1, 31),
            REG_MONTH => time.month = field.clamp(1, 12),
            REG_YEAR => time.year = time.year.div_euclid(100) * 100 + i64::from(field % 100),
            REG_CENTURY => time.year = i64::from(field) * 100 + time.year.rem_euclid(100),
            _ => return,
        }
        if self.frozen.is_some() {
            self.frozen = Some(time);
        } else {
            self.set_time(time);
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let was_set = self.reg_b & REG_B_SET != 0;
        let set = value & REG_B_SET != 0;
        if set && !was_set {
            // Freeze the registers so the guest can write a consistent time.
            self.frozen = Some(self.current());
        } else if !set && was_set {
            if let Some(time) = self.frozen.take() {
                self.set_time(time);
            }
        }
        // Setting SET clears the update-ended interrupt enable on the chip.
        self.reg_b = if set {
            value & !REG_B_UPDATE_INT
        } else {
            value
        };
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            // The index register is write-only.
            INDEX_OFFSET => 0xff,
            DATA_OFFSET => self.read_register(self.index),
            _ => 0xff,
        };
        fill_byte_register(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        let &value = data.first()?;
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const LEAP_DAY_AFTERNOON: u64 = 1_709_214_307;

    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<Duration>>);

    impl FakeClock {
        fn at(secs: u64) -> Self {
            Self(Arc::new(Mutex::new(Duration::from_secs(secs))))
        }
        fn set(&self, time: Duration) {
            *self.0.lock().unwrap() = time;
        }
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    fn rtc_at(secs: u64) -> (Rtc, FakeClock) {
        let clock = FakeClock::at(secs);
        (Rtc::with_clock(Box::new(clock.clone())), clock)
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[index]);
        let mut data = [0u8];
        rtc.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(INDEX_OFFSET, &[index]);
        rtc.write(DATA_OFFSET, &[value]);
    }

    /// (year, month, day, hour, minute, second) read the way Linux does.
    fn read_time(rtc: &mut Rtc) -> [u8; 7] {
        [
            REG_CENTURY,
            REG_YEAR,
            REG_MONTH,
            REG_DAY,
            REG_HOURS,
            REG_MINUTES,
            REG_SECONDS,
        ]
        .map(|reg| read(rtc, reg))
    }

    #[test]
    fn time_reads_in_bcd_by_default() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        assert_eq!(
            read_time(&mut rtc),
            [0x20, 0x24, 0x02, 0x29, 0x13, 0x45, 0x07]
        );
        assert_eq!(read(&mut rtc, REG_WEEKDAY), 5, "Thursday is day 5");
    }

    #[test]
    fn time_reads_in_binary_when_selected() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_BINARY);
        assert_eq!(read_time(&mut rtc), [20, 24, 2, 29, 13, 45, 7]);
    }

    #[test]
    fn hours_read_in_12_hour_format_when_selected() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 0x01);
    }

    #[test]
    fn time_follows_the_host_clock() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        clock.advance(Duration::from_secs(60));
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x46);
    }

    #[test]
    fn guest_set_time_is_kept_as_an_offset() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        // What Linux's mc146818_set_time does: SET, write fields, clear SET.
        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_SET);
        for (reg, value) in [
            (REG_YEAR, 0x99),
            (REG_MONTH, 0x12),
            (REG_DAY, 0x31),
            (REG_HOURS, 0x23),
            (REG_MINUTES, 0x59),
            (REG_SECONDS, 0x58),
            (REG_CENTURY, 0x19),
        ] {
            write(&mut rtc, reg, value);
        }
        write(&mut rtc, REG_B, REG_B_24_HOUR);
        assert_eq!(
            read_time(&mut rtc),
            [0x19, 0x99, 0x12, 0x31, 0x23, 0x59, 0x58]
        );
        // The guest's clock keeps ticking from the time it set.
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            read_time(&mut rtc),
            [0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00]
        );
    }

    #[test]
    fn clock_is_frozen_while_set_bit_is_on() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_SET);
        clock.advance(Duration::from_secs(5));
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x07);
    }

    #[test]
    fn single_field_write_without_set_takes_effect_at_once() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        write(&mut rtc, REG_MINUTES, 0x10);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x10);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x13);
    }

    #[test]
    fn uip_is_clear_for_most_of_each_second() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
        clock.set(Duration::new(LEAP_DAY_AFTERNOON, 999_000_000));
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
    }

    #[test]
    fn uip_is_set_only_in_the_last_244_microseconds() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        clock.set(Duration::new(LEAP_DAY_AFTERNOON, 999_800_000));
        assert_ne!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
        // Past the update the bit is clear again and the second has ticked.
        clock.advance(Duration::from_micros(300));
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x08);
    }

    #[test]
    fn uip_is_clear_while_clock_is_being_set() {
        let (mut rtc, clock) = rtc_at(LEAP_DAY_AFTERNOON);
        clock.set(Duration::new(LEAP_DAY_AFTERNOON, 999_900_000));
        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_SET);
        assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
    }

    #[test]
    fn status_registers_satisfy_linux_probe() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VALID_RAM);
        assert_ne!(read(&mut rtc, REG_B) & REG_B_24_HOUR, 0);
        assert_eq!(read(&mut rtc, REG_C), 0);
    }

    #[test]
    fn cmos_memory_keeps_bytes_and_ignores_nmi_bit() {
        let (mut rtc, _clock) = rtc_at(LEAP_DAY_AFTERNOON);
        write(&mut rtc, 0x80 | 0x40, 0xa5);
        assert_eq!(read(&mut rtc, 0x40), 0xa5);
    }

    #[test]
    fn date_conversion_round_trips() {
        // The extremes: a host clock set absurdly far ahead or behind.
        for secs in [0, 951_782_400, 4_107_542_399, -86_400, i64::MAX, i64::MIN] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), i128::from(secs));
        }
        let leap = DateTime::from_unix(951_782_400);
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }
}
