//! A fuzzing entry over the transmit path: descriptor chains, length checks
//! and header checks, without threads.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::worker::NetHandler;
use super::{features_for, tun_f, NetBackend, NET_HDR_LEN};
use crate::queue::QueueSet;
use crate::{ActiveQueue, Interrupt, InterruptKind, Memory};

const MEM_SIZE: usize = 0x30000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const BUFFERS: u64 = 0x1000;

#[derive(Debug)]
struct Sink;

impl NetBackend for Sink {
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize> {
        let len: usize = frame.iter().map(|s| s.len()).sum();
        assert!(
            len >= NET_HDR_LEN,
            "a frame reached the backend without a header"
        );
        Ok(len)
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn raw_fd(&self) -> RawFd {
        -1
    }
    fn offloads(&self) -> u32 {
        tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::TSO_ECN | tun_f::UFO
    }
    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
struct Quiet;

impl Interrupt for Quiet {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

/// Runs the transmit path over `data`: bytes 0..256 are a 16-entry
/// descriptor table, 256..258 the available index, 258..290 the available
/// ring, and the rest the buffers at guest address 0x1000. Never panics
/// whatever the bytes are.
pub fn fuzz_tx(data: &[u8]) {
    let Ok(mem) = Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let table = &data[..data.len().min(256)];
    let _ = mem.write_slice(table, GuestAddress(DESC));
    if let Some(idx) = data.get(256..258) {
        let _ = mem.write_slice(idx, GuestAddress(AVAIL + 2));
    }
    if let Some(ring) = data.get(258..290) {
        let _ = mem.write_slice(ring, GuestAddress(AVAIL + 4));
    }
    if let Some(rest) = data.get(290..) {
        let n = rest.len().min(MEM_SIZE - BUFFERS as usize);
        let _ = mem.write_slice(&rest[..n], GuestAddress(BUFFERS));
    }
    let (Some(rx), Some(tx)) = (queue(0), queue(1)) else {
        return;
    };
    let features = features_for(Sink.offloads());
    let backend: Box<dyn NetBackend> = Box::new(Sink);
    let mut handler = NetHandler::new(Arc::new(Mutex::new(backend)), features, Default::default());
    let mut set = QueueSet::new("virtio-net", mem, Arc::new(Quiet), vec![rx, tx], features);
    handler.process_tx(&mut set);
}

fn queue(index: u16) -> Option<ActiveQueue> {
    let mut q = Queue::new(QSIZE).ok()?;
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    Some(ActiveQueue {
        index,
        queue: q,
        kick: EventFd::new(0).ok()?,
    })
}
