//! The guest file: one VM, with everything `ferrovisor run` takes, plus the
//! host CPUs each vCPU may run on.
//!
//! ```toml
//! kernel = "vmlinuz"             # required; relative to this file
//! initramfs = "initramfs.cpio"
//! cmdline = "console=ttyS0"
//! cpus = 2                       # 1 to 254
//! memory = "512M"                # or a byte count
//! memory_backing = "auto"        # or "anonymous" or "memfd"
//! hugepages = "2M"               # or "1G": hugetlb pages (optional)
//! console = "serial"             # or "virtio"
//! rng = true
//! affinity = "2-3"               # every vCPU on host CPUs 2-3, or one
//!                                # entry per vCPU: ["2", "3"]
//! uuid = "6f1c2e3d-4b5a-4978-8a1b-0c2d3e4f5a6b"  # SMBIOS system UUID;
//!                                # random at each run when absent
//! seccomp = "on"                 # or "log" or "off"
//! netns = "guests"               # join /run/netns/guests before the taps
//!
//! [[disk]]
//! path = "root.img"
//! readonly = true
//! rate = { bandwidth = "20MiB/s", ops = 500, burst = "64MiB" }  # optional
//!
//! [[net]]
//! tap = "fv0"
//! mac = "52:54:00:12:34:56"
//! rx_rate = { bandwidth = "100Mbit/s" }   # frames to the guest (optional)
//! tx_rate = { bandwidth = "100Mbit/s" }   # frames from the guest
//!
//! [vsock]
//! cid = 3
//! socket = "vsock.sock"
//!
//! [cpu]
//! features = ["-x2apic", "+rdtscp"]   # applied in order to the host's set
//!
//! [[region]]                     # shared memory: an ivshmem-compatible device
//! path = "/dev/shm/ring0"        # the file; its size (a power of two) is the region's
//! id = 0                         # this guest's peer id (IVPosition), 0 to 65535
//! readonly = false
//! [sched]                        # CPU policy and memory isolation: see `sched`
//! weight = 200
//! ```

use std::path::{Path, PathBuf};

use vmm::config::{
    self as vmcfg, ConsoleMode, DiskConfig, NetConfig, RegionConfig, VmConfig, VsockConfig,
    DEFAULT_CMDLINE, DEFAULT_CPUS, DEFAULT_MEMORY,
};

use arch::cpu_features::FeatureEdit;
use vmm::rate::{RateSpec, RateValue, RATE_KEYS};

use crate::fields::{kind, Fields};
use crate::{parse_table, read_file, FileError};

/// The most vCPUs a guest may have.
const MAX_CPUS: i64 = 254;
/// An affinity entry that leaves its vCPU unpinned.
pub const AFFINITY_ANY: &str = "any";

/// Parses a guest file's text. `origin` names the file in errors;
/// relative paths in it are taken relative to `base_dir`.
pub fn parse_guest(text: &str, origin: &str, base_dir: &Path) -> Result<VmConfig, FileError> {
    let table = parse_table(text, origin)?;
    let mut fields = Fields::root(table, origin);
    let config = guest_fields(&mut fields, base_dir)?;
    fields.finish()?;
    Ok(config)
}

/// Reads and parses the guest file at `path`; its relative paths are taken
/// relative to the file's own directory (made absolute).
pub fn load_guest(path: &Path) -> Result<VmConfig, FileError> {
    let (text, origin, base_dir) = read_file(path)?;
    parse_guest(&text, &origin, &base_dir)
}

/// A path from the file, relative to `base_dir` unless absolute. An
/// inherited descriptor (`fd:N`, see `vmm::guest_file`) is kept as it is.
fn resolve(base_dir: &Path, text: &str) -> PathBuf {
    let path = Path::new(text);
    if path.is_absolute() || vmm::guest_file::inherited_fd(path).is_some() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// Reads the guest's keys from `f`, leaving any others in place (a system
/// file adds its own), so the caller finishes the walk.
pub(crate) fn guest_fields(f: &mut Fields, base_dir: &Path) -> Result<VmConfig, FileError> {
    let kernel = resolve(base_dir, &f.required_string("kernel")?);
    let initramfs = optional_path(f, "initramfs", base_dir)?;
    let cmdline = f
        .string("cmdline")?
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if cmdline.contains('\0') {
        return Err(f.error("cmdline", "contains a NUL character"));
    }
    let cpus = cpus(f)?;
    let memory = memory(f)?;
    let memory_backing = parsed(f, "memory_backing")?.unwrap_or_default();
    let hugepages = parsed(f, "hugepages")?;
    let console = match f.string("console")? {
        None => ConsoleMode::default(),
        Some(text) => text.parse().map_err(|_| {
            f.error(
                "console",
                format!("'{text}' is not \"serial\" or \"virtio\""),
            )
        })?,
    };
    let rng = f.boolean("rng")?.unwrap_or(false);
    let affinity = affinity(f, cpus)?;
    let disks = f
        .tables("disk")?
        .into_iter()
        .map(|d| disk(d, base_dir))
        .collect::<Result<_, _>>()?;
    let nets = f
        .tables("net")?
        .into_iter()
        .map(net)
        .collect::<Result<_, _>>()?;
    let vsock = f.table("vsock")?.map(|v| vsock(v, base_dir)).transpose()?;
    let cpu_features = match f.table("cpu")? {
        None => Vec::new(),
        Some(c) => cpu(c)?,
    };
    let regions = f
        .tables("region")?
        .into_iter()
        .map(|r| region(r, base_dir))
        .collect::<Result<_, _>>()?;
    let sched = crate::sched::sched_fields(f, cpus)?;
    let uuid = match f.string("uuid")? {
        None => None,
        Some(text) => Some(
            text.parse()
                .map_err(|e: arch::smbios::UuidError| f.error("uuid", e.to_string()))?,
        ),
    };
    let seccomp = match f.string("seccomp")? {
        None => vmm::SeccompMode::default(),
        Some(text) => text.parse().map_err(|e: String| f.error("seccomp", e))?,
    };
    let netns = f.string("netns")?;
    if let Some(name) = &netns {
        if !jail::valid_name(name) {
            return Err(f.error(
                "netns",
                format!(
                    "'{name}' is not a network namespace name (letters, digits, '-', '_', '.')"
                ),
            ));
        }
    }
    Ok(VmConfig {
        kernel,
        initramfs,
        cmdline,
        cpus,
        memory,
        memory_backing,
        hugepages,
        disks,
        nets,
        console,
        rng,
        vsock,
        affinity,
        cpu_features,
        uuid,
        seccomp,
        regions,
        sched,
        netns,
    })
}

fn optional_path(
    f: &mut Fields,
    key: &'static str,
    base_dir: &Path,
) -> Result<Option<PathBuf>, FileError> {
    match f.string(key)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Err(f.error(key, "is empty")),
        Some(s) => Ok(Some(resolve(base_dir, &s))),
    }
}

/// An optional string field parsed by its type's `FromStr`, whose error
/// message says what was wrong.
fn parsed<T>(f: &mut Fields, key: &'static str) -> Result<Option<T>, FileError>
where
    T: std::str::FromStr<Err = vmcfg::ConfigError>,
{
    match f.string(key)? {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|e: vmcfg::ConfigError| f.error(key, e.to_string())),
    }
}

fn cpus(f: &mut Fields) -> Result<u8, FileError> {
    match f.integer("cpus")? {
        None => Ok(DEFAULT_CPUS),
        Some(n) if (1..=MAX_CPUS).contains(&n) => Ok(n as u8),
        Some(n) => Err(f.error(
            "cpus",
            format!("{n} is not a number of vCPUs from 1 to {MAX_CPUS}"),
        )),
    }
}

fn memory(f: &mut Fields) -> Result<u64, FileError> {
    let size = match f.take("memory") {
        None => return Ok(DEFAULT_MEMORY),
        Some(toml::Value::String(text)) => vmcfg::parse_size(&text).ok_or_else(|| {
            f.error(
                "memory",
                format!("'{text}' is not a size (examples: 512M, 2G, 1048576K)"),
            )
        })?,
        Some(toml::Value::Integer(n)) => {
            u64::try_from(n).map_err(|_| f.error("memory", format!("{n} is not a size")))?
        }
        Some(other) => {
            return Err(f.error(
                "memory",
                format!(
                    "expected a size such as \"512M\" or a byte count, found {}",
                    kind(&other)
                ),
            ))
        }
    };
    if size < arch::memmap::MIN_MEMORY {
        return Err(f.error(
            "memory",
            format!(
                "{size} bytes is too small: at least {} MiB is needed",
                arch::memmap::MIN_MEMORY >> 20
            ),
        ));
    }
    if !size.is_multiple_of(4096) {
        return Err(f.error("memory", format!("{size} bytes is not a multiple of 4 KiB")));
    }
    Ok(size)
}

/// `affinity = "LIST"` (every vCPU) or `affinity = ["LIST", ...]` (one
/// entry per vCPU, at most `cpus`; `"any"` leaves that vCPU unpinned).
fn affinity(f: &mut Fields, cpus: u8) -> Result<Vec<Vec<usize>>, FileError> {
    let list = |text: &str| vmcfg::parse_cpu_list(text).map_err(|e| e.to_string());
    match f.take("affinity") {
        None => Ok(Vec::new()),
        Some(toml::Value::String(text)) => {
            let cpus_allowed = list(&text).map_err(|e| f.error("affinity", e))?;
            Ok(vec![cpus_allowed; usize::from(cpus)])
        }
        Some(toml::Value::Array(items)) => {
            if items.len() > usize::from(cpus) {
                return Err(f.error(
                    "affinity",
                    format!("{} entries for {cpus} vCPU(s)", items.len()),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    toml::Value::String(s) if s == AFFINITY_ANY => Ok(Vec::new()),
                    toml::Value::String(s) => list(s).map_err(|e| f.item_error("affinity", i, e)),
                    other => Err(f.item_error(
                        "affinity",
                        i,
                        format!("expected a CPU list such as \"0-3\", found {}", kind(other)),
                    )),
                })
                .collect()
        }
        Some(other) => Err(f.error(
            "affinity",
            format!(
                "expected a CPU list such as \"0-3\" or an array of them, found {}",
                kind(&other)
            ),
        )),
    }
}

fn disk(mut d: Fields, base_dir: &Path) -> Result<DiskConfig, FileError> {
    let path = resolve(base_dir, &d.required_string("path")?);
    let readonly = d.boolean("readonly")?.unwrap_or(false);
    let rate = rate(&mut d, "rate")?;
    d.finish()?;
    Ok(DiskConfig {
        path,
        readonly,
        rate,
    })
}

/// An I/O limit: `key = { bandwidth = "20MiB/s", ops = 500, ... }` (the
/// keys of `vmm::rate`); absent is no limit.
fn rate(f: &mut Fields, key: &'static str) -> Result<RateSpec, FileError> {
    let Some(mut t) = f.table(key)? else {
        return Ok(RateSpec::default());
    };
    let mut spec = RateSpec::default();
    for name in RATE_KEYS {
        let value = match t.take(name) {
            None => continue,
            Some(toml::Value::String(s)) => spec.set(name, RateValue::Text(&s)),
            Some(toml::Value::Integer(n)) => match u64::try_from(n) {
                Ok(n) => spec.set(name, RateValue::Number(n)),
                Err(_) => return Err(t.error(name, format!("{n} is not above 0"))),
            },
            Some(other) => {
                return Err(t.error(
                    name,
                    format!("expected a string or an integer, found {}", kind(&other)),
                ))
            }
        };
        value.map_err(|e| t.error(name, e.problem))?;
    }
    spec.check().map_err(|e| t.error(&e.key, e.problem))?;
    t.finish()?;
    Ok(spec)
}

fn net(mut n: Fields) -> Result<NetConfig, FileError> {
    let (tap, switch, vhost_user) = (
        n.string("tap")?,
        n.string("switch")?,
        n.string("vhost_user")?,
    );
    let given = [tap.is_some(), switch.is_some(), vhost_user.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(n.error("switch", "give one of tap, switch or vhost_user"));
    }
    if let Some(path) = vhost_user {
        if path.is_empty() {
            return Err(n.error("vhost_user", "is empty"));
        }
        let attach = vmcfg::NetAttach::VhostUser(PathBuf::from(path));
        return net_rest(n, attach);
    }
    let attach = match (tap, switch) {
        (Some(_), Some(_)) | (None, None) => return Err(n.error("tap", "is required (or switch)")),
        (Some(tap), None) => {
            vmcfg::check_tap_name(&tap).map_err(|_| {
                n.error(
                    "tap",
                    format!("'{tap}' is not an interface name (1 to 15 characters, no '/', ':' or spaces)"),
                )
            })?;
            for key in ["vlan", "vlans"] {
                if n.has(key) {
                    return Err(n.error(key, "needs a switch"));
                }
            }
            vmcfg::NetAttach::Tap(tap)
        }
        (None, Some(name)) => {
            if crate::check_guest_name(&name).is_err() {
                let problem =
                    format!("'{name}' is not a switch name (1 to 32 characters: a-z, 0-9 and -)");
                return Err(n.error("switch", problem));
            }
            let vlans = port_vlans(&mut n)?;
            vmcfg::NetAttach::Switch { name, vlans }
        }
    };
    net_rest(n, attach)
}

/// The rest of a `[[net]]` table, once its attachment is known.
fn net_rest(mut n: Fields, attach: vmcfg::NetAttach) -> Result<NetConfig, FileError> {
    let mac = match n.string("mac")? {
        None => None,
        Some(text) => Some(vmcfg::parse_mac(&text).map_err(|e| n.error("mac", e.to_string()))?),
    };
    let rx_rate = rate(&mut n, "rx_rate")?;
    let tx_rate = rate(&mut n, "tx_rate")?;
    if !matches!(attach, vmcfg::NetAttach::Tap(_))
        && (!rx_rate.is_unlimited() || !tx_rate.is_unlimited())
    {
        return Err(n.error("rx_rate", "a switch port takes no rate limit"));
    }
    n.finish()?;
    Ok(NetConfig {
        attach,
        mac,
        rx_rate,
        tx_rate,
    })
}

/// A switch port's VLANs: `vlan = N` (access) or `vlans = [N, ...]`
/// (trunk); access on VLAN 1 when neither is given.
fn port_vlans(n: &mut Fields) -> Result<vmcfg::VlanMembership, FileError> {
    let access = n.integer("vlan")?;
    let trunk = n.take("vlans");
    match (access, trunk) {
        (Some(_), Some(_)) => Err(n.error("vlans", "give vlan or vlans, not both")),
        (Some(id), None) => Ok(vmcfg::VlanMembership::Access(crate::switches::vlan_id(
            n, "vlan", id,
        )?)),
        (None, Some(list)) => Ok(vmcfg::VlanMembership::Trunk(crate::switches::vlan_list_of(
            n, "vlans", list,
        )?)),
        (None, None) => Ok(vmcfg::VlanMembership::Access(1)),
    }
}

fn vsock(mut v: Fields, base_dir: &Path) -> Result<VsockConfig, FileError> {
    let cid = match v.integer("cid")? {
        None => return Err(v.error("cid", "is required")),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|c| (3..u32::MAX).contains(c))
            .ok_or_else(|| v.error("cid", format!("{n} is not a guest CID (3 to 4294967294)")))?,
    };
    let socket = resolve(base_dir, &v.required_string("socket")?);
    v.finish()?;
    Ok(VsockConfig {
        cid,
        socket,
        route: None,
    })
}

fn region(mut r: Fields, base_dir: &Path) -> Result<RegionConfig, FileError> {
    let path = resolve(base_dir, &r.required_string("path")?);
    let id = match r.integer("id")? {
        None => 0,
        Some(n) => u16::try_from(n)
            .map_err(|_| r.error("id", format!("{n} is not a peer id (0 to 65535)")))?,
    };
    let readonly = r.boolean("readonly")?.unwrap_or(false);
    r.finish()?;
    Ok(RegionConfig {
        path,
        id,
        readonly,
        fds: None,
    })
}

/// The `[cpu]` table: `features = ["-name", "+name", ...]`. Names must be
/// known; whether the host can add a feature is checked when the VM starts.
fn cpu(mut c: Fields) -> Result<Vec<FeatureEdit>, FileError> {
    let edits = match c.take("features") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => s
                    .parse::<FeatureEdit>()
                    .map_err(|e| c.error("features", e.to_string())),
                other => Err(c.error(
                    "features",
                    format!(
                        "expected feature names such as \"-x2apic\", found {}",
                        kind(other)
                    ),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(c.error(
                "features",
                format!(
                    "expected an array such as [\"-x2apic\"], found {}",
                    kind(&other)
                ),
            ))
        }
    };
    c.finish()?;
    Ok(edits)
}
