//! Per-guest control groups: one layout, used by containment (memory and
//! pids limits around each VMM process) and by scheduling (CPU weight, cap
//! and cpuset of each guest, with its vCPU threads inside).
//!
//! Layout, in every hierarchy that holds a controller we use:
//!
//! ```text
//! <the creating process's own cgroup>/ferrovisor/<guest>/
//! ```
//!
//! Guest groups nest under the cgroup of whoever creates them (the daemon, or
//! `ferrovisor run`), so limits set above Ferrovisor still apply to its guests.
//! A controller lives on cgroup v2 when the unified tree offers it, else on
//! its v1 mount (see [`detect`]); the guest's group is then one directory on
//! v2 or one per v1 hierarchy, and every setter writes the file its version
//! names (`cpu.weight` or `cpu.shares`, `memory.max` or
//! `memory.limit_in_bytes`, ...).

mod detect;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use detect::Place;

/// The directory under each hierarchy's base that holds every guest group.
pub const PARENT: &str = "ferrovisor";

/// The CPU period a cap is expressed in, in microseconds (the kernel's default).
pub const CAP_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "this host mounts no cgroup hierarchy with the cpu, cpuset, memory or pids controller"
    )]
    NoCgroups,
    #[error("cgroup name {0:?} is not valid: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("this host has no {0} controller in any cgroup hierarchy")]
    Missing(&'static str),
    #[error("CPU weight {0} is out of range: use 1-10000 (100 is the default)")]
    BadWeight(u32),
    #[error("real-time runtime: {wanted} us per second asked for, {free} us left under {path} (other guests hold the rest)")]
    RtRuntimeShort {
        path: PathBuf,
        wanted: u64,
        free: u64,
    },
    #[error("real-time runtime: the kernel has no {wanted} us per second left: deadline reservations hold the host's real-time bandwidth")]
    RtBandwidthTaken { wanted: u64 },
    #[error("CPU cap {0}% is out of range: use 1-{max}% (100% is one host CPU)", max = MAX_CAP_PERCENT)]
    BadCap(u32),
}

pub type Result<T> = std::result::Result<T, CgroupError>;

/// The largest cap: 256 host CPUs' worth.
pub const MAX_CAP_PERCENT: u32 = 25_600;

/// The controllers Ferrovisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Cpu,
    /// v1 only: CPU time used (v2 reports it in `cpu.stat`).
    Cpuacct,
    Cpuset,
    Memory,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Pids,
    ];

    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Cpuacct => None,
            other => Some(other.v1_name()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1,
    V2,
}

/// Where each controller lives on this host, seen from the calling process.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    places: Vec<Place>,
}

impl Hierarchy {
    /// Reads this process's mounts and cgroups.
    pub fn detect() -> Result<Self> {
        let read = |path: &str| {
            fs::read_to_string(path).map_err(|source| CgroupError::Read {
                path: path.into(),
                source,
            })
        };
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        let controllers = |dir: &Path| fs::read_to_string(dir.join("cgroup.controllers")).ok();
        let places = detect::places(&mountinfo, &own, &controllers);
        if places.is_empty() {
            return Err(CgroupError::NoCgroups);
        }
        Ok(Hierarchy { places })
    }

    /// The version `controller` is used on, or `None` when the host lacks it.
    pub fn version_of(&self, controller: Controller) -> Option<Version> {
        self.places
            .iter()
            .find(|p| p.controller == controller)
            .map(|p| p.version)
    }

    /// The real-time runtime (µs per `cpu.rt_period_us`, per CPU) that
    /// guest groups hold, where the kernel groups real-time bandwidth (v1
    /// `cpu.rt_runtime_us`); 0 elsewhere.
    pub fn guests_rt_runtime_us(&self) -> u64 {
        self.places
            .iter()
            .find(|p| p.controller == Controller::Cpu && p.version == Version::V1)
            .and_then(|p| children_rt_runtime(&p.base.join(PARENT)).ok())
            .unwrap_or(0)
    }

    /// Takes back the real-time runtime of guest groups that have no task
    /// (left by VMMs that were killed outright).
    pub fn reclaim_rt_runtime(&self) {
        if let Some(p) = self
            .places
            .iter()
            .find(|p| p.controller == Controller::Cpu && p.version == Version::V1)
        {
            reclaim_rt_runtime(&p.base.join(PARENT), Path::new(""));
        }
    }

    /// The group of guest `name` (not created yet: see [`GuestCgroup::create`]).
    pub fn guest(&self, name: &str) -> Result<GuestCgroup> {
        check_name(name)?;
        let mut dirs: Vec<Dir> = Vec::new();
        for place in &self.places {
            let path = place.base.join(PARENT).join(name);
            match dirs.iter_mut().find(|d| d.path == path) {
                Some(dir) => dir.controllers.push(place.controller),
                None => dirs.push(Dir {
                    controllers: vec![place.controller],
                    version: place.version,
                    base: place.base.clone(),
                    path,
                }),
            }
        }
        Ok(GuestCgroup {
            name: name.to_string(),
            dirs,
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

/// One directory of a guest's group: a v2 directory holds several
/// controllers, a v1 directory those its mount binds.
#[derive(Debug, Clone)]
struct Dir {
    controllers: Vec<Controller>,
    version: Version,
    base: PathBuf,
    path: PathBuf,
}

impl Dir {
    fn has(&self, controller: Controller) -> bool {
        self.controllers.contains(&controller)
    }
}

/// What a guest's group reports. A figure is `None` when the host lacks its
/// controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used by every thread in the group, in microseconds.
    pub cpu_usage_us: Option<u64>,
    /// CFS bandwidth periods that elapsed, and those in which a cap throttled the group.
    pub periods: Option<u64>,
    pub throttled_periods: Option<u64>,
    /// Time the group spent throttled by its cap, in microseconds.
    pub throttled_us: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// `None` inside: no limit.
    pub memory_limit: Option<Option<u64>>,
    pub pids: Option<u64>,
    pub pids_limit: Option<Option<u64>>,
}

/// One guest's group in every hierarchy Ferrovisor uses.
#[derive(Debug, Clone)]
pub struct GuestCgroup {
    name: String,
    dirs: Vec<Dir>,
}

impl GuestCgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's directories, each with the controllers it holds.
    pub fn paths(&self) -> Vec<(Vec<Controller>, Version, PathBuf)> {
        self.dirs
            .iter()
            .map(|d| (d.controllers.clone(), d.version, d.path.clone()))
            .collect()
    }

    /// The directory holding `controller`, if the host has it.
    pub fn path_of(&self, controller: Controller) -> Option<&Path> {
        self.dir_with(controller).map(|d| d.path.as_path())
    }

    fn dir_with(&self, controller: Controller) -> Option<&Dir> {
        self.dirs.iter().find(|d| d.has(controller))
    }

    fn require(&self, controller: Controller) -> Result<&Dir> {
        self.dir_with(controller)
            .ok_or(CgroupError::Missing(controller.v1_name()))
    }

    /// Creates the group (and the shared parent) in every hierarchy. An
    /// existing group is reused. On v2 the controllers are enabled down the
    /// path; on v1 a new cpuset inherits its parent's CPUs and memory nodes.
    pub fn create(&self) -> Result<()> {
        for dir in &self.dirs {
            let parent = dir.base.join(PARENT);
            for (above, level) in [(&dir.base, &parent), (&parent, &dir.path)] {
                if dir.version == Version::V2 {
                    enable_v2(above, &dir.controllers)?;
                }
                make_dir(level)?;
                if dir.version == Version::V1 && dir.has(Controller::Cpuset) {
                    inherit_cpuset(above, level)?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the group (read from its first directory).
    pub fn processes(&self) -> Result<Vec<u32>> {
        let Some(dir) = self.dirs.first() else {
            return Ok(Vec::new());
        };
        let text = read(&dir.path.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Limits the group's memory (RAM charged to it) to `bytes`, or lifts it.
    pub fn set_memory_limit(&self, bytes: Option<u64>) -> Result<()> {
        let dir = self.require(Controller::Memory)?;
        match dir.version {
            Version::V2 => write(&dir.path.join("memory.max"), &limit_text(bytes, "max")),
            Version::V1 => write(
                &dir.path.join("memory.limit_in_bytes"),
                &limit_text(bytes, "-1"),
            ),
        }
    }

    /// Limits the number of tasks (processes and threads) in the group.
    pub fn set_pids_limit(&self, count: Option<u64>) -> Result<()> {
        let dir = self.require(Controller::Pids)?;
        write(&dir.path.join("pids.max"), &limit_text(count, "max"))
    }

    /// Sets the group's CPU weight, 1-10000 with 100 the default (`cpu.weight`
    /// on v2; on v1 `cpu.shares`, scaled so that 100 is its default 1024).
    pub fn set_cpu_weight(&self, weight: u32) -> Result<()> {
        if !(1..=10_000).contains(&weight) {
            return Err(CgroupError::BadWeight(weight));
        }
        let dir = self.require(Controller::Cpu)?;
        match dir.version {
            Version::V2 => write(&dir.path.join("cpu.weight"), &weight.to_string()),
            Version::V1 => write(
                &dir.path.join("cpu.shares"),
                &shares_of_weight(weight).to_string(),
            ),
        }
    }

    /// Caps the group's CPU time at `percent` of one host CPU per
    /// [`CAP_PERIOD_US`], or lifts the cap.
    pub fn set_cpu_cap(&self, percent: Option<u32>) -> Result<()> {
        if let Some(p) = percent {
            if !(1..=MAX_CAP_PERCENT).contains(&p) {
                return Err(CgroupError::BadCap(p));
            }
        }
        let quota = percent.map(|p| u64::from(p) * CAP_PERIOD_US / 100);
        let dir = self.require(Controller::Cpu)?;
        match dir.version {
            Version::V2 => write(
                &dir.path.join("cpu.max"),
                &format!("{} {CAP_PERIOD_US}", limit_text(quota, "max")),
            ),
            Version::V1 => {
                write(
                    &dir.path.join("cpu.cfs_period_us"),
                    &CAP_PERIOD_US.to_string(),
                )?;
                write(&dir.path.join("cpu.cfs_quota_us"), &limit_text(quota, "-1"))
            }
        }
    }

    /// Confines the group to host CPUs `cpus` (the kernel's list form, `0-1,3`).
    pub fn set_cpus(&self, cpus: &str) -> Result<()> {
        let dir = self.require(Controller::Cpuset)?;
        write(&dir.path.join("cpuset.cpus"), cpus)
    }

    /// The host CPUs the group may run on, as the kernel lists them.
    pub fn cpus(&self) -> Result<String> {
        let dir = self.require(Controller::Cpuset)?;
        let file = match dir.version {
            Version::V2 => "cpuset.cpus.effective",
            Version::V1 => "cpuset.effective_cpus",
        };
        Ok(read(&dir.path.join(file))?.trim().to_string())
    }

    /// Gives the group `us` microseconds of real-time (SCHED_FIFO/RR) runtime
    /// per `cpu.rt_period_us`, where the kernel groups real-time bandwidth
    /// (v1 `cpu.rt_runtime_us`, RT_GROUP_SCHED): without it a real-time
    /// thread cannot run in a child group at all. The shared parent is
    /// raised to its own parent's runtime first, so guests share that.
    /// Elsewhere (v2, or a kernel without it) there is nothing to do.
    pub fn grant_rt_runtime(&self, us: u64) -> Result<()> {
        let Some(dir) = self.dir_with(Controller::Cpu) else {
            return Err(CgroupError::Missing("cpu"));
        };
        let file = "cpu.rt_runtime_us";
        if dir.version == Version::V2 || !dir.base.join(file).exists() {
            return Ok(());
        }
        let parent = dir.base.join(PARENT);
        let base_runtime = read_signed(&dir.base.join(file))?;
        if read_signed(&parent.join(file))? < base_runtime {
            write(&parent.join(file), &base_runtime.to_string())?;
        }
        let own = read_signed(&dir.path.join(file))?.max(0) as u64;
        let mut held = children_rt_runtime(&parent)?.saturating_sub(own);
        let mut free = (base_runtime.max(0) as u64).saturating_sub(held);
        if us > free {
            // Groups left behind by VMMs that were killed outright hold
            // runtime with no task to use it: take it back.
            reclaim_rt_runtime(&parent, &dir.path);
            held = children_rt_runtime(&parent)?.saturating_sub(own);
            free = (base_runtime.max(0) as u64).saturating_sub(held);
        }
        if us > free {
            return Err(CgroupError::RtRuntimeShort {
                path: parent,
                wanted: us,
                free,
            });
        }
        // The kernel refuses (EINVAL) runtime that deadline reservations
        // already hold: they share the same real-time bandwidth.
        write(&dir.path.join(file), &us.to_string()).map_err(|e| match e {
            CgroupError::Write { source, .. } if source.raw_os_error() == Some(libc::EINVAL) => {
                CgroupError::RtBandwidthTaken { wanted: us }
            }
            other => other,
        })
    }

    /// Moves process `pid` back to the creator's own group (so that this
    /// group can be removed while the process lives on).
    pub fn leave(&self, pid: u32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.base.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// What the group has used, and its limits.
    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        if let Some(dir) = self.dir_with(Controller::Cpu) {
            let stat = read(&dir.path.join("cpu.stat")).unwrap_or_default();
            let field = |key: &str| stat_field(&stat, key);
            usage.periods = field("nr_periods");
            usage.throttled_periods = field("nr_throttled");
            match dir.version {
                Version::V2 => {
                    usage.cpu_usage_us = field("usage_usec");
                    usage.throttled_us = field("throttled_usec");
                }
                Version::V1 => usage.throttled_us = field("throttled_time").map(|ns| ns / 1000),
            }
        }
        if let Some(dir) = self.dir_with(Controller::Cpuacct) {
            usage.cpu_usage_us = read_number(&dir.path.join("cpuacct.usage")).map(|ns| ns / 1000);
        }
        if let Some(dir) = self.dir_with(Controller::Memory) {
            let (current, limit) = match dir.version {
                Version::V2 => ("memory.current", "memory.max"),
                Version::V1 => ("memory.usage_in_bytes", "memory.limit_in_bytes"),
            };
            usage.memory_bytes = read_number(&dir.path.join(current));
            usage.memory_limit = read_limit(&dir.path.join(limit));
        }
        if let Some(dir) = self.dir_with(Controller::Pids) {
            usage.pids = read_number(&dir.path.join("pids.current"));
            usage.pids_limit = read_limit(&dir.path.join("pids.max"));
        }
        usage
    }

    /// Removes the group's directories. They must be empty: the kernel
    /// refuses to remove a group with tasks in it. A group already gone is fine.
    pub fn remove(&self) -> Result<()> {
        for dir in &self.dirs {
            match fs::remove_dir(&dir.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: dir.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// v1 `cpu.shares` for a v2-style weight: 100 ↦ 1024, never below the kernel's minimum 2.
pub fn shares_of_weight(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

fn limit_text(value: Option<u64>, none: &str) -> String {
    value.map_or_else(|| none.to_string(), |v| v.to_string())
}

fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A limit file: a number, or "max" (v2) / a huge number (v1) for none.
fn read_limit(path: &Path) -> Option<Option<u64>> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text == "max" || text == "-1" {
        return Some(None);
    }
    let value: u64 = text.parse().ok()?;
    // v1 reports "no limit" as the largest page-aligned value.
    Some((value < (1 << 62)).then_some(value))
}

fn read_signed(path: &Path) -> Result<i64> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| CgroupError::Read {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number: {text:?}"),
        ),
    })
}

/// Zeroes the real-time runtime of the child groups of `parent` (but
/// `keep`) that have no task.
fn reclaim_rt_runtime(parent: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let empty = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
        if dir != keep && empty && dir.join("cpu.rt_runtime_us").exists() {
            let _ = fs::write(dir.join("cpu.rt_runtime_us"), "0");
        }
    }
}

/// The real-time runtime the child groups of `parent` hold.
fn children_rt_runtime(parent: &Path) -> Result<u64> {
    let entries = fs::read_dir(parent).map_err(|source| CgroupError::Read {
        path: parent.to_path_buf(),
        source,
    })?;
    let mut sum = 0;
    for entry in entries.flatten() {
        let file = entry.path().join("cpu.rt_runtime_us");
        if file.exists() {
            sum += read_signed(&file)?.max(0) as u64;
        }
    }
    Ok(sum)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn make_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Enables `controllers` for the children of v2 group `dir`.
fn enable_v2(dir: &Path, controllers: &[Controller]) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let enabled: BTreeSet<String> = read(&path)?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let wanted: Vec<String> = controllers
        .iter()
        .filter_map(|c| c.v2_name())
        .filter(|name| !enabled.contains(*name))
        .map(|name| format!("+{name}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write(&path, &wanted.join(" "))
}

/// A new v1 cpuset starts empty and takes no tasks: give it its parent's sets.
fn inherit_cpuset(parent: &Path, child: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = read(&child.join(file))?;
        if own.trim().is_empty() {
            let from_parent = read(&parent.join(file))?;
            write(&child.join(file), from_parent.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_maps_to_v1_shares_with_the_defaults_aligned() {
        assert_eq!(shares_of_weight(100), 1024);
        assert_eq!(shares_of_weight(400), 4096);
        assert_eq!(shares_of_weight(1), 10);
        assert_eq!(shares_of_weight(10_000), 102_400);
    }

    #[test]
    fn guest_names_that_could_leave_the_parent_are_refused() {
        for bad in ["", "..", ".hidden", "a/b", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["web-1", "db_2", "a.b"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn stat_fields_are_read_by_exact_name() {
        let stat = "nr_periods 10\nnr_throttled 3\nthrottled_time 5000\n";
        assert_eq!(stat_field(stat, "nr_throttled"), Some(3));
        assert_eq!(stat_field(stat, "throttled"), None);
    }

    #[test]
    fn guest_group_is_one_directory_per_hierarchy() {
        let hierarchy = Hierarchy {
            places: vec![
                Place {
                    controller: Controller::Cpu,
                    version: Version::V2,
                    base: "/cg".into(),
                },
                Place {
                    controller: Controller::Memory,
                    version: Version::V2,
                    base: "/cg".into(),
                },
                Place {
                    controller: Controller::Pids,
                    version: Version::V1,
                    base: "/v1/pids/job".into(),
                },
            ],
        };
        let group = hierarchy.guest("web").expect("valid name");
        let paths = group.paths();
        assert_eq!(paths.len(), 2);
        assert_eq!(paths[0].2, PathBuf::from("/cg/ferrovisor/web"));
        assert_eq!(
            paths[0].0,
            vec![Controller::Cpu, Controller::Memory],
            "v2 controllers share a directory"
        );
        assert_eq!(paths[1].2, PathBuf::from("/v1/pids/job/ferrovisor/web"));
        assert!(matches!(
            group.set_cpus("0"),
            Err(CgroupError::Missing("cpuset"))
        ));
        assert!(matches!(
            group.set_cpu_weight(0),
            Err(CgroupError::BadWeight(0))
        ));
        assert!(matches!(
            group.set_cpu_cap(Some(0)),
            Err(CgroupError::BadCap(0))
        ));
    }
}
