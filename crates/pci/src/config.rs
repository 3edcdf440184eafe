//! A PCI function's type-0 configuration space: the 256 bytes the guest reads
//! and writes through 0xCF8/0xCFC or ECAM, with per-byte write masks, base
//! address registers and a capability list.
//!
//! Every register is plain bytes plus a mask of the bits the guest may change,
//! so read-only fields (ids, class, BAR type bits, capability headers) stay as
//! they were built whatever the guest writes. A BAR's size is encoded in its
//! mask: the low bits below the size are read-only zeros, which is exactly
//! what the sizing protocol (write all ones, read back) relies on.

use thiserror::Error;

/// Size of conventional configuration space. ECAM reads past it return 0.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Type-0 functions have six base address registers.
pub const NUM_BARS: usize = 6;

pub const REG_VENDOR_ID: usize = 0x00;
pub const REG_DEVICE_ID: usize = 0x02;
pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_REVISION: usize = 0x08;
pub const REG_CLASS: usize = 0x09;
pub const REG_HEADER_TYPE: usize = 0x0e;
pub const REG_BAR0: usize = 0x10;
pub const REG_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const REG_SUBSYSTEM_ID: usize = 0x2e;
pub const REG_CAPABILITIES: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;
pub const REG_INTERRUPT_PIN: usize = 0x3d;

/// Command register: memory space decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx assertion disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the function has a capability list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// BAR low bits: 64-bit memory BAR type.
const BAR_MEM64: u32 = 0b100;
/// BAR low bits: prefetchable memory.
const BAR_PREFETCHABLE: u32 = 0b1000;
/// Where the first capability goes, after the standard header.
const FIRST_CAPABILITY: usize = 0x40;

/// Errors from building a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The BAR index is out of range, or the register is already in use.
    #[error("BAR {0} is out of range or already used")]
    BarInUse(usize),
    /// A BAR's size must be a power of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two of at least 16")]
    BarSize(u64),
    /// The capabilities do not fit in configuration space.
    #[error("no room for a {0}-byte capability")]
    NoRoom(usize),
}

/// The kind of memory a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR, one register.
    Memory32,
    /// A 64-bit memory BAR, two registers.
    Memory64,
}

/// The identity of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface, as 0xCCSSPP.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// One function's configuration space.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    /// Registers taken by the upper half of a 64-bit BAR.
    upper_half: [bool; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    /// A type-0 header with the given ids and no BARs or capabilities. The
    /// command register's memory, bus-master and INTx-disable bits and the
    /// interrupt line are writable.
    pub fn new(ids: Ids) -> Self {
        let mut space = Self {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            upper_half: [false; NUM_BARS],
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
        };
        space.set_u16(REG_VENDOR_ID, ids.vendor);
        space.set_u16(REG_DEVICE_ID, ids.device);
        space.bytes[REG_REVISION] = ids.revision;
        space.bytes[REG_CLASS..REG_CLASS + 3].copy_from_slice(&ids.class.to_le_bytes()[..3]);
        space.set_u16(REG_SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        space.set_u16(REG_SUBSYSTEM_ID, ids.subsystem);
        let command_mask = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        space.wmask[REG_COMMAND..REG_COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        space.wmask[REG_INTERRUPT_LINE] = 0xff;
        space
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// The 16-bit register at `offset`.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// The 32-bit register at `offset`.
    pub fn u32_at(&self, offset: usize) -> u32 {
        let b = &self.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(REG_COMMAND)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the conventional
    /// space (extended space through ECAM) read as zero.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset`, changing only the writable bits. Writes
    /// past the conventional space are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let mask = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
    }

    /// Sets the interrupt pin (1 = INTA) the function uses.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.bytes[REG_INTERRUPT_PIN] = pin;
    }

    /// Sets the command register as firmware would, whatever the mask.
    pub fn set_command(&mut self, command: u16) {
        self.set_u16(REG_COMMAND, command);
    }

    /// Declares BAR `index` of `size` bytes (a power of two of 16 or more).
    /// A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let regs = if kind == BarKind::Memory64 { 2 } else { 1 };
        let free = |i: usize| i < NUM_BARS && self.bars[i].is_none() && !self.upper_half[i];
        if !(index..index + regs).all(free) {
            return Err(ConfigError::BarInUse(index));
        }
        if !size.is_power_of_two() || size < 16 || (kind == BarKind::Memory32 && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        let address_mask = !(size - 1);
        let offset = REG_BAR0 + 4 * index;
        let type_bits = if kind == BarKind::Memory64 {
            BAR_MEM64
        } else {
            0
        };
        self.set_u32(offset, type_bits);
        let low_mask = (address_mask as u32) & !0xf;
        self.wmask[offset..offset + 4].copy_from_slice(&low_mask.to_le_bytes());
        if kind == BarKind::Memory64 {
            let high_mask = (address_mask >> 32) as u32;
            self.wmask[offset + 4..offset + 8].copy_from_slice(&high_mask.to_le_bytes());
            self.upper_half[index + 1] = true;
        }
        self.bars[index] = Some(Bar { size, kind });
        Ok(())
    }

    /// Marks BAR `index` prefetchable (reads have no side effects; memory,
    /// not registers). Does nothing for an undeclared BAR.
    pub fn set_bar_prefetchable(&mut self, index: usize) {
        if self.bar_size(index).is_some() {
            let offset = REG_BAR0 + 4 * index;
            let low = self.u32_at(offset) | BAR_PREFETCHABLE;
            self.set_u32(offset, low);
        }
    }

    /// Programs BAR `index`'s address as firmware would.
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let offset = REG_BAR0 + 4 * index;
        let low = self.u32_at(offset) & 0xf;
        self.set_u32(offset, low | (address as u32 & !0xf));
        if bar.kind == BarKind::Memory64 {
            self.set_u32(offset + 4, (address >> 32) as u32);
        }
    }

    /// BAR `index`'s size, if it is declared.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bars.get(index).copied().flatten().map(|b| b.size)
    }

    /// The address BAR `index` holds, whether or not it decodes.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let offset = REG_BAR0 + 4 * index;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = match bar.kind {
            BarKind::Memory64 => u64::from(self.u32_at(offset + 4)) << 32,
            BarKind::Memory32 => 0,
        };
        Some(high | low)
    }

    /// The `(base, size)` BAR `index` decodes now: declared, memory decode
    /// on, and not the all-ones pattern of a sizing probe.
    pub fn decoded_bar(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let size = self.bar_size(index)?;
        let base = self.bar_address(index)?;
        (base != 0 && base.checked_add(size).is_some()).then_some((base, size))
    }

    /// Appends a capability. `body` starts with the capability id; its
    /// second byte (the next pointer) is filled in here. `wmask` gives the
    /// guest-writable bits of each body byte (shorter means read-only).
    /// Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let end = offset + body.len();
        if body.len() < 2 || end > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom(body.len()));
        }
        self.bytes[offset..end].copy_from_slice(body);
        self.bytes[offset + 1] = 0;
        for (i, &m) in wmask.iter().take(body.len()).enumerate() {
            self.wmask[offset + i] = m;
        }
        // The header (id, next) is never writable.
        self.wmask[offset] = 0;
        self.wmask[offset + 1] = 0;
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[REG_CAPABILITIES] = offset as u8;
                let status = self.u16_at(REG_STATUS) | STATUS_CAPABILITIES;
                self.set_u16(REG_STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(Ids {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_0000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    fn read32(s: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        s.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_read_back_and_are_read_only() {
        let mut s = space();
        assert_eq!(read32(&s, 0), 0x1044_1af4);
        s.write(0, &[0; 4]);
        assert_eq!(read32(&s, 0), 0x1044_1af4);
        assert_eq!(read32(&s, 8), 0xff00_0001);
    }

    #[test]
    fn bar_sizing_protocol_reports_the_size() {
        let mut s = space();
        s.add_bar(0, 0x4000, BarKind::Memory32).unwrap();
        s.write(REG_BAR0, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&s, REG_BAR0), 0xffff_c000);
        s.write(REG_BAR0, &0xc000_0000u32.to_le_bytes());
        assert_eq!(s.bar_address(0), Some(0xc000_0000));
    }

    #[test]
    fn bar64_keeps_type_bits_and_upper_half() {
        let mut s = space();
        s.add_bar(2, 0x1_0000, BarKind::Memory64).unwrap();
        s.write(REG_BAR0 + 8, &u32::MAX.to_le_bytes());
        s.write(REG_BAR0 + 12, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&s, REG_BAR0 + 8), 0xffff_0004);
        assert_eq!(read32(&s, REG_BAR0 + 12), 0xffff_ffff);
        s.write(REG_BAR0 + 8, &0x1234_0000u32.to_le_bytes());
        s.write(REG_BAR0 + 12, &0x1u32.to_le_bytes());
        assert_eq!(s.bar_address(2), Some(0x1_1234_0000));
        assert_eq!(
            s.add_bar(3, 16, BarKind::Memory32),
            Err(ConfigError::BarInUse(3))
        );
    }

    #[test]
    fn prefetchable_bit_survives_sizing_and_addressing() {
        let mut s = space();
        s.add_bar(2, 0x10_0000, BarKind::Memory64).unwrap();
        s.set_bar_prefetchable(2);
        s.set_bar_prefetchable(4);
        s.write(REG_BAR0 + 8, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&s, REG_BAR0 + 8), 0xfff0_000c);
        s.set_bar_address(2, 0xc020_0000);
        assert_eq!(read32(&s, REG_BAR0 + 8), 0xc020_000c);
        assert_eq!(s.bar_address(2), Some(0xc020_0000));
        assert_eq!(read32(&s, REG_BAR0 + 16), 0);
    }

    #[test]
    fn bad_bar_sizes_are_refused() {
        let mut s = space();
        assert_eq!(
            s.add_bar(0, 0x3000, BarKind::Memory32),
            Err(ConfigError::BarSize(0x3000))
        );
        assert_eq!(
            s.add_bar(0, 8, BarKind::Memory32),
            Err(ConfigError::BarSize(8))
        );
        assert_eq!(
            s.add_bar(5, 16, BarKind::Memory64),
            Err(ConfigError::BarInUse(5))
        );
    }

    #[test]
    fn bar_decodes_only_with_memory_enabled() {
        let mut s = space();
        s.add_bar(0, 0x1000, BarKind::Memory32).unwrap();
        s.set_bar_address(0, 0xc000_1000);
        assert_eq!(s.decoded_bar(0), None);
        s.write(REG_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(s.decoded_bar(0), Some((0xc000_1000, 0x1000)));
    }

    #[test]
    fn capabilities_are_chained() {
        let mut s = space();
        let a = s.add_capability(&[0x11, 0xee, 1, 2], &[0xff; 4]).unwrap();
        let b = s.add_capability(&[0x09, 0, 16, 1, 0, 0], &[]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(
            s.u16_at(REG_STATUS) & STATUS_CAPABILITIES,
            STATUS_CAPABILITIES
        );
        assert_eq!(s.bytes[REG_CAPABILITIES], 0x40);
        assert_eq!(s.bytes[0x41], 0x44);
        assert_eq!(s.bytes[0x45], 0);
        // The header stays read-only, the body follows its mask.
        s.write(0x40, &[0, 0, 9, 9]);
        assert_eq!(read32(&s, 0x40), 0x0909_4411);
    }

    #[test]
    fn extended_space_reads_zero_and_ignores_writes() {
        let mut s = space();
        s.write(0x100, &[1, 2, 3, 4]);
        assert_eq!(read32(&s, 0x100), 0);
        assert_eq!(read32(&s, 0xffc), 0);
    }
}
