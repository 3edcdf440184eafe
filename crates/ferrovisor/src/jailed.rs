//! `ferrovisor run --jail DIR`: the VMM in its jail (see the `jail` crate).
//!
//! This process prepares the jail as root (the guest's cgroup, its network
//! namespace), then forks into new namespaces. The child builds and runs the
//! VM and locks itself down before the first guest instruction; this process
//! only waits, forwards stop signals, and ends as the child ended.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cgroup::{GuestCgroup, Hierarchy};
use jail::{ChildEnd, Fork, Jail};
use vmm::{RunOptions, VmConfig};

use crate::args::{CgroupMode, Guest, JailArgs, RunArgs};
use crate::{load_vm, one_line, record_exit, run_vm};

/// How long the parent retries removing the guest's cgroup while the
/// kernel finishes tearing the child down.
const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The guest's name: `--name`, else the guest file's name, else `run-PID`.
fn guest_name(args: &RunArgs) -> String {
    if let Some(name) = &args.name {
        return name.clone();
    }
    if let Guest::File(path) = &args.guest {
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            if jail::valid_name(stem) {
                return stem.to_string();
            }
        }
    }
    format!("run-{}", std::process::id())
}

fn absolute(path: &Path, what: &str) -> Result<PathBuf, String> {
    std::fs::canonicalize(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The largest regular file the VMM writes through an open descriptor:
/// RLIMIT_FSIZE must let it write to the end of every disk image.
fn largest_disk(vm: &VmConfig) -> u64 {
    vm.disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// The jail for `vm`, with every path made absolute (the VMM's working
/// directory is `/` of its root afterwards).
fn make_jail(
    vm: &mut VmConfig,
    name: &str,
    args: &JailArgs,
    runtime_dir: Option<&Path>,
) -> Result<Jail, String> {
    let runtime_dir = runtime_dir
        .map(|d| absolute(d, "--runtime-dir"))
        .transpose()?;
    let mut shared_dirs = Vec::new();
    if let Some(vsock) = vm.vsock.as_mut() {
        let parent = vsock
            .socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = absolute(parent, "the vsock socket's directory")?;
        if let Some(file) = vsock.socket.file_name() {
            vsock.socket = dir.join(file);
        }
        shared_dirs.push(dir);
    }
    let (uid, gid) = args.ids.unwrap_or_else(|| {
        let uid = jail::uid_for_name(name, jail::DEFAULT_UID_RANGE);
        (uid, uid)
    });
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("--jail {}: {e}", args.dir.display()))?;
    let dir = absolute(&args.dir, "--jail")?;
    Ok(Jail {
        name: name.to_string(),
        root: dir.join(name),
        runtime_dir,
        shared_dirs,
        uid,
        gid,
        nofile: jail::NOFILE_LIMIT,
        fsize: largest_disk(vm).max(jail::MIN_FSIZE_LIMIT),
        keep_sys_nice: vm.sched.is_real_time() || vm.sched.partition.is_some(),
    })
}

/// Creates the guest's own group under this process's cgroup, with the
/// memory and pids limits.
fn own_cgroup(vm: &VmConfig, name: &str) -> Result<GuestCgroup, String> {
    let fail = |e: cgroup::CgroupError| format!("jail: {}", one_line(&e));
    let group = Hierarchy::detect()
        .and_then(|h| h.guest(name))
        .map_err(fail)?;
    group.create().map_err(fail)?;
    group
        .set_memory_limit(Some(jail::memory_limit(vm.memory, vm.cpus)))
        .map_err(fail)?;
    group
        .set_pids_limit(Some(jail::pids_limit(vm.cpus, vm.virtio_devices())))
        .map_err(fail)?;
    // The guest's own CPU and memory policy, as run applies it unjailed.
    if vm.sched.needs_cgroup() || vm.sched.partition.is_some() {
        daemon::sched::apply_group_policy(&group, &vm.sched).map_err(fail)?;
    }
    Ok(group)
}

/// Removes the group once the kernel has let go of the child's tasks.
fn remove_cgroup(group: &GuestCgroup) {
    let deadline = Instant::now() + CGROUP_REMOVE_TIMEOUT;
    while group.remove().is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything up to the fork; an error is one line.
fn prepare(args: &RunArgs) -> Result<(VmConfig, Jail, Option<GuestCgroup>), (i32, String)> {
    let jail_args = args.jail.as_ref().ok_or((2, String::new()))?;
    let mut vm = load_vm(args)?;
    let name = guest_name(args);
    let fail = |reason: String| {
        eprintln!("ferrovisor: {reason}");
        (2, reason)
    };
    let jail = make_jail(&mut vm, &name, jail_args, args.runtime_dir.as_deref()).map_err(fail)?;
    let group = match jail_args.cgroup {
        CgroupMode::Own => Some(own_cgroup(&vm, &name).map_err(fail)?),
        CgroupMode::Caller => None,
    };
    if let Some(ns) = &vm.netns {
        jail::join_netns(ns).map_err(|e| fail(one_line(&e)))?;
    }
    Ok((vm, jail, group))
}

/// Runs the guest jailed; see the module's comment.
pub fn run(args: RunArgs, start: Instant) -> ExitCode {
    let (vm, jail, group) = match prepare(&args) {
        Ok(prepared) => prepared,
        Err((status, reason)) => {
            record_exit(args.runtime_dir.as_deref(), status, &reason);
            return ExitCode::from(status as u8);
        }
    };
    let runtime_dir = jail.runtime_dir.clone();
    let fork = jail::fork_into_namespaces();
    match fork {
        Ok(Fork::Child) => {
            let (status, reason) = match group.as_ref().map(|g| g.add_process(0)) {
                Some(Err(e)) => {
                    let reason = format!("jail: {}", one_line(&e));
                    eprintln!("ferrovisor: {reason}");
                    (2, reason)
                }
                _ => {
                    let options = RunOptions {
                        runtime_dir: runtime_dir.clone(),
                        jail: Some(jail),
                    };
                    run_vm(&vm, start, &options, args.stats)
                }
            };
            record_exit(runtime_dir.as_deref(), status, &reason);
            ExitCode::from(status as u8)
        }
        Ok(Fork::Parent(child)) => {
            let end = jail::wait_child(child);
            if let Some(group) = &group {
                remove_cgroup(group);
            }
            match end {
                ChildEnd::Exited(code) => ExitCode::from(code as u8),
                ChildEnd::Signaled(signal) => {
                    // The words the daemon uses for an unjailed VMM.
                    let reason = format!("killed by signal {signal}");
                    eprintln!(
                        "ferrovisor: the VMM was {reason} ({})",
                        jail::signal_name(signal)
                    );
                    record_exit(runtime_dir.as_deref(), vmm::STATUS_GUEST_FAILED, &reason);
                    ExitCode::from(vmm::STATUS_GUEST_FAILED as u8)
                }
            }
        }
        Err(e) => {
            let reason = one_line(&e);
            eprintln!("ferrovisor: {reason}");
            if let Some(group) = &group {
                remove_cgroup(group);
            }
            record_exit(runtime_dir.as_deref(), 2, &reason);
            ExitCode::from(2)
        }
    }
}
