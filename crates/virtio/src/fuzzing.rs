//! Entry points for the fuzz targets in `fuzz/`, also run by a unit test
//! over the checked-in corpus (`fuzz/corpus/<target>/`).
//!
//! * [`queue`]: arbitrary bytes become guest memory holding a descriptor
//!   table and rings; every available chain is walked, read and written.
//! * [`block`]: the bytes describe one virtio-blk request chain (mostly
//!   well-formed, so the fuzzer reaches the request parser) that is served
//!   against an in-memory disk.
//!
//! Neither may panic, and both check the walker's promises: every buffer of
//! an accepted chain lies inside guest memory, readable buffers come first,
//! and the lengths add up.

pub(crate) mod driver;

use std::fs::File;
use std::os::fd::FromRawFd;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{serve, Disk};
use crate::queue::{Chain, DeviceQueue};
use crate::testing::{Buf, MockDriver};
use crate::{ActiveQueue, Memory, VIRTIO_RING_F_INDIRECT_DESC};

/// Guest memory size for the queue target.
const QUEUE_MEM: usize = 0x1_0000;
/// Where the queue target's rings live.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Bytes of the queue target's input that are settings, not memory.
const QUEUE_HEADER: usize = 4;

/// Walks every chain a fuzzed guest memory image makes available.
///
/// Input: byte 0 picks the queue size (a power of two up to 256), byte 1
/// bit 0 enables indirect descriptors and bit 1 the event index, bytes 2-3
/// are the device's starting `next_avail`; the rest is copied to guest
/// address 0 (descriptor table at 0, avail ring at 0x1000, used ring at
/// 0x2000, buffers anywhere below 64 KiB).
pub fn queue(data: &[u8]) {
    if data.len() < QUEUE_HEADER {
        return;
    }
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), QUEUE_MEM)]) else {
        return;
    };
    let image = &data[QUEUE_HEADER..];
    let n = image.len().min(QUEUE_MEM);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let indirect = data[1] & 1 != 0;
    let event_idx = data[1] & 2 != 0;
    let next_avail = u16::from_le_bytes([data[2], data[3]]);
    let Some(mut q) = device_queue(size, indirect, event_idx, next_avail) else {
        return;
    };
    // The avail ring may announce up to `size` chains.
    for _ in 0..=size {
        match q.pop(&mem) {
            Ok(Some(chain)) => {
                check_chain(&mem, &chain, size);
                exercise(&mem, &chain);
                let len = chain.writable_len();
                if q.add_used(&mem, chain.head(), len).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = q.needs_notification(&mem);
    let _ = q.enable_notification(&mem);
}

fn device_queue(
    size: u16,
    indirect: bool,
    event_idx: bool,
    next_avail: u16,
) -> Option<DeviceQueue> {
    let mut queue = Queue::new(size).ok()?;
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_next_avail(next_avail);
    queue.set_next_used(next_avail);
    queue.set_ready(true);
    let kick = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    Some(DeviceQueue::new(
        ActiveQueue {
            index: 0,
            queue,
            kick,
        },
        indirect,
    ))
}

/// The walker's promises about an accepted chain.
fn check_chain(mem: &Memory, chain: &Chain, size: u16) {
    assert!(chain.head() < size, "head past the queue");
    let all = chain.readable().len() + chain.writable().len();
    assert!(all <= usize::from(size), "chain longer than the queue");
    let mut readable = 0u64;
    for b in chain.readable() {
        readable += u64::from(b.len);
    }
    let mut writable = 0u64;
    for b in chain.readable().iter().chain(chain.writable()) {
        assert!(
            b.len == 0 || GuestMemoryBackend::check_range(mem, b.addr, b.len as usize),
            "buffer outside guest memory"
        );
    }
    for b in chain.writable() {
        writable += u64::from(b.len);
    }
    assert_eq!(readable, u64::from(chain.readable_len()));
    assert_eq!(writable, u64::from(chain.writable_len()));
    assert!(readable + writable <= u64::from(u32::MAX));
}

/// Reads every readable byte and fills every writable one.
fn exercise(mem: &Memory, chain: &Chain) {
    let mut reader = chain.reader();
    let mut buf = vec![0u8; reader.remaining() as usize];
    reader
        .read_exact(mem, &mut buf)
        .expect("reading a validated chain");
    assert_eq!(reader.remaining(), 0);
    let fill = vec![0xa5u8; chain.writable_len() as usize];
    let written = chain.writer().write(mem, &fill).expect("writing");
    assert_eq!(written, fill.len());
}

/// Request types the block target picks from (the last slot is raw).
const BLOCK_TYPES: [u32; 7] = [
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_WRITE_ZEROES,
    99,
];
/// Size of the block target's disk.
const DISK_SIZE: u64 = 64 * 1024;
/// The most buffers in a fuzzed request.
const MAX_BUFS: usize = 8;

/// Serves one fuzzed virtio-blk request chain against a 64 KiB disk.
///
/// Input: byte 0 flags (bit 0 read-only, bit 1 DISCARD and WRITE_ZEROES
/// negotiated, bit 2 send the chain through an indirect table, bit 3 the
/// sector is taken raw instead of modulo 256, bit 4 the first buffer's
/// bytes come from the input instead of a built header); byte 1 picks the
/// request type (values 7 and up are used raw); bytes 2-9 the sector; byte
/// 10 the buffer count (1-8). Then per buffer: a little-endian u16 whose
/// top bit marks it device-writable and whose low 15 bits are its length,
/// followed, for readable buffers, by up to that many content bytes.
pub fn block(data: &[u8]) {
    let _ = block_status(data);
}

/// Runs [`block`]'s request; returns the status byte the device wrote, or
/// `None` when the input makes no request or the chain is a driver error.
fn block_status(data: &[u8]) -> Option<u8> {
    let (&flags, rest) = data.split_first()?;
    if rest.len() < 10 {
        return None;
    }
    let readonly = flags & 1 != 0;
    let kind = match rest[0] {
        k if usize::from(k) < BLOCK_TYPES.len() => BLOCK_TYPES[usize::from(k)],
        k => u32::from(k),
    };
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&rest[1..9]);
    let mut sector = u64::from_le_bytes(sector_bytes);
    if flags & 8 == 0 {
        sector %= 256;
    }
    let count = usize::from(rest[9]) % MAX_BUFS + 1;
    let mut input = &rest[10..];

    let mut drv = MockDriver::new(2 << 20, &[256]);
    let mut header = kind.to_le_bytes().to_vec();
    header.extend([0; 4]);
    header.extend(sector.to_le_bytes());
    let mut bufs = Vec::with_capacity(count + 1);
    if flags & 16 == 0 {
        let h = drv.put(&header);
        bufs.push(Buf::readable(h, 16));
    }
    for _ in 0..count {
        let Some(((lo, hi), tail)) = input
            .split_first_chunk::<2>()
            .map(|(c, t)| ((c[0], c[1]), t))
        else {
            break;
        };
        input = tail;
        let word = u16::from_le_bytes([lo, hi]);
        let len = u32::from(word & 0x7fff);
        let addr = drv.alloc(len);
        if word & 0x8000 != 0 {
            bufs.push(Buf::writable(addr, len));
        } else {
            let n = input.len().min(len as usize);
            let (content, tail) = input.split_at(n);
            drv.memory()
                .write_slice(content, addr)
                .expect("mock memory");
            input = tail;
            bufs.push(Buf::readable(addr, len));
        }
    }
    let indirect = flags & 4 != 0;
    if indirect {
        drv.add_indirect_chain(0, &bufs);
    } else {
        drv.add_chain(0, &bufs);
    }
    let features = if flags & 2 != 0 {
        1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    } else {
        0
    } | if indirect {
        VIRTIO_RING_F_INDIRECT_DESC
    } else {
        0
    };
    let disk = memfd_disk(readonly)?;
    let mem = drv.memory().clone();
    let mut q = DeviceQueue::new(drv.active_queues(features).remove(0), indirect);
    // Buffers that break the chain rules (readable after writable) are a
    // driver error the walker reports; the request parser is not reached.
    let chain = q.pop(&mem).ok()??;
    check_chain(&mem, &chain, 256);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let len = serve(&disk, features, &stop, &mem, &chain).ok()?;
    assert!(len >= 1 && len <= chain.writable_len(), "used length");
    // The status is the last writable byte (the last buffer may be empty).
    let mut writer = chain.writer();
    writer.take(chain.writable_len() - 1)?;
    let status = writer.take(1)?;
    mem.read_obj::<u8>(status.first()?.addr).ok()
}

/// A disk backed by anonymous memory, filled with a pattern.
fn memfd_disk(readonly: bool) -> Option<Disk> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create reads it
    // and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"virtio-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns
    // it.
    let file = unsafe { File::from_raw_fd(fd) };
    use std::os::unix::fs::FileExt;
    let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
    file.write_all_at(&pattern, 0).ok()?;
    Some(Disk::new(
        file,
        readonly,
        DISK_SIZE,
        *b"fuzz-serial\0\0\0\0\0\0\0\0\0",
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    fn corpus(target: &str) -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        files
    }

    /// Seeds and fixed crashes of every virtio target.
    #[test]
    fn device_seeds_and_regressions_replay() {
        type Entry = fn(&[u8]);
        let targets: [(&str, Entry); 6] = [
            ("queue", super::queue),
            ("block", super::block),
            ("net", crate::net::fuzz_tx),
            ("rng", crate::rng::fuzz_entry),
            ("console", crate::console::fuzz_entry),
            ("vsock", crate::vsock::fuzz_entry),
        ];
        for (target, entry) in targets {
            for (path, data) in devices::fuzz_entry::seeds(target) {
                eprintln!("{}", path.display());
                entry(&data);
            }
        }
    }

    #[test]
    fn queue_corpus_replays_cleanly() {
        for f in corpus("queue") {
            super::queue(&std::fs::read(&f).unwrap());
        }
    }

    #[test]
    fn block_seeds_are_the_requests_they_are_named_after() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/block");
        let status = |name: &str| super::block_status(&std::fs::read(dir.join(name)).unwrap());
        for ok in [
            "in",
            "out",
            "flush",
            "get-id",
            "discard",
            "write-zeroes-indirect",
        ] {
            assert_eq!(status(ok), Some(0), "{ok}");
        }
        assert_eq!(status("readonly-out"), Some(1));
    }

    #[test]
    fn block_corpus_replays_cleanly() {
        for f in corpus("block") {
            super::block(&std::fs::read(&f).unwrap());
        }
    }
}
