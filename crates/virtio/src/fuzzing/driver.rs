//! A guest driver played from fuzz bytes, for the device targets (`rng`,
//! `console`, `vsock`): it builds mostly well-formed descriptor chains in
//! guest memory, kicks queues, sometimes writes a raw descriptor, and reaps
//! the used ring; the device's own queue handler serves every kick on the
//! calling thread, so a run is deterministic and needs no worker thread.

use devices::fuzz_entry::Input;
use vm_memory::Bytes;

use crate::queue::QueueSet;
use crate::testing::{Buf, MockDriver};
use crate::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Guest memory: rings from 64 KiB, buffers from 1 MiB.
const MEM: usize = 3 << 20;
/// Bytes of buffers a run may allocate (the mock driver refuses more).
const BUDGET: u64 = 1 << 20;
/// The most buffers in a built chain.
const MAX_BUFS: u8 = 8;

/// A device as a fuzz target sees it.
pub(crate) trait Target {
    /// The driver kicked queue `qi`: the device serves it now.
    fn kick(&mut self, set: &mut QueueSet, qi: usize);
    /// Something happens on the host side of the device (input typed,
    /// a host program connecting); parameters come from `input`.
    fn host(&mut self, set: &mut QueueSet, input: &mut Input);
    /// Bytes put in front of the first readable buffer's content of a
    /// chain on queue `q` (a protocol header built from the input, so
    /// the fuzzer spends its time past the header checks).
    fn header(&mut self, _q: usize, _input: &mut Input) -> Vec<u8> {
        Vec::new()
    }
}

/// Runs `target` against a driver played from `data`.
///
/// Input: byte 0 picks features (bit 0 the event index, bit 1 indirect
/// descriptors, each only if `offered`); then operations, whose bits 3-7
/// pick the queue and low three bits the action: add a chain (0-1: a flag
/// byte, bit 0 indirect and bit 1 a header from [`Target::header`], bits
/// 4-7 the buffer count; then per buffer a little-endian u16 whose top bit
/// marks it writable and whose low 15 bits are its length, followed for
/// readable buffers by that many content bytes), kick (2-3), write a raw
/// descriptor and publish it (4), a host event (5), reap the used ring
/// (6), or set the used event index (7).
pub(crate) fn run(data: &[u8], sizes: &[u16], offered: u64, target: &mut impl Target) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut features = VIRTIO_F_VERSION_1;
    if flags & 1 != 0 {
        features |= offered & VIRTIO_RING_F_EVENT_IDX;
    }
    if flags & 2 != 0 {
        features |= offered & VIRTIO_RING_F_INDIRECT_DESC;
    }
    let mut drv = MockDriver::new(MEM, sizes);
    let queues = drv.active_queues(features);
    let mut set = QueueSet::new(
        "virtio-fuzz",
        drv.memory().clone(),
        drv.interrupt().clone(),
        queues,
        features,
    );
    let mut budget = BUDGET;
    while !input.is_empty() {
        let op = input.u8();
        let q = usize::from(op >> 3) % sizes.len();
        match op & 7 {
            0 | 1 => {
                let indirect = features & VIRTIO_RING_F_INDIRECT_DESC != 0;
                add_chain(&mut drv, q, indirect, &mut input, target, &mut budget);
            }
            2 | 3 => target.kick(&mut set, q),
            4 => {
                let index = input.u16() % sizes[q];
                // Sometimes past the end of guest memory.
                let (addr, len) = (input.u64() % (2 * MEM as u64), input.u32());
                let (flags, next) = (input.u16(), input.u16());
                drv.write_desc(q, index, addr, len, flags, next);
                drv.publish(q, index);
            }
            5 => target.host(&mut set, &mut input),
            6 => {
                for used in drv.take_used(q) {
                    assert!(used.id < u32::from(sizes[q]), "used head past the queue");
                }
            }
            _ => drv.set_used_event(q, input.u16()),
        }
    }
}

/// Builds one chain from the input and publishes it, unless the buffers
/// would overrun the run's memory budget.
fn add_chain(
    drv: &mut MockDriver,
    q: usize,
    indirect: bool,
    input: &mut Input,
    target: &mut impl Target,
    budget: &mut u64,
) {
    let flags = input.u8();
    let mut prefix = if flags & 2 != 0 {
        target.header(q, input)
    } else {
        Vec::new()
    };
    let count = (flags >> 4) % MAX_BUFS + 1;
    let mut bufs = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let word = input.u16();
        let mut len = u32::from(word & 0x7fff);
        let writable = word & 0x8000 != 0;
        let content = if writable {
            Vec::new()
        } else {
            let mut content = std::mem::take(&mut prefix);
            let room = (len as usize).saturating_sub(content.len());
            content.extend_from_slice(input.bytes(room));
            len = len.max(content.len() as u32);
            content
        };
        // Aligned to 8 by the mock driver, plus an indirect table.
        let cost = u64::from(len) + 8 + 16;
        if cost > *budget {
            return;
        }
        *budget -= cost;
        let addr = drv.alloc(len);
        if writable {
            bufs.push(Buf::writable(addr, len));
        } else {
            drv.memory()
                .write_slice(&content, addr)
                .expect("mock memory holds its allocation");
            bufs.push(Buf::readable(addr, len));
        }
    }
    if indirect && flags & 1 != 0 {
        drv.add_indirect_chain(q, &bufs);
    } else {
        drv.add_chain(q, &bufs);
    }
}
