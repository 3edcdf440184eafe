//! Shared regions the daemon owns (`[regions.NAME]` in a system file,
//! defined through `PUT /regions/NAME`): for each, a sealed memfd (it can
//! neither shrink nor grow, so no VMM can make another's mapping fault) and
//! one eventfd per (member, vector). When a member guest starts, its VMM
//! inherits the memfd, its own eventfds and every peer's, named in one
//! `--region-fds` option per region ([`vmm::region_fds`]); a guest that is
//! no member gets nothing. The descriptors live as long as the daemon:
//! a region defined again after a daemon restart is a new memfd, which
//! guests started before the restart do not share.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::Value;
use thiserror::Error;

/// Errors defining a region.
#[derive(Debug, Error)]
pub enum RegionError {
    /// The body is not a region (the message names the field).
    #[error("{0}")]
    Body(String),
    /// The region exists with another shape.
    #[error("region '{0}' exists with other members, size or vectors")]
    Conflict(String),
    /// A member runs already: it would not get the new region (after a
    /// daemon restart it may hold an earlier one of the same name).
    #[error(
        "guest '{guest}' is running; it gets region '{region}' only when it starts: stop it first"
    )]
    MemberRunning { region: String, guest: String },
    /// The host refused a memfd or an eventfd.
    #[error("cannot create region '{0}'")]
    Create(String, #[source] std::io::Error),
}

/// A region's shape: what `PUT /regions/NAME` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionShape {
    pub size: u64,
    pub vectors: u16,
    /// Members in peer-id order, each with whether it may only read.
    pub members: Vec<(String, bool)>,
}

struct Region {
    shape: RegionShape,
    memory: OwnedFd,
    /// The same memfd opened read-only, for read-only members: their VMM
    /// cannot map it writable even if it tried.
    memory_ro: OwnedFd,
    /// `doorbells[peer][vector]`.
    doorbells: Vec<Vec<OwnedFd>>,
}

static REGIONS: Mutex<BTreeMap<String, Region>> = Mutex::new(BTreeMap::new());

fn regions() -> MutexGuard<'static, BTreeMap<String, Region>> {
    REGIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a `PUT /regions/NAME` body: `{"size": N, "vectors": N,
/// "guests": [{"name": "a", "access": "rw"}, ...]}`.
pub fn parse_shape(body: &Value) -> Result<RegionShape, RegionError> {
    let bad = |field: &str, what: &str| RegionError::Body(format!("{field}: {what}"));
    let size = body["size"]
        .as_u64()
        .filter(|s| s.is_power_of_two() && (4096..=vmm::region::MAX_SIZE).contains(s))
        .ok_or_else(|| bad("size", "not a power of two from 4 KiB to 256 MiB"))?;
    let vectors = match &body["vectors"] {
        Value::Null => 1,
        v => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (1..=vmm::region_fds::MAX_VECTORS as u16).contains(n))
            .ok_or_else(|| bad("vectors", "not 1 to 128"))?,
    };
    let list = body["guests"]
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("guests", "not a list of members"))?;
    let mut members: Vec<(String, bool)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let name = m["name"].as_str().unwrap_or_default().to_string();
        if crate::description::check_name(&name).is_err() || members.iter().any(|x| x.0 == name) {
            return Err(bad(
                &format!("guests[{i}].name"),
                "not a guest name given once",
            ));
        }
        let readonly = match m["access"].as_str() {
            Some("rw") => false,
            Some("ro") => true,
            _ => return Err(bad(&format!("guests[{i}].access"), "not \"rw\" or \"ro\"")),
        };
        members.push((name, readonly));
    }
    Ok(RegionShape {
        size,
        vectors,
        members,
    })
}

fn create_memfd(name: &str, size: u64) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(format!("ferrovisor-region-{name}"))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated name; the descriptor returned is ours alone.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let memory = unsafe { OwnedFd::from_raw_fd(fd) };
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: ftruncate and fcntl on our own open memfd.
    let ok = unsafe {
        libc::ftruncate(fd, size as libc::off_t) == 0
            && libc::fcntl(fd, libc::F_ADD_SEALS, seals) == 0
    };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    Ok(memory)
}

/// A read-only open file description of the memfd `memory`.
fn reopen_read_only(memory: &OwnedFd) -> std::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", memory.as_raw_fd());
    let file = std::fs::OpenOptions::new().read(true).open(path)?;
    Ok(OwnedFd::from(file))
}

fn create_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory effects; the descriptor is ours alone.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Defines region `name`; defining it again with the same shape changes
/// nothing (guests keep sharing its memory). A new region is refused while
/// `running` says one of its members runs. Returns whether it was new.
pub fn define(
    name: &str,
    shape: RegionShape,
    running: impl Fn(&str) -> bool,
) -> Result<bool, RegionError> {
    crate::description::check_name(name)
        .map_err(|e| RegionError::Body(format!("name: {}", e.0)))?;
    let mut all = regions();
    if let Some(existing) = all.get(name) {
        return match existing.shape == shape {
            true => Ok(false),
            false => Err(RegionError::Conflict(name.to_string())),
        };
    }
    if let Some((guest, _)) = shape.members.iter().find(|(g, _)| running(g)) {
        return Err(RegionError::MemberRunning {
            region: name.to_string(),
            guest: guest.clone(),
        });
    }
    let create = |e| RegionError::Create(name.to_string(), e);
    let memory = create_memfd(name, shape.size).map_err(create)?;
    let memory_ro = reopen_read_only(&memory).map_err(create)?;
    let mut doorbells = Vec::new();
    for _ in &shape.members {
        let fds = (0..shape.vectors)
            .map(|_| create_eventfd())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(create)?;
        doorbells.push(fds);
    }
    all.insert(
        name.to_string(),
        Region {
            shape,
            memory,
            memory_ro,
            doorbells,
        },
    );
    Ok(true)
}

/// What a guest's VMM inherits: one `--region-fds` value per region it is a
/// member of, and the descriptors those values name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Handoff {
    pub options: Vec<String>,
    pub fds: Vec<RawFd>,
}

/// The regions `guest` is a member of, as [`Handoff`]. The descriptor
/// numbers are the daemon's own: the child inherits them unchanged.
pub fn handoff(guest: &str) -> Handoff {
    let mut out = Handoff::default();
    for (name, region) in regions().iter() {
        let Some(me) = region.shape.members.iter().position(|m| m.0 == guest) else {
            continue;
        };
        let raw = |l: &[OwnedFd]| l.iter().map(AsRawFd::as_raw_fd).collect::<Vec<_>>();
        let peers: Vec<(u16, Vec<RawFd>)> = (0..region.doorbells.len())
            .filter(|&p| p != me)
            .map(|p| (p as u16, raw(&region.doorbells[p])))
            .collect();
        let readonly = region.shape.members[me].1;
        let memory = if readonly {
            &region.memory_ro
        } else {
            &region.memory
        };
        let fds = vmm::region_fds::RegionFds {
            name: name.clone(),
            memory: memory.as_raw_fd(),
            own: raw(&region.doorbells[me]),
            peers,
        };
        out.fds.push(fds.memory);
        out.fds
            .extend(region.doorbells.iter().flatten().map(AsRawFd::as_raw_fd));
        out.options
            .push(vmm::region_fds::format(me as u16, readonly, &fds));
    }
    out
}

/// `PUT /regions/NAME`: 201 with the region when it is new, 200 when it
/// existed with this shape, 400 naming the field of a bad body, 409 when it
/// exists with another shape or, new, has a member running already.
pub fn put(daemon: &crate::daemon::Daemon, name: &str, body: &[u8]) -> crate::api::Reply {
    use crate::api::Reply;
    let shape = match serde_json::from_slice::<Value>(body) {
        Ok(v) => parse_shape(&v),
        Err(e) => Err(RegionError::Body(format!("bad request body: {e}"))),
    };
    let running = |g: &str| daemon.get(g).is_ok_and(|g| g.record().state.is_live());
    let result = shape.and_then(|s| define(name, s.clone(), running).map(|new| (new, s)));
    match result {
        Ok((new, shape)) => {
            let members: Vec<Value> = shape
                .members
                .iter()
                .enumerate()
                .map(|(id, (g, ro))| serde_json::json!({"name": g, "id": id, "readonly": ro}))
                .collect();
            let body = serde_json::json!({
                "name": name, "size": shape.size, "vectors": shape.vectors, "guests": members,
            });
            Reply {
                status: if new { 201 } else { 200 },
                body,
            }
        }
        Err(e @ RegionError::Body(_)) => Reply::error(400, e.to_string()),
        Err(e @ (RegionError::Conflict(_) | RegionError::MemberRunning { .. })) => {
            Reply::error(409, e.to_string())
        }
        Err(e) => Reply::error(
            500,
            format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shape(members: &[(&str, bool)]) -> RegionShape {
        RegionShape {
            size: 1 << 20,
            vectors: 2,
            members: members.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn members_get_their_own_and_their_peers_descriptors_and_others_nothing() {
        assert!(define(
            "unit-ring",
            shape(&[("unit-a", false), ("unit-b", true)]),
            |_| false
        )
        .unwrap());
        let a = handoff("unit-a");
        let b = handoff("unit-b");
        assert_eq!((a.options.len(), a.fds.len()), (1, 5));
        let (id, readonly, fds) = vmm::region_fds::parse(&b.options[0]).unwrap();
        assert_eq!((id, readonly), (1, true));
        assert_eq!(fds.own.len(), 2);
        // B's peer 0 is A's own pair; both get the same memfd, read-only
        // for B (which cannot map it writable), read-write for A.
        let (_, _, afds) = vmm::region_fds::parse(&a.options[0]).unwrap();
        assert_eq!(fds.peers, vec![(0, afds.own.clone())]);
        let inode = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(inode(fds.memory).ino(), inode(afds.memory).ino());
        // SAFETY: fcntl F_GETFL on open descriptors.
        let mode = |fd: RawFd| unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_ACCMODE;
        assert_eq!(mode(fds.memory), libc::O_RDONLY);
        assert_eq!(mode(afds.memory), libc::O_RDWR);
        assert_eq!(handoff("unit-c"), Handoff::default());
        // The memfd is sized and sealed against shrinking and growing.
        // SAFETY: fcntl and fstat on an open descriptor into a local.
        let (seals, size) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fds.memory, &mut st);
            (libc::fcntl(fds.memory, libc::F_GET_SEALS), st.st_size)
        };
        assert_eq!(size, 1 << 20);
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert_ne!(seals & libc::F_SEAL_GROW, 0);
        // The same shape again changes nothing; another shape is refused.
        assert!(!define(
            "unit-ring",
            shape(&[("unit-a", false), ("unit-b", true)]),
            |_| false
        )
        .unwrap());
        assert!(matches!(
            define("unit-ring", shape(&[("unit-a", false)]), |_| false),
            Err(RegionError::Conflict(_))
        ));
        // A new region whose member runs already is refused, naming it.
        let err = define(
            "unit-late",
            shape(&[("unit-a", false), ("unit-b", true)]),
            |g| g == "unit-b",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest 'unit-b' is running; it gets region 'unit-late' only when it starts: stop it first"
        );
        assert_eq!(handoff("unit-b").options.len(), 1);
    }

    #[test]
    fn bad_bodies_name_the_field() {
        let cases = [
            (
                json!({"size": 3000, "guests": [{"name": "a", "access": "rw"}]}),
                "size: not a power of two from 4 KiB to 256 MiB",
            ),
            (
                json!({"size": 4096, "vectors": 0, "guests": [{"name": "a", "access": "rw"}]}),
                "vectors: not 1 to 128",
            ),
            (
                json!({"size": 4096, "guests": []}),
                "guests: not a list of members",
            ),
            (
                json!({"size": 4096, "guests": [{"name": "a", "access": "rx"}]}),
                "guests[0].access: not \"rw\" or \"ro\"",
            ),
            (
                json!({"size": 4096, "guests": [{"name": "a", "access": "rw"}, {"name": "a", "access": "ro"}]}),
                "guests[1].name: not a guest name given once",
            ),
        ];
        for (body, message) in cases {
            assert_eq!(
                parse_shape(&body).unwrap_err().to_string(),
                message,
                "{body}"
            );
        }
    }
}
