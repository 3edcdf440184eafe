//! The bzImage loader: setup header, kernel, initramfs and command line placed in guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::loader::fuzz_entry::bzimage(data);
});
