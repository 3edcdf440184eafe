//! A small ivshmem server, for QEMU's `ivshmem-doorbell` peers in the
//! region benchmark (the lab has QEMU but not the server QEMU ships apart).
//! It speaks QEMU's ivshmem protocol: each message is a little-endian i64,
//! with at most one descriptor attached. A new peer gets the protocol
//! version (0), its own id, then -1 with the shared memory (a memfd); then
//! every existing peer's id with each of its doorbell eventfds, and its own
//! id with its own; existing peers are told the new one's id with its
//! eventfds. Peers are numbered from 0 in the order they connect, and
//! their sockets and eventfds are kept until the server is dropped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::util::{Context, Result};

/// One connected peer: its socket and one eventfd per vector.
struct Peer {
    id: i64,
    socket: UnixStream,
    doorbells: Vec<OwnedFd>,
}

/// A running server; it stops and closes everything when dropped.
pub struct IvshmemServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    peers: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

fn send(socket: &UnixStream, value: i64, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = value.to_le_bytes();
    let sent = match fd {
        Some(fd) => socket.send_with_fd(&bytes[..], fd),
        None => socket.send_with_fds(&[&bytes[..]], &[]),
    };
    sent.map(drop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A new eventfd, or a memfd of `size` bytes when `size` is given.
fn new_fd(size: Option<u64>) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system calls with constant arguments; each result is a
    // new descriptor that only the OwnedFd below owns.
    let fd = unsafe {
        match size {
            None => libc::eventfd(0, libc::EFD_CLOEXEC),
            Some(_) => libc::memfd_create(c"fvbench-ivshmem".as_ptr(), libc::MFD_CLOEXEC),
        }
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(size) = size {
        std::fs::File::from(owned.try_clone()?).set_len(size)?;
    }
    Ok(owned)
}

/// Takes a new peer: tells it who it is, the memory, everyone's doorbells,
/// and tells everyone about it.
fn welcome(
    socket: UnixStream,
    id: i64,
    vectors: u32,
    memory: &OwnedFd,
    peers: &mut Vec<Peer>,
) -> std::io::Result<()> {
    let doorbells = (0..vectors)
        .map(|_| new_fd(None))
        .collect::<std::io::Result<Vec<_>>>()?;
    send(&socket, 0, None)?;
    send(&socket, id, None)?;
    send(&socket, -1, Some(memory.as_raw_fd()))?;
    for other in peers.iter() {
        for fd in &doorbells {
            send(&other.socket, id, Some(fd.as_raw_fd()))?;
        }
        for fd in &other.doorbells {
            send(&socket, other.id, Some(fd.as_raw_fd()))?;
        }
    }
    for fd in &doorbells {
        send(&socket, id, Some(fd.as_raw_fd()))?;
    }
    peers.push(Peer {
        id,
        socket,
        doorbells,
    });
    Ok(())
}

impl IvshmemServer {
    /// Listens on `path` with a region of `size` bytes and `vectors`
    /// doorbells per peer.
    pub fn start(path: &Path, size: u64, vectors: u32) -> Result<IvshmemServer> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).ctx(|| format!("cannot listen on {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .ctx(|| "cannot make the server's socket non-blocking".to_string())?;
        let memory = new_fd(Some(size)).ctx(|| "cannot create the region's memfd".to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (stopping, counted) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || {
            let mut peers = Vec::new();
            while !stopping.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((socket, _)) => {
                        let _ = socket.set_nonblocking(false);
                        let id = peers.len() as i64;
                        match welcome(socket, id, vectors, &memory, &mut peers) {
                            Ok(()) => {
                                counted.store(peers.len(), Ordering::Release);
                            }
                            Err(e) => eprintln!("ivshmem server: peer {id}: {e}"),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(IvshmemServer {
            path: path.to_path_buf(),
            stop,
            peers: count,
            thread: Some(thread),
        })
    }

    /// How many peers have connected so far.
    pub fn peers(&self) -> usize {
        self.peers.load(Ordering::Acquire)
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_second_peer_learns_the_first_and_itself_and_the_first_learns_it() {
        let path = std::env::temp_dir().join(format!("fv-ivshmem-{}.sock", std::process::id()));
        let server = IvshmemServer::start(&path, 1 << 20, 2).unwrap();
        let read = |s: &mut UnixStream| {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            i64::from_le_bytes(b)
        };
        let mut first = UnixStream::connect(&path).unwrap();
        assert_eq!(
            (read(&mut first), read(&mut first)),
            (0, 0),
            "version, own id"
        );
        assert_eq!(read(&mut first), -1, "the memory");
        assert_eq!(
            (read(&mut first), read(&mut first)),
            (0, 0),
            "its own two doorbells"
        );
        let mut second = UnixStream::connect(&path).unwrap();
        let got: Vec<i64> = (0..7).map(|_| read(&mut second)).collect();
        assert_eq!(
            got,
            [0, 1, -1, 0, 0, 1, 1],
            "version, id, memory, peer 0's, its own"
        );
        assert_eq!(
            (read(&mut first), read(&mut first)),
            (1, 1),
            "told of peer 1"
        );
        // The count follows the last message sent, so it may lag a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.peers() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "peers: {}",
                server.peers()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.peers(), 2);
    }
}
