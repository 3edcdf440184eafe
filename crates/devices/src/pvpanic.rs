//! pvpanic: a one-byte port through which the guest kernel reports a panic,
//! compatible with QEMU's ISA `pvpanic` device (ACPI id QEMU0001).
//!
//! Reading the port gives the events the device supports; writing the
//! "panicked" bit tells the VMM the guest has panicked.

use crate::bus::{BusDevice, VmAction};

/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel and will reboot into it.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port.
#[derive(Debug, Default)]
pub struct PvPanic;

impl PvPanic {
    /// A pvpanic device.
    pub fn new() -> Self {
        Self
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmAction> {
        // A crash kernel taking over is not the end of the guest: only a
        // plain panic stops the VM.
        match data.first() {
            Some(v) if v & PVPANIC_PANICKED != 0 => Some(VmAction::Panicked),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_its_features() {
        let mut data = [0u8; 1];
        PvPanic::new().read(0, &mut data);
        assert_eq!(data[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
    }

    #[test]
    fn panicked_bit_stops_the_vm_and_crash_loaded_does_not() {
        let mut dev = PvPanic::new();
        assert_eq!(dev.write(0, &[PVPANIC_PANICKED]), Some(VmAction::Panicked));
        assert_eq!(dev.write(0, &[PVPANIC_CRASH_LOADED]), None);
        assert_eq!(dev.write(0, &[]), None);
    }
}
