//! The i8042 keyboard controller: commands, data, Ctrl+Alt+Del.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::fuzz_entry::i8042(data);
});
