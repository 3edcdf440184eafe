//! The 16550A UART: registers, console input, FIFO drains.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzz_entry::serial(data);
});
