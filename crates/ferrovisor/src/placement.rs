//! `ferrovisor run` with a CPU or memory policy and no daemon: the VMM puts
//! itself in a guest cgroup of its own (named by the guest file, else
//! `run-PID`) and sets the group's weight, cap, memory limit and real-time
//! runtime there before any vCPU runs. Under the daemon, which creates and
//! owns each guest's group and starts the VMM inside it, the VMM leaves it be.

use cgroup::{GuestCgroup, Hierarchy};
use daemon::sched::{apply_group_policy, chain};
use vmm::sched::SchedConfig;

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
