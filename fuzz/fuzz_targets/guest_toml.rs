//! The guest file parser, and the round trip through the writer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    config::fuzz_entry::guest_toml(data);
});
