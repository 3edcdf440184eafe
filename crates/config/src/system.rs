//! The system file: several guests, each inline or in its own guest file,
//! and whether each starts with the system or is held until started.
//!
//! ```toml
//! [guests.web]                 # inline: the guest file's keys, plus start
//! kernel = "vmlinuz"
//! memory = "256M"
//!
//! [guests.db]                  # by reference: another guest file
//! file = "db.toml"
//! start = "held"               # "boot" (the default) or "held"
//!
//! [pools.rt]                   # CPU pools: see `pools`
//! cpus = "1"
//! policy = "rt"
//! ```

use std::path::{Path, PathBuf};
use vmm::config::NetAttach;

use thiserror::Error;
use vmm::config::VmConfig;

use crate::fields::Fields;
use crate::guest::guest_fields;
use crate::{parse_table, read_file, FileError};

/// The longest guest name.
pub const MAX_NAME_LEN: usize = 32;

/// A name that is not a guest name.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("'{0}' is not a guest name (1 to 32 characters: a-z, 0-9 and -)")]
pub struct NameError(pub String);

/// Checks a guest name: 1 to 32 characters of `a-z`, `0-9` and `-`.
pub fn check_guest_name(name: &str) -> Result<(), NameError> {
    let ok = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError(name.to_string()))
    }
}

/// When a guest of a system starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPolicy {
    /// With the system (`start = "boot"`, the default).
    #[default]
    Boot,
    /// Only when asked for (`start = "held"`).
    Held,
}

impl StartPolicy {
    /// The name used in files: `boot` or `held`.
    pub fn as_str(self) -> &'static str {
        match self {
            StartPolicy::Boot => "boot",
            StartPolicy::Held => "held",
        }
    }
}

/// One guest of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemGuest {
    /// Its name, checked by [`check_guest_name`].
    pub name: String,
    pub config: VmConfig,
    pub start: StartPolicy,
    /// The guest file it came from, when it was not inline.
    pub file: Option<PathBuf>,
}

/// Several guests, in the order the file lists them, and the CPU pools
/// they are put in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct System {
    pub guests: Vec<SystemGuest>,
    pub pools: Vec<crate::pools::Pool>,
    /// Shared regions the daemon owns (`[regions.NAME]`).
    pub regions: Vec<crate::regions::SystemRegion>,
    /// Guest-to-guest vsock connections allowed (`[[vsock_allow]]`).
    pub vsock_allow: Vec<crate::vsock_allow::VsockAllow>,
    /// Virtual switches (`[switches.NAME]`).
    pub switches: Vec<crate::switches::SystemSwitch>,
}

/// Parses a system file's text. `origin` names it in errors; relative paths
/// in it (guest files, and paths in inline guests) are taken relative to
/// `base_dir`. Referenced guest files are read, and their own relative
/// paths are taken relative to their directory.
pub fn parse_system(text: &str, origin: &str, base_dir: &Path) -> Result<System, FileError> {
    let mut root = Fields::root(parse_table(text, origin)?, origin);
    let pools = crate::pools::pools(root.table("pools")?, origin)?;
    let table = root.table("guests")?;
    let regions = root.table("regions")?;
    let vsock_allow = root.tables("vsock_allow")?;
    let switches = crate::switches::switches(root.table("switches")?)?;
    root.finish()?;
    let Some(mut table) = table else {
        return Err(root_error(
            origin,
            "guests",
            "is required: name at least one guest",
        ));
    };
    let names = table.remaining_keys();
    if names.is_empty() {
        return Err(root_error(origin, "guests", "names no guest"));
    }
    let mut guests: Vec<SystemGuest> = Vec::with_capacity(names.len());
    for name in names {
        let entry = table.named_table(&name)?;
        let guest = system_guest(&name, entry, base_dir, origin)?;
        check_conflicts(&guests, &guest, origin)?;
        guests.push(guest);
    }
    crate::pools::place(&pools, &mut guests, origin)?;
    let names: Vec<String> = guests.iter().map(|g| g.name.clone()).collect();
    let regions = crate::regions::regions(regions, &names)?;
    let vsock_allow = crate::vsock_allow::vsock_allow(vsock_allow, &guests)?;
    check_switches_declared(&guests, &switches, origin)?;
    Ok(System {
        guests,
        pools,
        regions,
        vsock_allow,
        switches,
    })
}

/// Every switch a guest's `[[net]]` names is declared in `[switches]`.
fn check_switches_declared(
    guests: &[SystemGuest],
    switches: &[crate::switches::SystemSwitch],
    origin: &str,
) -> Result<(), FileError> {
    for guest in guests {
        for (i, net) in guest.config.nets.iter().enumerate() {
            let NetAttach::Switch { name, .. } = &net.attach else {
                continue;
            };
            if !switches.iter().any(|s| &s.name == name) {
                return Err(root_error(
                    origin,
                    &format!("guests.{}.net[{i}].switch", guest.name),
                    &format!("no switch '{name}' is declared in [switches]"),
                ));
            }
        }
    }
    Ok(())
}

/// Reads and parses the system file at `path`.
pub fn load_system(path: &Path) -> Result<System, FileError> {
    let (text, origin, base_dir) = read_file(path)?;
    parse_system(&text, &origin, &base_dir)
}

fn root_error(origin: &str, field: &str, problem: &str) -> FileError {
    FileError::Field {
        origin: origin.to_string(),
        field: field.to_string(),
        problem: problem.to_string(),
    }
}

fn system_guest(
    name: &str,
    mut entry: Fields,
    base_dir: &Path,
    origin: &str,
) -> Result<SystemGuest, FileError> {
    if let Err(e) = check_guest_name(name) {
        return Err(root_error(origin, entry.path(), &e.to_string()));
    }
    let start = match entry.string("start")?.as_deref() {
        None | Some("boot") => StartPolicy::Boot,
        Some("held") => StartPolicy::Held,
        Some(other) => {
            return Err(entry.error("start", format!("'{other}' is not \"boot\" or \"held\"")))
        }
    };
    let (config, file) = if entry.has("file") {
        let file = base_dir.join(entry.required_string("file")?);
        if let Some(key) = entry.remaining_keys().first() {
            return Err(entry.error(
                key,
                "a guest given by 'file' takes only 'start' beside it; put this in the guest file",
            ));
        }
        (crate::guest::load_guest(&file)?, Some(file))
    } else {
        (guest_fields(&mut entry, base_dir)?, None)
    };
    entry.finish()?;
    Ok(SystemGuest {
        name: name.to_string(),
        config,
        start,
        file,
    })
}

/// Refuses what two guests of one host cannot share: a vsock CID, a tap
/// device, a disk image that either of them may write, a peer id on a
/// shared region.
fn check_conflicts(
    earlier: &[SystemGuest],
    guest: &SystemGuest,
    origin: &str,
) -> Result<(), FileError> {
    let field = |what: String| format!("guests.{}.{what}", guest.name);
    for other in earlier {
        if let (Some(a), Some(b)) = (&guest.config.vsock, &other.config.vsock) {
            if a.cid == b.cid {
                let problem = format!("CID {} is also guest '{}''s", a.cid, other.name);
                return Err(root_error(origin, &field("vsock.cid".into()), &problem));
            }
        }
        for (i, net) in guest.config.nets.iter().enumerate() {
            if let NetAttach::Tap(tap) = &net.attach {
                if other
                    .config
                    .nets
                    .iter()
                    .any(|n| matches!(&n.attach, NetAttach::Tap(t) if t == tap))
                {
                    let problem = format!("tap '{tap}' is also used by guest '{}'", other.name);
                    return Err(root_error(
                        origin,
                        &field(format!("net[{i}].tap")),
                        &problem,
                    ));
                }
            }
            if let (NetAttach::Switch { name, .. }, Some(mac)) = (&net.attach, net.mac) {
                let same = |n: &&vmm::config::NetConfig| {
                    n.mac == Some(mac)
                        && matches!(&n.attach, NetAttach::Switch { name: s, .. } if s == name)
                };
                if other.config.nets.iter().any(|n| same(&n)) {
                    let problem = format!(
                        "guest '{}' uses the same MAC on switch '{name}'",
                        other.name
                    );
                    return Err(root_error(
                        origin,
                        &field(format!("net[{i}].mac")),
                        &problem,
                    ));
                }
            }
        }
        for (i, disk) in guest.config.disks.iter().enumerate() {
            let shared = other
                .config
                .disks
                .iter()
                .find(|d| d.path == disk.path && !(d.readonly && disk.readonly));
            if shared.is_some() {
                let problem = format!(
                    "'{}' is also a disk of guest '{}', and one of them may write it",
                    disk.path.display(),
                    other.name
                );
                return Err(root_error(
                    origin,
                    &field(format!("disk[{i}].path")),
                    &problem,
                ));
            }
        }
        for (i, region) in guest.config.regions.iter().enumerate() {
            let regions = &other.config.regions;
            if regions
                .iter()
                .any(|r| r.path == region.path && r.id == region.id)
            {
                let problem = format!(
                    "id {} on region '{}' is also guest '{}''s; guests sharing a region need distinct ids",
                    region.id,
                    region.path.display(),
                    other.name
                );
                return Err(root_error(
                    origin,
                    &field(format!("region[{i}].id")),
                    &problem,
                ));
            }
        }
    }
    Ok(())
}
