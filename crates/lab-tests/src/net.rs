//! The host end of a guest's network interface: waiting for the tap the VMM
//! creates, and giving it an IPv4 address (the ioctls `ip addr add` and
//! `ip link set up` use).

use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Errors of the host network set-up.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("interface name '{0}' is too long")]
    Name(String),
    #[error("interface {0} did not appear within {1} s")]
    NoInterface(String, u64),
    #[error("cannot {what} on {name}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Waits until the network interface `name` exists.
pub fn wait_for_interface(name: &str, limit: Duration) -> Result<(), NetError> {
    let start = Instant::now();
    let path = Path::new("/sys/class/net").join(name);
    while !path.exists() {
        if start.elapsed() > limit {
            return Err(NetError::NoInterface(name.to_string(), limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn request(name: &str) -> Result<libc::ifreq, NetError> {
    // SAFETY: ifreq is plain data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(NetError::Name(name.to_string()));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data for which all-zero bytes are valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from_ne_bytes(addr);
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; the kernel reads
    // the address back as sockaddr_in for AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Socket(libc::c_int);

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn ioctl(
    sock: &Socket,
    code: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &'static str,
    name: &str,
) -> Result<(), NetError> {
    // SAFETY: `req` is a valid ifreq for this interface request.
    if unsafe { libc::ioctl(sock.0, code, req as *mut libc::ifreq) } < 0 {
        return Err(NetError::Ioctl {
            what,
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Gives interface `name` the address `addr/prefix` and brings it up.
pub fn configure_interface(name: &str, addr: [u8; 4], prefix: u8) -> Result<(), NetError> {
    // SAFETY: plain system call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(NetError::Ioctl {
            what: "open a socket",
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    let sock = Socket(fd);
    let mut req = request(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "set the address", name)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let mut req = request(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(mask.to_be_bytes());
    ioctl(
        &sock,
        libc::SIOCSIFNETMASK,
        &mut req,
        "set the netmask",
        name,
    )?;
    let mut req = request(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "read the flags", name)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "bring it up", name)
}
