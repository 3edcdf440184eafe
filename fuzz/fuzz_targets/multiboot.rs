//! The multiboot loader: header, ELF or a.out kludge image, modules, info structure.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm::loader::fuzz_entry::multiboot(data);
});
