//! The host tap interface behind a virtio-net device.
//!
//! [`Tap::open`] attaches to the tap interface of the given name, creating
//! it if it does not exist. The tap carries a 12-byte virtio-net header in
//! front of every frame (IFF_VNET_HDR with TUNSETVNETHDRSZ), so offloads pass
//! between the guest and the host stack unchanged, and its file descriptor is
//! non-blocking so one worker thread can serve it with epoll.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use super::{NetBackend, NET_HDR_LEN};

/// Offload flags of TUNSETOFFLOAD (linux/if_tun.h).
pub mod tun_f {
    /// The reader takes frames with a partial checksum.
    pub const CSUM: u32 = 0x01;
    /// The reader takes TCP segmentation offload frames over IPv4.
    pub const TSO4: u32 = 0x02;
    /// The reader takes TCP segmentation offload frames over IPv6.
    pub const TSO6: u32 = 0x04;
    /// The reader takes TSO frames with the ECN bit.
    pub const TSO_ECN: u32 = 0x08;
    /// The reader takes UDP fragmentation offload frames.
    pub const UFO: u32 = 0x10;
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, padded to
/// the size of the kernel's union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors from opening a tap interface.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, too long, or has characters Linux refuses.
    #[error("invalid tap name {0:?}: use 1 to 15 characters, no '/', ':' or spaces")]
    Name(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun for tap {name}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused to attach to or create the tap.
    #[error("cannot attach to tap {name} (it may be in use, or not a tap)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The tap does not take a 12-byte virtio-net header.
    #[error("tap {name} does not take a virtio-net header")]
    VnetHeader {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open tap interface in IFF_TAP | IFF_NO_PI | IFF_VNET_HDR mode.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offloads: u32,
}

impl Tap {
    /// Opens the tap interface `name`, creating it if it does not exist,
    /// and probes which offloads it takes.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= libc::IFNAMSIZ
            || bytes
                .iter()
                .any(|&b| b == b'/' || b == b':' || b <= b' ' || b >= 0x7f)
            || name == "."
            || name == ".."
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::Open {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // matches in layout and size; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at a live local.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::VnetHeader {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap {
            file,
            name: name.to_string(),
            offloads: 0,
        };
        tap.offloads = tap.probe_offloads();
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn set_offload_flags(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Finds the largest usual set of offloads the kernel accepts, then
    /// turns them all off until the guest asks for them.
    fn probe_offloads(&self) -> u32 {
        use tun_f::*;
        let candidates = [
            CSUM | TSO4 | TSO6 | TSO_ECN | UFO,
            CSUM | TSO4 | TSO6 | TSO_ECN,
            CSUM | TSO4 | TSO6,
            CSUM,
        ];
        let found = candidates
            .into_iter()
            .find(|&f| self.set_offload_flags(f).is_ok())
            .unwrap_or(0);
        // Off until negotiated; a failure leaves the probed set, which is
        // what the guest would be offered anyway.
        let _ = self.set_offload_flags(0);
        found
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<usize> {
        self.file.write_vectored(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn offloads(&self) -> u32 {
        self.offloads
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.set_offload_flags(flags & self.offloads)
    }
}
