//! Landlock: a second wall inside the root. Only the writable directories
//! may be written (and read); `/proc` may be read; TCP is refused; signals
//! and abstract unix sockets stay inside the VMM. Files opened before the
//! restriction keep their rights.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{sys, JailError, Result};

const CREATE_RULESET_VERSION: u32 = 1;
const RULE_PATH_BENEATH: libc::c_int = 1;

/// Every filesystem right of ABI 1 (execute ... make symlink).
const FS_ABI1: u64 = (1 << 13) - 1;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;
const FS_IOCTL_DEV: u64 = 1 << 15;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_EXECUTE: u64 = 1;
const NET_BIND_TCP: u64 = 1;
const NET_CONNECT_TCP: u64 = 2;
const SCOPE_ABSTRACT_UNIX: u64 = 1;
const SCOPE_SIGNAL: u64 = 2;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version, or `None` without Landlock.
pub fn abi_version() -> Option<u32> {
    // SAFETY: a null attribute with size 0 and the VERSION flag only asks.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

/// The rights ABI `abi` handles, and those the writable directories get.
fn fs_rights(abi: u32) -> u64 {
    let mut rights = FS_ABI1;
    if abi >= 2 {
        rights |= FS_REFER;
    }
    if abi >= 3 {
        rights |= FS_TRUNCATE;
    }
    if abi >= 5 {
        rights |= FS_IOCTL_DEV;
    }
    rights
}

fn open_path(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Sys {
        what: format!("use path {}", path.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is NUL-terminated; O_PATH opens no data.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(sys(format!("open {} for a Landlock rule", path.display())));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn add_rule(ruleset: &OwnedFd, path: &Path, allowed: u64) -> Result<()> {
    let dir = open_path(path)?;
    let rule = PathBeneathAttr {
        allowed_access: allowed,
        parent_fd: dir.as_raw_fd(),
    };
    // SAFETY: `rule` is a valid path-beneath attribute; both fds are open.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0u32,
        )
    };
    if rc != 0 {
        return Err(sys(format!("add a Landlock rule for {}", path.display())));
    }
    Ok(())
}

/// Restricts this thread (and the threads it starts) to `writable` and a
/// readable `/proc`. Needs no_new_privs. Returns the ABI used, or `None`
/// when the kernel has no Landlock.
pub(crate) fn restrict(writable: &[PathBuf]) -> Result<Option<u32>> {
    let Some(abi) = abi_version() else {
        return Ok(None);
    };
    let handled = fs_rights(abi);
    let attr = RulesetAttr {
        handled_access_fs: handled,
        handled_access_net: if abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL
        } else {
            0
        },
    };
    // Older ABIs know a shorter attribute.
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => std::mem::size_of::<RulesetAttr>(),
    };
    // SAFETY: `attr` is valid for `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            size,
            0u32,
        )
    };
    if fd < 0 {
        return Err(sys("create a Landlock ruleset"));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for dir in writable {
        add_rule(&ruleset, dir, handled & !FS_EXECUTE)?;
    }
    add_rule(&ruleset, Path::new("/proc"), FS_READ_FILE | FS_READ_DIR)?;
    // SAFETY: the ruleset fd is open; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if rc != 0 {
        return Err(sys("enforce the Landlock rules"));
    }
    Ok(Some(abi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Landlock and no_new_privs hold for one thread (and what it starts),
    /// so a thread of the test can be walled in alone.
    #[test]
    fn only_the_writable_directories_can_be_written_or_read() {
        assert!(
            abi_version().is_some(),
            "this kernel has no Landlock: this test cannot run here"
        );
        let base = std::env::temp_dir().join(format!("fv-landlock-{}", std::process::id()));
        let (allowed, other) = (base.join("allowed"), base.join("other"));
        for dir in [&allowed, &other] {
            std::fs::create_dir_all(dir).expect("scratch");
        }
        std::fs::write(other.join("old"), b"x").expect("file");
        let (a, o) = (allowed.clone(), other.clone());
        let (write_allowed, write_other, read_other, tcp) = std::thread::spawn(move || {
            crate::creds::no_new_privs().expect("no_new_privs");
            restrict(std::slice::from_ref(&a)).expect("restrict");
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").map(drop);
            (
                std::fs::write(a.join("new"), b"x").map_err(|e| e.kind()),
                std::fs::write(o.join("new"), b"x").map_err(|e| e.kind()),
                std::fs::read(o.join("old")).map_err(|e| e.kind()),
                tcp.map_err(|e| e.kind()),
            )
        })
        .join()
        .expect("walled thread");
        // The rest of the process is not walled in.
        let outside = std::fs::write(other.join("later"), b"x").map_err(|e| e.kind());
        let _ = std::fs::remove_dir_all(&base);
        assert_eq!(outside, Ok(()));
        assert_eq!(write_allowed, Ok(()));
        assert_eq!(write_other, Err(std::io::ErrorKind::PermissionDenied));
        assert_eq!(
            read_other.map(drop),
            Err(std::io::ErrorKind::PermissionDenied)
        );
        if abi_version().is_some_and(|v| v >= 4) {
            assert_eq!(tcp, Err(std::io::ErrorKind::PermissionDenied), "TCP bind");
        }
    }

    #[test]
    fn newer_abis_handle_more_rights() {
        assert_eq!(fs_rights(1), FS_ABI1);
        assert!(fs_rights(3) & FS_TRUNCATE != 0);
        assert!(fs_rights(2) & FS_TRUNCATE == 0);
        assert!(fs_rights(5) & FS_IOCTL_DEV != 0);
    }
}
