//! `ferrovisor run` with a CPU or memory policy and no daemon: the VMM puts
//! itself in a guest cgroup of its own (named by the guest file, else
//! `run-PID`) and sets the group's weight, cap, memory limit and real-time
//! runtime there before any vCPU runs. Under the daemon, which creates and
//! owns each guest's group, the VMM is already inside one and leaves it be.

use cgroup::{GuestCgroup, Hierarchy};
use vmm::sched::SchedConfig;

/// Real-time runtime per second given to a guest whose vCPUs (or partition
/// gate) use SCHED_FIFO/RR, when it declares no cap: half of each CPU.
pub const DEFAULT_RT_RUNTIME_US: u64 = 500_000;

/// Whether this process already sits in a Ferrovisor guest group.
fn inside_guest_group() -> bool {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    own.lines()
        .any(|l| l.contains(&format!("/{}/", cgroup::PARENT)))
}

/// The name of the group: the guest file's stem when it is a valid name.
pub fn group_name(file: Option<&std::path::Path>) -> String {
    file.and_then(|f| f.file_stem())
        .and_then(|s| s.to_str())
        .filter(|s| config::check_guest_name(s).is_ok())
        .map_or_else(|| format!("run-{}", std::process::id()), str::to_string)
}

/// Applies the group half of `sched` to `group` (created if needed).
pub fn apply_group_policy(group: &GuestCgroup, sched: &SchedConfig) -> cgroup::Result<()> {
    group.create()?;
    if let Some(w) = sched.weight {
        group.set_cpu_weight(w)?;
    }
    group.set_cpu_cap(sched.cap)?;
    if sched.memory_limit.is_some() {
        group.set_memory_limit(sched.memory_limit)?;
    }
    if sched.priority.is_some() || sched.partition.is_some() {
        let runtime = sched
            .cap
            .map_or(DEFAULT_RT_RUNTIME_US, |c| u64::from(c.min(100)) * 10_000);
        group.grant_rt_runtime(runtime)?;
    }
    Ok(())
}

/// Puts this process in its own group when `sched` needs one. Returns the
/// group, to be left and removed when the run ends.
pub fn enter(name: &str, sched: &SchedConfig) -> Result<Option<GuestCgroup>, String> {
    let needs = sched.needs_cgroup() || sched.partition.is_some();
    if !needs || inside_guest_group() {
        return Ok(None);
    }
    let place = || -> cgroup::Result<GuestCgroup> {
        let group = Hierarchy::detect()?.guest(name)?;
        apply_group_policy(&group, sched)?;
        group.add_process(std::process::id())?;
        Ok(group)
    };
    place().map(Some).map_err(|e| {
        format!(
            "sched: cannot place the VMM in cgroup '{name}': {}",
            chain(&e)
        )
    })
}

/// Leaves and removes the group made by [`enter`].
pub fn leave(group: GuestCgroup) {
    let _ = group.leave(std::process::id());
    if let Err(e) = group.remove() {
        eprintln!("ferrovisor: {}", chain(&e));
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
