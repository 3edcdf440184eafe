//! A real tap: frames cross between the device and the host's network stack.
//! Needs root (CAP_NET_ADMIN) and /dev/net/tun; fails, naming them, without.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::*;
use crate::testing::{Buf, MockDriver, WAIT};

/// An EtherType for local experiments (IEEE 802), so the host's own
/// traffic on the tap (IPv6 router solicitations) is told apart.
const ETHERTYPE: u16 = 0x88b5;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Brings the interface up and returns its index.
fn link_up(name: &str) -> io::Result<libc::c_int> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket")?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS fills a `struct ifreq`, which `req` matches.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(ret, "SIOCGIFFLAGS")?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `req` matches.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check(ret, "SIOCSIFFLAGS")?;
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index as libc::c_int)
}

/// A packet socket on the interface for our EtherType only.
fn packet_socket(index: libc::c_int) -> io::Result<OwnedFd> {
    let proto = ETHERTYPE.to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    };
    check(fd, "AF_PACKET socket")?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index;
    // SAFETY: `addr` is a sockaddr_ll of the size given.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    check(ret, "bind")?;
    let tv = libc::timeval {
        tv_sec: WAIT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the size given.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    check(ret, "SO_RCVTIMEO")?;
    Ok(sock)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    f.extend(ETHERTYPE.to_be_bytes());
    f.extend(payload);
    f
}

#[test]
fn host_tap_exchanges_frames_with_the_device() {
    let name = format!("fvt{}", std::process::id() % 1_000_000);
    let tap = Tap::open(&name).unwrap_or_else(|e| {
        panic!(
            "this test needs root and /dev/net/tun: {e}: {:?}",
            std::error::Error::source(&e)
        )
    });
    assert_eq!(tap.name(), name);
    // Quiet the host's IPv6 chatter on the new link; best effort.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let index = link_up(&name).expect("bring the tap up");
    let sock = packet_socket(index).expect("packet socket");

    let guest_mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    let mut net = Net::new(Box::new(tap), guest_mac);
    assert_ne!(
        net.device_features() & bit(VIRTIO_NET_F_CSUM),
        0,
        "a tap takes checksum offload"
    );
    let mut drv = MockDriver::new(1 << 22, &[QUEUE_SIZE, QUEUE_SIZE]);
    let rx_bufs: Vec<_> = (0..8)
        .map(|_| {
            let a = drv.alloc(2048);
            drv.add_chain(0, &[Buf::writable(a, 2048)]);
            a
        })
        .collect();
    let features = net.device_features();
    drv.activate(&mut net, features).expect("activate");

    // Guest to host.
    let out = ethernet([0xff; 6], guest_mac, b"from the guest, through the tap");
    let mut req = vec![0u8; NET_HDR_LEN];
    req.extend(&out);
    let a = drv.put(&req);
    drv.add_chain(1, &[Buf::readable(a, req.len() as u32)]);
    drv.kick(1);
    let mut buf = [0u8; 2048];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n > 0, "no frame on the tap: {}", io::Error::last_os_error());
    assert_eq!(&buf[..n as usize], &out[..]);

    // Host to guest.
    let back = ethernet(
        guest_mac,
        [0x52, 0x54, 0, 1, 1, 1],
        b"from the host, into the guest",
    );
    // SAFETY: `back` is readable for its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
    assert_eq!(
        n as usize,
        back.len(),
        "send: {}",
        io::Error::last_os_error()
    );
    let end = Instant::now() + WAIT;
    'found: loop {
        assert!(Instant::now() < end, "the frame never reached the guest");
        for used in drv.take_used(0) {
            let got = drv.read(rx_bufs[used.id as usize], used.len as usize);
            let ours = got.len() > NET_HDR_LEN + 14
                && got[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == ETHERTYPE.to_be_bytes();
            if ours {
                assert_eq!(&got[NET_HDR_LEN..], &back[..]);
                break 'found;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!drv.interrupt().needs_reset());
    net.reset();
}
#[test]
fn opening_the_same_tap_twice_is_one_clear_error() {
    let name = format!("fvu{}", std::process::id() % 1_000_000);
    let first =
        Tap::open(&name).unwrap_or_else(|e| panic!("this test needs root and /dev/net/tun: {e}"));
    let err = Tap::open(&name).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&name), "{msg}");
    assert!(!msg.contains('\n'));
    drop(first);
}
