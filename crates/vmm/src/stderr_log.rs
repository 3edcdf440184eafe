//! The VMM's stderr, bounded when it is a file (the daemon's `vmm.err`):
//! like the console log, past [`LIMIT`] bytes it is cut to its last
//! [`KEEP`]. The file stays the same open file (the VMM does not know its
//! path, and in a jail could not reopen it): it is switched to append
//! mode, its tail read, the file truncated and the tail written back.
//! Lines written during the cut by another thread may land before the
//! kept tail; nothing else is lost beyond what the cut drops. The file must
//! be open for reading as well (the daemon opens `vmm.err` so); a stderr
//! open only for writing is left as it is.

use std::io;
use std::os::fd::RawFd;

/// stderr is cut once it passes this size...
pub const LIMIT: u64 = 2 << 20;
/// ...keeping this many of its last bytes.
pub const KEEP: u64 = 1 << 20;

/// Cuts the file open as `fd` to its last `keep` bytes if it is a regular
/// file longer than `limit`. Returns whether it was cut.
pub fn bound(fd: RawFd, limit: u64, keep: u64) -> io::Result<bool> {
    // SAFETY: fstat writes a stat struct we own; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes `st`, which outlives the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let size = st.st_size as u64;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || size <= limit {
        return Ok(false);
    }
    // Writes from now on go to the end, wherever the end is.
    // SAFETY: F_GETFL and F_SETFL change only the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_APPEND) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let keep = keep.min(size);
    let mut tail = vec![0u8; keep as usize];
    let mut got = 0usize;
    while got < tail.len() {
        // SAFETY: pread writes at most `tail.len() - got` bytes into the
        // rest of `tail`, which outlives the call.
        let n = unsafe {
            libc::pread(
                fd,
                tail[got..].as_mut_ptr().cast(),
                tail.len() - got,
                (size - keep + got as u64) as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        got += n as usize;
    }
    tail.truncate(got);
    // SAFETY: ftruncate on our own descriptor; no memory effects.
    if unsafe { libc::ftruncate(fd, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut written = 0usize;
    while written < tail.len() {
        // SAFETY: write reads at most the rest of `tail`, which outlives
        // the call.
        let n = unsafe { libc::write(fd, tail[written..].as_ptr().cast(), tail.len() - written) };
        if n <= 0 {
            return Err(io::Error::last_os_error());
        }
        written += n as usize;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_long_file_is_cut_to_its_tail_and_later_writes_follow_it() {
        let path = std::env::temp_dir().join(format!("fv-stderr-{}", std::process::id()));
        // Opened for reading too (the daemon opens vmm.err so), and not
        // for appending, as a shell's `2<>` is not.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.write_all(b"0123456789abcdef").expect("write");
        assert!(!bound(file.as_raw_fd(), 16, 4).expect("not yet"));
        file.write_all(b"XYZ").expect("write");
        assert!(bound(file.as_raw_fd(), 16, 4).expect("cut"));
        assert_eq!(std::fs::read(&path).expect("read"), b"fXYZ");
        file.write_all(b"next").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"fXYZnext");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_pipe_is_left_alone() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        assert!(!bound(fds[1], 0, 0).expect("pipe"));
        for fd in fds {
            // SAFETY: closing the descriptors this test made.
            unsafe { libc::close(fd) };
        }
    }
}
