//! An address bus: maps ranges of port or MMIO addresses to devices.
//!
//! A device sees only an offset into its own range and the bytes of the access.
//! Anything a device wants the VMM to do beyond the access itself (power off,
//! reset, exit with a status) it returns as a [`VmAction`].

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// What a device asks the VMM to do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    Reset,
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The guest's init reached a boot milestone (value written to the marker port).
    BootMarker(u8),
    /// The guest kernel reported a panic (pvpanic).
    Panicked,
}

/// A device that answers reads and writes within its own address range.
pub trait BusDevice: Send {
    /// Fills `data` with the bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes the bytes written at `offset`, and returns an action for the VMM if any.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction>;
}

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A range of length zero, or one that wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Maps non-overlapping address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    // Kept sorted by base address.
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self
            .entries
            .iter()
            .map(|e| format!("{:#x}+{:#x}", e.base, e.len))
            .collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` on the bus at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        let offset = addr - entry.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`. Returns false, leaving `data` as all ones
    /// (what an unclaimed bus reads as), when no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`. `None` in the outer option means no device
    /// claimed the access; writes to nowhere are dropped, as on real hardware.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<Option<VmAction>> {
        let (entry, offset) = self.find(addr, data.len())?;
        let action = lock(&entry.device).write(offset, data);
        Some(action)
    }
}

/// Answers a read of a one-byte register: `value` in the first byte, and all
/// ones in any wider part of the access, as an 8-bit ISA device reads.
pub fn fill_byte_register(data: &mut [u8], value: u8) {
    data.fill(0xff);
    if let Some(first) = data.first_mut() {
        *first = value;
    }
}

/// Locks a device, carrying on with the inner state if another thread panicked
/// while holding it: a device model keeps no invariant that a panic could break
/// halfway through an access that we would rather not serve.
pub fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
            self.last_write = Some((offset, data.to_vec()));
            None
        }
    }

    #[test]
    fn access_reaches_device_with_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert_eq!(bus.write(0x3fb, &[7]), Some(None));
        assert_eq!(dev.lock().unwrap().last_write, Some((3, vec![7])));
    }

    #[test]
    fn unclaimed_read_is_all_ones() {
        let bus = Bus::new();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x1234, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(bus.write(0x1234, &[1]), None);
    }

    #[test]
    fn access_straddling_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(0x60, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut data = [0u8; 2];
        assert!(!bus.read(0x60, &mut data));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x70, 2, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let err = bus
            .insert(0x71, 4, Arc::new(Mutex::new(Recorder::default())))
            .unwrap_err();
        assert_eq!(err, BusError::Overlap { base: 0x71, len: 4 });
        assert!(bus
            .insert(0, 0, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
    }
}
