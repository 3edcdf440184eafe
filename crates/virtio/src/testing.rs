//! A mock virtio driver for tests: plain guest memory, split queues laid out
//! by hand, chains built from readable and writable buffers, a recording
//! [`Interrupt`], and bounded waits for used entries.
//!
//! It plays the transport's part too: [`MockDriver::activate`] hands the
//! device `virtio_queue::Queue` values and kick eventfds the way virtio-pci
//! does on DRIVER_OK.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    ActivateError, ActiveQueue, Interrupt, InterruptKind, Memory, VirtioDevice,
    VIRTIO_RING_F_EVENT_IDX,
};

/// How long the bounded waits wait before giving up.
pub const WAIT: Duration = Duration::from_secs(10);

/// Where the queues' structures start; each queue gets `QUEUE_STRIDE`.
const QUEUE_BASE: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
/// Where buffers are allocated from.
const DATA_BASE: u64 = 0x10_0000;

/// An [`Interrupt`] that records what the device signalled.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    triggers: Mutex<Vec<InterruptKind>>,
    needs_reset: AtomicBool,
    changed: Condvar,
}

impl RecordingInterrupt {
    /// Every interrupt so far, in order.
    pub fn triggers(&self) -> Vec<InterruptKind> {
        self.lock().clone()
    }
    /// How many interrupts queue `index` got.
    pub fn count(&self, index: u16) -> usize {
        self.lock()
            .iter()
            .filter(|k| **k == InterruptKind::Queue(index))
            .count()
    }
    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }
    /// Waits (bounded by [`WAIT`]) until the device asks for a reset.
    pub fn wait_needs_reset(&self) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut guard = self.lock();
        while !self.needs_reset() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match self.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
    /// Waits (bounded by [`WAIT`]) until queue `index` got `n` interrupts.
    pub fn wait_count(&self, index: u16, n: usize) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut guard = self.lock();
        loop {
            let got = guard
                .iter()
                .filter(|k| **k == InterruptKind::Queue(index))
                .count();
            let now = Instant::now();
            if got >= n {
                return true;
            }
            if now >= deadline {
                return false;
            }
            guard = match self.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
    /// Forgets the recorded interrupts and the reset request.
    pub fn clear(&self) {
        self.lock().clear();
        self.needs_reset.store(false, Ordering::SeqCst);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<InterruptKind>> {
        self.triggers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.lock().push(kind);
        self.changed.notify_all();
        Ok(())
    }
    fn set_needs_reset(&self) {
        let _guard = self.lock();
        self.needs_reset.store(true, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

/// One buffer of a chain the mock driver builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }
    /// A device-writable buffer.
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// A used-ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// The chain's head index.
    pub id: u32,
    /// Bytes the device wrote.
    pub len: u32,
}

#[derive(Debug)]
struct MockQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    seen_used: u16,
    kick: Option<EventFd>,
}

/// The driver side of a device's queues, in its own guest memory.
#[derive(Debug)]
pub struct MockDriver {
    mem: Memory,
    interrupt: Arc<RecordingInterrupt>,
    queues: Vec<MockQueue>,
    next_data: u64,
    mem_size: u64,
}

impl MockDriver {
    /// Guest memory of `mem_size` bytes and one queue per entry of `sizes`.
    pub fn new(mem_size: usize, sizes: &[u16]) -> Self {
        let mem = Memory::from_ranges(&[(GuestAddress(0), mem_size)]).expect("mock guest memory");
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let base = QUEUE_BASE + i as u64 * QUEUE_STRIDE;
                MockQueue {
                    size,
                    desc: GuestAddress(base),
                    avail: GuestAddress(base + 0x8000),
                    used: GuestAddress(base + 0xa000),
                    next_desc: 0,
                    avail_idx: 0,
                    seen_used: 0,
                    kick: None,
                }
            })
            .collect();
        MockDriver {
            mem,
            interrupt: Arc::new(RecordingInterrupt::default()),
            queues,
            next_data: DATA_BASE,
            mem_size: mem_size as u64,
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// The interrupt handed to the device.
    pub fn interrupt(&self) -> &Arc<RecordingInterrupt> {
        &self.interrupt
    }

    /// Allocates `len` zeroed bytes of guest memory (8-byte aligned).
    pub fn alloc(&mut self, len: u32) -> GuestAddress {
        let addr = self.next_data;
        self.next_data = (addr + u64::from(len) + 7) & !7;
        assert!(self.next_data <= self.mem_size, "mock guest memory full");
        let zeros = vec![0u8; len as usize];
        self.mem
            .write_slice(&zeros, GuestAddress(addr))
            .expect("zero");
        GuestAddress(addr)
    }

    /// Allocates guest memory holding `data`.
    pub fn put(&mut self, data: &[u8]) -> GuestAddress {
        let addr = self.alloc(data.len() as u32);
        self.mem.write_slice(data, addr).expect("write");
        addr
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, addr).expect("read");
        out
    }

    /// Writes descriptor `index` of queue `q` as given.
    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.queues[q].desc.0 + u64::from(index) * 16;
        self.write_raw_desc(GuestAddress(at), addr, len, flags, next);
    }

    /// Writes a descriptor at an arbitrary guest address (indirect tables).
    pub fn write_raw_desc(&self, at: GuestAddress, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("descriptor");
    }

    /// Builds a chain of `bufs` in free descriptors of queue `q` and
    /// publishes it. Returns the head index.
    pub fn add_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let size = self.queues[q].size;
        let head = self.queues[q].next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let mut flags = if b.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = (index + 1) % size;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(q, index, b.addr.0, b.len, flags, next);
        }
        self.queues[q].next_desc = (head + bufs.len() as u16) % size;
        self.publish(q, head);
        head
    }

    /// Builds an indirect table of `bufs` and publishes a one-descriptor
    /// chain pointing at it. Returns the head index.
    pub fn add_indirect_chain(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let table = self.alloc(16 * bufs.len() as u32);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = GuestAddress(table.0 + 16 * i as u64);
            self.write_raw_desc(at, b.addr.0, b.len, flags, i as u16 + 1);
        }
        let head = self.queues[q].next_desc;
        let len = 16 * bufs.len() as u32;
        self.write_desc(q, head, table.0, len, VRING_DESC_F_INDIRECT as u16, 0);
        self.queues[q].next_desc = (head + 1) % self.queues[q].size;
        self.publish(q, head);
        head
    }

    /// Puts `head` in the avail ring of queue `q` and bumps its index.
    pub fn publish(&mut self, q: usize, head: u16) {
        let mq = &mut self.queues[q];
        let slot = u64::from(mq.avail_idx % mq.size);
        self.mem
            .write_obj(head.to_le(), mq.avail.unchecked_add_(4 + 2 * slot))
            .expect("avail ring");
        mq.avail_idx = mq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(mq.avail_idx.to_le(), mq.avail.unchecked_add_(2))
            .expect("avail idx");
    }

    /// Sets the avail ring's index of queue `q` directly.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        let mq = &mut self.queues[q];
        mq.avail_idx = idx;
        self.mem
            .write_obj(idx.to_le(), mq.avail.unchecked_add_(2))
            .expect("avail idx");
    }

    /// Writes the `used_event` field (event index) of queue `q`.
    pub fn set_used_event(&self, q: usize, value: u16) {
        let mq = &self.queues[q];
        let at = mq.avail.unchecked_add_(4 + 2 * u64::from(mq.size));
        self.mem.write_obj(value.to_le(), at).expect("used_event");
    }

    /// The `avail_event` field the device wrote in queue `q`'s used ring.
    pub fn avail_event(&self, q: usize) -> u16 {
        let mq = &self.queues[q];
        let at = mq.used.unchecked_add_(4 + 8 * u64::from(mq.size));
        u16::from_le(self.mem.read_obj(at).expect("avail_event"))
    }

    /// Waits (bounded by [`WAIT`]) until the device's `avail_event` of
    /// queue `q` is `value`.
    pub fn wait_avail_event(&self, q: usize, value: u16) -> bool {
        let deadline = Instant::now() + WAIT;
        while self.avail_event(q) != value {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// The used ring's index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        let mq = &self.queues[q];
        u16::from_le(
            self.mem
                .read_obj(mq.used.unchecked_add_(2))
                .expect("used idx"),
        )
    }

    /// The used-ring entries the device added since the last call.
    pub fn take_used(&mut self, q: usize) -> Vec<Used> {
        let idx = self.used_idx(q);
        let mq = &mut self.queues[q];
        let mut out = Vec::new();
        while mq.seen_used != idx {
            let slot = u64::from(mq.seen_used % mq.size);
            let at = mq.used.unchecked_add_(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(at).expect("used id");
            let len: u32 = self.mem.read_obj(at.unchecked_add_(4)).expect("used len");
            out.push(Used {
                id: u32::from_le(id),
                len: u32::from_le(len),
            });
            mq.seen_used = mq.seen_used.wrapping_add(1);
        }
        out
    }

    /// Waits (bounded by [`WAIT`]) until `count` new used entries are on
    /// queue `q` and returns them; fewer if the wait runs out.
    pub fn wait_used(&mut self, q: usize, count: usize) -> Vec<Used> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        loop {
            out.extend(self.take_used(q));
            if out.len() >= count || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The queue values and kick eventfds a transport would hand over on
    /// DRIVER_OK, with the event index set from `features`.
    pub fn active_queues(&mut self, features: u64) -> Vec<ActiveQueue> {
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut out = Vec::new();
        for (i, mq) in self.queues.iter_mut().enumerate() {
            let mut queue = Queue::new(mq.size).expect("queue size");
            let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
            let (lo, hi) = split(mq.desc);
            queue.set_desc_table_address(lo, hi);
            let (lo, hi) = split(mq.avail);
            queue.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(mq.used);
            queue.set_used_ring_address(lo, hi);
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            mq.kick = Some(kick.try_clone().expect("eventfd clone"));
            out.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
            });
        }
        out
    }

    /// Activates `dev` with all queues and `features`.
    pub fn activate(
        &mut self,
        dev: &mut dyn VirtioDevice,
        features: u64,
    ) -> Result<(), ActivateError> {
        let queues = self.active_queues(features);
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        dev.activate(self.mem.clone(), interrupt, queues, features)
    }

    /// Forgets the rings' state, as a driver does before re-initialising
    /// after a device reset. Guest memory contents stay.
    pub fn reset_rings(&mut self) {
        for mq in &mut self.queues {
            mq.next_desc = 0;
            mq.avail_idx = 0;
            mq.seen_used = 0;
            mq.kick = None;
            let zeros = vec![0u8; 0x8000];
            self.mem.write_slice(&zeros, mq.avail).expect("zero rings");
        }
        self.interrupt.clear();
    }

    /// Notifies queue `q` (writes its kick eventfd).
    pub fn kick(&self, q: usize) {
        if let Some(k) = &self.queues[q].kick {
            k.write(1).expect("kick");
        }
    }
}

/// `GuestAddress + offset` for addresses the mock laid out itself.
trait AddExt {
    fn unchecked_add_(&self, off: u64) -> GuestAddress;
}

impl AddExt for GuestAddress {
    fn unchecked_add_(&self, off: u64) -> GuestAddress {
        GuestAddress(self.0 + off)
    }
}
