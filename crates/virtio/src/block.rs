//! virtio-blk (VirtIO 1.2, 5.2) backed by a raw disk image.
//!
//! One request queue, served on the device's worker thread; file I/O never
//! happens on the caller's (vCPU or VMM) thread. Data moves between the file
//! and guest memory with positional reads and writes straight into the
//! guest's buffers. Requests: IN, OUT, FLUSH (fdatasync before the used
//! entry is published), GET_ID, DISCARD (hole punching) and WRITE_ZEROES.
//!
//! A request the device can refuse cleanly (a sector past the end, an
//! unknown type, a write to a read-only disk) completes with an error
//! status. A chain that is not a request at all (header shorter than 16
//! bytes, no status byte) is a driver error: the queue stops and the device
//! asks for a reset.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use vmm_sys_util::epoll::EventSet;

use crate::queue::{Buffer, Chain, QueueError, QueueHandler, QueueSet, Worker};
use crate::rate_limiter::DeviceLimiter;
use crate::{
    device_type, read_config_bytes, ActivateError, ActiveQueue, Interrupt, Memory, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector, the unit of `capacity` and request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial number GET_ID returns.
pub const SERIAL_LEN: usize = 20;
/// Length of the request header (type, reserved, sector).
const HEADER_LEN: u32 = 16;
/// Length of one DISCARD / WRITE_ZEROES segment.
const SEGMENT_LEN: u32 = 16;
/// The most sectors one DISCARD or WRITE_ZEROES segment may cover.
const MAX_DISCARD_SECTORS: u32 = 0x7f_ffff;
/// The most segments in one DISCARD or WRITE_ZEROES request.
const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity hint, in sectors (4 KiB).
const DISCARD_ALIGNMENT: u32 = 8;
/// The most data bytes one IN or OUT request may carry; bigger requests
/// fail with IOERR. This bounds the time one request takes, so a reset
/// (which waits for the request in progress) stays prompt.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// The most data segments the driver may put in one request (`seg_max`).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest data segment the driver may use (`size_max`). With
/// [`SEG_MAX`] segments a request stays under [`MAX_REQUEST_BYTES`], so a
/// driver that honours both limits never meets the cap.
const SIZE_MAX: u32 = 16 * 1024;
/// Discard and write-zeroes ranges are worked through in steps of this
/// many bytes, checking between steps whether the device is being reset.
const ZERO_STEP: u64 = 64 << 20;
/// Buffer size for writing zeroes by hand.
const ZERO_BUF: usize = 64 * 1024;
/// Bytes of the configuration space the device exposes.
const CONFIG_LEN: usize = 60;

/// Errors from opening a disk image.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image's size could not be read.
    #[error("cannot read the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image is a directory or some other non-disk file.
    #[error("disk image {path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    /// The serial number does not fit in the 20 bytes GET_ID returns.
    #[error("serial '{serial}' for disk image {path} is longer than 20 bytes")]
    SerialTooLong { path: PathBuf, serial: String },
}

/// The backing file and what the driver sees of it.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    readonly: bool,
    /// Capacity in 512-byte sectors (the file size rounded down).
    sectors: u64,
    serial: [u8; SERIAL_LEN],
}

impl Disk {
    pub(crate) fn new(file: File, readonly: bool, size: u64, serial: [u8; SERIAL_LEN]) -> Self {
        Disk {
            file,
            readonly,
            sectors: size / SECTOR_SIZE,
            serial,
        }
    }

    /// The byte offset of `len` bytes at `sector`, if inside the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.sectors * SECTOR_SIZE).then_some(offset)
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    config: [u8; CONFIG_LEN],
    worker: Option<Worker>,
    limiter: Option<Arc<DeviceLimiter>>,
}

impl Block {
    /// Opens the raw image at `path` (read-only if `readonly`) as a disk
    /// whose GET_ID answer is `serial` (at most 20 bytes).
    pub fn open(path: &Path, readonly: bool, serial: &str) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| BlockError::Open {
                path: path.to_path_buf(),
                source: e,
            })?;
        Block::from_file(file, path, readonly, serial)
    }

    /// A disk on the image `file` opened already (for writing too unless
    /// `readonly`); `path` names it in errors.
    pub fn from_file(
        mut file: File,
        path: &Path,
        readonly: bool,
        serial: &str,
    ) -> Result<Block, BlockError> {
        let serial_bytes = serial_bytes(path, serial)?;
        let open = |e| BlockError::Open {
            path: path.to_path_buf(),
            source: e,
        };
        let meta = file.metadata().map_err(open)?;
        let kind = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(|e| BlockError::Size {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(Block::from_disk(Disk::new(
            file,
            readonly,
            size,
            serial_bytes,
        )))
    }

    pub(crate) fn from_disk(disk: Disk) -> Block {
        let config = build_config(&disk);
        Block {
            disk: Arc::new(disk),
            config,
            worker: None,
            limiter: None,
        }
    }

    /// Serves requests through `limiter`: each costs its data bytes and
    /// one operation, and a request out of tokens waits on the limiter's
    /// timer.
    pub fn with_rate_limiter(mut self, limiter: Arc<DeviceLimiter>) -> Block {
        self.limiter = Some(limiter);
        self
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors
    }
}

fn serial_bytes(path: &Path, serial: &str) -> Result<[u8; SERIAL_LEN], BlockError> {
    let mut out = [0u8; SERIAL_LEN];
    if serial.len() > SERIAL_LEN {
        return Err(BlockError::SerialTooLong {
            path: path.to_path_buf(),
            serial: serial.to_string(),
        });
    }
    out[..serial.len()].copy_from_slice(serial.as_bytes());
    Ok(out)
}

/// The configuration space (VirtIO 1.2, 5.2.4), little-endian.
fn build_config(disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| {
        c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    c[0..8].copy_from_slice(&disk.sectors.to_le_bytes());
    put32(&mut c, 8, SIZE_MAX); // size_max
    put32(&mut c, 12, SEG_MAX); // seg_max
    put32(&mut c, 20, SECTOR_SIZE as u32); // blk_size
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, MAX_DISCARD_SEG);
    put32(&mut c, 44, DISCARD_ALIGNMENT);
    put32(&mut c, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
    put32(&mut c, 52, MAX_DISCARD_SEG); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // No writable fields: writeback is not offered.
    }

    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        crate::expect_queues(&queues, 1)?;
        self.reset();
        let set = QueueSet::new("virtio-blk", mem, interrupt, queues, features);
        let handler = BlockHandler {
            stop: set.stop_flag(),
            disk: self.disk.clone(),
            features: features & self.device_features(),
            limiter: self.limiter.clone(),
        };
        let timer: Vec<_> = self
            .limiter
            .iter()
            .map(|l| (l.timer_fd(), RATE_TIMER, EventSet::IN))
            .collect();
        let worker =
            Worker::spawn("virtio-blk", set, handler, &timer).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        // Told to stop; the transport waits for it off the bus lock.
        self.worker.take().map(Worker::stopping)
    }
}

/// The worker's token for the rate limiter's timer.
const RATE_TIMER: u32 = 0;

struct BlockHandler {
    /// Set when the worker is told to stop: long requests end early.
    stop: Arc<AtomicBool>,
    disk: Arc<Disk>,
    features: u64,
    limiter: Option<Arc<DeviceLimiter>>,
}

impl QueueHandler for BlockHandler {
    fn queue_event(&mut self, set: &mut QueueSet, qi: usize) {
        let (disk, features, stop) = (&*self.disk, self.features, &*self.stop);
        let limiter = self.limiter.as_deref();
        set.drain_admitted(
            qi,
            |chain| limiter.is_none_or(|l| l.admit(request_bytes(chain), 1)),
            |mem, chain| serve(disk, features, stop, mem, chain),
        );
    }

    fn backend_event(&mut self, set: &mut QueueSet, token: u32, _events: EventSet) {
        if token == RATE_TIMER {
            if let Some(limiter) = &self.limiter {
                limiter.timer_fired();
            }
            if !set.queues[0].is_broken() {
                self.queue_event(set, 0);
            }
        }
    }
}

/// What a request costs a bandwidth limit: its data, that is the chain
/// without the 16-byte header and the status byte.
fn request_bytes(chain: &Chain) -> u64 {
    let readable = u64::from(chain.readable_len()).saturating_sub(u64::from(HEADER_LEN));
    let writable = u64::from(chain.writable_len()).saturating_sub(1);
    readable + writable
}

/// Serves one request chain; returns the bytes written into it (data and
/// status). A chain that is not a request is an error. `stop` set while
/// a long discard or write-zeroes runs ends it early with IOERR.
pub(crate) fn serve(
    disk: &Disk,
    features: u64,
    stop: &AtomicBool,
    mem: &Memory,
    chain: &Chain,
) -> Result<u32, QueueError> {
    let mut reader = chain.reader();
    let mut header = [0u8; HEADER_LEN as usize];
    reader
        .read_exact(mem, &mut header)
        .map_err(|_| QueueError::Malformed("request header shorter than 16 bytes"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector);

    let writable = chain.writable_len();
    if writable == 0 {
        return Err(QueueError::Malformed("request without a status byte"));
    }
    let mut writer = chain.writer();
    let data_out = writer.take(writable - 1).unwrap_or_default();
    let status_at = writer
        .take(1)
        .and_then(|b| b.first().copied())
        .ok_or(QueueError::Malformed("request without a status byte"))?;
    // The readable bytes after the header.
    let data_in = reader.take(reader.remaining()).unwrap_or_default();

    let has = |bit: u32| features & (1 << bit) != 0;
    let (status, written) = match kind {
        VIRTIO_BLK_T_IN => read(disk, mem, sector, &data_out),
        VIRTIO_BLK_T_OUT if disk.readonly => (VIRTIO_BLK_S_IOERR, 0),
        VIRTIO_BLK_T_OUT => (write(disk, mem, sector, &data_in), 0),
        VIRTIO_BLK_T_FLUSH => (flush(disk), 0),
        VIRTIO_BLK_T_GET_ID => get_id(disk, mem, &data_out)?,
        VIRTIO_BLK_T_DISCARD if has(VIRTIO_BLK_F_DISCARD) && !disk.readonly => {
            (discard(disk, mem, &data_in, false, stop)?, 0)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if has(VIRTIO_BLK_F_WRITE_ZEROES) && !disk.readonly => {
            (discard(disk, mem, &data_in, true, stop)?, 0)
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    };
    // Status values are below 256.
    mem.write_obj(status as u8, status_at.addr)
        .map_err(|_| QueueError::Memory)?;
    Ok(written + 1)
}

fn total_len(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// IN: file to guest memory. Returns the status and the bytes written.
fn read(disk: &Disk, mem: &Memory, sector: u64, bufs: &[Buffer]) -> (u32, u32) {
    let len = total_len(bufs);
    let Some(mut offset) = disk
        .range(sector, len)
        .filter(|_| len.is_multiple_of(SECTOR_SIZE) && len <= MAX_REQUEST_BYTES)
    else {
        return (VIRTIO_BLK_S_IOERR, 0);
    };
    for b in bufs {
        let mut file = FileAt {
            file: &disk.file,
            offset,
        };
        if transfer(mem, b, |slice| file.read_exact_volatile(slice)).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        offset += u64::from(b.len);
    }
    // len is at most the chain's writable length, a u32.
    (VIRTIO_BLK_S_OK, len as u32)
}

/// OUT: guest memory to file.
fn write(disk: &Disk, mem: &Memory, sector: u64, bufs: &[Buffer]) -> u32 {
    let len = total_len(bufs);
    let Some(mut offset) = disk
        .range(sector, len)
        .filter(|_| len.is_multiple_of(SECTOR_SIZE) && len <= MAX_REQUEST_BYTES)
    else {
        return VIRTIO_BLK_S_IOERR;
    };
    for b in bufs {
        let mut file = FileAt {
            file: &disk.file,
            offset,
        };
        if transfer(mem, b, |slice| file.write_all_volatile(slice)).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        offset += u64::from(b.len);
    }
    VIRTIO_BLK_S_OK
}

/// Runs `io` on each host-contiguous piece of a guest buffer.
fn transfer<F>(mem: &Memory, b: &Buffer, mut io: F) -> Result<(), VolatileMemoryError>
where
    F: FnMut(&mut VolatileSlice<'_, ()>) -> Result<(), VolatileMemoryError>,
{
    for slice in GuestMemoryBackend::get_slices(mem, b.addr, b.len as usize) {
        let mut slice = slice.map_err(|_| VolatileMemoryError::OutOfBounds { addr: 0 })?;
        io(&mut slice)?;
    }
    Ok(())
}

fn flush(disk: &Disk) -> u32 {
    match disk.file.sync_data() {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(_) => VIRTIO_BLK_S_IOERR,
    }
}

/// GET_ID: the serial, NUL-padded, as much as fits.
fn get_id(disk: &Disk, mem: &Memory, bufs: &[Buffer]) -> Result<(u32, u32), QueueError> {
    let mut done = 0usize;
    for b in bufs {
        if done == SERIAL_LEN {
            break;
        }
        let n = (b.len as usize).min(SERIAL_LEN - done);
        mem.write_slice(&disk.serial[done..done + n], b.addr)
            .map_err(|_| QueueError::Memory)?;
        done += n;
    }
    // done <= 20.
    Ok((VIRTIO_BLK_S_OK, done as u32))
}

/// One DISCARD / WRITE_ZEROES segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

/// Reads and checks every segment before touching the file: a bad one
/// fails the whole request.
fn segments(mem: &Memory, bufs: &[Buffer], zeroes: bool) -> Result<Vec<Segment>, u32> {
    let len = total_len(bufs);
    if len == 0 || !len.is_multiple_of(u64::from(SEGMENT_LEN)) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let count = len / u64::from(SEGMENT_LEN);
    if count > u64::from(MAX_DISCARD_SEG) {
        return Err(VIRTIO_BLK_S_IOERR);
    }
    let mut raw = vec![0u8; len as usize];
    let mut pos = 0usize;
    for b in bufs {
        let n = b.len as usize;
        mem.read_slice(&mut raw[pos..pos + n], b.addr)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        pos += n;
    }
    let allowed = if zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    raw.chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let le32 = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
            let mut s = [0u8; 8];
            s.copy_from_slice(&c[0..8]);
            let seg = Segment {
                sector: u64::from_le_bytes(s),
                sectors: le32(8),
                flags: le32(12),
            };
            if seg.flags & !allowed != 0 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            if seg.sectors > MAX_DISCARD_SECTORS {
                return Err(VIRTIO_BLK_S_IOERR);
            }
            Ok(seg)
        })
        .collect()
}

/// DISCARD punches holes; WRITE_ZEROES zeroes the ranges (punching holes
/// when the driver allows unmapping). Returns the status. Ranges are done
/// in steps of [`ZERO_STEP`]; `stop` set between steps ends the request
/// with IOERR.
fn discard(
    disk: &Disk,
    mem: &Memory,
    bufs: &[Buffer],
    zeroes: bool,
    stop: &AtomicBool,
) -> Result<u32, QueueError> {
    let segs = match segments(mem, bufs, zeroes) {
        Ok(s) => s,
        Err(status) => return Ok(status),
    };
    let mut ranges = Vec::with_capacity(segs.len());
    for s in &segs {
        let len = u64::from(s.sectors) * SECTOR_SIZE;
        match disk.range(s.sector, len) {
            Some(offset) => ranges.push((offset, len, s.flags)),
            None => return Ok(VIRTIO_BLK_S_IOERR),
        }
    }
    for (offset, len, flags) in ranges {
        let mode = if !zeroes || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        let end = offset + len;
        let mut at = offset;
        while at < end {
            if stop.load(Ordering::Acquire) {
                return Ok(VIRTIO_BLK_S_IOERR);
            }
            let step = (end - at).min(ZERO_STEP);
            if let Err(status) = discard_step(disk, mode, at, step, zeroes, stop) {
                return Ok(status);
            }
            at += step;
        }
    }
    Ok(VIRTIO_BLK_S_OK)
}

/// One step of [`discard`]: `len` bytes at `offset`.
fn discard_step(
    disk: &Disk,
    mode: i32,
    offset: u64,
    len: u64,
    zeroes: bool,
    stop: &AtomicBool,
) -> Result<(), u32> {
    match fallocate(&disk.file, mode, offset, len) {
        Ok(()) => Ok(()),
        Err(_) if zeroes => {
            write_zeroes_by_hand(&disk.file, offset, len, stop).map_err(|_| VIRTIO_BLK_S_IOERR)
        }
        // A file system without hole punching makes discard a no-op,
        // which the spec allows; other failures are errors.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(_) => Err(VIRTIO_BLK_S_IOERR),
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    loop {
        // SAFETY: fallocate only acts on the file descriptor, which `file`
        // keeps open; no memory is passed.
        let r = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Writes `len` zero bytes at `offset`, giving up (with `Interrupted`) as
/// soon as `stop` is set.
fn write_zeroes_by_hand(
    file: &File,
    mut offset: u64,
    len: u64,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; ZERO_BUF];
    let end = offset + len;
    while offset < end {
        if stop.load(Ordering::Acquire) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        let n = (end - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// A file seen from a position, read and written with pread/pwrite
/// directly into and out of guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn offset(&self) -> Result<i64, VolatileMemoryError> {
        i64::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from_raw_os_error(libc::EINVAL))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the pointer and length come from a VolatileSlice of mapped
        // guest memory that stays mapped while `guard` lives; pread writes
        // at most `buf.len()` bytes there. The fd is open for `self.file`'s
        // lifetime.
        let n = unsafe {
            libc::pread64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        // 0 <= n <= buf.len().
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: the pointer and length come from a VolatileSlice of mapped
        // guest memory that stays mapped while `guard` lives; pwrite only
        // reads `buf.len()` bytes from it. The fd is open for `self.file`'s
        // lifetime.
        let n = unsafe {
            libc::pwrite64(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        // 0 <= n <= buf.len().
        let n = n as usize;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
