//! A minimal virtio driver for unit tests: it lays out one split queue in
//! guest memory, posts descriptor chains and reads the used ring.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::{Interrupt, InterruptKind, Memory};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// How long a test waits for the device before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One queue as a driver sees it.
#[derive(Debug)]
pub struct DriverQueue {
    pub mem: Memory,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at `base` (needs
    /// `size * 24 + 0x1000` bytes).
    pub fn new(mem: &Memory, base: u64, size: u16) -> DriverQueue {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        DriverQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The queue as the transport hands it to the device.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes raw descriptors (addr, len, flags, next) at the next free
    /// table slots and makes the first one available; returns its index.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (head + i as u16) % self.size;
            let at = GuestAddress(self.desc + 16 * u64::from(slot));
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, at).expect("descriptor");
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Adds a well-formed chain of (addr, len, writable) buffers.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i + 1 == bufs.len();
                let mut flags = if write { F_WRITE } else { 0 };
                let next = (head + i as u16 + 1) % self.size;
                if !last {
                    flags |= F_NEXT;
                }
                (addr, len, flags, if last { 0 } else { next })
            })
            .collect();
        self.add_raw(&descs)
    }

    /// Puts `head` in the available ring and bumps the index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the available index directly (hostile tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    /// The next used element (id, len), if the device returned one.
    pub fn used(&mut self) -> Option<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).ok()?;
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = GuestAddress(self.used + 4 + 8 * slot);
        let id: u32 = self.mem.read_obj(at).ok()?;
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Waits for the next used element; panics (fails the test) after
    /// [`PATIENCE`].
    pub fn wait_used(&mut self) -> (u16, u32) {
        let end = Instant::now() + PATIENCE;
        loop {
            if let Some(u) = self.used() {
                return u;
            }
            assert!(Instant::now() < end, "the device returned no buffer");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write");
    }
}

/// Records interrupts and reset requests.
#[derive(Debug, Default)]
pub struct TestInterrupt {
    pub queue_irqs: AtomicUsize,
    pub needs_reset: Mutex<bool>,
    cond: Condvar,
}

impl TestInterrupt {
    /// Waits until the device asks for a reset; fails after [`PATIENCE`].
    pub fn wait_needs_reset(&self) {
        let guard = self.needs_reset.lock().expect("lock");
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, PATIENCE, |set| !*set)
            .expect("lock");
        assert!(*guard, "the device did not ask for a reset");
    }

    pub fn is_needs_reset(&self) -> bool {
        *self.needs_reset.lock().expect("lock")
    }
}

impl Interrupt for TestInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.queue_irqs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_needs_reset(&self) {
        *self.needs_reset.lock().expect("lock") = true;
        self.cond.notify_all();
    }
}

/// Guest memory of `size` bytes at address 0.
pub fn memory(size: usize) -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), size)]).expect("memory")
}
