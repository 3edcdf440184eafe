//! The virtio-pci transport: common config, ISR, notify, device config, MSI-X table and PBA.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pci::fuzz_entry::virtio_pci(data);
});
