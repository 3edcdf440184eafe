//! Entry points for the fuzz targets in `fuzz/` (`virtio_pci`,
//! `pci_config`, `msix`), also called by the unit tests that replay
//! `fuzz/regressions/`.
//!
//! The guest-facing path is the real one: a root complex with the host
//! bridge and a virtio-rng function behind the virtio-pci transport,
//! reached through the 0xCF8/0xCFC port pair, ECAM and the BAR window, the
//! bus devices the VMM maps. None of it may panic, whatever the guest
//! writes.

use std::io;
use std::sync::{Arc, Mutex};

use devices::fuzz_entry::Input;
use devices::BusDevice;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::msix::{MsiDelivery, MsiMessage, Msix};
use crate::root::{PciConfigIo, PciConfigMmio, PciMmioWindow, PciRoot};
use crate::virtio_pci::{IoEvents, VirtioPciDevice};

/// Where the BAR window starts, and its size.
const WINDOW: (u64, u64) = (0xc000_0000, 0x10_0000);
/// Guest RAM: the rings the fuzzed driver sets up live here (small, so
/// that each run maps and faults in little).
const RAM: usize = 0x1_0000;
/// The slot the virtio function gets (the host bridge is slot 0).
const SLOT: u32 = 1;
/// Register offsets inside the transport's common configuration
/// (VirtIO 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// The BAR's regions: common, ISR, device, notify, MSI-X table, PBA.
const REGIONS: [u64; 6] = [0x0, 0x1000, 0x2000, 0x3000, 0x4000, 0x6000];
/// Access sizes an MMIO or port exit carries.
const SIZES: [usize; 4] = [1, 2, 4, 8];

/// Checks what the transport asks of the VMM's MSI plumbing.
struct Delivery {
    vectors: u16,
}

impl MsiDelivery for Delivery {
    fn route(&self, vector: u16, _message: MsiMessage) -> io::Result<()> {
        assert!(
            vector < self.vectors,
            "routed vector {vector} past the table"
        );
        Ok(())
    }

    fn signal(&self, vector: u16) -> io::Result<()> {
        assert!(
            vector < self.vectors,
            "signalled vector {vector} past the table"
        );
        Ok(())
    }
}

/// Notify addresses are registered with KVM in the VMM; here they must lie
/// in the BAR window, where the BAR may decode.
struct Notifies;

impl IoEvents for Notifies {
    fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        let inside = addr >= WINDOW.0 && addr - WINDOW.0 < WINDOW.1;
        assert!(inside, "notify address {addr:#x} outside the window");
        Ok(())
    }

    fn unregister(&self, _addr: u64, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's view of the bus.
struct Machine {
    root: Arc<Mutex<PciRoot>>,
    cf8: PciConfigIo,
    ecam: PciConfigMmio,
    window: PciMmioWindow,
}

impl Machine {
    fn new() -> Option<Machine> {
        let mem = virtio::Memory::from_ranges(&[(GuestAddress(0), RAM)]).ok()?;
        let intx = EventFd::new(libc::EFD_NONBLOCK).ok()?;
        // One vector per queue plus the configuration vector.
        let delivery = Arc::new(Delivery { vectors: 2 });
        let rng = Box::new(virtio::rng::Rng::new());
        let dev = VirtioPciDevice::new(rng, mem, delivery, intx, Arc::new(Notifies)).ok()?;
        let mut root = PciRoot::new(vec![WINDOW]);
        root.add(Box::new(dev)).ok()?;
        let root = Arc::new(Mutex::new(root));
        Some(Machine {
            cf8: PciConfigIo::new(root.clone()),
            ecam: PciConfigMmio::new(root.clone()),
            window: PciMmioWindow::new(root.clone(), WINDOW.0),
            root,
        })
    }

    /// Where BAR 0 of the virtio function decodes now, read the way the
    /// guest reads it (through ECAM).
    fn bar0(&mut self) -> u64 {
        let ecam = u64::from(SLOT) << 15;
        let lo = self.ecam_read(ecam + 0x10, 4) & !0xf;
        let hi = self.ecam_read(ecam + 0x14, 4);
        hi << 32 | lo
    }

    fn ecam_read(&mut self, offset: u64, size: usize) -> u64 {
        let mut b = [0u8; 8];
        self.ecam.read(offset, &mut b[..size]);
        u64::from_le_bytes(b)
    }

    /// Where an access `offset` bytes into BAR 0 lands in the window, if
    /// it does: the MMIO bus hands the window only accesses inside it.
    fn in_window(&mut self, offset: u64, size: usize) -> Option<u64> {
        let at = self.bar0().checked_add(offset)?.checked_sub(WINDOW.0)?;
        (at + size as u64 <= WINDOW.1).then_some(at)
    }

    fn bar_read(&mut self, offset: u64, size: usize) -> u64 {
        let mut b = [0u8; 8];
        match self.in_window(offset, size) {
            Some(at) => self.window.read(at, &mut b[..size]),
            // Unclaimed MMIO reads as all ones.
            None => b[..size].fill(0xff),
        }
        u64::from_le_bytes(b)
    }

    fn bar_write(&mut self, offset: u64, size: usize, value: u64) {
        if let Some(at) = self.in_window(offset, size) {
            self.window.write(at, &value.to_le_bytes()[..size]);
        }
    }

    /// A configuration access through 0xCF8/0xCFC: the address dword, then
    /// the data port at `0xCFC + (b & 3)`.
    fn port_config(&mut self, input: &mut Input, write: bool) {
        let slot = [0, SLOT, 2, 31][usize::from(input.u8() & 3)];
        let b = input.u8();
        let address = 0x8000_0000 | slot << 11 | u32::from(b & 0xfc);
        self.cf8.write(0, &address.to_le_bytes());
        let mut back = [0u8; 4];
        self.cf8.read(0, &mut back);
        assert_eq!(u32::from_le_bytes(back), address, "0xCF8 reads back");
        let lane = u64::from(b & 3);
        let size = SIZES[usize::from(input.u8() & 3)];
        if write {
            self.cf8.write(4 + lane, &input.u64().to_le_bytes()[..size]);
        } else {
            let mut data = [0u8; 8];
            self.cf8.read(4 + lane, &mut data[..size]);
        }
    }

    /// A configuration access through ECAM: any bus, slot, function and
    /// register, of any size.
    fn ecam_config(&mut self, input: &mut Input, write: bool) {
        let slot = u64::from([0, SLOT, 2, 31][usize::from(input.u8() & 3)]);
        let raw = input.u32();
        let offset = if raw & 1 != 0 {
            // Anywhere in the 1 MiB region: other buses and functions.
            u64::from(raw >> 1) % 0x10_0000
        } else {
            slot << 15 | u64::from(raw >> 1) & 0xfff
        };
        let size = SIZES[usize::from(input.u8() & 3)];
        if write {
            self.ecam.write(offset, &input.u64().to_le_bytes()[..size]);
        } else {
            let mut data = [0u8; 8];
            self.ecam.read(offset, &mut data[..size]);
        }
    }

    /// A driver bringing the device up the way Linux does, with the
    /// values taken from the input: status, features, one queue with
    /// rings in RAM, its MSI-X vector, DRIVER_OK and a kick.
    fn driver_init(&mut self, input: &mut Input) {
        let flags = input.u8();
        // Memory decode and bus mastering, MSI-X on or off.
        self.ecam
            .write(u64::from(SLOT) << 15 | 4, &6u16.to_le_bytes());
        let control: u16 = if flags & 1 != 0 { 0x8000 } else { 0 };
        self.ecam
            .write(u64::from(SLOT) << 15 | 0x42, &control.to_le_bytes());
        self.bar_write(DEVICE_STATUS, 1, 0);
        self.bar_write(DEVICE_STATUS, 1, 1);
        self.bar_write(DEVICE_STATUS, 1, 3);
        self.bar_write(DEVICE_FEATURE_SELECT, 4, 1);
        let high = self.bar_read(DEVICE_FEATURE_SELECT + 4, 4);
        self.bar_write(DRIVER_FEATURE_SELECT, 4, 1);
        self.bar_write(DRIVER_FEATURE, 4, high & u64::from(input.u8() | 1));
        self.bar_write(DRIVER_FEATURE_SELECT, 4, 0);
        self.bar_write(DRIVER_FEATURE, 4, u64::from(input.u32()));
        self.bar_write(DEVICE_STATUS, 1, 0xb);
        self.bar_write(QUEUE_SELECT, 2, u64::from(flags >> 6));
        self.bar_write(QUEUE_SIZE, 2, 1 << (input.u8() % 10));
        self.bar_write(QUEUE_MSIX_VECTOR, 2, u64::from(input.u8() % 3));
        let (desc, driver, device) = if flags & 2 != 0 {
            (input.u64(), input.u64(), input.u64())
        } else {
            (0x1000, 0x3000, 0x4000)
        };
        self.bar_write(QUEUE_DESC, 8, desc);
        self.bar_write(QUEUE_DRIVER, 4, driver);
        self.bar_write(QUEUE_DRIVER + 4, 4, driver >> 32);
        self.bar_write(QUEUE_DEVICE, 8, device);
        self.bar_write(QUEUE_ENABLE, 2, 1);
        self.bar_write(DEVICE_STATUS, 1, 0xf);
        self.bar_write(0x3000, 2, 0);
        let _ = self.bar_read(0x1000, 1);
    }

    /// A BAR access in one of the transport's regions.
    fn bar_access(&mut self, input: &mut Input, op: u8, write: bool) {
        let region = REGIONS[usize::from(op >> 3) % REGIONS.len()];
        let b = input.u8();
        let size = SIZES[usize::from(b & 3)];
        let offset = region + u64::from(input.u16()) % 0x1000;
        if write {
            let value = input.u64();
            self.bar_write(offset, size, value);
        } else {
            let _ = self.bar_read(offset, size);
        }
        if b & 4 != 0 {
            // Sanity that holds whatever the driver did: the function is
            // still there.
            let ids = self.ecam_read(u64::from(SLOT) << 15, 4);
            assert_eq!(ids & 0xffff, 0x1af4, "the virtio function's vendor id");
        }
    }
}

/// Drives the virtio-pci transport (common configuration, ISR, device
/// configuration, notify, MSI-X table and PBA) and the configuration
/// space it sits in. Input: operations whose low three bits pick a BAR
/// read (0) or write (1) in the region bits 3-5 choose, a driver's
/// bring-up sequence (2), a configuration read or write through
/// 0xCF8/0xCFC (3-4) or ECAM (5-6), or a device reset (7).
pub fn virtio_pci(data: &[u8]) {
    let Some(mut m) = Machine::new() else {
        return;
    };
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        match op & 7 {
            0 => m.bar_access(&mut input, op, false),
            1 => m.bar_access(&mut input, op, true),
            2 => m.driver_init(&mut input),
            3 => m.port_config(&mut input, false),
            4 => m.port_config(&mut input, true),
            5 => m.ecam_config(&mut input, false),
            6 => m.ecam_config(&mut input, true),
            _ => m.bar_write(DEVICE_STATUS, 1, 0),
        }
    }
    drop(m.root);
}

/// Drives PCI configuration space alone: the host bridge and a virtio
/// function, reached through 0xCF8/0xCFC and ECAM, including BAR sizing
/// and moves (which re-register notify addresses). Input: operations
/// whose low two bits pick a port read or write (0-1), an ECAM read or
/// write (2), or a BAR sizing sequence (3: all ones written to a BAR, read
/// back, then a new address from the input written).
pub fn pci_config(data: &[u8]) {
    let Some(mut m) = Machine::new() else {
        return;
    };
    let mut input = Input::new(data);
    while !input.is_empty() {
        let op = input.u8();
        match op & 3 {
            0 => m.port_config(&mut input, op & 4 != 0),
            1 => m.ecam_config(&mut input, op & 4 != 0),
            2 => {
                let reg = u64::from(input.u8() & 0xfc);
                let value = input.u32();
                m.ecam
                    .write(u64::from(SLOT) << 15 | reg, &value.to_le_bytes());
            }
            _ => {
                let bar = (u64::from(SLOT) << 15) | (0x10 + u64::from(input.u8() % 6) * 4);
                m.ecam.write(bar, &u32::MAX.to_le_bytes());
                let _ = m.ecam_read(bar, 4);
                m.ecam.write(bar, &input.u32().to_le_bytes());
            }
        }
    }
}

/// Drives one MSI-X table alone. Input: byte 0 the vector count (1-64),
/// then operations whose low three bits pick a table read (0) or write (1)
/// of any size and alignment, a PBA read (2), a write of the capability's
/// control word (3), or the device raising a vector (4-7).
pub fn msix(data: &[u8]) {
    let mut input = Input::new(data);
    let vectors = u16::from(input.u8() % 64) + 1;
    let mut msix = Msix::new(vectors, Arc::new(Delivery { vectors }));
    let span = msix.table_len() + 16;
    while !input.is_empty() {
        let op = input.u8();
        let size = SIZES[usize::from(op >> 3) & 3];
        match op & 7 {
            0 => {
                let mut buf = [0u8; 8];
                msix.read_table(u64::from(input.u16()) % span, &mut buf[..size]);
            }
            1 => {
                let offset = u64::from(input.u16()) % span;
                msix.write_table(offset, &input.u64().to_le_bytes()[..size]);
            }
            2 => {
                let mut buf = [0u8; 8];
                msix.read_pba(u64::from(input.u8()) % 16, &mut buf[..size]);
            }
            3 => msix.set_control(input.u16()),
            _ => {
                let vector = input.u16() % (vectors + 1);
                let _ = msix.trigger(vector);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fuzz_entry::seeds;

    #[test]
    fn virtio_pci_seeds_and_regressions_replay() {
        for (_, data) in seeds("virtio_pci") {
            virtio_pci(&data);
        }
    }

    #[test]
    fn pci_config_seeds_and_regressions_replay() {
        for (_, data) in seeds("pci_config") {
            pci_config(&data);
        }
    }

    #[test]
    fn msix_seeds_and_regressions_replay() {
        for (_, data) in seeds("msix") {
            msix(&data);
        }
    }

    #[test]
    fn the_driver_sequence_brings_the_device_up() {
        let mut m = Machine::new().unwrap();
        // MSI-X on, all offered high features, no low ones, a 16-entry
        // queue at the default addresses on vector 1.
        let mut input = Input::new(&[1, 0xff, 0, 0, 0, 0, 4, 1]);
        m.driver_init(&mut input);
        assert_eq!(
            m.bar_read(DEVICE_STATUS, 1),
            0xf,
            "DRIVER_OK, no NEEDS_RESET"
        );
        m.bar_write(DEVICE_STATUS, 1, 0);
        // A reset completes when the device's worker has stopped: the status
        // reads 0 from then on, as drivers wait for.
        let mut status = m.bar_read(DEVICE_STATUS, 1);
        for _ in 0..1000 {
            if status == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            status = m.bar_read(DEVICE_STATUS, 1);
        }
        assert_eq!(status, 0, "the reset never completed");
    }
}
