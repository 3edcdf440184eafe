//! virtio-rng: request chains from the guest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::rng::fuzz_entry(data);
});
