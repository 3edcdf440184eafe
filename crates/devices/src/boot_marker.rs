//! The POST-code port (0x80), used as a boot-progress marker.
//!
//! Firmware writes POST codes here; the guest kit's init writes a byte at
//! each milestone, and the VMM gets it as [`VmAction::BootMarker`] so that
//! boot-time benchmarks need no serial parsing. Linux also uses port 0x80
//! for tiny I/O delays (`outb_p`); those writes arrive here too, which is
//! why the VMM, not this device, decides which values mean anything.
//! Reads return all ones, like an unclaimed port.

use crate::bus::{BusDevice, VmAction};

/// The boot-marker port.
#[derive(Debug, Default, Clone, Copy)]
pub struct BootMarker;

impl BootMarker {
    /// A new boot-marker device.
    pub fn new() -> Self {
        Self
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmAction> {
        data.first().map(|&b| VmAction::BootMarker(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_reports_the_marker_byte() {
        assert_eq!(
            BootMarker.write(0, &[0x42]),
            Some(VmAction::BootMarker(0x42))
        );
    }

    #[test]
    fn empty_write_reports_nothing() {
        assert_eq!(BootMarker.write(0, &[]), None);
    }
}
