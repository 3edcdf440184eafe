use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::testutil::{memory, DriverQueue, TestInterrupt, F_NEXT, F_WRITE};
use super::*;

const RX_BASE: u64 = 0x0;
const TX_BASE: u64 = 0x4000;
const BUF: u64 = 0x10000;

/// A backend over one end of a datagram socket pair; the test holds the
/// other end and sees exactly what the device sends.
#[derive(Debug)]
struct PairBackend {
    sock: UnixDatagram,
    offloads: u32,
    set: Arc<Mutex<Option<u32>>>,
}

impl NetBackend for PairBackend {
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize> {
        let bytes: Vec<u8> = frame.iter().flat_map(|s| s.iter().copied()).collect();
        self.sock.send(&bytes)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn offloads(&self) -> u32 {
        self.offloads
    }
    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        *self.set.lock().expect("lock") = Some(flags);
        Ok(())
    }
}

struct Harness {
    net: Net,
    peer: UnixDatagram,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<TestInterrupt>,
    set_offloads: Arc<Mutex<Option<u32>>>,
}

impl Harness {
    fn new(offloads: u32) -> Harness {
        let (a, peer) = UnixDatagram::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let set = Arc::new(Mutex::new(None));
        let backend = PairBackend {
            sock: a,
            offloads,
            set: set.clone(),
        };
        let mem = memory(1 << 20);
        Harness {
            net: Net::new(Box::new(backend), [0x52, 0x54, 0, 1, 2, 3]),
            peer,
            rx: DriverQueue::new(&mem, RX_BASE, QUEUE_SIZE),
            tx: DriverQueue::new(&mem, TX_BASE, QUEUE_SIZE),
            rx_kick: EventFd::new(0).expect("eventfd"),
            tx_kick: EventFd::new(0).expect("eventfd"),
            irq: Arc::new(TestInterrupt::default()),
            set_offloads: set,
        }
    }

    fn activate(&mut self, features: u64) {
        let queues = vec![
            ActiveQueue {
                index: 0,
                queue: self.rx.queue(),
                kick: self.rx_kick.try_clone().expect("clone"),
            },
            ActiveQueue {
                index: 1,
                queue: self.tx.queue(),
                kick: self.tx_kick.try_clone().expect("clone"),
            },
        ];
        self.net
            .activate(self.rx.mem.clone(), self.irq.clone(), queues, features)
            .expect("activate");
    }

    fn kick_rx(&self) {
        self.rx_kick.write(1).expect("kick");
    }

    fn kick_tx(&self) {
        self.tx_kick.write(1).expect("kick");
    }
}

fn header(flags: u8, gso: u8) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn tx_frame_reaches_backend_with_its_header() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let hdr = header(0, 0);
    let f = frame(1000, 1);
    h.tx.write(BUF, &hdr);
    // Header and frame split oddly across three buffers.
    h.tx.write(BUF + 0x100, &f[..10]);
    h.tx.write(BUF + 0x1000, &f[10..]);
    h.tx.add(&[
        (BUF, 12, false),
        (BUF + 0x100, 10, false),
        (BUF + 0x1000, 990, false),
    ]);
    h.kick_tx();
    let mut got = vec![0u8; 4096];
    let n = h.peer.recv(&mut got).expect("frame");
    assert_eq!(&got[..12], &hdr);
    assert_eq!(&got[12..n], &f[..]);
    assert_eq!(h.tx.wait_used(), (0, 0));
    assert!(!h.irq.is_needs_reset());
}

#[test]
fn rx_frame_lands_in_guest_buffer_with_header_and_length() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let mut sent = header(0, 0).to_vec();
    sent.extend(frame(1400, 2));
    h.peer.send(&sent).expect("send");
    h.rx.add(&[(BUF, 100, true), (BUF + 0x1000, 1500, true)]);
    h.kick_rx();
    let (id, len) = h.rx.wait_used();
    assert_eq!((id, len as usize), (0, sent.len()));
    let mut got = h.rx.read(BUF, 100);
    got.extend(h.rx.read(BUF + 0x1000, sent.len() - 100));
    // num_buffers is 1 without merged receive buffers.
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(&got[..10], &sent[..10]);
    assert_eq!(&got[12..], &sent[12..]);
}

#[test]
fn rx_waits_for_buffers_then_resumes_on_kick() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let mut v = header(0, 0).to_vec();
            v.extend(frame(60 + i, i as u8));
            v
        })
        .collect();
    for f in &frames {
        h.peer.send(f).expect("send");
    }
    // Nothing posted: no frame may be lost while the device waits.
    std::thread::sleep(Duration::from_millis(50));
    assert!(h.rx.used().is_none());
    h.rx.add(&[(BUF, 2048, true)]);
    h.kick_rx();
    assert_eq!(h.rx.wait_used(), (0, frames[0].len() as u32));
    h.rx.add(&[(BUF + 0x1000, 2048, true)]);
    h.rx.add(&[(BUF + 0x2000, 2048, true)]);
    h.kick_rx();
    assert_eq!(h.rx.wait_used(), (1, frames[1].len() as u32));
    assert_eq!(h.rx.wait_used(), (2, frames[2].len() as u32));
    assert_eq!(h.rx.read(BUF + 0x2000 + 12, 62), frames[2][12..]);
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let mut big = header(0, 0).to_vec();
    big.extend(frame(3000, 3));
    let mut small = header(0, 0).to_vec();
    small.extend(frame(100, 4));
    h.peer.send(&big).expect("send");
    h.peer.send(&small).expect("send");
    h.rx.add(&[(BUF, 1526, true)]);
    h.kick_rx();
    assert_eq!(h.rx.wait_used(), (0, small.len() as u32));
    assert!(!h.irq.is_needs_reset());
}

#[test]
fn offloads_follow_backend_and_negotiation() {
    let none = features_for(0);
    assert_eq!(none & bit(VIRTIO_NET_F_CSUM), 0);
    assert_eq!(none & bit(VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_ne!(none & bit(VIRTIO_NET_F_MAC), 0);
    assert_ne!(none & VIRTIO_F_VERSION_1, 0);

    let all = tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::TSO_ECN | tun_f::UFO;
    let mut h = Harness::new(all);
    let offered = h.net.device_features();
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_ne!(offered & bit(b), 0, "feature bit {b} not offered");
    }
    // The guest takes checksums and TSO over IPv4 only.
    let accepted = VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_CSUM);
    h.activate(accepted);
    assert_eq!(
        *h.set_offloads.lock().expect("lock"),
        Some(tun_f::CSUM | tun_f::TSO4)
    );
    // A TSO frame over IPv6 was not negotiated: dropped, buffer returned.
    h.tx.write(BUF, &header(1, 4));
    h.tx.write(BUF + 12, &frame(200, 5));
    h.tx.add(&[(BUF, 212, false)]);
    // A TSO frame over IPv4 was: it goes through.
    h.tx.write(BUF + 0x1000, &header(1, 1));
    h.tx.write(BUF + 0x1000 + 12, &frame(200, 6));
    h.tx.add(&[(BUF + 0x1000, 212, false)]);
    h.kick_tx();
    let mut got = vec![0u8; 4096];
    let n = h.peer.recv(&mut got).expect("frame");
    assert_eq!(&got[..2], &[1, 1]);
    assert_eq!(&got[12..n], &frame(200, 6)[..]);
    assert_eq!(h.tx.wait_used().0, 0);
    assert_eq!(h.tx.wait_used().0, 1);
}

#[test]
fn offloads_off_when_guest_declines_checksums() {
    assert_eq!(offloads_for(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        offloads_for(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        tun_f::CSUM
    );
}

#[test]
fn config_space_holds_mac_and_link_up() {
    let h = Harness::new(0);
    let mut c = [0xffu8; 10];
    h.net.read_config(0, &mut c);
    assert_eq!(c, [0x52, 0x54, 0, 1, 2, 3, 1, 0, 0, 0]);
    let mut far = [0xffu8; 4];
    h.net.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    assert_eq!(h.net.device_type(), device_type::NET);
    assert_eq!(h.net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn reset_and_activate_again_keeps_the_backend() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    h.net.reset();
    // The driver starts over with fresh rings.
    let mem = h.rx.mem.clone();
    h.rx = DriverQueue::new(&mem, RX_BASE, QUEUE_SIZE);
    h.tx = DriverQueue::new(&mem, TX_BASE, QUEUE_SIZE);
    mem.write_slice(&[0u8; 0x8000], GuestAddress(0))
        .expect("clear");
    h.activate(h.net.device_features());
    h.tx.write(BUF, &header(0, 0));
    h.tx.write(BUF + 12, &frame(64, 7));
    h.tx.add(&[(BUF, 76, false)]);
    h.kick_tx();
    let mut got = vec![0u8; 256];
    assert_eq!(h.peer.recv(&mut got).expect("frame"), 76);
}

#[test]
fn activate_with_wrong_queue_count_fails() {
    let mut h = Harness::new(0);
    let err = h
        .net
        .activate(h.rx.mem.clone(), h.irq.clone(), Vec::new(), 0)
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { want: 2, got: 0 }));
}

#[test]
fn local_mac_is_unicast_and_locally_administered() {
    for seed in 0..64 {
        let m = local_mac(seed);
        assert_eq!(m[0] & 1, 0);
        assert_eq!(m[0] & 2, 2);
    }
    assert_ne!(local_mac(1), local_mac(2));
}

fn expect_tx_reset(descs: &[(u64, u32, u16, u16)]) {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    h.tx.add_raw(descs);
    h.kick_tx();
    h.irq.wait_needs_reset();
    // The queue is no longer served: a good frame after the bad one stays.
    h.tx.write(BUF, &header(0, 0));
    h.tx.add(&[(BUF, 76, false)]);
    h.kick_tx();
    h.peer.set_nonblocking(true).expect("nonblocking");
    std::thread::sleep(Duration::from_millis(20));
    assert!(h.peer.recv(&mut [0u8; 128]).is_err());
}

#[test]
fn tx_short_header_needs_reset() {
    expect_tx_reset(&[(BUF, 11, 0, 0)]);
}

#[test]
fn tx_frame_over_64k_needs_reset() {
    let len = (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
    expect_tx_reset(&[(BUF, len, 0, 0)]);
}

#[test]
fn tx_buffer_outside_memory_needs_reset() {
    expect_tx_reset(&[(0xfff00, 0x200, 0, 0)]);
}

#[test]
fn tx_descriptor_loop_needs_reset() {
    // Two descriptors pointing at each other.
    expect_tx_reset(&[(BUF, 12, F_NEXT, 1), (BUF, 12, F_NEXT, 0)]);
}

#[test]
fn tx_overflowing_length_needs_reset() {
    expect_tx_reset(&[(BUF, u32::MAX, F_NEXT, 1), (BUF, 16, 0, 0)]);
}

#[test]
fn tx_next_index_outside_queue_needs_reset() {
    expect_tx_reset(&[(BUF, 12, F_NEXT, QUEUE_SIZE)]);
}

#[test]
fn avail_index_far_ahead_needs_reset() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    h.tx.set_avail_idx(QUEUE_SIZE + 5);
    h.kick_tx();
    h.irq.wait_needs_reset();
}

#[test]
fn rx_buffer_smaller_than_header_needs_reset() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let mut f = header(0, 0).to_vec();
    f.extend(frame(60, 8));
    h.peer.send(&f).expect("send");
    h.rx.add(&[(BUF, 8, true)]);
    h.kick_rx();
    h.irq.wait_needs_reset();
    // The transmit queue still works.
    h.tx.write(BUF + 0x1000, &header(0, 0));
    h.tx.add(&[(BUF + 0x1000, 76, false)]);
    h.kick_tx();
    assert_eq!(h.peer.recv(&mut [0u8; 128]).expect("frame"), 76);
}

#[test]
fn rx_readable_descriptor_after_writable_needs_reset() {
    let mut h = Harness::new(0);
    h.activate(h.net.device_features());
    let mut f = header(0, 0).to_vec();
    f.extend(frame(60, 9));
    h.peer.send(&f).expect("send");
    h.rx.add_raw(&[(BUF, 100, F_WRITE | F_NEXT, 1), (BUF + 0x100, 100, 0, 0)]);
    h.kick_rx();
    h.irq.wait_needs_reset();
}

#[test]
fn tap_rejects_bad_names_with_the_name_in_the_error() {
    for bad in ["", "a/b", "sixteen-chars-xx", "with space", ".."] {
        let err = Tap::open(bad).unwrap_err();
        assert!(matches!(err, TapError::Name(_)), "{bad:?}: {err}");
        assert!(err.to_string().contains(&format!("{bad:?}")));
    }
}

#[test]
fn fuzz_entry_survives_garbage() {
    fuzz_tx(&[]);
    fuzz_tx(&[0xff; 400]);
    let mut data = vec![0u8; 400];
    // One descriptor at 0x1000 of 40 bytes, made available once.
    data[..8].copy_from_slice(&0x1000u64.to_le_bytes());
    data[8..12].copy_from_slice(&40u32.to_le_bytes());
    data[256] = 1;
    fuzz_tx(&data);
}
