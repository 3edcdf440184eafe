//! PCI configuration space through 0xCF8/0xCFC and ECAM, BAR sizing and moves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pci::fuzz_entry::pci_config(data);
});
