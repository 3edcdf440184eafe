//! The guest group on this host's real cgroups (needs root, as the VMM does).

use std::process::{Child, Command};

use cgroup::{Controller, Hierarchy, Version};

struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn own_cgroups(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup")
}

#[test]
fn a_process_moved_into_a_guest_group_gets_its_limits() {
    let hierarchy = Hierarchy::detect().expect("this host has cgroups");
    let name = format!("test-{}", std::process::id());
    let group = hierarchy.guest(&name).expect("valid name");
    group.create().expect("create the group");

    let sleeper = Sleeper(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep"),
    );
    let pid = sleeper.0.id();
    group.add_process(pid).expect("move the process in");
    group
        .set_memory_limit(Some(64 << 20))
        .expect("memory limit");
    group.set_pids_limit(Some(16)).expect("pids limit");
    group.set_cpu_weight(400).expect("weight");
    group.set_cpu_cap(Some(25)).expect("cap");

    assert_eq!(group.processes().expect("list"), vec![pid]);
    let listed = own_cgroups(pid);
    assert!(
        listed.contains(&format!("/ferrovisor/{name}")),
        "the process's cgroups do not name its group:\n{listed}"
    );

    let usage = group.usage();
    assert_eq!(usage.memory_limit, Some(Some(64 << 20)));
    assert_eq!(usage.pids_limit, Some(Some(16)));
    assert_eq!(usage.pids, Some(1));
    assert!(usage.cpu_usage_us.is_some(), "CPU time is not reported");

    let cpu_dir = group.path_of(Controller::Cpu).expect("cpu controller");
    let (file, want) = match hierarchy.version_of(Controller::Cpu) {
        Some(Version::V2) => ("cpu.max", "25000 100000"),
        _ => ("cpu.cfs_quota_us", "25000"),
    };
    let got = std::fs::read_to_string(cpu_dir.join(file)).expect("read the cap");
    assert_eq!(got.trim(), want);

    group.set_cpu_cap(None).expect("lift the cap");
    let lifted = std::fs::read_to_string(cpu_dir.join(file)).expect("read the cap");
    assert!(
        lifted.starts_with("max") || lifted.trim() == "-1",
        "the cap is still set: {lifted}"
    );

    drop(sleeper);
    group.remove().expect("remove the emptied group");
    for (_, _, path) in group.paths() {
        assert!(!path.exists(), "{} is left behind", path.display());
    }
}

#[test]
fn a_guest_group_confined_to_one_cpu_reports_it() {
    let hierarchy = Hierarchy::detect().expect("this host has cgroups");
    let group = hierarchy
        .guest(&format!("cpus-{}", std::process::id()))
        .expect("valid name");
    group.create().expect("create the group");
    group.set_cpus("0").expect("confine to CPU 0");
    assert_eq!(group.cpus().expect("read cpus"), "0");
    group.remove().expect("remove the group");
}
