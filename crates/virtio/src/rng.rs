//! virtio-rng (VirtIO 1.2, 5.4): one request queue whose device-writable
//! buffers the device fills from the host kernel's random pool
//! (getrandom(2)).

use std::sync::Arc;

use thiserror::Error;
use vm_memory::Bytes;

use crate::queue::{Chain, QueueError, QueueHandler, QueueSet, Worker};
use crate::{
    device_type, ActivateError, ActiveQueue, Interrupt, Memory, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes filled per request; a larger buffer gets this many.
const MAX_FILL: usize = 64 * 1024;

/// Errors from virtio-rng.
#[derive(Debug, Error)]
pub enum RngError {
    /// getrandom(2) failed.
    #[error("getrandom failed")]
    GetRandom(#[source] std::io::Error),
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    /// A virtio-rng device, not yet activated.
    pub fn new() -> Self {
        Rng { worker: None }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
        features: u64,
    ) -> Result<(), ActivateError> {
        crate::expect_queues(&queues, 1)?;
        self.reset();
        let set = QueueSet::new("virtio-rng", mem, interrupt, queues, features);
        let handler = RngHandler {
            buf: vec![0; MAX_FILL],
        };
        let worker =
            Worker::spawn("virtio-rng", set, handler, &[]).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> Option<Worker> {
        // Told to stop; the transport waits for it off the bus lock.
        self.worker.take().map(Worker::stopping)
    }
}

struct RngHandler {
    buf: Vec<u8>,
}

impl QueueHandler for RngHandler {
    fn queue_event(&mut self, set: &mut QueueSet, qi: usize) {
        let buf = &mut self.buf;
        set.drain(qi, |mem, chain| fill_chain(mem, chain, buf));
    }
}

/// Fills the chain's writable buffers (up to [`MAX_FILL`] bytes) with
/// random bytes; returns how many were written.
fn fill_chain(mem: &Memory, chain: &Chain, buf: &mut [u8]) -> Result<u32, QueueError> {
    let want = (chain.writable_len() as usize).min(buf.len());
    let buf = &mut buf[..want];
    if let Err(e) = getrandom(buf) {
        // The host failed, not the driver: hand the buffer back empty.
        crate::guest_log!("virtio-rng: {e}");
        return Ok(0);
    }
    let mut offset = 0usize;
    for b in chain.writable() {
        if offset == want {
            break;
        }
        let n = (b.len as usize).min(want - offset);
        mem.write_slice(&buf[offset..offset + n], b.addr)
            .map_err(|_| QueueError::Memory)?;
        offset += n;
    }
    // offset <= MAX_FILL, which fits in u32.
    Ok(offset as u32)
}

/// Fills `buf` from the kernel's random pool.
fn getrandom(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(err));
        }
        // n >= 0 and at most rest.len().
        done += n as usize;
    }
    Ok(())
}

#[cfg(any(test, feature = "test-utils"))]
mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub use fuzz::rng as fuzz_entry;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Buf, MockDriver};
    use virtio_queue::QueueT;

    fn features() -> u64 {
        VIRTIO_F_VERSION_1
    }

    #[test]
    fn fills_writable_buffers_with_varying_bytes() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features()).expect("activate");
        let a = drv.alloc(64);
        let b = drv.alloc(64);
        drv.add_chain(0, &[Buf::writable(a, 64), Buf::writable(b, 64)]);
        drv.kick(0);
        let used = drv.wait_used(0, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 128);
        let mut data = drv.read(a, 64);
        data.extend(drv.read(b, 64));
        // 128 random bytes: all equal with probability 2^-1016.
        assert!(data.iter().any(|&x| x != data[0]), "constant data");
        assert!(drv.interrupt().count(0) >= 1);
        rng.reset();
    }

    #[test]
    fn two_requests_get_different_bytes() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features()).expect("activate");
        let a = drv.alloc(32);
        let b = drv.alloc(32);
        drv.add_chain(0, &[Buf::writable(a, 32)]);
        drv.add_chain(0, &[Buf::writable(b, 32)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 2).len(), 2);
        assert_ne!(drv.read(a, 32), drv.read(b, 32));
    }

    #[test]
    fn large_buffer_is_capped() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features()).expect("activate");
        let a = drv.alloc(1 << 20);
        drv.add_chain(0, &[Buf::writable(a, 1 << 20)]);
        drv.kick(0);
        let used = drv.wait_used(0, 1);
        assert_eq!(used[0].len as usize, MAX_FILL);
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE, QUEUE_SIZE]);
        let mut rng = Rng::new();
        let err = drv.activate(&mut rng, features()).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { want: 1, got: 2 }));
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features() | VIRTIO_RING_F_EVENT_IDX)
            .expect("activate");
        // The driver wants an interrupt only once used idx passes 2.
        drv.set_used_event(0, 2);
        let a = drv.alloc(8);
        drv.add_chain(0, &[Buf::writable(a, 8)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 1).len(), 1);
        // Two more: used idx goes 1 -> 3, crossing used_event + 1 = 3.
        drv.add_chain(0, &[Buf::writable(a, 8)]);
        drv.add_chain(0, &[Buf::writable(a, 8)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 2).len(), 2);
        assert!(drv.interrupt().wait_count(0, 1));
        // The first batch (used idx 0 -> 1) got no interrupt.
        assert_eq!(drv.interrupt().count(0), 1);
        // The device asks for a kick at the next avail index.
        assert_eq!(drv.avail_event(0), 3);
    }

    #[test]
    fn without_event_idx_every_batch_interrupts() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features()).expect("activate");
        drv.set_used_event(0, 100);
        let a = drv.alloc(8);
        drv.add_chain(0, &[Buf::writable(a, 8)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 1).len(), 1);
        assert!(drv.interrupt().wait_count(0, 1));
    }

    #[test]
    fn reset_then_reactivate_serves_again() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        drv.activate(&mut rng, features()).expect("activate");
        let a = drv.alloc(16);
        drv.add_chain(0, &[Buf::writable(a, 16)]);
        drv.kick(0);
        assert_eq!(drv.wait_used(0, 1).len(), 1);
        rng.reset();
        drv.reset_rings();
        drv.activate(&mut rng, features()).expect("reactivate");
        drv.add_chain(0, &[Buf::writable(a, 16)]);
        drv.kick(0);
        let used = drv.wait_used(0, 1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].len, 16);
    }

    #[test]
    fn hostile_chain_stops_the_queue_and_spares_other_devices() {
        let mut bad = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut good = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng1 = Rng::new();
        let mut rng2 = Rng::new();
        bad.activate(&mut rng1, features()).expect("activate");
        good.activate(&mut rng2, features()).expect("activate");
        // A writable buffer that runs past the end of guest memory.
        bad.write_desc(0, 0, (1 << 22) - 8, 64, 2, 0);
        bad.publish(0, 0);
        bad.kick(0);
        assert!(bad.interrupt().wait_needs_reset());
        assert_eq!(bad.used_idx(0), 0);
        // Later valid chains on the stopped queue are ignored.
        let a = bad.alloc(8);
        bad.add_chain(0, &[Buf::writable(a, 8)]);
        bad.kick(0);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(bad.used_idx(0), 0);
        // The other device is unaffected.
        let b = good.alloc(8);
        good.add_chain(0, &[Buf::writable(b, 8)]);
        good.kick(0);
        assert_eq!(good.wait_used(0, 1).len(), 1);
        assert!(!good.interrupt().needs_reset());
        // A reset brings the broken device back.
        rng1.reset();
        bad.reset_rings();
        bad.activate(&mut rng1, features()).expect("reactivate");
        bad.add_chain(0, &[Buf::writable(a, 8)]);
        bad.kick(0);
        assert_eq!(bad.wait_used(0, 1).len(), 1);
        assert!(!bad.interrupt().needs_reset());
    }

    #[test]
    fn rings_outside_memory_need_reset_at_activation() {
        let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE]);
        let mut rng = Rng::new();
        let mut queues = drv.active_queues(features());
        queues[0]
            .queue
            .set_used_ring_address(Some(0xffff_f000), Some(0x10));
        let interrupt: Arc<dyn Interrupt> = drv.interrupt().clone();
        rng.activate(drv.memory().clone(), interrupt, queues, features())
            .expect("activate");
        assert!(drv.interrupt().needs_reset());
    }
}
