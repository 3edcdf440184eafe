//! virtio-vsock: packets from the guest, receive buffers, host programs connecting.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::vsock::fuzz_entry(data);
});
