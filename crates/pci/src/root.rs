//! The PCI root complex: bus 0, a host bridge at 00:00.0, and one function per
//! device slot. Configuration space is reached through the legacy port pair
//! 0xCF8/0xCFC ([`PciConfigIo`]) and through ECAM ([`PciConfigMmio`]); BARs
//! through [`PciMmioWindow`], one bus device that covers the MMIO windows and
//! finds the BAR that decodes each address.
//!
//! BARs are assigned at build time as firmware would (memory decode on), so
//! that an OS that keeps firmware assignments finds them ready. When the
//! guest writes a BAR or the command register, the root recomputes where each
//! BAR decodes and tells the function ([`PciFunction::bar_moved`]), which then
//! moves whatever hangs off that address (its ioeventfds).

use std::sync::{Arc, Mutex, MutexGuard};

use devices::{BusDevice, VmAction};
use thiserror::Error;

use crate::config::{self, ConfigSpace, Ids, NUM_BARS};

/// Device slots on bus 0 (slot 0 is the host bridge).
pub const SLOTS: usize = 32;
/// The host bridge's ids: Red Hat's generic PCIe host bridge, which no OS
/// driver binds to or quirks.
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code of a host bridge.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// The enable bit of the 0xCF8 address register.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Errors from building the PCI bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RootError {
    /// Every slot on bus 0 is taken.
    #[error("no free PCI slot: bus 0 holds at most {} devices", SLOTS - 1)]
    NoSlot,
    /// The MMIO window cannot hold another BAR.
    #[error("the PCI MMIO window has no room for a {size:#x}-byte BAR")]
    NoRoom { size: u64 },
}

/// A function on the bus, as the root complex sees it.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Its configuration space, for writes.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// Called after the guest wrote `len` bytes of configuration space at
    /// `offset`, so that the function can act on control bits (MSI-X).
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    /// Reads `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` stopped decoding at `old` and now decodes at `new`.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
    /// Status register bits whose state lives outside configuration space
    /// (the INTx status bit of an interrupt raised off the vCPU path), ORed
    /// in on every read.
    fn dynamic_status(&self) -> u16 {
        0
    }
}

/// ORs `bits` into the status register's bytes among `data`, read at
/// `offset` of configuration space.
fn or_status(offset: usize, data: &mut [u8], bits: u16) {
    for (i, byte) in data.iter_mut().enumerate() {
        match offset + i {
            o if o == config::REG_STATUS => *byte |= bits as u8,
            o if o == config::REG_STATUS + 1 => *byte |= (bits >> 8) as u8,
            _ => {}
        }
    }
}

/// The host bridge at 00:00.0: ids and nothing else.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(Ids {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                revision: 0,
                class: CLASS_HOST_BRIDGE,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Where one BAR decodes now.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    base: u64,
    size: u64,
    slot: usize,
    bar: usize,
}

/// Bus 0 and its functions.
pub struct PciRoot {
    slots: Vec<Option<Box<dyn PciFunction>>>,
    /// Where each slot's BARs decode, as last told to the function.
    decoded: Vec<[Option<u64>; NUM_BARS]>,
    mappings: Vec<Mapping>,
    /// MMIO windows `(base, size)` BARs may decode in.
    windows: Vec<(u64, u64)>,
    /// Next free address in the first window, for build-time assignment.
    next_free: u64,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used: Vec<usize> = (0..SLOTS).filter(|&s| self.slots[s].is_some()).collect();
        f.debug_struct("PciRoot")
            .field("slots", &used)
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// A bus with the host bridge at slot 0 whose BARs may decode inside
    /// `windows`; build-time assignments come from the first window.
    pub fn new(windows: Vec<(u64, u64)>) -> Self {
        let mut slots: Vec<Option<Box<dyn PciFunction>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Box::new(HostBridge::new()));
        let next_free = windows.first().map_or(0, |w| w.0);
        Self {
            slots,
            decoded: vec![[None; NUM_BARS]; SLOTS],
            mappings: Vec::new(),
            windows,
            next_free,
        }
    }

    /// Puts `function` in the first free slot, assigns its BARs from the
    /// window, turns memory decode on, and returns the slot.
    pub fn add(&mut self, mut function: Box<dyn PciFunction>) -> Result<usize, RootError> {
        let slot = (1..SLOTS)
            .find(|&s| self.slots[s].is_none())
            .ok_or(RootError::NoSlot)?;
        let (start, size) = self.windows.first().copied().unwrap_or((0, 0));
        let mut next = self.next_free;
        for bar in 0..NUM_BARS {
            let Some(bar_size) = function.config().bar_size(bar) else {
                continue;
            };
            let base = next.next_multiple_of(bar_size);
            if base + bar_size > start + size {
                return Err(RootError::NoRoom { size: bar_size });
            }
            function.config_mut().set_bar_address(bar, base);
            next = base + bar_size;
        }
        self.next_free = next;
        let command = function.config().command() | config::COMMAND_MEMORY;
        function.config_mut().set_command(command);
        self.slots[slot] = Some(function);
        self.update_mappings();
        Ok(slot)
    }

    fn in_window(&self, base: u64, size: u64) -> bool {
        self.windows
            .iter()
            .any(|&(w, len)| base >= w && base + size <= w + len)
    }

    /// Recomputes where every BAR decodes and tells each function about
    /// every change. A BAR outside the windows or overlapping another BAR
    /// decodes nowhere; a BAR that keeps its place keeps decoding, so a BAR
    /// moved onto a decoding one is the one refused. Recomputing all slots
    /// (at most 32 × 6 BARs) lets a refused BAR decode again once the
    /// other one has moved away.
    fn update_mappings(&mut self) {
        let mut wanted = Vec::new();
        for (slot, function) in self.slots.iter().enumerate() {
            let Some(function) = function else { continue };
            for bar in 0..NUM_BARS {
                if let Some((base, size)) = function.config().decoded_bar(bar) {
                    if self.in_window(base, size) {
                        wanted.push(Mapping {
                            base,
                            size,
                            slot,
                            bar,
                        });
                    }
                }
            }
        }
        let unchanged = |m: &Mapping| self.decoded[m.slot][m.bar] == Some(m.base);
        let (kept, moved): (Vec<Mapping>, Vec<Mapping>) =
            wanted.into_iter().partition(|m| unchanged(m));
        let mut mappings: Vec<Mapping> = Vec::with_capacity(kept.len() + moved.len());
        for m in kept.into_iter().chain(moved) {
            let overlaps = mappings
                .iter()
                .any(|o| m.base < o.base + o.size && o.base < m.base + m.size);
            if !overlaps {
                mappings.push(m);
            }
        }
        self.mappings = mappings;
        for slot in 0..SLOTS {
            for bar in 0..NUM_BARS {
                let new = self
                    .mappings
                    .iter()
                    .find(|m| m.slot == slot && m.bar == bar)
                    .map(|m| m.base);
                let old = self.decoded[slot][bar];
                if old == new {
                    continue;
                }
                self.decoded[slot][bar] = new;
                if let Some(function) = self.slots[slot].as_mut() {
                    function.bar_moved(bar, old, new);
                }
            }
        }
    }

    /// Reads configuration space of 00:`slot`.`func` at `offset`. Absent
    /// functions read as all ones.
    pub fn config_read(&self, bus: u8, slot: usize, func: u8, offset: usize, data: &mut [u8]) {
        match self.function(bus, slot, func) {
            Some(f) => {
                f.config().read(offset, data);
                let bits = f.dynamic_status();
                if bits != 0 {
                    or_status(offset, data, bits);
                }
            }
            None => data.fill(0xff),
        }
    }

    /// Writes configuration space of 00:`slot`.`func` at `offset`.
    pub fn config_write(&mut self, bus: u8, slot: usize, func: u8, offset: usize, data: &[u8]) {
        if self.function(bus, slot, func).is_none() {
            return;
        }
        if let Some(f) = self.slots[slot].as_mut() {
            f.config_mut().write(offset, data);
            f.config_written(offset, data.len());
        }
        self.update_mappings();
    }

    fn function(&self, bus: u8, slot: usize, func: u8) -> Option<&dyn PciFunction> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(slot)?.as_deref()
    }

    fn mapping(&self, addr: u64, len: usize) -> Option<(Mapping, u64)> {
        let m = self
            .mappings
            .iter()
            .find(|m| addr >= m.base && addr < m.base + m.size)?;
        let offset = addr - m.base;
        (offset + len as u64 <= m.size).then_some((*m, offset))
    }

    /// Reads BAR memory at guest address `addr`; unclaimed reads as all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.mapping(addr, data.len()) {
            Some((m, offset)) => match self.slots[m.slot].as_mut() {
                Some(f) => f.read_bar(m.bar, offset, data),
                None => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    /// Writes BAR memory at guest address `addr`; unclaimed writes are dropped.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if let Some((m, offset)) = self.mapping(addr, data.len()) {
            if let Some(f) = self.slots[m.slot].as_mut() {
                f.write_bar(m.bar, offset, data);
            }
        }
    }
}

/// The root complex shared by its bus devices.
pub type SharedRoot = Arc<Mutex<PciRoot>>;

fn lock(root: &SharedRoot) -> MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configuration access mechanism #1: the address register at 0xCF8 and the
/// data window at 0xCFC-0xCFF. Put it on the port bus at 0xCF8, 8 ports.
#[derive(Debug)]
pub struct PciConfigIo {
    root: SharedRoot,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: SharedRoot) -> Self {
        Self { root, address: 0 }
    }

    /// (bus, slot, function, register offset) the address register selects,
    /// if configuration access is enabled.
    fn target(&self) -> Option<(u8, usize, u8, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as usize;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = (self.address & 0xfc) as usize;
        Some((bus, slot, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, len) if offset as usize - 4 + len <= 4 => match self.target() {
                Some((bus, slot, func, reg)) => {
                    let at = reg + offset as usize - 4;
                    lock(&self.root).config_read(bus, slot, func, at, data);
                }
                None => data.fill(0xff),
            },
            // Narrow accesses to 0xCF8-0xCFB are not configuration cycles.
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        match (offset, data.len()) {
            (0, 4) => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Reserved bits 30:24 and the low two bits read as zero.
                self.address = value & 0x80ff_fffc;
            }
            (4..=7, len) if offset as usize - 4 + len <= 4 => {
                if let Some((bus, slot, func, reg)) = self.target() {
                    let at = reg + offset as usize - 4;
                    lock(&self.root).config_write(bus, slot, func, at, data);
                }
            }
            _ => {}
        }
        None
    }
}

/// Enhanced configuration access (ECAM): 4 KiB of configuration space per
/// function, bus 0 only. Put it on the MMIO bus at the ECAM base, 1 MiB.
#[derive(Debug)]
pub struct PciConfigMmio {
    root: SharedRoot,
}

impl PciConfigMmio {
    pub fn new(root: SharedRoot) -> Self {
        Self { root }
    }

    fn decode(offset: u64, len: usize) -> Option<(u8, usize, u8, usize)> {
        let reg = (offset & 0xfff) as usize;
        if !matches!(len, 1 | 2 | 4) || !reg.is_multiple_of(len) {
            return None;
        }
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as usize;
        let func = ((offset >> 12) & 0x7) as u8;
        Some((bus, slot, func, reg))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Some((bus, slot, func, reg)) => {
                lock(&self.root).config_read(bus, slot, func, reg, data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        if let Some((bus, slot, func, reg)) = Self::decode(offset, data.len()) {
            lock(&self.root).config_write(bus, slot, func, reg, data);
        }
        None
    }
}

/// An MMIO window through which BARs are reached. Put one on the MMIO bus
/// per window, at the window's base.
#[derive(Debug)]
pub struct PciMmioWindow {
    root: SharedRoot,
    base: u64,
}

impl PciMmioWindow {
    pub fn new(root: SharedRoot, base: u64) -> Self {
        Self { root, base }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.root).mmio_read(self.base + offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmAction> {
        lock(&self.root).mmio_write(self.base + offset, data);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, COMMAND_MEMORY, REG_BAR0, REG_COMMAND};

    const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);

    /// A function with one 64-bit BAR that records accesses and moves.
    struct Probe {
        config: ConfigSpace,
        moves: Moves,
    }

    impl PciFunction for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.lock().unwrap().push((bar, old, new));
        }
    }

    type Moves = Arc<Mutex<Vec<(usize, Option<u64>, Option<u64>)>>>;

    fn root_with_probe() -> (SharedRoot, Moves) {
        let mut config = ConfigSpace::new(Ids {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_0000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar(0, 0x4000, BarKind::Memory64).unwrap();
        let moves = Moves::default();
        let probe = Probe {
            config,
            moves: moves.clone(),
        };
        let mut root = PciRoot::new(vec![WINDOW]);
        assert_eq!(root.add(Box::new(probe)).unwrap(), 1);
        (Arc::new(Mutex::new(root)), moves)
    }

    fn cf8(io: &mut PciConfigIo, slot: u32, reg: u32) {
        io.write(0, &(CONFIG_ENABLE | slot << 11 | reg).to_le_bytes());
    }

    fn cfc32(io: &mut PciConfigIo) -> u32 {
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_is_at_slot_zero_through_ports() {
        let (root, _) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        cf8(&mut io, 0, 0);
        assert_eq!(cfc32(&mut io), 0x0008_1b36);
        cf8(&mut io, 0, 8);
        assert_eq!(cfc32(&mut io) >> 8, 0x06_00_00);
    }

    #[test]
    fn all_widths_of_the_data_window_work() {
        let (root, _) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        cf8(&mut io, 1, 0);
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b, [0x10]);
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        let mut straddle = [0u8; 2];
        io.read(7, &mut straddle);
        assert_eq!(straddle, [0xff, 0xff]);
    }

    #[test]
    fn address_register_masks_reserved_bits_and_enable_gates_access() {
        let (root, _) = root_with_probe();
        let mut io = PciConfigIo::new(root);
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        io.write(0, &0u32.to_le_bytes());
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
    }

    #[test]
    fn empty_slots_and_functions_read_all_ones() {
        let (root, _) = root_with_probe();
        let mut io = PciConfigIo::new(root.clone());
        cf8(&mut io, 5, 0);
        assert_eq!(cfc32(&mut io), 0xffff_ffff);
        let mut ecam = PciConfigMmio::new(root);
        let mut b = [0u8; 4];
        ecam.read(1 << 15 | 1 << 12, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn ecam_reaches_the_same_registers() {
        let (root, _) = root_with_probe();
        let mut ecam = PciConfigMmio::new(root);
        let mut b = [0u8; 4];
        ecam.read(1 << 15, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        ecam.read(1 << 15 | 0x100, &mut b);
        assert_eq!(b, [0; 4]);
        let mut misaligned = [0u8; 4];
        ecam.read(1 << 15 | 2, &mut misaligned);
        assert_eq!(misaligned, [0xff; 4]);
    }

    #[test]
    fn bars_are_assigned_and_decode_at_build_time() {
        let (root, moves) = root_with_probe();
        assert_eq!(*moves.lock().unwrap(), vec![(0, None, Some(WINDOW.0))]);
        let mut r = lock(&root);
        let mut b = [0u8; 1];
        r.mmio_read(WINDOW.0 + 3, &mut b);
        assert_eq!(b, [0x03]);
    }

    #[test]
    fn moving_a_bar_moves_its_decoding() {
        let (root, moves) = root_with_probe();
        let mut ecam = PciConfigMmio::new(root.clone());
        let bar = (1 << 15) | REG_BAR0 as u64;
        ecam.write(bar, &0xc010_0000u32.to_le_bytes());
        assert_eq!(
            moves.lock().unwrap().last(),
            Some(&(0, Some(WINDOW.0), Some(0xc010_0000)))
        );
        let mut r = lock(&root);
        let mut b = [0u8; 1];
        r.mmio_read(WINDOW.0, &mut b);
        assert_eq!(b, [0xff]);
        r.mmio_read(0xc010_0001, &mut b);
        assert_eq!(b, [0x01]);
    }

    #[test]
    fn memory_decode_off_unmaps_the_bar() {
        let (root, moves) = root_with_probe();
        let mut ecam = PciConfigMmio::new(root.clone());
        ecam.write((1 << 15) | REG_COMMAND as u64, &0u16.to_le_bytes());
        assert_eq!(
            moves.lock().unwrap().last(),
            Some(&(0, Some(WINDOW.0), None))
        );
        let mut b = [0u8; 1];
        lock(&root).mmio_read(WINDOW.0, &mut b);
        assert_eq!(b, [0xff]);
        ecam.write(
            (1 << 15) | REG_COMMAND as u64,
            &COMMAND_MEMORY.to_le_bytes(),
        );
        assert_eq!(
            moves.lock().unwrap().last(),
            Some(&(0, None, Some(WINDOW.0)))
        );
    }

    #[test]
    fn a_bar_moved_outside_the_window_decodes_nowhere() {
        let (root, moves) = root_with_probe();
        let mut ecam = PciConfigMmio::new(root);
        // The sizing probe: all ones in both halves.
        ecam.write((1 << 15) | REG_BAR0 as u64, &u32::MAX.to_le_bytes());
        ecam.write((1 << 15) | (REG_BAR0 + 4) as u64, &u32::MAX.to_le_bytes());
        assert_eq!(
            moves.lock().unwrap().last(),
            Some(&(0, Some(WINDOW.0), None))
        );
    }

    fn probe(moves: &Moves) -> Box<Probe> {
        let mut config = ConfigSpace::new(Ids {
            vendor: 0x1af4,
            device: 0x1044,
            revision: 1,
            class: 0xff_0000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar(0, 0x4000, BarKind::Memory64).unwrap();
        Box::new(Probe {
            config,
            moves: moves.clone(),
        })
    }

    #[test]
    fn a_refused_bar_decodes_once_the_other_moves_away() {
        let (first, second) = (Moves::default(), Moves::default());
        let mut root = PciRoot::new(vec![WINDOW]);
        assert_eq!(root.add(probe(&first)).unwrap(), 1);
        assert_eq!(root.add(probe(&second)).unwrap(), 2);
        let root = Arc::new(Mutex::new(root));
        let mut ecam = PciConfigMmio::new(root.clone());
        let bar = |slot: u64| (slot << 15) | REG_BAR0 as u64;
        // Slot 2's BAR moved onto slot 1's: refused, slot 1 keeps decoding.
        ecam.write(bar(2), &(WINDOW.0 as u32).to_le_bytes());
        assert_eq!(
            second.lock().unwrap().last(),
            Some(&(0, Some(WINDOW.0 + 0x4000), None))
        );
        assert_eq!(first.lock().unwrap().len(), 1);
        let mut b = [0u8; 1];
        lock(&root).mmio_read(WINDOW.0 + 1, &mut b);
        assert_eq!(b, [0x01]);
        // Slot 1 moves away: slot 2's BAR now decodes where it was put.
        ecam.write(bar(1), &0xc010_0000u32.to_le_bytes());
        assert_eq!(
            first.lock().unwrap().last(),
            Some(&(0, Some(WINDOW.0), Some(0xc010_0000)))
        );
        assert_eq!(
            second.lock().unwrap().last(),
            Some(&(0, None, Some(WINDOW.0)))
        );
    }

    #[test]
    fn window_full_is_an_error() {
        let mut root = PciRoot::new(vec![(0xc000_0000, 0x1000)]);
        let mut config = ConfigSpace::new(Ids {
            vendor: 1,
            device: 2,
            revision: 0,
            class: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_bar(0, 0x2000, BarKind::Memory32).unwrap();
        let probe = Probe {
            config,
            moves: Moves::default(),
        };
        assert_eq!(
            root.add(Box::new(probe)).unwrap_err(),
            RootError::NoRoom { size: 0x2000 }
        );
    }
}
