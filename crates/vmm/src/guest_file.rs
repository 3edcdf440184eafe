//! The files a guest boots from and writes to (kernel, initramfs, disk
//! images), named by path or as `fd:N`: a descriptor the VMM inherited
//! open from its supervisor. The daemon opens every guest file itself
//! (beneath its image roots, refusing symlinks) and hands the VMM only
//! descriptors, so nothing is opened by path again once a guest starts, and
//! a VMM in a root of its own still reaches its files.
//!
//! Disk images carry open-file-description locks (`F_OFD_SETLK`): a write
//! lock for a read-write disk, a read lock for a read-only one, so that two
//! VMMs never write one image, nor one write what another reads.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

/// The prefix of an inherited descriptor's name: `fd:N`.
pub const FD_PREFIX: &str = "fd:";

/// Errors opening or locking a guest file.
#[derive(Debug, Error)]
pub enum GuestFileError {
    #[error("{path} is in use by another guest (it holds a {held} lock on it)")]
    InUse { path: String, held: &'static str },
    #[error("cannot lock {0}")]
    Lock(String, #[source] io::Error),
}

/// The descriptor number of an `fd:N` name, or `None` for a path.
pub fn inherited_fd(path: &Path) -> Option<RawFd> {
    let text = path.to_str()?.strip_prefix(FD_PREFIX)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|&fd| fd >= 0)
}

/// Opens a guest file for reading, and for writing too when `write`: a
/// path is opened; `fd:N` is duplicated and rewound, so it can be read
/// from the start as often as needed. Callers name the file in their
/// errors.
pub fn open(path: &Path, write: bool) -> io::Result<File> {
    let Some(fd) = inherited_fd(path) else {
        return OpenOptions::new().read(true).write(write).open(path);
    };
    // SAFETY: F_GETFL reads the descriptor's flags and has no memory
    // effects; a descriptor that is not open gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not an open file descriptor",
        ));
    }
    if write && flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "open read-only, and a read-write disk needs it open for writing",
        ));
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor for the same open
    // file, or -1; it has no memory effects.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a descriptor just made for us and owned by nothing
    // else; the File closes it.
    let mut file = unsafe { File::from_raw_fd(dup) };
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Connects to a unix socket named by path, or takes `fd:N`, a socket
/// the VMM inherited already connected (a duplicate of it).
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let Some(fd) = inherited_fd(path) else {
        return UnixStream::connect(path);
    };
    // SAFETY: fstat writes only the zeroed stat buffer it is given; a
    // descriptor that is not open gives EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above: `st` is a live, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not an open file descriptor",
        ));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a socket"));
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor for the same open
    // file, or -1; it has no memory effects.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a socket descriptor just made for us and owned by
    // nothing else; the stream closes it.
    Ok(unsafe { UnixStream::from_raw_fd(dup) })
}

/// Takes an OFD lock on the whole of `file`: a write lock when `write`,
/// else a read lock. A lock held by another open file (another VMM) is
/// `InUse`; locking again through the same open file changes nothing.
pub fn lock(file: &File, write: bool, shown: &Path) -> Result<(), GuestFileError> {
    let mut flock = whole_file(if write { libc::F_WRLCK } else { libc::F_RDLCK });
    // SAFETY: F_OFD_SETLK reads the flock struct, which outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut flock) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(GuestFileError::InUse {
            path: shown.display().to_string(),
            held: holder(file, write).unwrap_or("conflicting"),
        }),
        _ => Err(GuestFileError::Lock(shown.display().to_string(), e)),
    }
}

/// What kind of lock another open file holds that conflicts with ours
/// (`F_OFD_GETLK`; OFD locks report no pid, so only the kind is known).
fn holder(file: &File, write: bool) -> Option<&'static str> {
    let mut flock = whole_file(if write { libc::F_WRLCK } else { libc::F_RDLCK });
    // SAFETY: F_OFD_GETLK reads and writes the flock struct, which
    // outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut flock) };
    if rc != 0 {
        return None;
    }
    match i32::from(flock.l_type) {
        libc::F_WRLCK => Some("write"),
        libc::F_RDLCK => Some("read"),
        _ => None,
    }
}

fn whole_file(kind: i32) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (whole file
    // from offset 0, pid 0 as F_OFD_* requires).
    let mut flock: libc::flock = unsafe { std::mem::zeroed() };
    flock.l_type = kind as libc::c_short;
    flock.l_whence = libc::SEEK_SET as libc::c_short;
    flock
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("fv-gf-{tag}-{}", std::process::id()));
        std::fs::write(&path, b"image").expect("write");
        path
    }

    #[test]
    fn fd_names_are_recognised_and_nothing_else() {
        assert_eq!(inherited_fd(Path::new("fd:7")), Some(7));
        assert_eq!(inherited_fd(Path::new("fd:")), None);
        assert_eq!(inherited_fd(Path::new("fd:-1")), None);
        assert_eq!(inherited_fd(Path::new("/fd:7")), None);
        assert_eq!(inherited_fd(Path::new("fd:7x")), None);
    }

    #[test]
    fn an_inherited_descriptor_reads_from_the_start_every_time() {
        let path = scratch("rewind");
        let file = File::open(&path).expect("open");
        let name = PathBuf::from(format!("fd:{}", file.as_raw_fd()));
        for _ in 0..2 {
            let mut text = String::new();
            open(&name, false)
                .expect("fd")
                .read_to_string(&mut text)
                .expect("read");
            assert_eq!(text, "image");
        }
        let e = open(&name, true).expect_err("read-only");
        assert!(e.to_string().starts_with("open read-only"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_closed_descriptor_is_one_clear_error() {
        let e = open(Path::new("fd:987654"), false).expect_err("not open");
        assert_eq!(e.to_string(), "not an open file descriptor");
    }

    #[test]
    fn two_writers_of_one_image_are_refused_readers_share() {
        let path = scratch("lock");
        let rw = |p: &Path| open(p, true).expect("open");
        let first = rw(&path);
        lock(&first, true, &path).expect("first writer");
        lock(&first, true, &path).expect("the same open file again");
        let second = rw(&path);
        let e = lock(&second, true, &path).expect_err("second writer");
        assert!(
            e.to_string()
                .ends_with("is in use by another guest (it holds a write lock on it)"),
            "{e}"
        );
        assert!(
            lock(&second, false, &path).is_err(),
            "no reader beside a writer"
        );
        drop(first);
        let r1 = open(&path, false).expect("open");
        let r2 = open(&path, false).expect("open");
        lock(&r1, false, &path).expect("reader");
        lock(&r2, false, &path).expect("readers share");
        let e = lock(&second, true, &path).expect_err("no writer beside readers");
        assert!(e.to_string().contains("read lock"), "{e}");
        let _ = std::fs::remove_file(path);
    }
}
