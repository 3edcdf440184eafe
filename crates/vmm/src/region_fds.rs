//! A shared region handed to the VMM as inherited descriptors, for a region
//! the daemon owns: the region's memfd, the eventfds of this guest's own
//! doorbell vectors (which the VMM registers as irqfds) and those of every
//! peer (which its Doorbell register writes). `ferrovisor run` takes one
//! per `--region-fds` option:
//!
//! ```text
//! name=ring,fd=5,id=0,readonly=off,own=6+7,peers=1:8+9/2:10+11
//! ```
//!
//! `own` lists one eventfd per vector (1 to 128); `peers` lists, for each
//! peer id, that peer's vectors' eventfds. The descriptors must be open in
//! the VMM when it starts; the VMM takes its own copies of them.

use std::fmt;
use std::os::fd::RawFd;

use thiserror::Error;

/// The most doorbell vectors a region's device has.
pub const MAX_VECTORS: usize = pci::ivshmem::MAX_VECTORS as usize;

/// Errors in a `--region-fds` value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegionFdsError {
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("unknown key '{0}' (known: name, fd, id, readonly, own, peers)")]
    UnknownKey(String),
    #[error("'{0}' is required")]
    Missing(&'static str),
    #[error("{key}: '{value}' is not {what}")]
    Bad {
        key: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("own: a region needs 1 to {MAX_VECTORS} vectors")]
    Vectors,
}

/// One region as inherited descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFds {
    /// The region's name in the system file (for messages).
    pub name: String,
    /// The region's memfd.
    pub memory: RawFd,
    /// This guest's vectors' eventfds, by vector.
    pub own: Vec<RawFd>,
    /// Each peer's id and its vectors' eventfds.
    pub peers: Vec<(u16, Vec<RawFd>)>,
}

fn bad(key: &'static str, value: &str, what: &'static str) -> RegionFdsError {
    RegionFdsError::Bad {
        key,
        value: value.to_string(),
        what,
    }
}

fn fd(key: &'static str, text: &str) -> Result<RawFd, RegionFdsError> {
    text.parse::<RawFd>()
        .ok()
        .filter(|&n| n >= 0)
        .ok_or_else(|| bad(key, text, "a descriptor number"))
}

fn fd_list(key: &'static str, text: &str) -> Result<Vec<RawFd>, RegionFdsError> {
    let fds = text
        .split('+')
        .map(|t| fd(key, t))
        .collect::<Result<Vec<_>, _>>()?;
    if fds.len() > MAX_VECTORS {
        return Err(RegionFdsError::Vectors);
    }
    Ok(fds)
}

fn peers(text: &str) -> Result<Vec<(u16, Vec<RawFd>)>, RegionFdsError> {
    let mut out: Vec<(u16, Vec<RawFd>)> = Vec::new();
    for item in text.split('/').filter(|t| !t.is_empty()) {
        let (id, fds) = item
            .split_once(':')
            .ok_or_else(|| bad("peers", item, "ID:FD+FD"))?;
        let id: u16 = id.parse().map_err(|_| bad("peers", id, "a peer id"))?;
        if out.iter().any(|(p, _)| *p == id) {
            return Err(bad("peers", item, "a peer given once"));
        }
        out.push((id, fd_list("peers", fds)?));
    }
    Ok(out)
}

/// Parses a `--region-fds` value into this guest's id, whether it may only
/// read, and the descriptors.
pub fn parse(text: &str) -> Result<(u16, bool, RegionFds), RegionFdsError> {
    let (mut name, mut memory, mut id, mut readonly, mut own, mut peer_list) =
        (None, None, 0u16, false, None, Vec::new());
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| RegionFdsError::NotKeyValue(item.to_string()))?;
        match key {
            "name" => name = Some(value.to_string()),
            "fd" => memory = Some(fd("fd", value)?),
            "id" => id = value.parse().map_err(|_| bad("id", value, "a peer id"))?,
            "readonly" => {
                readonly = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(bad("readonly", value, "on or off")),
                }
            }
            "own" => own = Some(fd_list("own", value)?),
            "peers" => peer_list = peers(value)?,
            other => return Err(RegionFdsError::UnknownKey(other.to_string())),
        }
    }
    let fds = RegionFds {
        name: name.ok_or(RegionFdsError::Missing("name"))?,
        memory: memory.ok_or(RegionFdsError::Missing("fd"))?,
        own: own.ok_or(RegionFdsError::Missing("own"))?,
        peers: peer_list,
    };
    Ok((id, readonly, fds))
}

/// Writes the `--region-fds` value that [`parse`] reads back.
pub fn format(id: u16, readonly: bool, fds: &RegionFds) -> String {
    let list = |l: &[RawFd]| {
        l.iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("+")
    };
    let peers: Vec<String> = fds
        .peers
        .iter()
        .map(|(p, l)| format!("{p}:{}", list(l)))
        .collect();
    format!(
        "name={},fd={},id={id},readonly={},own={},peers={}",
        fds.name,
        fds.memory,
        if readonly { "on" } else { "off" },
        list(&fds.own),
        peers.join("/")
    )
}

impl fmt::Display for RegionFds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region '{}'", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_round_trips() {
        let text = "name=ring,fd=5,id=1,readonly=on,own=6+7,peers=0:8+9/2:10+11";
        let (id, readonly, fds) = parse(text).unwrap();
        assert_eq!((id, readonly), (1, true));
        assert_eq!(fds.memory, 5);
        assert_eq!(fds.own, vec![6, 7]);
        assert_eq!(fds.peers, vec![(0, vec![8, 9]), (2, vec![10, 11])]);
        assert_eq!(format(id, readonly, &fds), text);
    }

    #[test]
    fn a_region_alone_has_no_peers() {
        let (_, _, fds) = parse("name=solo,fd=3,own=4,peers=").unwrap();
        assert!(fds.peers.is_empty());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("name=r,fd=x,own=4", "fd: 'x' is not a descriptor number"),
            ("name=r,fd=3", "'own' is required"),
            ("fd=3,own=4", "'name' is required"),
            ("name=r,fd=3,own=4,peers=1", "peers: '1' is not ID:FD+FD"),
            (
                "name=r,fd=3,own=4,peers=1:5/1:6",
                "peers: '1:6' is not a peer given once",
            ),
            (
                "name=r,fd=3,own=4,readonly=yes",
                "readonly: 'yes' is not on or off",
            ),
            ("name=r,fd=3,own=-1", "own: '-1' is not a descriptor number"),
            (
                "name=r,fd=3,own=4,size=1",
                "unknown key 'size' (known: name, fd, id, readonly, own, peers)",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(parse(text).unwrap_err().to_string(), message, "{text}");
        }
    }
}
