//! One mostly well-formed virtio-blk request chain through the request parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::block(data);
});
