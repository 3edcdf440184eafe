//! The PVH loader: an ELF kernel, its program headers and PVH note.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::loader::fuzz_entry::pvh(data);
});
