//! Arbitrary guest memory and queue settings; every available chain walked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::queue(data);
});
