//! The ivshmem device driven through its registers, configuration space and
//! the root complex, as a guest driver would.

use std::sync::Mutex;

use super::*;
use crate::config::{COMMAND_MEMORY, REG_BAR0, REG_COMMAND};
use crate::msix::tests::Recorder;
use crate::msix::CONTROL_ENABLE;
use crate::root::PciRoot;

/// Records where the region was mapped and unmapped.
#[derive(Default)]
struct Mappings(Mutex<Vec<(&'static str, u64)>>);

impl RegionMapping for Mappings {
    fn map(&self, gpa: u64) -> io::Result<()> {
        self.0.lock().unwrap().push(("map", gpa));
        Ok(())
    }
    fn unmap(&self, gpa: u64) -> io::Result<()> {
        self.0.lock().unwrap().push(("unmap", gpa));
        Ok(())
    }
}

struct Rig {
    dev: IvshmemDevice,
    msi: Arc<Recorder>,
    intx: EventFd,
    /// Each peer's eventfds, as the peers' VMMs would hold them as irqfds.
    peer_fds: HashMap<u16, Vec<EventFd>>,
    mappings: Arc<Mappings>,
}

const SIZE: u64 = 0x10_0000;

fn settings() -> IvshmemConfig {
    IvshmemConfig {
        size: SIZE,
        position: 3,
        vectors: 4,
        read_only: false,
    }
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn rig_with(settings: IvshmemConfig) -> Rig {
    // Peer 1 has two vectors, peer 7 one.
    let peer_fds: HashMap<u16, Vec<EventFd>> =
        HashMap::from([(1, vec![eventfd(), eventfd()]), (7, vec![eventfd()])]);
    let theirs = peer_fds
        .iter()
        .map(|(&p, fds)| (p, fds.iter().map(|f| f.try_clone().unwrap()).collect()))
        .collect();
    let msi = Arc::new(Recorder::default());
    let intx = eventfd();
    let mappings = Arc::new(Mappings::default());
    let dev = IvshmemDevice::new(
        settings,
        msi.clone(),
        intx.try_clone().unwrap(),
        Arc::new(EventFdDoorbells::new(theirs)),
        mappings.clone(),
    )
    .unwrap();
    Rig {
        dev,
        msi,
        intx,
        peer_fds,
        mappings,
    }
}

fn rig() -> Rig {
    rig_with(settings())
}

fn read_reg(dev: &mut IvshmemDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_bar(REGISTERS_BAR, offset, &mut b);
    u32::from_le_bytes(b)
}

fn write_reg(dev: &mut IvshmemDevice, offset: u64, value: u32) {
    dev.write_bar(REGISTERS_BAR, offset, &value.to_le_bytes());
}

fn config32(dev: &IvshmemDevice, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    dev.config().read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// How many times `fd` was signalled since last asked (0 if never).
fn signalled(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

fn enable_msix(dev: &mut IvshmemDevice) {
    dev.config_mut().write(0x42, &CONTROL_ENABLE.to_le_bytes());
    dev.config_written(0x42, 2);
}

fn program_vector(dev: &mut IvshmemDevice, vector: u64, data: u32, masked: bool) {
    let at = vector * 16;
    dev.write_bar(MSIX_BAR, at, &0xfee0_0000u32.to_le_bytes());
    dev.write_bar(MSIX_BAR, at + 4, &0u32.to_le_bytes());
    dev.write_bar(MSIX_BAR, at + 8, &data.to_le_bytes());
    dev.write_bar(MSIX_BAR, at + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn identity_and_bars_match_qemus_ivshmem() {
    let mut r = rig();
    let dev = &mut r.dev;
    assert_eq!(config32(dev, 0), 0x1110_1af4);
    // Revision 1, class 05 00 00 (RAM).
    assert_eq!(config32(dev, 8), 0x0500_0001);
    assert_eq!(config32(dev, 0x2c), 0x1100_1af4);
    // Sizing each BAR: 256 B and 4 KiB 32-bit, the region 64-bit prefetchable.
    for (bar, expect) in [(0, 0xffff_ff00u32), (1, 0xffff_f000), (2, 0xfff0_000c)] {
        let reg = REG_BAR0 + 4 * bar;
        dev.config_mut().write(reg, &u32::MAX.to_le_bytes());
        assert_eq!(config32(dev, reg), expect, "BAR {bar}");
    }
    // MSI-X: 4 vectors, table at BAR 1 offset 0, PBA at 0x800.
    assert_eq!(dev.config().u16_at(0x34) & 0xff, 0x40);
    assert_eq!(config32(dev, 0x40) & 0xff, 0x11);
    assert_eq!(dev.config().u16_at(0x42) & 0x7ff, 3);
    assert_eq!(config32(dev, 0x44), 1);
    assert_eq!(config32(dev, 0x48), 0x801);
}

#[test]
fn iv_position_is_the_guests_peer_id_and_read_only() {
    let mut r = rig();
    assert_eq!(read_reg(&mut r.dev, REG_IV_POSITION), 3);
    write_reg(&mut r.dev, REG_IV_POSITION, 9);
    assert_eq!(read_reg(&mut r.dev, REG_IV_POSITION), 3);
    // Doorbell is write-only and reserved space reads zero.
    assert_eq!(read_reg(&mut r.dev, REG_DOORBELL), 0);
    assert_eq!(read_reg(&mut r.dev, 0x10), 0);
}

#[test]
fn a_doorbell_write_signals_the_named_peers_vector() {
    let mut r = rig();
    write_reg(&mut r.dev, REG_DOORBELL, 1 << 16 | 1);
    assert_eq!(signalled(&r.peer_fds[&1][1]), 1);
    assert_eq!(signalled(&r.peer_fds[&1][0]), 0);
    assert_eq!(signalled(&r.peer_fds[&7][0]), 0);
    write_reg(&mut r.dev, REG_DOORBELL, 7 << 16);
    write_reg(&mut r.dev, REG_DOORBELL, 7 << 16);
    assert_eq!(signalled(&r.peer_fds[&7][0]), 2);
    assert_eq!(r.dev.counters().doorbells_sent, 3);
}

#[test]
fn a_doorbell_for_no_such_peer_or_vector_is_dropped_and_counted() {
    let mut r = rig();
    write_reg(&mut r.dev, REG_DOORBELL, 2 << 16);
    write_reg(&mut r.dev, REG_DOORBELL, 7 << 16 | 1);
    for fds in r.peer_fds.values() {
        assert!(fds.iter().all(|fd| signalled(fd) == 0));
    }
    let c = r.dev.counters();
    assert_eq!((c.doorbells_sent, c.doorbells_dropped), (0, 2));
}

#[test]
fn narrow_misaligned_and_out_of_range_accesses_do_nothing() {
    let mut r = rig();
    r.dev.write_bar(REGISTERS_BAR, REG_DOORBELL, &[0, 0]);
    r.dev
        .write_bar(REGISTERS_BAR, REG_DOORBELL + 2, &[1, 0, 0, 0]);
    r.dev.write_bar(REGISTERS_BAR, 0x100, &[1, 0, 0, 0]);
    r.dev.write_bar(3, 0, &[1, 0, 0, 0]);
    assert_eq!(r.dev.counters(), IvshmemCounters::default());
    let mut b = [0xaa; 2];
    r.dev.read_bar(REGISTERS_BAR, REG_IV_POSITION, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn a_peer_interrupt_goes_to_msix_and_waits_while_the_vector_is_masked() {
    let mut r = rig();
    enable_msix(&mut r.dev);
    program_vector(&mut r.dev, 1, 0x41, false);
    program_vector(&mut r.dev, 2, 0x42, true);
    r.dev.ring(1).unwrap();
    assert_eq!(*r.msi.signals.lock().unwrap(), vec![1]);
    r.dev.ring(2).unwrap();
    assert_eq!(*r.msi.signals.lock().unwrap(), vec![1]);
    let mut pba = [0u8; 8];
    r.dev.read_bar(MSIX_BAR, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(pba[0], 0b100);
    // Unmasking delivers it.
    r.dev.write_bar(MSIX_BAR, 2 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(*r.msi.signals.lock().unwrap(), vec![1, 2]);
    // A vector past the table is ignored; no INTx while MSI-X is on.
    r.dev.ring(9).unwrap();
    assert_eq!(r.dev.counters().doorbells_received, 2);
    assert_eq!(signalled(&r.intx), 0);
}

#[test]
fn without_msix_a_peer_interrupt_sets_status_and_raises_intx_when_unmasked() {
    let mut r = rig();
    r.dev.ring(0).unwrap();
    // Masked (the reset state): status set, no INTx.
    assert_eq!(signalled(&r.intx), 0);
    write_reg(&mut r.dev, REG_INTR_MASK, 1);
    assert_eq!(signalled(&r.intx), 1);
    // Still pending: the line is raised again after end of interrupt.
    r.dev.resample().unwrap();
    assert_eq!(signalled(&r.intx), 1);
    // Reading the status clears it; then nothing more is raised.
    assert_eq!(read_reg(&mut r.dev, REG_INTR_STATUS), 1);
    assert_eq!(read_reg(&mut r.dev, REG_INTR_STATUS), 0);
    r.dev.resample().unwrap();
    assert_eq!(signalled(&r.intx), 0);
    assert!(r.msi.signals.lock().unwrap().is_empty());
}

#[test]
fn intx_disable_in_the_command_register_holds_the_line() {
    let mut r = rig();
    write_reg(&mut r.dev, REG_INTR_MASK, 1);
    let command = config::COMMAND_INTX_DISABLE.to_le_bytes();
    r.dev.config_mut().write(REG_COMMAND, &command);
    r.dev.config_written(REG_COMMAND, 2);
    r.dev.ring(0).unwrap();
    assert_eq!(signalled(&r.intx), 0);
    assert_eq!(read_reg(&mut r.dev, REG_INTR_STATUS), 1);
}

#[test]
fn a_doorbell_from_the_watcher_shows_in_the_status_register_and_raises_intx() {
    let mut r = rig();
    let state = r.dev.intx_state();
    write_reg(&mut r.dev, REG_INTR_MASK, 1);
    // A driver that takes INTx (Linux's uio_pci_generic) masks the line in
    // its handler, after checking the status register's interrupt bit.
    assert_eq!(r.dev.dynamic_status(), 0);
    assert!(!state.msix_enabled());
    state.peer_rang().unwrap();
    assert_eq!(signalled(&r.intx), 1);
    assert_eq!(r.dev.dynamic_status(), 1 << 3);
    let command = config::COMMAND_INTX_DISABLE.to_le_bytes();
    r.dev.config_mut().write(REG_COMMAND, &command);
    r.dev.config_written(REG_COMMAND, 2);
    // Turning INTx back on with the interrupt still pending raises it again.
    r.dev.config_mut().write(REG_COMMAND, &0u16.to_le_bytes());
    r.dev.config_written(REG_COMMAND, 2);
    assert_eq!(signalled(&r.intx), 1);
    // Reading Interrupt Status clears the bit and the condition.
    assert_eq!(read_reg(&mut r.dev, REG_INTR_STATUS), 1);
    assert_eq!(r.dev.dynamic_status(), 0);
    r.dev.config_written(REG_COMMAND, 2);
    assert_eq!(signalled(&r.intx), 0);
    // With MSI-X on, the watcher leaves doorbells to the vectors' irqfds.
    r.dev
        .config_mut()
        .write(0x42, &CONTROL_ENABLE.to_le_bytes());
    r.dev.config_written(0x42, 2);
    assert!(state.msix_enabled());
}

#[test]
fn the_region_is_mapped_wherever_bar2_decodes() {
    let r = rig();
    let mappings = r.mappings.clone();
    let window = (0xc000_0000, 0x1000_0000);
    let mut root = PciRoot::new(vec![window]);
    let slot = root.add(Box::new(r.dev)).unwrap();
    // Build time: BAR 0 at the window's start, BAR 1 after it, BAR 2
    // aligned to its size.
    let at = 0xc010_0000;
    assert_eq!(*mappings.0.lock().unwrap(), vec![("map", at)]);
    // The guest moves BAR 2 (low half, then high half).
    let bar2 = REG_BAR0 + 8;
    root.config_write(0, slot, 0, bar2, &0xc080_0000u32.to_le_bytes());
    root.config_write(0, slot, 0, bar2 + 4, &0u32.to_le_bytes());
    assert_eq!(
        mappings.0.lock().unwrap()[1..],
        [("unmap", at), ("map", 0xc080_0000)]
    );
    // Memory decode off unmaps it; on maps it again.
    root.config_write(0, slot, 0, REG_COMMAND, &0u16.to_le_bytes());
    let command = COMMAND_MEMORY.to_le_bytes();
    root.config_write(0, slot, 0, REG_COMMAND, &command);
    assert_eq!(
        mappings.0.lock().unwrap()[3..],
        [("unmap", 0xc080_0000), ("map", 0xc080_0000)]
    );
    // Registers answer through the window at BAR 0.
    let mut b = [0u8; 4];
    root.mmio_read(0xc000_0000 + REG_IV_POSITION, &mut b);
    assert_eq!(u32::from_le_bytes(b), 3);
}

#[test]
fn writes_that_reach_the_region_do_not_land_and_are_counted() {
    let mut r = rig_with(IvshmemConfig {
        read_only: true,
        ..settings()
    });
    r.dev.write_bar(MEMORY_BAR, 0x10, &[1, 2, 3, 4]);
    r.dev.write_bar(MEMORY_BAR, 0x20, &[5]);
    let mut b = [0xaa; 4];
    r.dev.read_bar(MEMORY_BAR, 0x10, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(r.dev.counters().writes_dropped, 2);
}

#[test]
fn bad_sizes_and_vector_counts_are_refused() {
    let build = |size, vectors| {
        IvshmemDevice::new(
            IvshmemConfig {
                size,
                vectors,
                ..settings()
            },
            Arc::new(Recorder::default()),
            eventfd(),
            Arc::new(EventFdDoorbells::default()),
            Arc::new(Mappings::default()),
        )
    };
    for size in [0, 0x800, 0x3000] {
        let err = build(size, 1).unwrap_err();
        assert!(matches!(err, IvshmemError::Size(s) if s == size));
    }
    assert!(matches!(
        build(SIZE, 0).unwrap_err(),
        IvshmemError::Vectors(0)
    ));
    let err = build(SIZE, MAX_VECTORS + 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a shared region needs 1 to 128 doorbell vectors, not 129"
    );
    assert!(build(SIZE, MAX_VECTORS).is_ok());
}
