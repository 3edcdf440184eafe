//! The jail around one VMM process.
//!
//! A jailed `ferrovisor run` works in two processes:
//!
//! 1. The **parent** (the process the user or the daemon started) joins the
//!    guest's network namespace when it names one, unshares new mount, PID,
//!    IPC and UTS namespaces and forks ([`fork_into_namespaces`]). It then
//!    only waits ([`wait_child`]): it forwards SIGINT, SIGTERM, SIGHUP and
//!    SIGQUIT to the child and ends with the child's status.
//! 2. The **child** is pid 1 of the new PID namespace. It builds the VM as
//!    root: it opens `/dev/kvm`, the kernel, initramfs, disks, taps and vsock
//!    socket, and the runtime directory. Then, before the first guest
//!    instruction and while it is still one thread, it locks itself down
//!    ([`Jail::lock_down`]): pivots into a fresh per-guest root, sets
//!    resource limits, drops every capability, sets `PR_SET_NO_NEW_PRIVS`,
//!    adds Landlock rules and becomes the guest's uid and gid.
//!
//! The root is a small read-only tmpfs mounted on `DIR/NAME` in the child's
//! own mount namespace. It holds only what the VMM opens after the lock-down:
//! the runtime directory (bound read-write at its own path: the console log
//! is rotated by renaming, the exit record and vCPU dump are written there),
//! the directory of the vsock socket when it lies elsewhere (guest-initiated
//! connections reach host sockets there), and a `/proc` of the guest's PID
//! namespace alone (the VMM reads its own threads' states and memory use).
//! The kernel, initramfs, disks, `/dev/kvm` and `/dev/net/tun` are opened
//! before the pivot and never reopened (a guest reboot ends the VMM), so
//! they are not in the root.

mod creds;
mod landlock;
mod mounts;
mod ns;

use std::path::PathBuf;

pub use creds::{last_capability, process_caps, Caps};
pub use landlock::abi_version as landlock_abi;
pub use ns::{fork_into_namespaces, join_netns, signal_name, wait_child, ChildEnd, Fork};

/// The uid range the daemon hands out by default, one uid (and the same
/// gid) per guest.
pub const DEFAULT_UID_RANGE: (u32, u32) = (100_000, 165_535);

/// Memory the VMM process may use beyond guest RAM: its own heap, thread
/// stacks, device buffers (vsock may hold up to 256 KiB per connection),
/// KVM's per-vCPU structures charged to the group, and the page cache of
/// the files it reads. Measured: a jailed VMM with a tiny guest resides in
/// about 6 MiB besides guest RAM (see docs/benchmarks.md).
pub const VMM_MEMORY_BUDGET: u64 = 256 << 20;
/// Per vCPU, on top of [`VMM_MEMORY_BUDGET`]: its thread's stack and KVM's
/// state for it.
pub const VMM_MEMORY_PER_VCPU: u64 = 8 << 20;

/// The tasks a jailed VMM may have: the waiting parent, the main thread and
/// the fixed threads (signals, console, control, INTx, console output,
/// the deadline watcher, the partition gate),
/// one worker per device, one thread per vCPU, and a margin.
pub fn pids_limit(vcpus: u8, devices: usize) -> u64 {
    16 + u64::from(vcpus) + devices as u64
}

/// The memory limit of a guest's group: its RAM plus the VMM's budget.
pub fn memory_limit(guest_ram: u64, vcpus: u8) -> u64 {
    guest_ram + VMM_MEMORY_BUDGET + u64::from(vcpus) * VMM_MEMORY_PER_VCPU
}

/// The most file descriptors a jailed VMM may hold: vsock connections
/// (each a host socket) are the only ones that grow.
pub const NOFILE_LIMIT: u64 = 4096;

/// The capability that lets a process give threads a real-time class.
const CAP_SYS_NICE: u32 = 23;

/// The smallest file-size limit: the largest file the VMM writes itself is
/// the console log (2 MiB before it is cut).
pub const MIN_FSIZE_LIMIT: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail must be set up by root (it creates namespaces and changes user)")]
    NotRoot,
    #[error("cannot {what}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {name:?}: cannot open {path}")]
    NetnsOpen {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace name {0:?} is not valid: use letters, digits, '-', '_' or '.', not starting with '.'")]
    BadNetns(String),
    #[error("the VMM has more than one thread before its lock-down ({0}); every thread must start jailed")]
    Threads(usize),
    #[error("after the lock-down the VMM still has {0}")]
    NotDropped(String),
}

pub type Result<T> = std::result::Result<T, JailError>;

/// The last OS error, as a [`JailError`] naming what failed.
fn sys(what: impl Into<String>) -> JailError {
    JailError::Sys {
        what: what.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// What a jailed VMM becomes: where its root is, which directories it keeps,
/// who it runs as and its resource limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The guest's name: its host name in the UTS namespace.
    pub name: String,
    /// The empty directory the per-guest root is mounted on.
    pub root: PathBuf,
    /// The runtime directory (absolute), given to the guest's uid, bound
    /// read-write into the root at its own path.
    pub runtime_dir: Option<PathBuf>,
    /// Other directories (absolute) the VMM uses after the lock-down, bound
    /// read-write at their own paths: the vsock socket's directory.
    pub shared_dirs: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE: no smaller than the largest disk image, which the VMM
    /// writes through its open descriptor.
    pub fsize: u64,
    /// Keep CAP_SYS_NICE (alone): the guest's vCPU threads get a real-time
    /// class or a time partition, which the VMM sets on its own threads.
    pub keep_sys_nice: bool,
}

/// What the lock-down did that a user may want told once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedDown {
    /// The Landlock ABI version used, or `None` when the kernel has none.
    pub landlock: Option<u32>,
}

impl Jail {
    /// Every directory the jailed VMM may write in.
    pub fn writable(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.runtime_dir.iter().cloned().collect();
        for dir in &self.shared_dirs {
            if !dirs.iter().any(|d| dir.starts_with(d)) {
                dirs.push(dir.clone());
            }
        }
        dirs
    }

    /// Locks the calling process down. Call it in the child of
    /// [`fork_into_namespaces`], as root, once every file, device and tap the
    /// VMM needs is open and before any other thread starts.
    pub fn lock_down(&self) -> Result<LockedDown> {
        let threads = creds::thread_count();
        if threads != 1 {
            return Err(JailError::Threads(threads));
        }
        let last_cap = creds::last_capability();
        if let Some(runtime) = &self.runtime_dir {
            mounts::give_dir(runtime, self.uid, self.gid)?;
        }
        let writable = self.writable();
        mounts::set_hostname(&self.name)?;
        mounts::enter_root(&self.root, &writable)?;
        creds::set_limits(self.nofile, self.fsize)?;
        creds::drop_bounding_set(last_cap)?;
        creds::no_new_privs()?;
        let landlock = landlock::restrict(&writable)?;
        let kept = if self.keep_sys_nice {
            1 << CAP_SYS_NICE
        } else {
            0
        };
        creds::become_user(self.uid, self.gid, kept)?;
        creds::check_dropped(self.uid, kept)?;
        ns::die_with_parent()?;
        Ok(LockedDown { landlock })
    }
}

/// Confines the calling process without a new root or user, for a helper
/// that keeps its uid (the switch process): an empty bounding set, no
/// capabilities left in any set, no_new_privs, and, where the kernel has
/// Landlock, no file access outside `writable` (file descriptors already
/// open keep working). Call it once everything privileged is open and
/// before any other thread starts.
pub fn confine_in_place(writable: &[PathBuf]) -> Result<LockedDown> {
    let threads = creds::thread_count();
    if threads != 1 {
        return Err(JailError::Threads(threads));
    }
    creds::drop_bounding_set(creds::last_capability())?;
    creds::no_new_privs()?;
    let landlock = landlock::restrict(writable)?;
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    creds::become_user(uid, gid, 0)?;
    creds::check_dropped(uid, 0)?;
    Ok(LockedDown { landlock })
}

/// Whether `name` may name a guest in the jail or a network namespace: 1-64
/// letters, digits, `-`, `_` or `.`, not starting with `.` (so never a path).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A stable uid in `range` for guest `name` when nobody assigns one (the
/// foreground `ferrovisor run --jail`): a hash of the name.
pub fn uid_for_name(name: &str, range: (u32, u32)) -> u32 {
    // FNV-1a: stable across runs and builds.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let span = u64::from(range.1 - range.0) + 1;
    range.0 + (hash % span) as u32
}

/// Parses a uid range `FIRST-LAST` (both above 0, FIRST <= LAST).
pub fn parse_uid_range(text: &str) -> Option<(u32, u32)> {
    let (a, b) = text.split_once('-')?;
    let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
    (a > 0 && a <= b && b < u32::MAX).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_stable_uids_inside_the_range() {
        let range = DEFAULT_UID_RANGE;
        let a = uid_for_name("web", range);
        assert_eq!(a, uid_for_name("web", range));
        assert!((range.0..=range.1).contains(&a));
        assert_ne!(a, uid_for_name("db", range));
        assert_eq!(uid_for_name("x", (5, 5)), 5);
    }

    #[test]
    fn uid_ranges_parse_only_when_ordered_and_not_root() {
        assert_eq!(parse_uid_range("100000-165535"), Some((100_000, 165_535)));
        assert_eq!(parse_uid_range("7-7"), Some((7, 7)));
        for bad in ["0-10", "10-5", "a-b", "100000", "-5", "1-4294967295"] {
            assert_eq!(parse_uid_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn limits_grow_with_the_guest() {
        assert_eq!(
            memory_limit(512 << 20, 2),
            (512 << 20) + VMM_MEMORY_BUDGET + 2 * VMM_MEMORY_PER_VCPU
        );
        assert!(pids_limit(4, 3) > pids_limit(1, 3));
        assert_eq!(pids_limit(1, 0), 17);
    }
}
