//! virtio-blk through the mock driver, on real files.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vm_memory::GuestAddress;

use super::*;
use crate::testing::{Buf, MockDriver};

const MEM: usize = 1 << 24;
const FEATURES: u64 = VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

/// A temporary file removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(contents: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "virtio-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).unwrap();
        TempImage(path)
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend(0u32.to_le_bytes());
    h.extend(sector.to_le_bytes());
    h
}

fn segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = sector.to_le_bytes().to_vec();
    s.extend(sectors.to_le_bytes());
    s.extend(flags.to_le_bytes());
    s
}

/// A driver with an activated disk.
struct Rig {
    drv: MockDriver,
    dev: Block,
}

impl Rig {
    fn new(image: &TempImage, readonly: bool) -> Rig {
        Rig::with_features(image, readonly, FEATURES)
    }

    fn with_features(image: &TempImage, readonly: bool, features: u64) -> Rig {
        Rig::with_memory(image, readonly, features, MEM)
    }

    fn with_memory(image: &TempImage, readonly: bool, features: u64, mem: usize) -> Rig {
        let mut drv = MockDriver::new(mem, &[QUEUE_SIZE]);
        let mut dev = Block::open(&image.0, readonly, "ferro-disk-1").unwrap();
        let offered = dev.device_features();
        drv.activate(&mut dev, features & offered).unwrap();
        Rig { drv, dev }
    }

    /// Sends a request with `out` after the header and `in_len` writable
    /// data bytes before the status; returns (status, used len, data).
    fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, u32, Vec<u8>) {
        let h = self.drv.put(&header(kind, sector));
        let mut bufs = vec![Buf::readable(h, 16)];
        if !out.is_empty() {
            let d = self.drv.put(out);
            bufs.push(Buf::readable(d, out.len() as u32));
        }
        let data = self.drv.alloc(in_len.max(1));
        if in_len > 0 {
            bufs.push(Buf::writable(data, in_len));
        }
        let status = self.drv.alloc(1);
        self.drv.write_slice_byte(status, 0xff);
        bufs.push(Buf::writable(status, 1));
        self.drv.add_chain(0, &bufs);
        self.drv.kick(0);
        let used = self.drv.wait_used(0, 1);
        assert_eq!(used.len(), 1, "request not completed");
        let st = self.drv.read(status, 1)[0];
        (st, used[0].len, self.drv.read(data, in_len as usize))
    }
}

impl MockDriver {
    fn write_slice_byte(&self, addr: GuestAddress, b: u8) {
        use vm_memory::Bytes;
        self.memory().write_obj(b, addr).unwrap();
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_then_read_round_trips_through_the_file() {
    let image = TempImage::new(&vec![0u8; 64 * 1024]);
    let mut rig = Rig::new(&image, false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let (st, len, _) = rig.request(VIRTIO_BLK_T_OUT, 4, &data, 0);
    assert_eq!((st, len), (OK, 1));
    assert_eq!(&image.contents()[2048..3072], &data[..]);
    let (st, len, back) = rig.request(VIRTIO_BLK_T_IN, 4, &[], 1024);
    assert_eq!((st, len), (OK, 1025));
    assert_eq!(back, data);
}

#[test]
fn read_returns_the_files_bytes_across_split_buffers() {
    let contents: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let image = TempImage::new(&contents);
    let mut rig = Rig::new(&image, false);
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 2));
    let a = rig.drv.alloc(100);
    let b = rig.drv.alloc(924);
    let s = rig.drv.alloc(1);
    rig.drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::writable(a, 100),
            Buf::writable(b, 924),
            Buf::writable(s, 1),
        ],
    );
    rig.drv.kick(0);
    assert_eq!(rig.drv.wait_used(0, 1)[0].len, 1025);
    assert_eq!(rig.drv.read(s, 1)[0], OK);
    let mut got = rig.drv.read(a, 100);
    got.extend(rig.drv.read(b, 924));
    assert_eq!(got, &contents[1024..2048]);
}

#[test]
fn indirect_request_is_served() {
    let image = TempImage::new(&[0x5a; 4096]);
    let mut rig = Rig::with_features(&image, false, FEATURES | VIRTIO_RING_F_INDIRECT_DESC);
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 0));
    let d = rig.drv.alloc(512);
    let s = rig.drv.alloc(1);
    rig.drv.add_indirect_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::writable(d, 512),
            Buf::writable(s, 1),
        ],
    );
    rig.drv.kick(0);
    assert_eq!(rig.drv.wait_used(0, 1).len(), 1);
    assert_eq!(rig.drv.read(s, 1)[0], OK);
    assert_eq!(rig.drv.read(d, 512), vec![0x5a; 512]);
}

#[test]
fn flush_after_write_leaves_the_data_in_the_file() {
    let image = TempImage::new(&[0u8; 4096]);
    let mut rig = Rig::new(&image, false);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 1, &[0xab; 512], 0).0, OK);
    let (st, len, _) = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!((st, len), (OK, 1));
    assert_eq!(&image.contents()[512..1024], &[0xab; 512][..]);
}

#[test]
fn get_id_returns_the_serial_nul_padded() {
    let image = TempImage::new(&[0u8; 4096]);
    let mut rig = Rig::new(&image, false);
    let (st, len, id) = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((st, len), (OK, 21));
    let mut want = b"ferro-disk-1".to_vec();
    want.resize(20, 0);
    assert_eq!(id, want);
}

#[test]
fn discard_punches_a_hole() {
    let image = TempImage::new(&vec![0x11u8; 1 << 20]);
    let blocks_before = std::fs::metadata(&image.0).unwrap().blocks();
    let mut rig = Rig::new(&image, false);
    // 256 KiB from sector 256 (128 KiB in).
    let (st, _, _) = rig.request(VIRTIO_BLK_T_DISCARD, 0, &segment(256, 512, 0), 0);
    assert_eq!(st, OK);
    let contents = image.contents();
    assert_eq!(contents.len(), 1 << 20, "discard changed the size");
    assert!(contents[128 << 10..384 << 10].iter().all(|&b| b == 0));
    assert!(contents[..128 << 10].iter().all(|&b| b == 0x11));
    assert!(contents[384 << 10..].iter().all(|&b| b == 0x11));
    let blocks_after = std::fs::metadata(&image.0).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "no space freed: {blocks_before} -> {blocks_after}"
    );
}

#[test]
fn write_zeroes_zeroes_the_range() {
    let image = TempImage::new(&vec![0x22u8; 64 << 10]);
    let mut rig = Rig::new(&image, false);
    let mut segs = segment(8, 8, 0);
    segs.extend(segment(64, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
    let (st, _, _) = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segs, 0);
    assert_eq!(st, OK);
    let c = image.contents();
    assert!(c[4096..8192].iter().all(|&b| b == 0));
    assert!(c[32768..40960].iter().all(|&b| b == 0));
    assert!(c[..4096].iter().all(|&b| b == 0x22));
    assert!(c[8192..32768].iter().all(|&b| b == 0x22));
}

#[test]
fn bad_discard_segments_fail_without_touching_the_file() {
    let image = TempImage::new(&vec![0x33u8; 64 << 10]);
    let mut rig = Rig::new(&image, false);
    // The second segment runs past the end: nothing is discarded.
    let mut segs = segment(0, 8, 0);
    segs.extend(segment(120, 16, 0));
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, &segs, 0).0, IOERR);
    // Unmap is not a discard flag.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 1), 0).0,
        UNSUPP
    );
    // Not a whole number of segments.
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, &[0u8; 20], 0).0, IOERR);
    // Sector count that overflows when turned into bytes.
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &segment(u64::MAX / 256, 8, 0), 0)
            .0,
        IOERR
    );
    assert!(image.contents().iter().all(|&b| b == 0x33));
    assert!(!rig.drv.interrupt().needs_reset());
}

#[test]
fn readonly_disk_refuses_writes_and_keeps_the_file() {
    let image = TempImage::new(&[0x44u8; 8192]);
    let mut rig = Rig::new(&image, true);
    let features = rig.dev.device_features();
    assert_ne!(features & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(features & 1 << VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &[0u8; 512], 0).0, IOERR);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 0), 0).0,
        UNSUPP
    );
    assert_eq!(
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(0, 8, 0), 0)
            .0,
        UNSUPP
    );
    let (st, _, data) = rig.request(VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!((st, data), (OK, vec![0x44; 512]));
    assert_eq!(image.contents(), vec![0x44u8; 8192]);
}

#[test]
fn out_of_range_and_unknown_requests_get_error_statuses() {
    let image = TempImage::new(&[0u8; 4096]);
    let mut rig = Rig::new(&image, false);
    // Sector 8 is the end of a 4 KiB disk.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 8, &[], 512).0, IOERR);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 7, &[], 1024).0, IOERR);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 8, &[1; 512], 0).0, IOERR);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, u64::MAX, &[], 512).0, IOERR);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[], 100).0, IOERR);
    assert_eq!(rig.request(99, 0, &[], 0).0, UNSUPP);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 7, &[], 512).0, OK);
    assert!(!rig.drv.interrupt().needs_reset());
    assert_eq!(image.contents(), vec![0u8; 4096]);
}

#[test]
fn discard_not_negotiated_is_unsupported() {
    let image = TempImage::new(&[0x55u8; 8192]);
    let mut rig = Rig::with_features(&image, false, VIRTIO_F_VERSION_1);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 0), 0).0,
        UNSUPP
    );
    assert_eq!(image.contents(), vec![0x55u8; 8192]);
}

#[test]
fn several_disks_are_independent() {
    let i1 = TempImage::new(&[0u8; 4096]);
    let i2 = TempImage::new(&[0u8; 4096]);
    let mut r1 = Rig::new(&i1, false);
    let mut r2 = Rig::new(&i2, false);
    assert_eq!(r1.request(VIRTIO_BLK_T_OUT, 0, &[1; 512], 0).0, OK);
    assert_eq!(r2.request(VIRTIO_BLK_T_OUT, 1, &[2; 512], 0).0, OK);
    let c1 = i1.contents();
    let c2 = i2.contents();
    assert_eq!(&c1[..512], &[1; 512][..]);
    assert!(c1[512..].iter().all(|&b| b == 0));
    assert!(c2[..512].iter().all(|&b| b == 0));
    assert_eq!(&c2[512..1024], &[2; 512][..]);
    r1.dev.reset();
    assert_eq!(r2.request(VIRTIO_BLK_T_IN, 1, &[], 512).2, vec![2; 512]);
}

#[test]
fn capacity_is_the_size_rounded_down_to_sectors() {
    let image = TempImage::new(&[0u8; 1000]);
    let dev = Block::open(&image.0, false, "").unwrap();
    assert_eq!(dev.capacity(), 1);
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 1);
    let mut seg_max = [0u8; 4];
    dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    let mut past = [0xffu8; 4];
    dev.read_config(200, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn open_errors_name_the_file() {
    let missing = std::env::temp_dir().join("virtio-blk-test-no-such-image.img");
    let err = Block::open(&missing, false, "").unwrap_err();
    assert!(err.to_string().contains("no-such-image.img"), "{err}");
    let dir = std::env::temp_dir();
    let err = Block::open(&dir, true, "").unwrap_err();
    assert!(matches!(err, BlockError::NotADisk { .. }), "{err}");
    let image = TempImage::new(&[0u8; 512]);
    let err = Block::open(&image.0, false, "this-serial-is-far-too-long").unwrap_err();
    assert!(
        err.to_string().contains(&*image.0.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn readonly_disk_is_opened_read_only() {
    let image = TempImage::new(&[7u8; 1024]);
    let mut rig = Rig::new(&image, true);
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(rig.dev.disk.file.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 1, &[], 512).2, vec![7; 512]);
}

// Hostile drivers.

fn hostile_rig() -> (TempImage, Rig) {
    let image = TempImage::new(&[0x66u8; 4096]);
    let rig = Rig::new(&image, false);
    (image, rig)
}

/// The device asked for a reset, the queue takes no more requests, and a
/// second disk keeps working.
fn assert_stopped(rig: &mut Rig, image: &TempImage) {
    assert!(rig.drv.interrupt().wait_needs_reset());
    assert_eq!(rig.drv.take_used(0), vec![]);
    let h = rig.drv.put(&header(VIRTIO_BLK_T_OUT, 0));
    let d = rig.drv.put(&[0u8; 512]);
    let s = rig.drv.alloc(1);
    rig.drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::readable(d, 512),
            Buf::writable(s, 1),
        ],
    );
    rig.drv.kick(0);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(rig.drv.take_used(0), vec![]);
    assert_eq!(image.contents(), vec![0x66u8; 4096]);

    let other_image = TempImage::new(&[0u8; 4096]);
    let mut other = Rig::new(&other_image, false);
    assert_eq!(other.request(VIRTIO_BLK_T_OUT, 0, &[9; 512], 0).0, OK);
    assert!(!other.drv.interrupt().needs_reset());
}

#[test]
fn short_header_needs_reset() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_OUT, 0)[..12]);
    let s = rig.drv.alloc(1);
    rig.drv
        .add_chain(0, &[Buf::readable(h, 12), Buf::writable(s, 1)]);
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

#[test]
fn missing_status_byte_needs_reset() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_FLUSH, 0));
    rig.drv.add_chain(0, &[Buf::readable(h, 16)]);
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

#[test]
fn buffer_outside_memory_needs_reset() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 0));
    let s = rig.drv.alloc(1);
    rig.drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::writable(GuestAddress(MEM as u64 - 256), 512),
            Buf::writable(s, 1),
        ],
    );
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

#[test]
fn overflowing_length_needs_reset() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 0));
    let s = rig.drv.alloc(1);
    rig.drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::writable(GuestAddress(u64::MAX - 100), u32::MAX),
            Buf::writable(s, 1),
        ],
    );
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

#[test]
fn descriptor_loop_needs_reset() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 0));
    rig.drv.write_desc(0, 0, h.0, 16, 1, 1);
    rig.drv.write_desc(0, 1, h.0, 16, 1, 0);
    rig.drv.publish(0, 0);
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

#[test]
fn reset_then_reactivate_serves_again() {
    let (image, mut rig) = hostile_rig();
    let h = rig.drv.put(&header(VIRTIO_BLK_T_IN, 0)[..8]);
    rig.drv.add_chain(0, &[Buf::readable(h, 8)]);
    rig.drv.kick(0);
    assert!(rig.drv.interrupt().wait_needs_reset());
    rig.dev.reset();
    rig.drv.reset_rings();
    rig.drv.activate(&mut rig.dev, FEATURES).unwrap();
    let (st, _, data) = rig.request(VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!((st, data), (OK, vec![0x66; 512]));
    assert!(!rig.drv.interrupt().needs_reset());
    drop(image);
}

/// Runs `build` (which publishes a hostile chain) against a disk that
/// negotiated indirect descriptors when `indirect`, kicks, and checks the
/// device stops the queue and a second disk keeps working.
fn hostile_case(indirect: bool, mem: usize, build: impl FnOnce(&mut MockDriver)) {
    let image = TempImage::new(&[0x66u8; 4096]);
    let features = if indirect {
        FEATURES | VIRTIO_RING_F_INDIRECT_DESC
    } else {
        FEATURES
    };
    let mut rig = Rig::with_memory(&image, false, features, mem);
    build(&mut rig.drv);
    rig.drv.kick(0);
    assert_stopped(&mut rig, &image);
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[test]
fn chain_longer_than_the_queue_needs_reset() {
    hostile_case(true, MEM, |drv| {
        // One direct descriptor, then an indirect table of QUEUE_SIZE.
        let h = drv.put(&header(VIRTIO_BLK_T_FLUSH, 0));
        let table = drv.alloc(16 * u32::from(QUEUE_SIZE));
        for i in 0..QUEUE_SIZE {
            let flags = if i + 1 < QUEUE_SIZE { F_NEXT } else { 0 } | F_WRITE;
            let at = GuestAddress(table.0 + 16 * u64::from(i));
            drv.write_raw_desc(at, h.0, 1, flags, i + 1);
        }
        drv.write_desc(0, 0, h.0, 16, F_NEXT, 1);
        drv.write_desc(0, 1, table.0, 16 * u32::from(QUEUE_SIZE), F_INDIRECT, 0);
        drv.publish(0, 0);
    });
}

#[test]
fn total_length_overflowing_u32_needs_reset() {
    // Three overlapping 1.5 GiB buffers: each inside a 2 GiB memory,
    // together past 4 GiB.
    hostile_case(false, 2 << 30, |drv| {
        let h = drv.put(&header(VIRTIO_BLK_T_IN, 0));
        let big = 3 << 29;
        drv.add_chain(
            0,
            &[
                Buf::readable(h, 16),
                Buf::writable(GuestAddress(0), big),
                Buf::writable(GuestAddress(0), big),
                Buf::writable(GuestAddress(0), big),
            ],
        );
    });
}

#[test]
fn malformed_indirect_table_needs_reset() {
    hostile_case(true, MEM, |drv| {
        let t = drv.alloc(64);
        drv.write_desc(0, 0, t.0, 24, F_INDIRECT, 0);
        drv.publish(0, 0);
    });
}

#[test]
fn nested_indirect_table_needs_reset() {
    hostile_case(true, MEM, |drv| {
        let t = drv.alloc(32);
        drv.write_raw_desc(t, t.0, 32, F_INDIRECT, 0);
        drv.write_desc(0, 0, t.0, 32, F_INDIRECT, 0);
        drv.publish(0, 0);
    });
}

#[test]
fn indirect_without_the_feature_needs_reset() {
    hostile_case(false, MEM, |drv| {
        let h = drv.put(&header(VIRTIO_BLK_T_FLUSH, 0));
        let s = drv.alloc(1);
        drv.add_indirect_chain(0, &[Buf::readable(h, 16), Buf::writable(s, 1)]);
    });
}

#[test]
fn next_index_past_the_queue_needs_reset() {
    hostile_case(false, MEM, |drv| {
        let h = drv.put(&header(VIRTIO_BLK_T_FLUSH, 0));
        drv.write_desc(0, 0, h.0, 16, F_NEXT, QUEUE_SIZE + 3);
        drv.publish(0, 0);
    });
}

#[test]
fn head_index_past_the_queue_needs_reset() {
    hostile_case(false, MEM, |drv| drv.publish(0, QUEUE_SIZE));
}

#[test]
fn avail_index_jump_needs_reset() {
    hostile_case(false, MEM, |drv| drv.set_avail_idx(0, QUEUE_SIZE + 1));
}

#[test]
fn readable_after_writable_needs_reset() {
    hostile_case(false, MEM, |drv| {
        let h = drv.put(&header(VIRTIO_BLK_T_OUT, 0));
        let s = drv.alloc(1);
        let d = drv.alloc(512);
        drv.add_chain(
            0,
            &[
                Buf::readable(h, 16),
                Buf::writable(s, 1),
                Buf::readable(d, 512),
            ],
        );
    });
}

#[test]
fn size_limits_are_advertised_and_cover_the_request_cap() {
    let image = TempImage::new(&[0u8; 4096]);
    let dev = Block::open(&image.0, false, "").unwrap();
    assert_ne!(dev.device_features() & 1 << VIRTIO_BLK_F_SIZE_MAX, 0);
    let field = |at: u64| {
        let mut v = [0u8; 4];
        dev.read_config(at, &mut v);
        u64::from(u32::from_le_bytes(v))
    };
    let (size_max, seg_max) = (field(8), field(12));
    assert_eq!(size_max, 16 * 1024);
    // A driver within both limits never meets the cap.
    assert!(size_max * seg_max <= MAX_REQUEST_BYTES);
}

#[test]
fn request_over_the_size_cap_fails_without_touching_the_file() {
    let len = MAX_REQUEST_BYTES as usize + 4096;
    let image = TempImage::new(&vec![0x44u8; len]);
    let mut rig = Rig::with_memory(&image, false, FEATURES, 1 << 25);
    let over = MAX_REQUEST_BYTES as u32 + 512;
    let (st, used, _) = rig.request(VIRTIO_BLK_T_IN, 0, &[], over);
    assert_eq!((st, used), (IOERR, 1));
    let (st, _, _) = rig.request(VIRTIO_BLK_T_OUT, 0, &vec![0x55; over as usize], 0);
    assert_eq!(st, IOERR);
    assert!(image.contents().iter().all(|&b| b == 0x44));
    // Exactly the cap is served.
    let (st, used, data) = rig.request(VIRTIO_BLK_T_IN, 8, &[], MAX_REQUEST_BYTES as u32);
    assert_eq!((st, used), (OK, MAX_REQUEST_BYTES as u32 + 1));
    assert!(data.iter().all(|&b| b == 0x44));
}

#[test]
fn write_zeroes_ends_early_when_the_device_is_stopping() {
    use crate::queue::DeviceQueue;
    use std::sync::atomic::AtomicBool;
    let image = TempImage::new(&vec![0x66u8; 1 << 20]);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image.0)
        .unwrap();
    let disk = Disk::new(file, false, 1 << 20, [0; SERIAL_LEN]);
    let mut drv = MockDriver::new(MEM, &[QUEUE_SIZE]);
    let h = drv.put(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    let s = drv.put(&segment(0, 2048, 0));
    let status = drv.alloc(1);
    drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::readable(s, 16),
            Buf::writable(status, 1),
        ],
    );
    let mem = drv.memory().clone();
    let mut q = DeviceQueue::new(drv.active_queues(FEATURES).remove(0), false);
    let chain = q.pop(&mem).unwrap().unwrap();
    let stop = AtomicBool::new(true);
    assert_eq!(serve(&disk, FEATURES, &stop, &mem, &chain).unwrap(), 1);
    assert_eq!(drv.read(status, 1)[0], IOERR);
    assert!(image.contents().iter().all(|&b| b == 0x66));
    // Writing zeroes by hand stops between steps too.
    let err = write_zeroes_by_hand(&disk.file, 0, 1 << 20, &stop).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    assert!(image.contents().iter().all(|&b| b == 0x66));
    let go = AtomicBool::new(false);
    write_zeroes_by_hand(&disk.file, 0, 1 << 20, &go).unwrap();
    assert!(image.contents().iter().all(|&b| b == 0));
}

#[test]
fn reset_with_a_queue_of_long_write_zeroes_returns_after_the_first() {
    use std::os::fd::FromRawFd;
    const SIZE: u64 = 64 << 20;
    const REQUESTS: usize = 32;
    // SAFETY: the name is a NUL-terminated literal; memfd_create reads it
    // and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"virtio-blk-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(SIZE).unwrap();
    // Anonymous memory has no ZERO_RANGE: every request writes 64 MiB of
    // zeroes by hand, 2 GiB for the whole queue.
    let mut dev = Block::from_disk(Disk::new(file, false, SIZE, [0; SERIAL_LEN]));
    let mut drv = MockDriver::new(MEM, &[QUEUE_SIZE]);
    drv.activate(&mut dev, FEATURES).unwrap();
    let h = drv.put(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0));
    let s = drv.put(&segment(0, (SIZE / SECTOR_SIZE) as u32, 0));
    for _ in 0..REQUESTS {
        let status = drv.alloc(1);
        drv.add_chain(
            0,
            &[
                Buf::readable(h, 16),
                Buf::readable(s, 16),
                Buf::writable(status, 1),
            ],
        );
    }
    drv.kick(0);
    dev.reset();
    let done = usize::from(drv.used_idx(0));
    assert!(done < REQUESTS, "the reset waited for all {done} requests");
}

/// Queues a one-sector read at `sector`; returns its status address.
fn queue_read(drv: &mut MockDriver, sector: u64) -> GuestAddress {
    let h = drv.put(&header(VIRTIO_BLK_T_IN, sector));
    let data = drv.alloc(512);
    let status = drv.alloc(1);
    drv.add_chain(
        0,
        &[
            Buf::readable(h, 16),
            Buf::writable(data, 512),
            Buf::writable(status, 1),
        ],
    );
    status
}

#[test]
fn a_request_out_of_tokens_waits_until_the_limit_is_raised() {
    use crate::rate_limiter::{BucketConfig, DeviceLimiter, LimiterConfig};
    let image = TempImage::new(&vec![0u8; 64 * 1024]);
    // One operation per hour: the first request empties the bucket.
    let hourly = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: Duration::from_secs(3600),
        }),
    };
    let limiter = DeviceLimiter::new(hourly).unwrap();
    let mut drv = MockDriver::new(MEM, &[QUEUE_SIZE]);
    let mut dev = Block::open(&image.0, false, "limited")
        .unwrap()
        .with_rate_limiter(limiter.clone());
    let features = FEATURES & dev.device_features();
    drv.activate(&mut dev, features).unwrap();
    queue_read(&mut drv, 0);
    queue_read(&mut drv, 1);
    drv.kick(0);
    assert_eq!(
        drv.wait_used(0, 1).len(),
        1,
        "the first request was not served"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !limiter.stats().waiting && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        limiter.stats().waiting,
        "the second request was not held back"
    );
    assert!(
        drv.take_used(0).is_empty(),
        "the second request went through"
    );
    limiter.set_config(LimiterConfig::default());
    assert_eq!(drv.wait_used(0, 1).len(), 1, "the second request never ran");
    let stats = limiter.stats();
    assert_eq!((stats.delayed_ops, stats.delayed_bytes), (1, 512));
    dev.reset();
}
