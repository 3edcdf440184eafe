//! Strict reading of split-virtqueue descriptor chains.
//!
//! `virtio_queue`'s chain iterator ends quietly when a descriptor is bad, so
//! a device cannot tell a short chain from a broken one. [`pop`] walks the
//! chain itself and reports every rule the driver broke as a [`ChainError`],
//! which the device answers with `Interrupt::set_needs_reset`. Data moves
//! through checked `Bytes` accessors only; no reference into guest memory is
//! ever taken.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::Memory;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// A rule of the split virtqueue the driver broke.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The ring's indices or addresses are not readable.
    #[error("the virtqueue's rings are outside guest memory")]
    Ring,
    /// The driver made more chains available than the queue holds.
    #[error("the available index ran {0} entries ahead of the device")]
    AvailIndex(u16),
    /// A descriptor index is past the end of the table.
    #[error("descriptor index {0} is outside the queue")]
    Index(u16),
    /// A buffer is (partly) outside guest memory.
    #[error("a buffer at {addr:#x} of {len} bytes is outside guest memory")]
    Buffer { addr: u64, len: u32 },
    /// The chain is longer than the queue: a loop.
    #[error("the descriptor chain is longer than the queue")]
    Loop,
    /// The buffers add up to more than 4 GiB.
    #[error("the descriptor chain's length overflows")]
    Overflow,
    /// An indirect descriptor, which the device does not offer.
    #[error("an indirect descriptor, which was not negotiated")]
    Indirect,
    /// A device-readable buffer follows a device-writable one.
    #[error("a device-readable buffer follows a device-writable one")]
    Order,
    /// The request is shorter than the header it must start with.
    #[error("a request of {0} bytes is shorter than its header")]
    ShortHeader(usize),
    /// The request is longer than the device takes.
    #[error("a request of {0} bytes is longer than the device takes")]
    TooLong(usize),
    /// The used ring could not be written.
    #[error("the used ring is outside guest memory")]
    Used,
}

/// One buffer of a chain, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A validated descriptor chain: the driver's readable buffers, then its
/// writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Chain {
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|s| s.len as usize).sum()
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|s| s.len as usize).sum()
    }

    /// Copies up to `out.len()` readable bytes starting at `skip`; returns
    /// how many were copied.
    pub fn read_at(&self, mem: &Memory, mut skip: usize, out: &mut [u8]) -> usize {
        let mut done = 0;
        for seg in &self.readable {
            let len = seg.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(out.len() - done);
            let addr = seg.addr.unchecked_add(skip as u64);
            if mem.read_slice(&mut out[done..done + n], addr).is_err() {
                break;
            }
            done += n;
            skip = 0;
            if done == out.len() {
                break;
            }
        }
        done
    }

    /// Copies `data` into the writable buffers starting at `skip`; returns
    /// how many bytes fit.
    pub fn write_at(&self, mem: &Memory, mut skip: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for seg in &self.writable {
            let len = seg.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(data.len() - done);
            let addr = seg.addr.unchecked_add(skip as u64);
            if mem.write_slice(&data[done..done + n], addr).is_err() {
                break;
            }
            done += n;
            skip = 0;
            if done == data.len() {
                break;
            }
        }
        done
    }
}

/// Takes the next available chain, checking every descriptor. `Ok(None)`
/// means the driver has none ready.
pub fn pop(queue: &mut Queue, mem: &Memory) -> Result<Option<Chain>, ChainError> {
    let idx = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| ChainError::Ring)?;
    let next = Wrapping(queue.next_avail());
    let size = queue.size();
    let ahead = (idx - next).0;
    if ahead == 0 {
        return Ok(None);
    }
    if ahead > size {
        return Err(ChainError::AvailIndex(ahead));
    }
    // avail ring: flags (2), idx (2), ring[size] of u16.
    let slot = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(next.0 % size))
        .ok_or(ChainError::Ring)?;
    let head: u16 = mem
        .read_obj::<u16>(slot)
        .map(u16::from_le)
        .map_err(|_| ChainError::Ring)?;
    let chain = walk(mem, GuestAddress(queue.desc_table()), size, head)?;
    queue.set_next_avail((next + Wrapping(1)).0);
    Ok(Some(chain))
}

/// Walks the chain starting at `head` in a table of `size` descriptors.
fn walk(mem: &Memory, table: GuestAddress, size: u16, head: u16) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut index = head;
    let mut total: u32 = 0;
    for _ in 0..size {
        if index >= size {
            return Err(ChainError::Index(index));
        }
        let at = table
            .checked_add(16 * u64::from(index))
            .ok_or(ChainError::Ring)?;
        let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Ring)?;
        let flags = desc.flags();
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        total = total.checked_add(desc.len()).ok_or(ChainError::Overflow)?;
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !mem.check_range(seg.addr, seg.len as usize) {
            return Err(ChainError::Buffer {
                addr: seg.addr.raw_value(),
                len: seg.len,
            });
        }
        if flags & VRING_DESC_F_WRITE != 0 {
            chain.writable.push(seg);
        } else if chain.writable.is_empty() {
            chain.readable.push(seg);
        } else {
            return Err(ChainError::Order);
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
    Err(ChainError::Loop)
}

/// Returns a chain to the driver with `len` bytes written.
pub fn add_used(queue: &mut Queue, mem: &Memory, head: u16, len: u32) -> Result<(), ChainError> {
    queue.add_used(mem, head, len).map_err(|_| ChainError::Used)
}
