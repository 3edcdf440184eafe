//! Queue machinery shared by every device: checked descriptor-chain walking
//! and the worker thread that serves a device's queues.
//!
//! The driver owns the descriptor table and the rings and may rewrite them
//! at any time, so nothing here keeps a reference into guest memory. A chain
//! is read once, validated descriptor by descriptor, and copied into a
//! [`Chain`]: a list of `(address, length)` buffers that are all inside guest
//! memory, readable ones first, with a total length that fits in a `u32`.
//! Data is then moved with vm-memory's checked accessors.
//!
//! `virtio_queue::DescriptorChain` stops iterating silently on most of these
//! faults (an unreadable descriptor, a bad indirect table, an overflowing
//! length) and does not check that buffers lie inside guest memory at all, so
//! the walk here reads the descriptor table itself and turns every fault into
//! a [`QueueError`]. A device that meets one stops serving the queue and asks
//! the driver for a reset ([`QueueSet::fail`]).
//!
//! [`Worker`] runs a [`QueueHandler`] on its own thread: it waits on the
//! queues' kick eventfds, any backend fds and a stop eventfd. Stopping joins
//! the thread, so once [`Worker::stop`] returns the device no longer touches
//! guest memory.

use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActiveQueue, Interrupt, InterruptKind, Memory};

/// Size of one split-queue descriptor in bytes.
const DESC_SIZE: u64 = 16;
/// Offset of the ring array in the available ring (after flags and idx).
const AVAIL_RING_OFFSET: u64 = 4;

/// A driver error found on a queue, or a failure to reach its rings.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The queue's rings do not lie inside guest memory.
    #[error("the queue's descriptor table or rings are outside guest memory")]
    RingsOutsideMemory,
    /// The queue size is zero or not a power of two.
    #[error("the queue size {0} is not a power of two")]
    BadSize(u16),
    /// The avail ring or used ring could not be accessed.
    #[error("cannot access the queue's rings")]
    RingAccess,
    /// The driver published more buffers than the queue holds.
    #[error("the driver made {pending} chains available on a queue of size {size}")]
    AvailIndex { pending: u16, size: u16 },
    /// A chain head index is past the end of the descriptor table.
    #[error("chain head {head} is past the queue size {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    /// A descriptor's `next` index is past the end of its table.
    #[error("descriptor {index} chains to {next}, past the table size {size}")]
    NextOutOfRange { index: u16, next: u16, size: u16 },
    /// The chain visits a descriptor twice.
    #[error("descriptor {index} appears twice in one chain (a loop)")]
    Loop { index: u16 },
    /// The chain has more descriptors than the queue size.
    #[error("the chain is longer than the queue size {size}")]
    TooLong { size: u16 },
    /// The descriptor itself could not be read (its table is outside memory).
    #[error("descriptor {index} cannot be read from guest memory")]
    DescriptorUnreadable { index: u16 },
    /// `addr + len` of a descriptor overflows the address space.
    #[error("descriptor {index} at {addr:#x} with length {len} overflows the address space")]
    AddressOverflow { index: u16, addr: u64, len: u32 },
    /// A descriptor's buffer is not entirely inside guest memory.
    #[error("descriptor {index} buffer {addr:#x}+{len} is outside guest memory")]
    BufferOutsideMemory { index: u16, addr: u64, len: u32 },
    /// The chain's total length does not fit in 32 bits.
    #[error("the chain's total length overflows 32 bits")]
    TotalLengthOverflow,
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: u16 },
    /// An indirect descriptor was used although the feature was not negotiated.
    #[error("descriptor {index} is indirect but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated { index: u16 },
    /// An indirect table contains another indirect descriptor.
    #[error("an indirect table contains an indirect descriptor")]
    IndirectNested,
    /// An indirect descriptor also has the NEXT flag.
    #[error("indirect descriptor {index} also has the NEXT flag")]
    IndirectWithNext { index: u16 },
    /// An indirect table's length is zero, not a multiple of 16, or larger
    /// than the queue.
    #[error(
        "indirect table length {len} is not a whole number of descriptors up to the queue size"
    )]
    IndirectLength { len: u32 },
    /// The chain has no buffer of the kind the request needs.
    #[error("the chain is malformed for this device: {0}")]
    Malformed(&'static str),
    /// Reading or writing a buffer in guest memory failed.
    #[error("cannot access a buffer in guest memory")]
    Memory,
}

/// One buffer of a chain: inside guest memory, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical start address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain, copied out of guest memory.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    head: u16,
    buffers: Vec<Buffer>,
    readable: usize,
    readable_len: u32,
    writable_len: u32,
}

impl Chain {
    /// The head descriptor index, to hand back in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }
    /// The device-readable buffers, in chain order.
    pub fn readable(&self) -> &[Buffer] {
        &self.buffers[..self.readable]
    }
    /// The device-writable buffers, in chain order.
    pub fn writable(&self) -> &[Buffer] {
        &self.buffers[self.readable..]
    }
    /// Total length of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }
    /// Total length of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }
    /// A cursor over the device-readable bytes.
    pub fn reader(&self) -> Cursor<'_> {
        Cursor::new(self.readable(), self.readable_len)
    }
    /// A cursor over the device-writable bytes.
    pub fn writer(&self) -> Cursor<'_> {
        Cursor::new(self.writable(), self.writable_len)
    }
}

/// A position in a list of buffers, seen as one run of bytes.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buffers: &'a [Buffer],
    offset: u32,
    remaining: u32,
}

impl<'a> Cursor<'a> {
    fn new(buffers: &'a [Buffer], total: u32) -> Self {
        Cursor {
            buffers,
            offset: 0,
            remaining: total,
        }
    }

    /// Bytes left after the cursor.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// Takes the next `len` bytes as guest ranges, moving the cursor past
    /// them. Returns `None` (and moves nothing) when fewer bytes remain.
    pub fn take(&mut self, len: u32) -> Option<Vec<Buffer>> {
        if len > self.remaining {
            return None;
        }
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let buf = self.buffers[0];
            let avail = buf.len - self.offset;
            let n = avail.min(left);
            out.push(Buffer {
                // Inside a validated buffer: cannot overflow.
                addr: buf.addr.unchecked_add(u64::from(self.offset)),
                len: n,
            });
            left -= n;
            self.advance(n);
        }
        self.skip_empty();
        Some(out)
    }

    fn advance(&mut self, n: u32) {
        self.offset += n;
        self.remaining -= n;
        self.skip_empty();
    }

    fn skip_empty(&mut self) {
        while let Some(buf) = self.buffers.first() {
            if self.offset < buf.len {
                break;
            }
            self.buffers = &self.buffers[1..];
            self.offset = 0;
        }
    }

    /// Reads exactly `out.len()` bytes. Fails (moving nothing) when fewer
    /// remain.
    pub fn read_exact(&mut self, mem: &Memory, out: &mut [u8]) -> Result<(), QueueError> {
        let len = u32::try_from(out.len()).map_err(|_| QueueError::Memory)?;
        let ranges = self
            .take(len)
            .ok_or(QueueError::Malformed("short buffer"))?;
        let mut pos = 0usize;
        for r in ranges {
            let n = r.len as usize;
            mem.read_slice(&mut out[pos..pos + n], r.addr)
                .map_err(|_| QueueError::Memory)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes as much of `data` as fits; returns the number of bytes written.
    pub fn write(&mut self, mem: &Memory, data: &[u8]) -> Result<usize, QueueError> {
        let n = u32::try_from(data.len())
            .unwrap_or(u32::MAX)
            .min(self.remaining);
        let ranges = self.take(n).unwrap_or_default();
        let mut pos = 0usize;
        for r in ranges {
            let len = r.len as usize;
            mem.write_slice(&data[pos..pos + len], r.addr)
                .map_err(|_| QueueError::Memory)?;
            pos += len;
        }
        Ok(pos)
    }
}

/// Walks descriptor chains of one queue, validating every descriptor.
#[derive(Debug, Clone)]
pub struct ChainWalker {
    desc_table: GuestAddress,
    size: u16,
    indirect: bool,
    visited: Vec<u64>,
}

impl ChainWalker {
    /// A walker for a descriptor table of `size` entries at `desc_table`.
    /// `indirect` says whether VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub fn new(desc_table: GuestAddress, size: u16, indirect: bool) -> Self {
        ChainWalker {
            desc_table,
            size,
            indirect,
            visited: vec![0; usize::from(size).div_ceil(64).max(1)],
        }
    }

    fn clear_visited(&mut self) {
        self.visited.iter_mut().for_each(|w| *w = 0);
    }

    /// Marks `index` visited; false if it already was.
    fn visit(&mut self, index: u16) -> bool {
        let (word, bit) = (usize::from(index / 64), index % 64);
        let seen = self.visited[word] & (1 << bit) != 0;
        self.visited[word] |= 1 << bit;
        !seen
    }

    /// Reads and validates the chain starting at `head`.
    pub fn walk(&mut self, mem: &Memory, head: u16) -> Result<Chain, QueueError> {
        let size = self.size;
        if head >= size {
            return Err(QueueError::HeadOutOfRange { head, size });
        }
        self.clear_visited();
        let mut chain = Chain {
            head,
            ..Chain::default()
        };
        let mut table = self.desc_table;
        let mut table_len = size;
        let mut in_indirect = false;
        let mut index = head;
        let mut total: u32 = 0;
        loop {
            if !self.visit(index) {
                return Err(QueueError::Loop { index });
            }
            let desc = read_descriptor(mem, table, index)?;
            if u32::from(desc.flags()) & VRING_DESC_F_INDIRECT != 0 {
                let len = self.check_indirect(mem, &desc, index, in_indirect)?;
                table = desc.addr();
                table_len = len;
                in_indirect = true;
                index = 0;
                self.clear_visited();
                continue;
            }
            if chain.buffers.len() >= usize::from(size) {
                return Err(QueueError::TooLong { size });
            }
            let buf = check_buffer(mem, &desc, index)?;
            total = total
                .checked_add(buf.len)
                .ok_or(QueueError::TotalLengthOverflow)?;
            if u32::from(desc.flags()) & VRING_DESC_F_WRITE != 0 {
                chain.writable_len += buf.len;
            } else {
                if chain.writable_len > 0 || chain.buffers.len() > chain.readable {
                    return Err(QueueError::ReadableAfterWritable { index });
                }
                chain.readable += 1;
                chain.readable_len += buf.len;
            }
            chain.buffers.push(buf);
            if u32::from(desc.flags()) & VRING_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            let next = desc.next();
            if next >= table_len {
                return Err(QueueError::NextOutOfRange {
                    index,
                    next,
                    size: table_len,
                });
            }
            index = next;
        }
    }

    /// Validates an indirect descriptor; returns its table's entry count.
    fn check_indirect(
        &self,
        mem: &Memory,
        desc: &Descriptor,
        index: u16,
        in_indirect: bool,
    ) -> Result<u16, QueueError> {
        if !self.indirect {
            return Err(QueueError::IndirectNotNegotiated { index });
        }
        if in_indirect {
            return Err(QueueError::IndirectNested);
        }
        if u32::from(desc.flags()) & VRING_DESC_F_NEXT != 0 {
            return Err(QueueError::IndirectWithNext { index });
        }
        let len = desc.len();
        let entries = u64::from(len) / DESC_SIZE;
        if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(self.size) {
            return Err(QueueError::IndirectLength { len });
        }
        check_buffer(mem, desc, index)?;
        // entries <= self.size, a u16.
        Ok(entries as u16)
    }
}

fn read_descriptor(
    mem: &Memory,
    table: GuestAddress,
    index: u16,
) -> Result<Descriptor, QueueError> {
    let addr = table
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(QueueError::DescriptorUnreadable { index })?;
    mem.read_obj::<Descriptor>(addr)
        .map_err(|_| QueueError::DescriptorUnreadable { index })
}

fn check_buffer(mem: &Memory, desc: &Descriptor, index: u16) -> Result<Buffer, QueueError> {
    let (addr, len) = (desc.addr(), desc.len());
    let overflow = QueueError::AddressOverflow {
        index,
        addr: addr.raw_value(),
        len,
    };
    // The last byte must be addressable: addr + len - 1 <= u64::MAX.
    if len > 0 && addr.checked_add(u64::from(len) - 1).is_none() {
        return Err(overflow);
    }
    if len > 0 && !GuestMemoryBackend::check_range(mem, addr, len as usize) {
        return Err(QueueError::BufferOutsideMemory {
            index,
            addr: addr.raw_value(),
            len,
        });
    }
    Ok(Buffer { addr, len })
}

/// Checks a queue's size and that its descriptor table and rings lie
/// inside guest memory (`Queue::is_valid` also wants the ready flag, which
/// is the transport's business).
pub fn check_rings(mem: &Memory, queue: &Queue) -> Result<(), QueueError> {
    let size = queue.size();
    if size == 0 || !size.is_power_of_two() {
        return Err(QueueError::BadSize(size));
    }
    let n = u64::from(size);
    let areas = [
        (queue.desc_table(), DESC_SIZE * n),
        (queue.avail_ring(), 6 + 2 * n),
        (queue.used_ring(), 6 + 8 * n),
    ];
    for (addr, len) in areas {
        let addr = GuestAddress(addr);
        if addr.checked_add(len).is_none()
            || !GuestMemoryBackend::check_range(mem, addr, len as usize)
        {
            return Err(QueueError::RingsOutsideMemory);
        }
    }
    Ok(())
}

/// One queue as a device serves it.
#[derive(Debug)]
pub struct DeviceQueue {
    index: u16,
    queue: Queue,
    kick: EventFd,
    walker: ChainWalker,
    broken: bool,
}

impl DeviceQueue {
    /// Wraps a queue the transport made ready. `indirect` says whether
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub fn new(active: ActiveQueue, indirect: bool) -> Self {
        let size = active.queue.size();
        let walker = ChainWalker::new(GuestAddress(active.queue.desc_table()), size, indirect);
        DeviceQueue {
            index: active.index,
            queue: active.queue,
            kick: active.kick,
            walker,
            broken: false,
        }
    }

    /// The queue's index within the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether a driver error stopped this queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The eventfd the driver's kicks signal.
    pub fn kick(&self) -> &EventFd {
        &self.kick
    }

    /// Takes the next available chain, validated. `Ok(None)` when the
    /// driver has made nothing new available or the queue is stopped.
    pub fn pop(&mut self, mem: &Memory) -> Result<Option<Chain>, QueueError> {
        if self.broken {
            return Ok(None);
        }
        let size = self.queue.size();
        if size == 0 {
            return Err(QueueError::BadSize(size));
        }
        let avail_idx = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|_| QueueError::RingAccess)?;
        let next = Wrapping(self.queue.next_avail());
        if avail_idx == next {
            return Ok(None);
        }
        let pending = (avail_idx - next).0;
        if pending > size {
            return Err(QueueError::AvailIndex { pending, size });
        }
        let slot = u64::from(next.0 % size);
        let addr = GuestAddress(self.queue.avail_ring())
            .checked_add(AVAIL_RING_OFFSET + slot * 2)
            .ok_or(QueueError::RingAccess)?;
        let head = mem
            .load::<u16>(addr, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| QueueError::RingAccess)?;
        self.queue.set_next_avail((next + Wrapping(1)).0);
        self.walker.walk(mem, head).map(Some)
    }

    /// Puts the chain [`DeviceQueue::pop`] last returned back at the head
    /// of the queue, to be popped again later (a rate-limited request).
    pub fn undo_pop(&mut self) {
        let next = Wrapping(self.queue.next_avail()) - Wrapping(1);
        self.queue.set_next_avail(next.0);
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &Memory, head: u16, len: u32) -> Result<(), QueueError> {
        self.queue
            .add_used(mem, head, len)
            .map_err(|_| QueueError::RingAccess)
    }

    /// Asks the driver not to kick while the device is draining the queue.
    pub fn disable_notification(&mut self, mem: &Memory) -> Result<(), QueueError> {
        self.queue
            .disable_notification(mem)
            .map_err(|_| QueueError::RingAccess)
    }

    /// Asks the driver to kick again; true if more chains arrived meanwhile.
    /// A stopped queue serves nothing, so it never has more: without this,
    /// a drain loop on a stopped queue with new chains would spin forever.
    pub fn enable_notification(&mut self, mem: &Memory) -> Result<bool, QueueError> {
        if self.broken {
            return Ok(false);
        }
        self.queue
            .enable_notification(mem)
            .map_err(|_| QueueError::RingAccess)
    }

    /// Whether the driver wants an interrupt for the used entries added
    /// since the last call (always true without event index).
    pub fn needs_notification(&mut self, mem: &Memory) -> Result<bool, QueueError> {
        self.queue
            .needs_notification(mem)
            .map_err(|_| QueueError::RingAccess)
    }
}

/// Everything a device's worker needs to serve its queues.
pub struct QueueSet {
    /// Guest memory.
    pub mem: Memory,
    /// The transport's interrupt.
    pub interrupt: Arc<dyn Interrupt>,
    /// The queues, in activation order.
    pub queues: Vec<DeviceQueue>,
    name: &'static str,
    reported: bool,
    epoll: Option<Arc<Epoll>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for QueueSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSet")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl QueueSet {
    /// Wraps the queues handed over on activation. A queue whose rings lie
    /// outside guest memory is stopped at once and the driver told to reset.
    pub fn new(
        name: &'static str,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Self {
        let indirect = features & crate::VIRTIO_RING_F_INDIRECT_DESC != 0;
        let mut set = QueueSet {
            name,
            queues: Vec::with_capacity(queues.len()),
            mem,
            interrupt,
            reported: false,
            epoll: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        for q in queues {
            let check = check_rings(&set.mem, &q.queue);
            set.queues.push(DeviceQueue::new(q, indirect));
            if let Err(e) = check {
                let i = set.queues.len() - 1;
                set.fail(i, &e);
            }
        }
        set
    }

    /// Stops serving queue `qi` after a driver error and asks the driver to
    /// reset the device. Later kicks on that queue are ignored until reset.
    pub fn fail(&mut self, qi: usize, err: &QueueError) {
        let q = &mut self.queues[qi];
        if q.broken {
            return;
        }
        q.broken = true;
        crate::guest_log!(
            "{}: queue {}: {}; the device needs a reset",
            self.name,
            q.index,
            err
        );
        if !self.reported {
            self.reported = true;
            self.interrupt.set_needs_reset();
        }
    }

    /// Whether the worker has been told to stop. Loops that serve one
    /// chain after another check this between chains, so a stop (a device
    /// reset) takes effect after at most the chain in progress.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// A handle on the stop flag, for work that must check it from inside
    /// a long operation on one chain.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Starts waiting on `fd` in the worker: `events` on it call
    /// [`QueueHandler::backend_event`] with `token`. For backends whose fds
    /// come and go (connections); fixed fds go to [`Worker::spawn`].
    pub fn watch(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll_ctl(ControlOperation::Add, fd, token, events)
    }

    /// Changes the events or token of a watched fd.
    pub fn rewatch(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll_ctl(ControlOperation::Modify, fd, token, events)
    }

    /// Stops waiting on `fd` (do this before closing it).
    pub fn unwatch(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll_ctl(ControlOperation::Delete, fd, 0, EventSet::empty())
    }

    fn epoll_ctl(
        &self,
        op: ControlOperation,
        fd: RawFd,
        token: u32,
        events: EventSet,
    ) -> std::io::Result<()> {
        let epoll = self.epoll.as_ref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the worker is not running",
            )
        })?;
        epoll.ctl(
            op,
            fd,
            EpollEvent::new(events, BACKEND_BASE + u64::from(token)),
        )
    }

    /// Sends the queue's interrupt if the driver wants one.
    pub fn notify(&mut self, qi: usize) {
        let q = &mut self.queues[qi];
        match q.needs_notification(&self.mem) {
            Ok(true) => {
                let _ = self.interrupt.trigger(InterruptKind::Queue(q.index));
            }
            Ok(false) => {}
            Err(e) => self.fail(qi, &e),
        }
    }

    /// Serves every available chain of queue `qi` with `serve`, which
    /// returns the number of bytes it wrote into the chain. Uses the
    /// disable/drain/re-enable pattern so no kick is lost, then notifies
    /// once. A driver error stops the queue. A stop request ends the drain
    /// after the chain in progress; the rest stay available.
    pub fn drain<F>(&mut self, qi: usize, serve: F)
    where
        F: FnMut(&Memory, &Chain) -> Result<u32, QueueError>,
    {
        self.drain_admitted(qi, |_| true, serve);
    }

    /// [`QueueSet::drain`], asking `admit` before serving each chain. A
    /// chain it refuses (a rate limiter out of tokens) stays at the head of
    /// the queue and the drain ends; the caller drains again later, and
    /// kicks meanwhile change nothing.
    pub fn drain_admitted<A, F>(&mut self, qi: usize, mut admit: A, mut serve: F)
    where
        A: FnMut(&Chain) -> bool,
        F: FnMut(&Memory, &Chain) -> Result<u32, QueueError>,
    {
        if let Err(e) = self.drain_inner(qi, &mut admit, &mut serve) {
            self.fail(qi, &e);
        }
        if !self.queues[qi].broken {
            self.notify(qi);
        }
    }

    fn drain_inner<A, F>(
        &mut self,
        qi: usize,
        admit: &mut A,
        serve: &mut F,
    ) -> Result<(), QueueError>
    where
        A: FnMut(&Chain) -> bool,
        F: FnMut(&Memory, &Chain) -> Result<u32, QueueError>,
    {
        let q = &mut self.queues[qi];
        loop {
            q.disable_notification(&self.mem)?;
            loop {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let Some(chain) = q.pop(&self.mem)? else {
                    break;
                };
                if !admit(&chain) {
                    q.undo_pop();
                    return Ok(());
                }
                let len = serve(&self.mem, &chain)?;
                q.add_used(&self.mem, chain.head(), len)?;
            }
            if !q.enable_notification(&self.mem)? {
                return Ok(());
            }
        }
    }
}

/// What a device does on its worker thread.
pub trait QueueHandler: Send + 'static {
    /// The driver kicked queue `qi` (position in [`QueueSet::queues`]), or
    /// the worker just started. Not called for stopped queues.
    fn queue_event(&mut self, set: &mut QueueSet, qi: usize);
    /// A backend fd registered with [`Worker::spawn`] is ready.
    fn backend_event(&mut self, _set: &mut QueueSet, _token: u32, _events: EventSet) {}
}

/// Token of the stop eventfd in the worker's epoll set.
const STOP_TOKEN: u64 = u64::MAX;
/// Backend tokens start here; smaller tokens are queue positions.
const BACKEND_BASE: u64 = 1 << 32;

/// A device's worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    flag: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a thread named `name` that serves `set` with `handler`.
    /// `backend` lists extra fds to wait on, with the token and events
    /// passed to [`QueueHandler::backend_event`].
    pub fn spawn<H: QueueHandler>(
        name: &'static str,
        mut set: QueueSet,
        handler: H,
        backend: &[(RawFd, u32, EventSet)],
    ) -> std::io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Arc::new(Epoll::new()?);
        let add = |fd: RawFd, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
        for (i, q) in set.queues.iter().enumerate() {
            add(q.kick.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        for &(fd, token, events) in backend {
            add(fd, BACKEND_BASE + u64::from(token), events)?;
        }
        set.epoll = Some(epoll.clone());
        let flag = set.stop.clone();
        let thread = crate::thread::spawn(name, move || run(epoll, set, handler))?;
        Ok(Worker {
            stop,
            flag,
            thread: Some(thread),
        })
    }

    /// Starts a thread named `name` that waits on `fds` and calls
    /// `on_event` with the index and eventfd of each one that is readable,
    /// until the worker stops. For devices whose queues another process
    /// serves, where the VMM only relays that process's signals.
    pub fn watch(
        name: &'static str,
        fds: Vec<EventFd>,
        mut on_event: impl FnMut(usize, &EventFd) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, fd) in fds.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let flag = Arc::new(AtomicBool::new(false));
        let stopped = flag.clone();
        let thread = crate::thread::spawn(name, move || {
            let mut events = [EpollEvent::default(); 8];
            while !stopped.load(Ordering::Acquire) {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                for event in &events[..n] {
                    let token = event.data();
                    if token == STOP_TOKEN {
                        return;
                    }
                    if let Some(fd) = fds.get(token as usize) {
                        on_event(token as usize, fd);
                    }
                }
            }
        })?;
        Ok(Worker {
            stop,
            flag,
            thread: Some(thread),
        })
    }

    /// Tells the thread to stop without waiting for it, and returns the
    /// worker: dropping it (or [`Worker::stop`]) then waits.
    pub fn stopping(self) -> Worker {
        self.flag.store(true, Ordering::Release);
        // A failed write leaves the counter non-zero already.
        let _ = self.stop.write(1);
        self
    }

    /// Whether the thread has ended (joining it will not wait).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and waits for it. When this returns the handler has
    /// been dropped and no guest memory access happens any more. The
    /// handler sees the stop between chains ([`QueueSet::stopping`]) and
    /// bounds the work on any one chain, so this returns promptly even
    /// with a full queue of large requests.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.flag.store(true, Ordering::Release);
            // A failed write leaves the counter non-zero already.
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The worker's loop. A handler error marks the device as needing a reset.
/// A panic in a handler does the same only where panics unwind (debug and
/// test builds); release builds are built with `panic = "abort"`, so there
/// a worker panic ends the whole VMM process.
fn run<H: QueueHandler>(epoll: Arc<Epoll>, mut set: QueueSet, mut handler: H) {
    let interrupt = set.interrupt.clone();
    let name = set.name;
    let result = catch_unwind(AssertUnwindSafe(|| {
        event_loop(&epoll, &mut set, &mut handler)
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            crate::guest_log!("{name}: the worker stopped: {e}; the device needs a reset");
            interrupt.set_needs_reset();
        }
        Err(_) => {
            crate::guest_log!("{name}: the worker panicked; the device needs a reset");
            interrupt.set_needs_reset();
        }
    }
}

fn event_loop<H: QueueHandler>(
    epoll: &Epoll,
    set: &mut QueueSet,
    handler: &mut H,
) -> std::io::Result<()> {
    for qi in 0..set.queues.len() {
        if !set.queues[qi].broken {
            handler.queue_event(set, qi);
        }
    }
    let mut events = vec![EpollEvent::default(); set.queues.len() + 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                return Ok(());
            }
            if token >= BACKEND_BASE {
                // Tokens were registered as BACKEND_BASE + u32.
                let t = (token - BACKEND_BASE) as u32;
                handler.backend_event(set, t, ev.event_set());
                continue;
            }
            let qi = token as usize;
            // Draining the counter; a spurious wakeup reads EAGAIN.
            let _ = set.queues[qi].kick.read();
            if !set.queues[qi].broken {
                handler.queue_event(set, qi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Buf, MockDriver};

    const SIZE: u16 = 8;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const MEM: usize = 1 << 22;

    /// A driver with one queue and the device's view of that queue.
    fn setup(indirect: bool) -> (MockDriver, DeviceQueue) {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        let features = if indirect {
            crate::VIRTIO_RING_F_INDIRECT_DESC
        } else {
            0
        };
        let q = drv.active_queues(features).remove(0);
        (drv, DeviceQueue::new(q, indirect))
    }

    fn pop(drv: &MockDriver, q: &mut DeviceQueue) -> Result<Option<Chain>, QueueError> {
        q.pop(drv.memory())
    }

    #[test]
    fn valid_chain_is_split_into_readable_and_writable() {
        let (mut drv, mut q) = setup(false);
        let a = drv.put(b"hello");
        let b = drv.alloc(3);
        let c = drv.alloc(4);
        let head = drv.add_chain(
            0,
            &[
                Buf::readable(a, 5),
                Buf::writable(b, 3),
                Buf::writable(c, 4),
            ],
        );
        let chain = pop(&drv, &mut q).unwrap().unwrap();
        assert_eq!(chain.head(), head);
        assert_eq!(chain.readable_len(), 5);
        assert_eq!(chain.writable_len(), 7);
        let mut out = [0u8; 5];
        chain.reader().read_exact(drv.memory(), &mut out).unwrap();
        assert_eq!(&out, b"hello");
        let mut w = chain.writer();
        assert_eq!(w.write(drv.memory(), b"0123456789").unwrap(), 7);
        assert_eq!(drv.read(b, 3), b"012");
        assert_eq!(drv.read(c, 4), b"3456");
        assert!(pop(&drv, &mut q).unwrap().is_none());
    }

    #[test]
    fn indirect_chain_is_walked_when_negotiated() {
        let (mut drv, mut q) = setup(true);
        let a = drv.put(b"abcd");
        let b = drv.alloc(8);
        drv.add_indirect_chain(0, &[Buf::readable(a, 4), Buf::writable(b, 8)]);
        let chain = pop(&drv, &mut q).unwrap().unwrap();
        assert_eq!(chain.readable(), &[Buffer { addr: a, len: 4 }]);
        assert_eq!(chain.writable(), &[Buffer { addr: b, len: 8 }]);
    }

    #[test]
    fn indirect_chain_is_refused_when_not_negotiated() {
        let (mut drv, mut q) = setup(false);
        let a = drv.put(b"abcd");
        drv.add_indirect_chain(0, &[Buf::readable(a, 4)]);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::IndirectNotNegotiated { index: 0 }
        );
    }

    #[test]
    fn buffer_outside_memory_is_an_error() {
        let (mut drv, mut q) = setup(false);
        drv.write_desc(0, 0, MEM as u64 - 4, 8, 0, 0);
        drv.publish(0, 0);
        assert!(matches!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::BufferOutsideMemory { index: 0, .. }
        ));
    }

    #[test]
    fn address_overflow_is_an_error() {
        let (mut drv, mut q) = setup(false);
        drv.write_desc(0, 0, u64::MAX - 2, 16, 0, 0);
        drv.publish(0, 0);
        assert!(matches!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::AddressOverflow { index: 0, .. }
        ));
    }

    #[test]
    fn loop_is_an_error() {
        let (mut drv, mut q) = setup(false);
        let a = drv.alloc(16);
        drv.write_desc(0, 0, a.0, 4, NEXT, 1);
        drv.write_desc(0, 1, a.0, 4, NEXT, 2);
        drv.write_desc(0, 2, a.0, 4, NEXT, 0);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::Loop { index: 0 }
        );
    }

    #[test]
    fn self_loop_is_an_error() {
        let (mut drv, mut q) = setup(false);
        let a = drv.alloc(16);
        drv.write_desc(0, 3, a.0, 4, NEXT, 3);
        drv.publish(0, 3);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::Loop { index: 3 }
        );
    }

    #[test]
    fn chain_longer_than_queue_is_an_error() {
        // Two direct descriptors, then an indirect table of SIZE entries:
        // SIZE + 1 buffers in one chain.
        let (mut drv, mut q) = setup(true);
        let a = drv.alloc(16);
        let table = drv.alloc(16 * u32::from(SIZE));
        for i in 0..SIZE {
            let flags = if i + 1 < SIZE { NEXT } else { 0 };
            let at = GuestAddress(table.0 + 16 * u64::from(i));
            drv.write_raw_desc(at, a.0, 4, flags, i + 1);
        }
        drv.write_desc(0, 0, a.0, 4, NEXT, 1);
        drv.write_desc(0, 1, table.0, 16 * u32::from(SIZE), INDIRECT, 0);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::TooLong { size: SIZE }
        );
    }

    #[test]
    fn head_and_next_past_queue_size_are_errors() {
        let (mut drv, mut q) = setup(false);
        drv.publish(0, SIZE);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::HeadOutOfRange {
                head: SIZE,
                size: SIZE
            }
        );
        let (mut drv, mut q) = setup(false);
        let a = drv.alloc(4);
        drv.write_desc(0, 0, a.0, 4, NEXT, 200);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::NextOutOfRange {
                index: 0,
                next: 200,
                size: SIZE
            }
        );
    }

    #[test]
    fn total_length_overflowing_u32_is_an_error() {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        let q = drv.active_queues(0).remove(0);
        let mut q = DeviceQueue::new(q, false);
        // Buffers may overlap: three 2 GiB buffers need a 2 GiB memory.
        let big = Memory::from_ranges(&[(GuestAddress(0), 1 << 31)]).unwrap();
        let desc = GuestAddress(0x1_0000);
        let mem = &big;
        let raw = |i: u64, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&0u64.to_le_bytes());
            d[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&d, GuestAddress(desc.0 + 16 * i)).unwrap();
        };
        for i in 0..4 {
            raw(i, NEXT, i as u16 + 1);
        }
        raw(4, 0, 0);
        mem.write_obj(0u16, GuestAddress(0x1_8000 + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x1_8000 + 2)).unwrap();
        assert_eq!(q.pop(mem).unwrap_err(), QueueError::TotalLengthOverflow);
    }

    #[test]
    fn readable_after_writable_is_an_error() {
        let (mut drv, mut q) = setup(false);
        let a = drv.alloc(8);
        drv.add_chain(0, &[Buf::writable(a, 4), Buf::readable(a, 4)]);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::ReadableAfterWritable { index: 1 }
        );
    }

    #[test]
    fn malformed_indirect_tables_are_errors() {
        let (mut drv, mut q) = setup(true);
        let t = drv.alloc(64);
        drv.write_desc(0, 0, t.0, 24, INDIRECT, 0);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::IndirectLength { len: 24 }
        );

        let (mut drv, mut q) = setup(true);
        let t = drv.alloc(16 * 16);
        drv.write_desc(0, 0, t.0, 16 * 16, INDIRECT, 0);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::IndirectLength { len: 256 }
        );

        let (mut drv, mut q) = setup(true);
        let t = drv.alloc(32);
        drv.write_desc(0, 0, t.0, 32, INDIRECT | NEXT, 1);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::IndirectWithNext { index: 0 }
        );

        let (mut drv, mut q) = setup(true);
        let t = drv.alloc(32);
        drv.write_raw_desc(t, t.0, 32, INDIRECT, 0);
        drv.write_desc(0, 0, t.0, 32, INDIRECT, 0);
        drv.publish(0, 0);
        assert_eq!(pop(&drv, &mut q).unwrap_err(), QueueError::IndirectNested);

        let (mut drv, mut q) = setup(true);
        drv.write_desc(0, 0, MEM as u64 - 16, 32, INDIRECT, 0);
        drv.publish(0, 0);
        assert!(matches!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::BufferOutsideMemory { .. }
        ));
    }

    #[test]
    fn loop_inside_indirect_table_is_an_error() {
        let (mut drv, mut q) = setup(true);
        let a = drv.alloc(4);
        let t = drv.alloc(32);
        drv.write_raw_desc(t, a.0, 4, NEXT, 1);
        drv.write_raw_desc(GuestAddress(t.0 + 16), a.0, 4, NEXT, 0);
        drv.write_desc(0, 0, t.0, 32, INDIRECT, 0);
        drv.publish(0, 0);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::Loop { index: 0 }
        );
    }

    #[test]
    fn avail_index_jump_is_an_error() {
        let (mut drv, mut q) = setup(false);
        drv.set_avail_idx(0, SIZE + 1);
        assert_eq!(
            pop(&drv, &mut q).unwrap_err(),
            QueueError::AvailIndex {
                pending: SIZE + 1,
                size: SIZE
            }
        );
    }

    #[test]
    fn ring_check_ignores_ready_and_catches_rings_past_memory() {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        let mut q = drv.active_queues(0).remove(0).queue;
        q.set_ready(false);
        assert_eq!(check_rings(drv.memory(), &q), Ok(()));
        q.set_avail_ring_address(Some(MEM as u32 - 8), Some(0));
        assert_eq!(
            check_rings(drv.memory(), &q),
            Err(QueueError::RingsOutsideMemory)
        );
    }

    struct WatchOnStart {
        fd: EventFd,
        seen: std::sync::mpsc::Sender<u32>,
        watched: bool,
    }

    impl QueueHandler for WatchOnStart {
        fn queue_event(&mut self, set: &mut QueueSet, _qi: usize) {
            if !self.watched {
                set.watch(self.fd.as_raw_fd(), 7, EventSet::IN).unwrap();
                self.watched = true;
                self.seen.send(0).unwrap();
            }
        }
        fn backend_event(&mut self, set: &mut QueueSet, token: u32, _events: EventSet) {
            let _ = self.fd.read();
            set.unwatch(self.fd.as_raw_fd()).unwrap();
            self.seen.send(token).unwrap();
        }
    }

    #[test]
    fn handler_can_watch_fds_at_run_time() {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        let interrupt: Arc<dyn Interrupt> = drv.interrupt().clone();
        let set = QueueSet::new(
            "test",
            drv.memory().clone(),
            interrupt,
            drv.active_queues(0),
            0,
        );
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let handler = WatchOnStart {
            fd: fd.try_clone().unwrap(),
            seen: tx,
            watched: false,
        };
        let mut worker = Worker::spawn("test", set, handler, &[]).unwrap();
        let wait = crate::testing::WAIT;
        assert_eq!(rx.recv_timeout(wait).unwrap(), 0);
        fd.write(1).unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), 7);
        worker.stop();
    }

    #[test]
    fn cursor_take_spans_buffers() {
        let bufs = [
            Buffer {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Buffer {
                addr: GuestAddress(0x2000),
                len: 4,
            },
        ];
        let mut c = Cursor::new(&bufs, 8);
        assert_eq!(
            c.take(6).unwrap(),
            vec![
                Buffer {
                    addr: GuestAddress(0x1000),
                    len: 4
                },
                Buffer {
                    addr: GuestAddress(0x2000),
                    len: 2
                }
            ]
        );
        assert_eq!(c.remaining(), 2);
        assert!(c.take(3).is_none());
        assert_eq!(
            c.take(2).unwrap(),
            vec![Buffer {
                addr: GuestAddress(0x2002),
                len: 2
            }]
        );
    }

    #[test]
    fn a_stopped_queue_returns_from_a_drain_with_chains_pending() {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        let queues = drv.active_queues(0);
        let mut set = QueueSet::new(
            "test",
            drv.memory().clone(),
            drv.interrupt().clone(),
            queues,
            0,
        );
        // A chain the walker refuses stops the queue...
        let (a, b) = (drv.alloc(4), drv.alloc(4));
        drv.add_chain(0, &[Buf::writable(a, 4), Buf::readable(b, 4)]);
        set.drain(0, |_, _| Ok(0));
        assert!(set.queues[0].is_broken());
        // ...and a later kick with a good chain pending must come back
        // (it used to spin forever) without serving it.
        drv.add_chain(0, &[Buf::writable(a, 4)]);
        let mut served = 0;
        set.drain(0, |_, _| {
            served += 1;
            Ok(0)
        });
        assert_eq!(served, 0);
        assert_eq!(drv.used_idx(0), 0);
        assert_eq!(set.queues[0].enable_notification(drv.memory()), Ok(false));
    }

    /// Serves chains one by one; the first one blocks until the worker is
    /// told to stop, like a long request in progress at a reset.
    struct SlowHandler {
        served: Arc<std::sync::atomic::AtomicUsize>,
        started: std::sync::mpsc::Sender<()>,
    }

    impl QueueHandler for SlowHandler {
        fn queue_event(&mut self, set: &mut QueueSet, qi: usize) {
            let stop = set.stop_flag();
            let (served, started) = (&self.served, &self.started);
            set.drain(qi, |_, _| {
                if served.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = started.send(());
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                Ok(0)
            });
        }
    }

    #[test]
    fn stop_takes_effect_after_the_chain_in_progress() {
        let mut drv = MockDriver::new(MEM, &[SIZE]);
        for _ in 0..SIZE {
            let a = drv.alloc(4);
            drv.add_chain(0, &[Buf::writable(a, 4)]);
        }
        let queues = drv.active_queues(0);
        let set = QueueSet::new(
            "test",
            drv.memory().clone(),
            drv.interrupt().clone(),
            queues,
            0,
        );
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (started, wait) = std::sync::mpsc::channel();
        let handler = SlowHandler {
            served: served.clone(),
            started,
        };
        let mut worker = Worker::spawn("test", set, handler, &[]).unwrap();
        wait.recv().unwrap();
        worker.stop();
        // The rest of the full queue was left for after the reset.
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(drv.used_idx(0), 1);
    }
}
