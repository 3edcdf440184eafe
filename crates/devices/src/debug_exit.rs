//! An exit port compatible with QEMU's `isa-debug-exit` (iobase 0xf4, iosize 4).
//!
//! A write of value `v`, 1, 2 or 4 bytes wide and little-endian, anywhere in
//! the 4-byte range, asks the VMM to stop with [`VmAction::DebugExit`]`(v)`.
//! QEMU then exits with status `(v << 1) | 1`; the VMM decides how to map `v`.
//! Reads return zero, as QEMU's device does.

use crate::bus::{BusDevice, VmAction};

/// The debug-exit port.
#[derive(Debug, Default, Clone, Copy)]
pub struct DebugExit;

impl DebugExit {
    /// A new debug-exit device.
    pub fn new() -> Self {
        Self
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmAction> {
        let mut bytes = [0u8; 4];
        let len = data.len().min(bytes.len());
        bytes[..len].copy_from_slice(&data[..len]);
        Some(VmAction::DebugExit(u32::from_le_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_write_exits_with_value() {
        assert_eq!(DebugExit.write(0, &[0x31]), Some(VmAction::DebugExit(0x31)));
    }

    #[test]
    fn wide_writes_are_little_endian() {
        assert_eq!(
            DebugExit.write(0, &[0x34, 0x12]),
            Some(VmAction::DebugExit(0x1234))
        );
        assert_eq!(
            DebugExit.write(0, &0xdead_beef_u32.to_le_bytes()),
            Some(VmAction::DebugExit(0xdead_beef))
        );
    }

    #[test]
    fn reads_return_zero() {
        let mut data = [0xaa; 4];
        DebugExit.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
