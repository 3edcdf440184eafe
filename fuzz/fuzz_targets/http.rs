//! The API socket's HTTP request parser (and the client's response parser).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    daemon::fuzz_entry::http(data);
});
