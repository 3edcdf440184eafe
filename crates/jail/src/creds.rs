//! Who the jailed VMM is: resource limits, capabilities, no new
//! privileges, and the guest's uid and gid.

use crate::{sys, JailError, Result};

/// The highest capability number this kernel knows.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(40)
}

/// The threads of this process.
pub(crate) fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64, name: &str) -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(sys(format!("set {name} to {value}")));
    }
    Ok(())
}

/// Open files, file size and core dumps; also marks the process not
/// dumpable, so that no process of the same uid may trace it.
pub(crate) fn set_limits(nofile: u64, fsize: u64) -> Result<()> {
    set_limit(libc::RLIMIT_NOFILE, nofile, "RLIMIT_NOFILE")?;
    set_limit(libc::RLIMIT_FSIZE, fsize, "RLIMIT_FSIZE")?;
    set_limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    // SAFETY: PR_SET_DUMPABLE takes a flag and has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(sys("mark the VMM not dumpable"));
    }
    Ok(())
}

/// Empties the bounding set (so no capability can come back by exec) and
/// the ambient set. Needs CAP_SETPCAP: call it before changing user.
pub(crate) fn drop_bounding_set(last_cap: u32) -> Result<()> {
    for cap in 0..=last_cap {
        // SAFETY: PR_CAPBSET_DROP takes a capability number.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            // A capability this kernel does not know.
            if err.raw_os_error() == Some(libc::EINVAL) {
                continue;
            }
            return Err(sys(format!("drop capability {cap} from the bounding set")));
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(sys("clear the ambient capabilities"));
    }
    Ok(())
}

pub(crate) fn no_new_privs() -> Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes a flag.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(sys("set no_new_privs"));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's capability sets, 64 bits each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

/// The calling thread's capabilities.
pub fn process_caps() -> Result<Caps> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 takes a header and two data structs, both valid.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(sys("read the capabilities"));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(Caps {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities
/// but those of mask `kept` (effective and permitted).
pub(crate) fn become_user(uid: u32, gid: u32, kept: u64) -> Result<()> {
    // SAFETY: an empty list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(sys("drop the supplementary groups"));
    }
    // SAFETY: no memory effects.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(sys(format!("become gid {gid}")));
    }
    // Changing every uid from 0 clears the permitted and effective sets,
    // unless asked to keep them (then only `kept` stays, below).
    // SAFETY: PR_SET_KEEPCAPS takes a flag.
    if kept != 0 && unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(sys("keep a capability across the change of user"));
    }
    // SAFETY: no memory effects.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(sys(format!("become uid {uid}")));
    }
    // SAFETY: PR_SET_KEEPCAPS takes a flag.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| CapData {
        effective: (kept >> shift) as u32,
        permitted: (kept >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: version 3 takes a header and two data structs, both valid.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(sys("clear the capabilities"));
    }
    Ok(())
}

/// Checks that the lock-down took: the uid, and no capability in any set
/// but `kept` (effective and permitted).
pub(crate) fn check_dropped(uid: u32, kept: u64) -> Result<()> {
    // SAFETY: no preconditions.
    let (real, effective) = unsafe { (libc::getuid(), libc::geteuid()) };
    if real != uid || effective != uid {
        return Err(JailError::NotDropped(format!("uid {effective}")));
    }
    let caps = process_caps()?;
    let want = Caps {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    };
    if caps != want {
        return Err(JailError::NotDropped(format!("capabilities {caps:?}")));
    }
    // SAFETY: PR_CAPBSET_READ takes a capability number.
    if unsafe { libc::prctl(libc::PR_CAPBSET_READ, 0, 0, 0, 0) } != 0 {
        return Err(JailError::NotDropped("a bounding set".into()));
    }
    Ok(())
}
