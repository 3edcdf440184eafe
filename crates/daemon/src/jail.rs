//! The daemon's side of the jail: every guest's VMM is started jailed
//! (`ferrovisor run --jail`) unless the daemon runs with `--no-jail`.
//!
//! The daemon gives each guest a uid (and the same gid) from its range,
//! kept in the guest's record so that it survives restarts; creates the
//! guest's cgroup `ferrovisor/NAME` below its own, with the memory and pids
//! limits; places the VMM process in it before it runs (between fork and
//! exec); and removes the group once the process has ended or the guest is
//! deleted. A jailed VMM is the child of the process the daemon started:
//! the daemon finds it in the group, and shows its pid and host thread ids.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroup::{CgroupError, GuestCgroup, Hierarchy};
use thiserror::Error;

/// How long the daemon retries removing a guest's group while the kernel
/// finishes tearing its tasks down.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum JailError {
    #[error("the jail needs the memory and pids cgroups (start the daemon with --no-jail to run guests unconfined)")]
    Cgroup(#[source] CgroupError),
    #[error("cannot create the jail directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("no free uid left in the range {0}-{1}")]
    NoUid(u32, u32),
    #[error("guest '{0}' has no uid of its own")]
    NoGuestUid(String),
    #[error("cannot place the guest in its cgroup")]
    Place(#[source] CgroupError),
}

/// How the daemon jails its guests.
#[derive(Debug)]
pub struct JailPolicy {
    pub uid_range: (u32, u32),
    /// The directory the guests' roots are mounted on (`STATE_DIR/jail`).
    pub dir: PathBuf,
    hierarchy: Hierarchy,
}

/// The cgroup a VMM is started in: its `cgroup.procs` files, for the
/// spawned process to write itself into before exec; and the jail's flags.
#[derive(Debug)]
pub struct Placement {
    pub procs: Vec<PathBuf>,
    pub args: Vec<OsString>,
}

impl JailPolicy {
    /// Detects the daemon's own cgroups (before any guest is placed) and
    /// makes the jail directory.
    pub fn new(state_dir: &Path, uid_range: (u32, u32)) -> Result<Self, JailError> {
        let hierarchy = Hierarchy::detect().map_err(JailError::Cgroup)?;
        for needed in [cgroup::Controller::Memory, cgroup::Controller::Pids] {
            if hierarchy.version_of(needed).is_none() {
                return Err(JailError::Cgroup(CgroupError::Missing(needed.v1_name())));
            }
        }
        let dir = state_dir.join("jail");
        std::fs::create_dir_all(&dir).map_err(|e| JailError::Dir(dir.clone(), e))?;
        Ok(JailPolicy {
            uid_range,
            dir,
            hierarchy,
        })
    }

    /// The lowest uid of the range no guest in `taken` has.
    pub fn allocate_uid(&self, taken: &BTreeSet<u32>) -> Result<u32, JailError> {
        let (first, last) = self.uid_range;
        (first..=last)
            .find(|uid| !taken.contains(uid))
            .ok_or(JailError::NoUid(first, last))
    }

    fn group(&self, name: &str) -> Option<GuestCgroup> {
        self.hierarchy.guest(name).ok()
    }

    /// Creates guest `name`'s group with its limits and opens it for the
    /// VMM to join; the flags that jail `ferrovisor run`.
    pub fn prepare(
        &self,
        name: &str,
        config: &config::VmConfig,
        uid: Option<u32>,
    ) -> Result<Placement, JailError> {
        let uid = uid.ok_or_else(|| JailError::NoGuestUid(name.to_string()))?;
        let group = self.hierarchy.guest(name).map_err(JailError::Place)?;
        group.create().map_err(JailError::Place)?;
        group
            .set_memory_limit(Some(jail::memory_limit(config.memory, config.cpus)))
            .map_err(JailError::Place)?;
        group
            .set_pids_limit(Some(jail::pids_limit(config.cpus, config.virtio_devices())))
            .map_err(JailError::Place)?;
        let procs = group
            .paths()
            .into_iter()
            .map(|(_, _, dir)| dir.join("cgroup.procs"))
            .collect();
        let args = [
            "--jail".into(),
            self.dir.clone().into_os_string(),
            "--jail-uid".into(),
            uid.to_string().into(),
            "--jail-cgroup".into(),
            "caller".into(),
            "--name".into(),
            name.into(),
        ]
        .into();
        Ok(Placement { procs, args })
    }

    /// Removes guest `name`'s group once its tasks are gone (a VMM killed
    /// with its parent takes a moment to go).
    pub fn release(&self, name: &str) {
        let Some(group) = self.group(name) else {
            return;
        };
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        while group.remove().is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The jailed VMM: the process in guest `name`'s group other than the
    /// one the daemon started.
    pub fn vmm_pid(&self, name: &str, started: i32) -> Option<i32> {
        let procs = self.group(name)?.processes().ok()?;
        procs.into_iter().map(|p| p as i32).find(|&p| p != started)
    }

    /// CPU time used by guest `name`'s processes, in milliseconds.
    pub fn cpu_time_ms(&self, name: &str) -> Option<u64> {
        self.group(name)?.usage().cpu_usage_us.map(|us| us / 1000)
    }
}

/// Host thread ids for thread ids `inner` of process `pid` as its own PID
/// namespace numbers them (the last `NSpid` field of each task).
pub fn host_tids(pid: i32, inner: &[i64]) -> Option<Vec<i64>> {
    let mut map = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(host) = task.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let ns = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last()?.parse::<i64>().ok());
        if let Some(ns) = ns {
            map.push((ns, host));
        }
    }
    inner
        .iter()
        .map(|t| map.iter().find(|(ns, _)| ns == t).map(|(_, h)| *h))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_threads_map_to_themselves_outside_a_pid_namespace() {
        let pid = std::process::id() as i32;
        // SAFETY: gettid has no preconditions.
        let tid = i64::from(unsafe { libc::gettid() });
        assert_eq!(host_tids(pid, &[tid]), Some(vec![tid]));
        assert_eq!(host_tids(pid, &[-7]), None);
    }
}
