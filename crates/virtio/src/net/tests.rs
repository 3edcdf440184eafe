use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::GuestAddress;

use super::*;
use crate::testing::{Buf, MockDriver, Used};

const RX: usize = 0;
const TX: usize = 1;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

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
    drv: MockDriver,
    set_offloads: Arc<Mutex<Option<u32>>>,
}

impl Harness {
    fn new(offloads: u32) -> Harness {
        Harness::limited(offloads, None, None)
    }

    /// A harness whose device limits received (`rx`) and sent (`tx`) frames.
    fn limited(
        offloads: u32,
        rx: Option<Arc<crate::rate_limiter::DeviceLimiter>>,
        tx: Option<Arc<crate::rate_limiter::DeviceLimiter>>,
    ) -> Harness {
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
        Harness {
            net: Net::new(Box::new(backend), [0x52, 0x54, 0, 1, 2, 3]).with_rate_limiters(rx, tx),
            peer,
            drv: MockDriver::new(1 << 22, &[QUEUE_SIZE, QUEUE_SIZE]),
            set_offloads: set,
        }
    }

    /// A harness whose device is active with every feature it offers.
    fn active() -> Harness {
        let mut h = Harness::new(0);
        let features = h.net.device_features();
        h.activate(features);
        h
    }

    fn activate(&mut self, features: u64) {
        self.drv
            .activate(&mut self.net, features)
            .expect("activate");
    }

    /// Queues one frame (header + payload) for transmission in one buffer.
    fn send_frame(&mut self, hdr: [u8; NET_HDR_LEN], payload: &[u8]) {
        let mut v = hdr.to_vec();
        v.extend(payload);
        let a = self.drv.put(&v);
        self.drv.add_chain(TX, &[Buf::readable(a, v.len() as u32)]);
    }

    /// Posts one receive buffer of `len` bytes.
    fn post_rx(&mut self, len: u32) -> GuestAddress {
        let a = self.drv.alloc(len);
        self.drv.add_chain(RX, &[Buf::writable(a, len)]);
        a
    }

    fn used(&mut self, q: usize) -> Used {
        let u = self.drv.wait_used(q, 1);
        assert_eq!(u.len(), 1, "the device returned no buffer on queue {q}");
        u[0]
    }
}

fn header(flags: u8, gso: u8) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn with_header(p: &[u8]) -> Vec<u8> {
    let mut v = header(0, 0).to_vec();
    v.extend(p);
    v
}

#[test]
fn tx_frame_reaches_backend_with_its_header() {
    let mut h = Harness::active();
    let hdr = header(0, 0);
    let f = payload(1000, 1);
    // Header and frame split oddly across three buffers.
    let a = h.drv.put(&hdr);
    let b = h.drv.put(&f[..10]);
    let c = h.drv.put(&f[10..]);
    h.drv.add_chain(
        TX,
        &[
            Buf::readable(a, 12),
            Buf::readable(b, 10),
            Buf::readable(c, 990),
        ],
    );
    h.drv.kick(TX);
    let mut got = vec![0u8; 4096];
    let n = h.peer.recv(&mut got).expect("frame");
    assert_eq!(&got[..12], &hdr);
    assert_eq!(&got[12..n], &f[..]);
    assert_eq!(h.used(TX).len, 0);
    assert!(!h.drv.interrupt().needs_reset());
}

#[test]
fn rx_frame_lands_in_guest_buffer_with_header_and_length() {
    let mut h = Harness::active();
    let sent = with_header(&payload(1400, 2));
    h.peer.send(&sent).expect("send");
    let a = h.drv.alloc(100);
    let b = h.drv.alloc(1500);
    h.drv
        .add_chain(RX, &[Buf::writable(a, 100), Buf::writable(b, 1500)]);
    h.drv.kick(RX);
    assert_eq!(h.used(RX).len as usize, sent.len());
    let mut got = h.drv.read(a, 100);
    got.extend(h.drv.read(b, sent.len() - 100));
    // num_buffers is 1 without merged receive buffers.
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(&got[..10], &sent[..10]);
    assert_eq!(&got[12..], &sent[12..]);
    assert!(h.drv.interrupt().wait_count(RX as u16, 1));
}

#[test]
fn rx_waits_for_buffers_then_resumes_on_kick() {
    let mut h = Harness::active();
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| with_header(&payload(60 + i, i as u8)))
        .collect();
    for f in &frames {
        h.peer.send(f).expect("send");
    }
    // Nothing posted yet: the frames wait, none is lost.
    std::thread::sleep(Duration::from_millis(50));
    assert!(h.drv.take_used(RX).is_empty());
    h.post_rx(2048);
    h.drv.kick(RX);
    assert_eq!(h.used(RX).len as usize, frames[0].len());
    h.post_rx(2048);
    let last = h.post_rx(2048);
    h.drv.kick(RX);
    let used = h.drv.wait_used(RX, 2);
    let lens: Vec<usize> = used.iter().map(|u| u.len as usize).collect();
    assert_eq!(lens, [frames[1].len(), frames[2].len()]);
    assert_eq!(h.drv.read(last, frames[2].len()), {
        let mut f = frames[2].clone();
        f[10] = 1;
        f
    });
}

#[test]
fn rx_without_buffers_sends_no_interrupt() {
    // Without event index (which counts used entries itself) every
    // notification check says yes.
    let mut h = Harness::new(0);
    let features = h.net.device_features() & !crate::VIRTIO_RING_F_EVENT_IDX;
    h.activate(features);
    let f = with_header(&payload(70, 4));
    h.peer.send(&f).expect("send");
    h.drv.kick(RX);
    // Two transmit round trips: the worker handles events in order, so by
    // the second one it has looked at the receive side.
    for i in 0..2 {
        h.send_frame(header(0, 0), &payload(60, i));
        h.drv.kick(TX);
        h.used(TX);
    }
    assert_eq!(h.drv.interrupt().count(RX as u16), 0);
    // With a buffer the frame arrives and the interrupt follows.
    h.post_rx(2048);
    h.drv.kick(RX);
    assert_eq!(h.used(RX).len as usize, f.len());
    assert!(h.drv.interrupt().wait_count(RX as u16, 1));
}

#[test]
fn rx_frame_arriving_later_wakes_the_device() {
    let mut h = Harness::active();
    h.post_rx(2048);
    h.drv.kick(RX);
    std::thread::sleep(Duration::from_millis(20));
    let f = with_header(&payload(80, 9));
    h.peer.send(&f).expect("send");
    assert_eq!(h.used(RX).len as usize, f.len());
}

#[test]
fn rx_frame_larger_than_the_buffer_is_dropped() {
    let mut h = Harness::active();
    let big = with_header(&payload(3000, 3));
    let small = with_header(&payload(100, 4));
    h.peer.send(&big).expect("send");
    h.peer.send(&small).expect("send");
    h.post_rx(1526);
    h.post_rx(1526);
    h.drv.kick(RX);
    let used = h.drv.wait_used(RX, 2);
    let lens: Vec<u32> = used.iter().map(|u| u.len).collect();
    assert_eq!(lens, [0, small.len() as u32]);
    assert!(!h.drv.interrupt().needs_reset());
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
    h.send_frame(header(1, 4), &payload(200, 5));
    // A TSO frame over IPv4 was: it goes through.
    h.send_frame(header(1, 1), &payload(200, 6));
    h.drv.kick(TX);
    let mut got = vec![0u8; 4096];
    let n = h.peer.recv(&mut got).expect("frame");
    assert_eq!(&got[..2], &[1, 1]);
    assert_eq!(&got[12..n], &payload(200, 6)[..]);
    assert_eq!(h.drv.wait_used(TX, 2).len(), 2);
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
    let mut h = Harness::active();
    h.net.reset();
    h.drv.reset_rings();
    let features = h.net.device_features();
    h.activate(features);
    h.send_frame(header(0, 0), &payload(64, 7));
    h.drv.kick(TX);
    let mut got = vec![0u8; 256];
    assert_eq!(h.peer.recv(&mut got).expect("frame"), 76);
}

#[test]
fn activate_with_wrong_queue_count_fails() {
    let mut h = Harness::new(0);
    let irq = h.drv.interrupt().clone();
    let err = h
        .net
        .activate(h.drv.memory().clone(), irq, Vec::new(), 0)
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

/// Publishes the raw chain `descs` (addr, len, flags, next) at descriptor
/// 0 of the transmit queue and expects the device to ask for a reset and
/// stop serving the queue.
fn expect_tx_reset(descs: &[(u64, u32, u16, u16)]) {
    let mut h = Harness::active();
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        h.drv.write_desc(TX, i as u16, addr, len, flags, next);
    }
    h.drv.publish(TX, 0);
    h.drv.kick(TX);
    assert!(h.drv.interrupt().wait_needs_reset());
    // The queue is no longer served: a good frame after the bad one stays.
    let good = h.drv.put(&with_header(&payload(64, 0)));
    h.drv.write_desc(TX, 10, good.0, 76, 0, 0);
    h.drv.publish(TX, 10);
    h.drv.kick(TX);
    h.peer.set_nonblocking(true).expect("nonblocking");
    std::thread::sleep(Duration::from_millis(20));
    assert!(h.peer.recv(&mut [0u8; 128]).is_err());
}

const DATA: u64 = 0x20_0000;

#[test]
fn tx_short_header_needs_reset() {
    expect_tx_reset(&[(DATA, 11, 0, 0)]);
}

#[test]
fn tx_frame_over_64k_needs_reset() {
    let len = (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
    expect_tx_reset(&[(DATA, len, 0, 0)]);
}

#[test]
fn tx_buffer_outside_memory_needs_reset() {
    expect_tx_reset(&[((1 << 22) - 0x100, 0x200, 0, 0)]);
}

#[test]
fn tx_descriptor_loop_needs_reset() {
    expect_tx_reset(&[(DATA, 12, NEXT, 1), (DATA, 12, NEXT, 0)]);
}

#[test]
fn tx_overflowing_length_needs_reset() {
    expect_tx_reset(&[(DATA, u32::MAX, NEXT, 1), (DATA, 16, 0, 0)]);
}

#[test]
fn tx_next_index_outside_queue_needs_reset() {
    expect_tx_reset(&[(DATA, 12, NEXT, QUEUE_SIZE)]);
}

#[test]
fn avail_index_far_ahead_needs_reset() {
    let mut h = Harness::active();
    h.drv.set_avail_idx(TX, QUEUE_SIZE + 5);
    h.drv.kick(TX);
    assert!(h.drv.interrupt().wait_needs_reset());
}

#[test]
fn rx_buffer_smaller_than_header_needs_reset_and_tx_goes_on() {
    let mut h = Harness::active();
    h.peer.send(&with_header(&payload(60, 8))).expect("send");
    h.post_rx(8);
    h.drv.kick(RX);
    assert!(h.drv.interrupt().wait_needs_reset());
    h.send_frame(header(0, 0), &payload(64, 8));
    h.drv.kick(TX);
    assert_eq!(h.peer.recv(&mut [0u8; 128]).expect("frame"), 76);
}

#[test]
fn rx_readable_descriptor_after_writable_needs_reset() {
    let mut h = Harness::active();
    h.peer.send(&with_header(&payload(60, 9))).expect("send");
    h.drv.write_desc(RX, 0, DATA, 100, WRITE | NEXT, 1);
    h.drv.write_desc(RX, 1, DATA + 0x100, 100, 0, 0);
    h.drv.publish(RX, 0);
    h.drv.kick(RX);
    assert!(h.drv.interrupt().wait_needs_reset());
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

/// Replays the fuzzing corpus as a regression test.
#[test]
fn net_corpus_replays_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/net");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz/corpus/net") {
        let path = entry.expect("entry").path();
        fuzz_tx(&std::fs::read(&path).expect("corpus file"));
        n += 1;
    }
    assert!(n >= 10, "only {n} corpus files");
}

/// A limit of one frame per hour: the first frame empties the bucket.
fn one_per_hour() -> Arc<crate::rate_limiter::DeviceLimiter> {
    use crate::rate_limiter::{BucketConfig, DeviceLimiter, LimiterConfig};
    DeviceLimiter::new(LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: Duration::from_secs(3600),
        }),
    })
    .expect("a limiter")
}

/// Waits until `limiter` holds a frame back.
fn wait_held(limiter: &crate::rate_limiter::DeviceLimiter) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !limiter.stats().waiting && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        limiter.stats().waiting,
        "the second frame was not held back"
    );
}

#[test]
fn frames_out_of_tokens_wait_in_each_direction_until_the_limit_is_lifted() {
    let (rx, tx) = (one_per_hour(), one_per_hour());
    let mut h = Harness::limited(0, Some(rx.clone()), Some(tx.clone()));
    let features = h.net.device_features();
    h.activate(features);

    h.send_frame(header(0, 0), &payload(100, 1));
    h.send_frame(header(0, 0), &payload(200, 2));
    h.drv.kick(TX);
    let mut got = vec![0u8; 4096];
    assert_eq!(h.peer.recv(&mut got).expect("the first frame"), 112);
    wait_held(&tx);
    h.peer.set_nonblocking(true).expect("nonblocking");
    assert!(h.peer.recv(&mut got).is_err(), "the second frame went out");
    h.peer.set_nonblocking(false).expect("blocking");
    tx.set_config(Default::default());
    assert_eq!(h.peer.recv(&mut got).expect("the second frame"), 212);

    for i in 0..2 {
        h.peer.send(&with_header(&payload(60, i))).expect("send");
        h.post_rx(2048);
    }
    h.drv.kick(RX);
    assert_eq!(
        h.drv.wait_used(RX, 1).len(),
        1,
        "the first frame was not received"
    );
    wait_held(&rx);
    assert!(
        h.drv.take_used(RX).is_empty(),
        "the second frame was received"
    );
    rx.set_config(Default::default());
    assert_eq!(
        h.drv.wait_used(RX, 1).len(),
        1,
        "the second frame never arrived"
    );
    assert_eq!((rx.stats().delayed_ops, tx.stats().delayed_bytes), (1, 200));
}
