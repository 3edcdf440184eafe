//! virtio-console: guest output chains, receive buffers, host input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::console::fuzz_entry(data);
});
