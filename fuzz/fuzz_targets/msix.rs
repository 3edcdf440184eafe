//! One MSI-X table: entries, control word, PBA, vectors raised.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pci::fuzz_entry::msix(data);
});
