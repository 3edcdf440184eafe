//! SMBIOS (DMI) tables: what the guest's `dmidecode` and
//! `/sys/class/dmi/id/*` report about the machine.
//!
//! The tables live in the BIOS area at [`SMBIOS_START`] (0xF0000), where a
//! guest without EFI scans for them on 16-byte boundaries. Two entry points
//! come first: the SMBIOS 3.0 64-bit one (`_SM3_`), which Linux prefers, and
//! a 2.8 32-bit one (`_SM_` with its `_DMI_` part) for older tools; both
//! point at the same structure table after them.
//!
//! The structures:
//! - type 0, BIOS: vendor "Ferrovisor", version the VMM's version, and the
//!   "this is a virtual machine" characteristic;
//! - type 1, system: manufacturer "Ferrovisor", product "Ferrovisor VM",
//!   version, serial number (the UUID's first group), the guest's UUID, and
//!   family "Virtual Machine";
//! - type 3, chassis: manufacturer "Ferrovisor", type "other";
//! - type 32, system boot: no errors;
//! - type 127, end of table.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout::{SMBIOS_SIZE, SMBIOS_START};

/// The manufacturer and BIOS vendor the guest sees.
pub const VENDOR: &str = "Ferrovisor";
/// The system's product name.
pub const PRODUCT: &str = "Ferrovisor VM";
/// The system's family.
pub const FAMILY: &str = "Virtual Machine";
/// The version in the BIOS and system structures.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The SMBIOS version the structures follow (3.0 entry point, 2.8 layout).
const SMBIOS_MAJOR: u8 = 3;
const SMBIOS_MINOR: u8 = 0;
const LEGACY_MAJOR: u8 = 2;
const LEGACY_MINOR: u8 = 8;
const EP3_LEN: usize = 0x18;
const EP2_LEN: usize = 0x1f;
/// Where the 32-bit entry point and the structure table start, relative to
/// [`SMBIOS_START`] (both 16-byte aligned).
const EP2_OFFSET: u64 = 0x20;
const TABLE_OFFSET: u64 = 0x40;

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_CHASSIS: u8 = 3;
const TYPE_BOOT: u8 = 32;
const TYPE_END: u8 = 127;

/// BIOS characteristics: "BIOS characteristics are not supported" (bit 3),
/// as a VM firmware says; extension byte 2 bit 4: a virtual machine.
const BIOS_CHARACTERISTICS: u64 = 1 << 3;
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// The segment of the (notional) BIOS image and its size in 64 KiB units
/// minus one.
const BIOS_SEGMENT: u16 = 0xe800;
const WAKE_UP_POWER_SWITCH: u8 = 6;
const CHASSIS_OTHER: u8 = 1;
const CHASSIS_STATE_SAFE: u8 = 3;
const CHASSIS_SECURITY_UNKNOWN: u8 = 2;

/// Errors from writing the SMBIOS tables.
#[derive(Debug, Error)]
pub enum SmbiosError {
    /// The tables outgrew their area of the BIOS region.
    #[error("SMBIOS tables of {len} bytes do not fit in {size:#x} bytes at {start:#x}")]
    OutOfSpace { len: usize, start: u64, size: u64 },
    /// Guest memory does not cover the SMBIOS area.
    #[error("failed to write the SMBIOS tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Errors from making a UUID.
#[derive(Debug, Error)]
pub enum UuidError {
    /// Text that is not a UUID.
    #[error("'{0}' is not a UUID (example: 123e4567-e89b-42d3-a456-426614174000)")]
    Parse(String),
    /// The host's random source failed.
    #[error("cannot read random bytes for a UUID")]
    Random(#[source] std::io::Error),
}

/// A UUID, in the order of its canonical text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random (version 4, RFC 9562 variant) UUID from the host's
    /// `getrandom`.
    pub fn random() -> Result<Self, UuidError> {
        let mut bytes = [0u8; 16];
        let mut filled = 0;
        while filled < bytes.len() {
            let rest = &mut bytes[filled..];
            // SAFETY: the pointer and length describe `rest`, which is
            // writable and lives across the call.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(UuidError::Random(err));
            }
            filled += n as usize;
        }
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Ok(Self(bytes))
    }

    /// The first group of the text form (8 hex digits), used as the
    /// system's serial number.
    pub fn first_group(&self) -> String {
        self.to_string()[..8].to_string()
    }

    /// The SMBIOS 2.6+ wire order: the first three fields little-endian.
    fn smbios_bytes(&self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }
}

impl FromStr for Uuid {
    type Err = UuidError;

    /// Parses the canonical form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
    /// (either case).
    fn from_str(text: &str) -> Result<Self, UuidError> {
        let bad = || UuidError::Parse(text.to_string());
        let groups: Vec<&str> = text.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What the tables say about this guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmbiosInfo {
    /// The system UUID (`product_uuid`).
    pub uuid: Uuid,
}

/// One structure: formatted area, then its strings.
struct Structure {
    bytes: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    /// A structure of `kind` with handle `handle`; the length is set when
    /// it is finished.
    fn new(kind: u8, handle: u16) -> Self {
        let mut bytes = vec![kind, 0];
        bytes.extend_from_slice(&handle.to_le_bytes());
        Self {
            bytes,
            strings: Vec::new(),
        }
    }

    fn byte(mut self, value: u8) -> Self {
        self.bytes.push(value);
        self
    }

    fn raw(mut self, value: &[u8]) -> Self {
        self.bytes.extend_from_slice(value);
        self
    }

    /// A string field: its number (1-based) in the string set.
    fn string(mut self, text: &str) -> Self {
        self.strings.push(text.to_string());
        let number = self.strings.len() as u8;
        self.byte(number)
    }

    /// The formatted area (with its length set), the strings, and the
    /// double NUL that ends the structure.
    fn finish(mut self) -> Vec<u8> {
        self.bytes[1] = self.bytes.len() as u8;
        let mut out = self.bytes;
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        if self.strings.is_empty() {
            out.push(0);
        }
        out.push(0);
        out
    }
}

fn bios() -> Vec<u8> {
    Structure::new(TYPE_BIOS, 0)
        .string(VENDOR)
        .string(VERSION)
        .raw(&BIOS_SEGMENT.to_le_bytes())
        .byte(0) // release date: none
        .byte(0) // ROM size: 64 KiB
        .raw(&BIOS_CHARACTERISTICS.to_le_bytes())
        .byte(0)
        .byte(BIOS_EXT2_VIRTUAL_MACHINE)
        .raw(&[0, 0]) // BIOS release 0.0
        .raw(&[0xff, 0xff]) // no embedded controller
        .finish()
}

fn system(info: &SmbiosInfo) -> Vec<u8> {
    Structure::new(TYPE_SYSTEM, 1)
        .string(VENDOR)
        .string(PRODUCT)
        .string(VERSION)
        .string(&info.uuid.first_group())
        .raw(&info.uuid.smbios_bytes())
        .byte(WAKE_UP_POWER_SWITCH)
        .byte(0) // SKU: none
        .string(FAMILY)
        .finish()
}

fn chassis() -> Vec<u8> {
    Structure::new(TYPE_CHASSIS, 3)
        .string(VENDOR)
        .byte(CHASSIS_OTHER)
        .raw(&[0, 0, 0]) // version, serial, asset tag: none
        .raw(&[CHASSIS_STATE_SAFE; 3]) // boot-up, power supply, thermal
        .byte(CHASSIS_SECURITY_UNKNOWN)
        .raw(&[0; 4]) // OEM-defined
        .raw(&[0, 0]) // height, power cords: unspecified
        .raw(&[0, 0]) // no contained elements
        .byte(0) // SKU: none
        .finish()
}

fn boot() -> Vec<u8> {
    Structure::new(TYPE_BOOT, 32)
        .raw(&[0; 6])
        .byte(0) // no errors detected
        .finish()
}

fn end() -> Vec<u8> {
    Structure::new(TYPE_END, 127).finish()
}

/// Makes the bytes sum to zero by setting `bytes[at]`.
fn set_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    bytes[at] = 0u8.wrapping_sub(sum);
}

fn entry_point_3(table_addr: u64, table_len: usize) -> Vec<u8> {
    let mut ep = Vec::with_capacity(EP3_LEN);
    ep.extend_from_slice(b"_SM3_");
    ep.push(0); // checksum
    ep.push(EP3_LEN as u8);
    ep.extend_from_slice(&[SMBIOS_MAJOR, SMBIOS_MINOR, 0]); // docrev 0
    ep.push(1); // entry point revision: 3.0
    ep.push(0);
    ep.extend_from_slice(&(table_len as u32).to_le_bytes());
    ep.extend_from_slice(&table_addr.to_le_bytes());
    set_checksum(&mut ep, 5);
    ep
}

fn entry_point_2(table_addr: u64, table: &[u8], count: u16, largest: usize) -> Vec<u8> {
    let mut ep = Vec::with_capacity(EP2_LEN);
    ep.extend_from_slice(b"_SM_");
    ep.push(0); // checksum
    ep.push(EP2_LEN as u8);
    ep.extend_from_slice(&[LEGACY_MAJOR, LEGACY_MINOR]);
    ep.extend_from_slice(&(largest as u16).to_le_bytes());
    ep.extend_from_slice(&[0; 6]); // entry point revision 0, formatted area
    ep.extend_from_slice(b"_DMI_");
    ep.push(0); // intermediate checksum
    ep.extend_from_slice(&(table.len() as u16).to_le_bytes());
    ep.extend_from_slice(&(table_addr as u32).to_le_bytes());
    ep.extend_from_slice(&count.to_le_bytes());
    ep.push((LEGACY_MAJOR << 4) | LEGACY_MINOR);
    set_checksum(&mut ep[0x10..], 5);
    set_checksum(&mut ep, 4);
    ep
}

/// Writes the SMBIOS entry points and structures for `info` into `mem` at
/// [`SMBIOS_START`], and returns the 3.0 entry point's address.
pub fn create_smbios_tables<M: GuestMemory>(
    mem: &M,
    info: &SmbiosInfo,
) -> Result<GuestAddress, SmbiosError> {
    let structures = [bios(), system(info), chassis(), boot(), end()];
    let largest = structures.iter().map(Vec::len).max().unwrap_or(0);
    let table: Vec<u8> = structures.concat();
    let table_addr = SMBIOS_START + TABLE_OFFSET;
    if TABLE_OFFSET + table.len() as u64 > SMBIOS_SIZE {
        return Err(SmbiosError::OutOfSpace {
            len: table.len(),
            start: SMBIOS_START,
            size: SMBIOS_SIZE,
        });
    }
    let ep3 = entry_point_3(table_addr, table.len());
    let ep2 = entry_point_2(table_addr, &table, structures.len() as u16, largest);
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(SmbiosError::Write)
    };
    write(&ep3, SMBIOS_START)?;
    write(&ep2, SMBIOS_START + EP2_OFFSET)?;
    write(&table, table_addr)?;
    Ok(GuestAddress(SMBIOS_START))
}

#[cfg(test)]
mod tests;
