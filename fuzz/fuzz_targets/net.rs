//! Fuzzes virtio-net's transmit path: descriptor chains from the guest,
//! request lengths and virtio-net headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::net::fuzz_tx(data);
});
