//! The CMOS RTC: index and data ports, a host clock that moves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzz_entry::rtc(data);
});
