//! Who may use the API, and the record of what they did.
//!
//! - Every connection's peer is read with `SO_PEERCRED` (and its groups
//!   with `SO_PEERGROUPS`): root, the daemon's own user, and members of the
//!   group given with `--group NAME` are served; anyone else gets one 403
//!   line and the connection is closed.
//! - Connections are counted per peer uid, so one user holding many open
//!   connections cannot starve the others.
//! - Every mutating call (any method but GET) is appended to the audit log
//!   (`STATE/audit.log`): time, peer uid and pid, method, path, status. The
//!   log is bounded like a console log.

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use thiserror::Error;
use vmm::runtime::ConsoleLog;

use crate::events::now_ms;

/// The audit log's name in the state directory.
pub const AUDIT_LOG: &str = "audit.log";
/// The audit log is cut once it passes this size...
pub const AUDIT_LIMIT: u64 = 4 << 20;
/// ...to its last this many bytes.
pub const AUDIT_KEEP: u64 = 2 << 20;

/// Errors setting up access control.
#[derive(Debug, Error)]
pub enum AccessError {
    #[error("--group: no group named '{0}'")]
    NoSuchGroup(String),
    #[error("--group: cannot look up group '{0}'")]
    Lookup(String, #[source] io::Error),
    #[error("cannot open the audit log {0}")]
    Audit(String, #[source] io::Error),
}

/// The credentials of a connection's peer, as the kernel saw them when it
/// connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty when the kernel cannot say).
    pub groups: Vec<u32>,
}

/// Reads the peer's credentials of a connected unix stream.
pub fn peer(stream: &UnixStream) -> io::Result<Peer> {
    let fd = stream.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is a
    // ucred of exactly that size and outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: peer_groups(fd),
    })
}

/// The peer's supplementary groups (`SO_PEERGROUPS`); empty on failure.
fn peer_groups(fd: i32) -> Vec<u32> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, whose
    // buffer holds exactly that many and outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// Looks up the id of group `name`.
pub fn group_id(name: &str) -> Result<u32, AccessError> {
    let c_name = CString::new(name).map_err(|_| AccessError::NoSuchGroup(name.to_string()))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero `group` is a valid value for getgrnam_r to fill.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is a C string,
    // `group` and `found` are locals, and `buf` has the length passed.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(AccessError::Lookup(
            name.to_string(),
            io::Error::from_raw_os_error(rc),
        ));
    }
    if found.is_null() {
        return Err(AccessError::NoSuchGroup(name.to_string()));
    }
    Ok(group.gr_gid)
}

/// Who may use the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The daemon's own effective uid (always allowed).
    pub own_uid: u32,
    /// Members of this group are allowed too.
    pub group: Option<u32>,
}

impl Policy {
    /// Whether `peer` may use the API.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        match self.group {
            Some(g) => peer.gid == g || peer.groups.contains(&g),
            None => false,
        }
    }
}

/// Open connections per peer uid, with a limit for each uid.
#[derive(Debug)]
pub struct UidLimits {
    per_uid: usize,
    open: Mutex<HashMap<u32, usize>>,
}

/// One counted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<UidLimits>,
    uid: u32,
}

impl UidLimits {
    /// At most `per_uid` connections for each uid.
    pub fn new(per_uid: usize) -> Arc<UidLimits> {
        Arc::new(UidLimits {
            per_uid,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for a connection of `uid`, or `None` when that uid
    /// has all its places taken.
    pub fn take(self: &Arc<Self>, uid: u32) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(uid).or_insert(0);
        if *count >= self.per_uid {
            return None;
        }
        *count += 1;
        Some(Slot {
            limits: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// The audit log: one JSON line per mutating call or refused peer.
#[derive(Debug)]
pub struct AuditLog {
    log: Mutex<ConsoleLog>,
}

impl AuditLog {
    /// Opens (creating, 0600) the audit log in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<AuditLog, AccessError> {
        let path = state_dir.join(AUDIT_LOG);
        let log = ConsoleLog::with_limits(&path, AUDIT_LIMIT, AUDIT_KEEP)
            .map_err(|e| AccessError::Audit(path.display().to_string(), e))?;
        Ok(AuditLog {
            log: Mutex::new(log),
        })
    }

    /// Records one call: `method` and `path` are `None` for a peer refused
    /// before its request was read.
    pub fn record(&self, peer: &Peer, method: Option<&str>, path: Option<&str>, status: u16) {
        let line = json!({
            "time_ms": now_ms(),
            "uid": peer.uid,
            "pid": peer.pid,
            "method": method,
            "path": path,
            "status": status,
        });
        let mut text = line.to_string();
        text.push('\n');
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        // An audit line that cannot be written is reported, not fatal: the
        // call it records has happened already.
        if let Err(e) = log.append(text.as_bytes()) {
            eprintln!("ferrovisor daemon: cannot write the audit log: {e}");
        }
    }
}

/// Whether a call with `method` changes anything (and is audited).
pub fn is_mutating(method: &str) -> bool {
    method != "GET" && method != "HEAD"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_of(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_the_owner_and_the_group_are_allowed_others_not() {
        let policy = Policy {
            own_uid: 1000,
            group: Some(50),
        };
        assert!(policy.allows(&peer_of(0, 0, &[])));
        assert!(policy.allows(&peer_of(1000, 1000, &[])));
        assert!(policy.allows(&peer_of(2000, 50, &[])));
        assert!(policy.allows(&peer_of(2000, 2000, &[7, 50])));
        assert!(!policy.allows(&peer_of(2000, 2000, &[7])));
        let closed = Policy {
            own_uid: 0,
            group: None,
        };
        assert!(!closed.allows(&peer_of(2000, 50, &[50])));
    }

    #[test]
    fn each_uid_has_its_own_places() {
        let limits = UidLimits::new(2);
        let a1 = limits.take(1).expect("first");
        let _a2 = limits.take(1).expect("second");
        assert!(limits.take(1).is_none(), "uid 1 is full");
        let _b = limits.take(2).expect("another uid is not starved");
        drop(a1);
        assert!(
            limits.take(1).is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn own_connection_shows_own_credentials() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let me = peer(&a).expect("peer");
        // SAFETY: geteuid has no memory effects.
        assert_eq!(me.uid, unsafe { libc::geteuid() });
        assert_eq!(me.pid, std::process::id() as i32);
    }

    #[test]
    fn an_unknown_group_is_one_clear_error() {
        let e = group_id("no-such-group-xyz").expect_err("unknown");
        assert_eq!(e.to_string(), "--group: no group named 'no-such-group-xyz'");
        assert_eq!(group_id("root").expect("root group"), 0);
    }

    #[test]
    fn mutating_calls_are_audited_lines() {
        let dir = std::env::temp_dir().join(format!("fv-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let log = AuditLog::open(&dir).expect("open");
        log.record(
            &peer_of(7, 7, &[]),
            Some("POST"),
            Some("/guests/a/start"),
            200,
        );
        log.record(&peer_of(9, 9, &[]), None, None, 403);
        let text = std::fs::read_to_string(dir.join(AUDIT_LOG)).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["uid"], 7);
        assert_eq!(lines[0]["method"], "POST");
        assert_eq!(lines[0]["path"], "/guests/a/start");
        assert_eq!(lines[0]["status"], 200);
        assert_eq!(lines[1]["status"], 403);
        assert!(is_mutating("DELETE") && !is_mutating("GET"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
