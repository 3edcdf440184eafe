//! The transport driven through its BAR and configuration space, with a mock
//! device and mock interrupt plumbing.

use std::sync::Mutex;

use virtio::ActivateError;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::msix::tests::Recorder;

const BASE: u64 = 0xc000_0000;
const RAM: u64 = 0x10_0000;

type Activation = (Vec<(u16, u16, bool)>, u64);

#[derive(Default)]
struct Seen {
    /// (index, size, event_idx) of each queue, and the features.
    activations: Vec<Activation>,
    resets: usize,
    interrupt: Option<Arc<dyn Interrupt>>,
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct MockDevice {
    seen: Arc<Mutex<Seen>>,
    sizes: Vec<u16>,
    fail: bool,
    /// When set, activation starts a worker busy on its first chain until
    /// a message arrives here.
    busy: Option<std::sync::mpsc::Receiver<()>>,
    worker: Option<virtio::queue::Worker>,
}

/// A worker handler busy (as on a slow fdatasync) until released.
struct BusyHandler(Option<std::sync::mpsc::Receiver<()>>);

impl virtio::queue::QueueHandler for BusyHandler {
    fn queue_event(&mut self, _set: &mut virtio::queue::QueueSet, _qi: usize) {
        if let Some(release) = self.0.take() {
            let _ = release.recv();
        }
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        virtio::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x50u8.wrapping_add(offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.seen
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::Backend("mock".into()));
        }
        if let Some(release) = self.busy.take() {
            let set = virtio::queue::QueueSet::new("mock", mem, interrupt, queues, features);
            let worker = virtio::queue::Worker::spawn("mock", set, BusyHandler(Some(release)), &[])
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
            self.worker = Some(worker);
            return Ok(());
        }
        let summary = queues
            .iter()
            .map(|q| (q.index, q.queue.size(), q.queue.event_idx_enabled()))
            .collect();
        let mut seen = self.seen.lock().unwrap();
        seen.activations.push((summary, features));
        seen.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) -> Option<virtio::queue::Worker> {
        self.seen.lock().unwrap().resets += 1;
        self.worker.take().map(virtio::queue::Worker::stopping)
    }
}

#[derive(Default)]
struct MockIoEvents {
    live: Mutex<Vec<u64>>,
}

impl IoEvents for MockIoEvents {
    fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.live.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.live.lock().unwrap().retain(|&a| a != addr);
        Ok(())
    }
}

struct Rig {
    dev: VirtioPciDevice,
    seen: Arc<Mutex<Seen>>,
    msi: Arc<Recorder>,
    intx: EventFd,
    io: Arc<MockIoEvents>,
}

fn rig_with(sizes: &[u16], fail: bool) -> Rig {
    rig_busy(sizes, fail, None)
}

fn rig_busy(sizes: &[u16], fail: bool, busy: Option<std::sync::mpsc::Receiver<()>>) -> Rig {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let device = MockDevice {
        seen: seen.clone(),
        sizes: sizes.to_vec(),
        fail,
        busy,
        worker: None,
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let msi = Arc::new(Recorder::default());
    let intx = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let io = Arc::new(MockIoEvents::default());
    let dev = VirtioPciDevice::new(
        Box::new(device),
        mem,
        msi.clone(),
        intx.try_clone().unwrap(),
        io.clone(),
    )
    .unwrap();
    Rig {
        dev,
        seen,
        msi,
        intx,
        io,
    }
}

fn rig() -> Rig {
    rig_with(&[16, 8], false)
}

impl Rig {
    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, offset: u64, len: usize, v: u64) {
        self.dev.write_bar(0, offset, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(DEVICE_STATUS, 1) as u8
    }
    fn negotiate(&mut self, features: u64) -> u8 {
        self.w(DEVICE_STATUS, 1, 3);
        self.w(DRIVER_FEATURE_SELECT, 4, 0);
        self.w(DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.w(DRIVER_FEATURE_SELECT, 4, 1);
        self.w(DRIVER_FEATURE, 4, features >> 32);
        self.w(DEVICE_STATUS, 1, 3 | u64::from(status::FEATURES_OK));
        self.status()
    }
    /// Sets up queue `q` with `size` entries at a valid place in RAM.
    fn setup_queue(&mut self, q: u16, size: u16) {
        let base = 0x1_0000 * (u64::from(q) + 1);
        self.w(QUEUE_SELECT, 2, q.into());
        self.w(QUEUE_SIZE, 2, size.into());
        self.w(QUEUE_DESC, 4, base);
        self.w(QUEUE_DESC + 4, 4, 0);
        self.w(QUEUE_DRIVER, 8, base + 0x4000);
        self.w(QUEUE_DEVICE, 8, base + 0x8000);
        self.w(QUEUE_ENABLE, 2, 1);
    }
    fn driver_ok(&mut self) {
        let s = u64::from(self.status());
        self.w(DEVICE_STATUS, 1, s | u64::from(status::DRIVER_OK));
    }
}

fn cfg32(dev: &VirtioPciDevice, offset: usize) -> u32 {
    dev.config().u32_at(offset)
}

/// (cfg_type, bar, offset, length, multiplier) of each virtio capability.
fn virtio_caps(dev: &VirtioPciDevice) -> Vec<(u8, u8, u32, u32, u32)> {
    let c = dev.config();
    let mut at = usize::from(c.u16_at(config::REG_CAPABILITIES) as u8);
    let mut caps = Vec::new();
    while at != 0 {
        let header = c.u32_at(at);
        if header as u8 == CAP_VENDOR {
            let b = c.u32_at(at) >> 24;
            let bar = c.u32_at(at + 4) as u8;
            let mult = if b as u8 == CFG_NOTIFY {
                c.u32_at(at + 16)
            } else {
                0
            };
            caps.push((b as u8, bar, c.u32_at(at + 8), c.u32_at(at + 12), mult));
        }
        at = usize::from((header >> 8) as u8);
    }
    caps
}

#[test]
fn ids_follow_the_modern_scheme() {
    let r = rig();
    assert_eq!(cfg32(&r.dev, 0), 0x1044_1af4);
    assert_eq!(cfg32(&r.dev, 8) & 0xff, 1);
    assert_eq!(r.dev.config().u16_at(0x2c), 0x1af4);
    assert_eq!(r.dev.config().bar_size(0), Some(BAR_SIZE));
    assert_eq!(cfg32(&r.dev, 0x10) & 0x7, 0b100, "64-bit memory BAR");
    assert_eq!(r.dev.config().bar_size(1), None, "no legacy I/O BAR");
}

#[test]
fn class_code_follows_the_device_type() {
    // The mock is an rng: QEMU's "unclassified" 0x00ff.
    let r = rig();
    assert_eq!(cfg32(&r.dev, 8) >> 8, 0x00_ff_00);
    assert_eq!(class_code(virtio::device_type::BLOCK), 0x01_00_00);
    assert_eq!(class_code(virtio::device_type::NET), 0x02_00_00);
    assert_eq!(class_code(virtio::device_type::CONSOLE), 0x07_80_00);
    assert_eq!(class_code(virtio::device_type::VSOCK), 0x07_80_00);
}

#[test]
fn capabilities_point_into_bar0() {
    let r = rig();
    let caps = virtio_caps(&r.dev);
    assert_eq!(
        caps,
        vec![
            (CFG_COMMON, 0, 0, COMMON_LEN as u32, 0),
            (CFG_NOTIFY, 0, 0x3000, 8, 4),
            (CFG_ISR, 0, 0x1000, 1, 0),
            (CFG_DEVICE, 0, 0x2000, 0x1000, 0),
        ]
    );
    // MSI-X first: 3 vectors (two queues and config), table and PBA in BAR 0.
    assert_eq!(cfg32(&r.dev, 0x40) & 0xff, 0x11);
    assert_eq!(cfg32(&r.dev, 0x40) >> 16, 2);
    assert_eq!(cfg32(&r.dev, 0x44), 0x4000);
    assert_eq!(cfg32(&r.dev, 0x48), 0x6000);
}

#[test]
fn feature_words_are_selected() {
    let mut r = rig();
    r.w(DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(
        r.r(DEVICE_FEATURE, 4),
        (VIRTIO_RING_F_EVENT_IDX | 1) & 0xffff_ffff
    );
    r.w(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(r.r(DEVICE_FEATURE, 4), 1);
    r.w(DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(r.r(DEVICE_FEATURE, 4), 0);
    assert_eq!(r.r(NUM_QUEUES, 2), 2);
}

#[test]
fn features_ok_needs_a_subset_with_version_1() {
    let mut r = rig();
    assert_ne!(r.negotiate(VIRTIO_F_VERSION_1 | 1) & status::FEATURES_OK, 0);
    let mut r = rig();
    assert_eq!(r.negotiate(1) & status::FEATURES_OK, 0, "no VERSION_1");
    let mut r = rig();
    assert_eq!(
        r.negotiate(VIRTIO_F_VERSION_1 | 1 << 5) & status::FEATURES_OK,
        0,
        "a feature the device did not offer"
    );
}

#[test]
fn driver_ok_activates_the_enabled_queues() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    r.setup_queue(0, 16);
    r.setup_queue(1, 4);
    r.driver_ok();
    let seen = r.seen.lock().unwrap();
    assert_eq!(
        seen.activations,
        vec![(
            vec![(0, 16, true), (1, 4, true)],
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        )]
    );
    drop(seen);
    assert_eq!(r.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn queue_registers_read_back() {
    let mut r = rig();
    r.setup_queue(1, 8);
    assert_eq!(r.r(QUEUE_SIZE, 2), 8);
    assert_eq!(r.r(QUEUE_ENABLE, 2), 1);
    assert_eq!(r.r(QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(r.r(QUEUE_DESC, 8), 0x2_0000);
    assert_eq!(r.r(QUEUE_DRIVER, 4), 0x2_4000);
    assert_eq!(r.r(QUEUE_DEVICE + 4, 4), 0);
}

#[test]
fn queue_outside_guest_memory_is_a_device_error() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.w(QUEUE_SELECT, 2, 1);
    r.w(QUEUE_DESC, 8, RAM + 0x1000);
    r.w(QUEUE_ENABLE, 2, 1);
    r.driver_ok();
    assert!(r.seen.lock().unwrap().activations.is_empty());
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    // MSI-X is off, so the config interrupt went out on INTx with ISR bit 1.
    assert_eq!(r.intx.read().unwrap(), 1);
    assert_eq!(r.r(ISR_OFFSET, 1), u64::from(ISR_CONFIG));
    assert_eq!(r.r(ISR_OFFSET, 1), 0, "reading the ISR clears it");
}

#[test]
fn bad_queue_sizes_are_a_device_error() {
    for size in [0u16, 3, 32] {
        let mut r = rig();
        r.negotiate(VIRTIO_F_VERSION_1);
        r.setup_queue(0, size);
        r.driver_ok();
        assert!(r.seen.lock().unwrap().activations.is_empty(), "size {size}");
        assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0, "size {size}");
    }
}

#[test]
fn driver_ok_without_features_ok_is_a_device_error() {
    let mut r = rig();
    r.w(DEVICE_STATUS, 1, 3);
    r.setup_queue(0, 16);
    r.driver_ok();
    assert!(r.seen.lock().unwrap().activations.is_empty());
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn failed_activation_is_a_device_error() {
    let mut r = rig_with(&[16], true);
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.driver_ok();
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn out_of_range_queue_select_reads_zero_and_ignores_writes() {
    let mut r = rig();
    r.w(QUEUE_SELECT, 2, 9);
    assert_eq!(r.r(QUEUE_SIZE, 2), 0);
    r.w(QUEUE_SIZE, 2, 4);
    r.w(QUEUE_ENABLE, 2, 1);
    r.w(QUEUE_MSIX_VECTOR, 2, 0);
    assert_eq!(r.r(QUEUE_SIZE, 2), 0);
    assert_eq!(r.r(QUEUE_ENABLE, 2), 0);
}

#[test]
fn queue_writes_after_driver_ok_are_ignored() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.setup_queue(1, 8);
    r.driver_ok();
    r.w(QUEUE_SELECT, 2, 0);
    r.w(QUEUE_DESC, 8, 0x9000);
    assert_eq!(r.r(QUEUE_DESC, 8), 0x1_0000);
    r.w(DRIVER_FEATURE_SELECT, 4, 0);
    r.w(DRIVER_FEATURE, 4, 0);
    r.w(DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(
        r.r(DRIVER_FEATURE, 4),
        1,
        "features are fixed after FEATURES_OK"
    );
}

#[test]
fn status_zero_resets_device_and_registers() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 4);
    r.setup_queue(1, 4);
    r.w(CONFIG_MSIX_VECTOR, 2, 0);
    r.driver_ok();
    r.w(DEVICE_STATUS, 1, 0);
    assert_eq!(r.seen.lock().unwrap().resets, 1);
    assert_eq!(r.status(), 0);
    r.w(QUEUE_SELECT, 2, 0);
    assert_eq!(r.r(QUEUE_SIZE, 2), 16);
    assert_eq!(r.r(QUEUE_ENABLE, 2), 0);
    assert_eq!(r.r(QUEUE_DESC, 8), 0);
    assert_eq!(r.r(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    r.w(DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(r.r(DRIVER_FEATURE, 4), 0);
    // And the device can be brought up again.
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 4);
    r.setup_queue(1, 4);
    r.driver_ok();
    assert_eq!(r.seen.lock().unwrap().activations.len(), 2);
}

#[test]
fn a_reset_does_not_wait_for_a_busy_worker_and_completes_when_it_ends() {
    let (release, busy) = std::sync::mpsc::channel();
    let mut r = rig_busy(&[16, 8], false, Some(busy));
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 4);
    r.setup_queue(1, 4);
    r.driver_ok();
    // The worker is stuck in its first chain; the reset returns anyway
    // (waiting for the worker here would hang this test).
    r.w(DEVICE_STATUS, 1, 0);
    assert_eq!(r.seen.lock().unwrap().resets, 1);
    assert_ne!(r.status(), 0, "the reset is pending while the worker runs");
    release.send(()).unwrap();
    let mut polls = 0;
    while r.status() != 0 {
        polls += 1;
        assert!(polls < 10_000, "the reset never completed");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(r.dev.resetting.is_none(), "the worker was joined");
}

#[test]
fn the_driver_cannot_clear_status_bits_or_set_needs_reset() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.w(DEVICE_STATUS, 1, 1);
    assert_eq!(r.status(), 3 | status::FEATURES_OK);
    let mut r = rig();
    r.w(DEVICE_STATUS, 1, u64::from(status::DEVICE_NEEDS_RESET | 1));
    assert_eq!(r.status(), 1);
}

#[test]
fn msix_vectors_out_of_range_read_back_as_no_vector() {
    let mut r = rig();
    r.w(CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(r.r(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    r.w(QUEUE_SELECT, 2, 1);
    r.w(QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(r.r(QUEUE_MSIX_VECTOR, 2), 2);
}

fn enable_msix(r: &mut Rig) {
    let control = (crate::msix::CONTROL_ENABLE >> 8) as u8;
    r.dev.config_mut().write(0x43, &[control]);
    r.dev.config_written(0x43, 1);
    for vector in 0..3u64 {
        r.w(MSIX_TABLE_OFFSET + 16 * vector, 4, 0xfee0_0000);
        r.w(MSIX_TABLE_OFFSET + 16 * vector + 8, 4, 0x40 + vector);
        r.w(MSIX_TABLE_OFFSET + 16 * vector + 12, 4, 0);
    }
}

#[test]
fn queue_interrupts_use_the_queue_vector_with_msix() {
    let mut r = rig();
    enable_msix(&mut r);
    assert_eq!(r.msi.routes.lock().unwrap().len(), 3);
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.w(QUEUE_MSIX_VECTOR, 2, 1);
    r.w(CONFIG_MSIX_VECTOR, 2, 2);
    r.driver_ok();
    let interrupt = r.seen.lock().unwrap().interrupt.clone().unwrap();
    interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    interrupt.trigger(InterruptKind::Config).unwrap();
    interrupt.trigger(InterruptKind::Queue(1)).unwrap();
    assert_eq!(*r.msi.signals.lock().unwrap(), vec![1, 2]);
    assert!(r.intx.read().is_err(), "no INTx while MSI-X is on");
}

#[test]
fn needs_reset_from_the_device_sets_status_and_signals_config() {
    let mut r = rig();
    enable_msix(&mut r);
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.w(CONFIG_MSIX_VECTOR, 2, 2);
    r.driver_ok();
    let interrupt = r.seen.lock().unwrap().interrupt.clone().unwrap();
    interrupt.set_needs_reset();
    assert_ne!(r.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(*r.msi.signals.lock().unwrap(), vec![2]);
}

#[test]
fn intx_queue_interrupt_sets_isr_bit_0() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.driver_ok();
    let interrupt = r.seen.lock().unwrap().interrupt.clone().unwrap();
    interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(r.intx.read().unwrap(), 1);
    assert_eq!(r.r(ISR_OFFSET, 1), u64::from(ISR_QUEUE));
}

#[test]
fn intx_is_raised_again_after_eoi_until_the_isr_is_read() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.driver_ok();
    let interrupt = r.seen.lock().unwrap().interrupt.clone().unwrap();
    interrupt.trigger(InterruptKind::Queue(0)).unwrap();
    assert_eq!(r.intx.read().unwrap(), 1);
    let resampler = r.dev.intx_resampler();
    resampler.resample().unwrap();
    assert_eq!(r.intx.read().unwrap(), 1, "ISR still set: raised again");
    r.r(ISR_OFFSET, 1);
    resampler.resample().unwrap();
    assert!(r.intx.read().is_err(), "ISR read: the line stays low");
}

#[test]
fn notify_addresses_follow_the_bar() {
    let mut r = rig();
    r.dev.bar_moved(0, None, Some(BASE));
    assert_eq!(
        *r.io.live.lock().unwrap(),
        vec![BASE + 0x3000, BASE + 0x3004]
    );
    r.dev.bar_moved(0, Some(BASE), Some(BASE + 0x10000));
    assert_eq!(
        *r.io.live.lock().unwrap(),
        vec![BASE + 0x13000, BASE + 0x13004]
    );
    r.dev.bar_moved(0, Some(BASE + 0x10000), None);
    assert!(r.io.live.lock().unwrap().is_empty());
}

#[test]
fn a_notify_write_that_reaches_the_transport_kicks_the_queue() {
    let mut r = rig();
    r.negotiate(VIRTIO_F_VERSION_1);
    r.setup_queue(0, 16);
    r.setup_queue(1, 8);
    r.driver_ok();
    r.w(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(r.dev.kicks[1].read().unwrap(), 1);
    assert!(r.dev.kicks[0].read().is_err());
}

#[test]
fn device_config_goes_to_the_device() {
    let mut r = rig();
    assert_eq!(r.r(DEVICE_CFG_OFFSET + 2, 1), 0x52);
    r.w(DEVICE_CFG_OFFSET + 4, 2, 0x1234);
    assert_eq!(
        r.seen.lock().unwrap().config_writes,
        vec![(4, vec![0x34, 0x12])]
    );
}

#[test]
fn hostile_accesses_everywhere_do_not_panic() {
    let mut r = rig();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % (BAR_SIZE + 16);
        let len = [1usize, 2, 3, 4, 8][(x >> 20) as usize % 5];
        if x & (1 << 40) != 0 {
            r.w(offset, len, x >> 8);
        } else {
            r.r(offset, len);
        }
    }
}
