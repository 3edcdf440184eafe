//! Host KVM tests of the jail (`ferrovisor run --jail DIR`): what a jailed
//! VMM process is, seen from the host's /proc, while its tiny guest runs.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A directory of its own for one test, with `run/` in it (`jail/` is
/// left for `run --jail` to create).
fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir("fvjail", name);
    std::fs::create_dir_all(dir.join("run")).unwrap();
    dir
}

/// A jailed VMM under test; killed if the test ends early.
type Jailed = Running;

use common::wait_until as wait_for;

/// A `status` field of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

impl Jailed {
    /// Starts the chatty guest jailed as `name` and waits until it printed.
    fn start(name: &str, extra: &[&str]) -> Jailed {
        let dir = scratch(name);
        let kernel = busy_guest();
        let mut args: Vec<String> = [
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32M",
            "--runtime-dir",
            dir.join("run").to_str().unwrap(),
            "--jail",
            dir.join("jail").to_str().unwrap(),
            "--name",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let jailed = Running::spawn(&args, dir);
        wait_for(|| jailed.log().contains('.'), "the guest's console output");
        jailed
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("console.log")).unwrap_or_default()
    }

    /// The VMM itself: the child of the process we started.
    fn vmm_pid(&self) -> u32 {
        let parent = self.child.id();
        let mut found = None;
        wait_for(
            || {
                found = children_of(parent).first().copied();
                found.is_some()
            },
            "the jailed VMM process",
        );
        found.unwrap()
    }

    /// Waits for the process to end; returns its status and stderr.
    fn wait_exit(&mut self) -> (i32, String) {
        wait_for(
            || self.child.try_wait().unwrap().is_some(),
            "the VMM's exit",
        );
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code().unwrap_or(-1), err)
    }
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if status_field(pid, "PPid").as_deref() == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

fn ns_of(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_jailed_vmm_runs_as_an_unprivileged_uid_without_capabilities() {
    let mut jailed = Jailed::start("creds", &["--jail-uid", "123457:123458"]);
    let pid = jailed.vmm_pid();
    let uids = status_field(pid, "Uid").unwrap();
    assert_eq!(
        uids.split_whitespace().collect::<Vec<_>>(),
        ["123457"; 4],
        "real, effective, saved and filesystem uid"
    );
    let gids = status_field(pid, "Gid").unwrap();
    assert_eq!(gids.split_whitespace().collect::<Vec<_>>(), ["123458"; 4]);
    assert_eq!(status_field(pid, "Groups").unwrap(), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps).unwrap(),
            "0000000000000000",
            "{caps} of the jailed VMM"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs").unwrap(), "1");
    assert_eq!(
        status_field(pid, "Seccomp").unwrap(),
        "2",
        "seccomp filter mode"
    );
    // Every thread, not just the main one.
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(ns_of(pid, kind), ns_of(std::process::id(), kind), "{kind}");
    }
    // pid 1 of its own PID namespace.
    let nspid = status_field(pid, "NSpid").unwrap();
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    // The guest goes on printing, and stops cleanly on SIGTERM to the
    // process the user started.
    let before = jailed.log().len();
    wait_for(|| jailed.log().len() > before, "more console output");
    // SAFETY: our own child.
    unsafe { libc::kill(jailed.child.id() as i32, libc::SIGTERM) };
    let (status, err) = jailed.wait_exit();
    assert_eq!(status, 0, "{err}");
    let record = std::fs::read_to_string(jailed.run_dir().join("exit.json")).unwrap();
    assert!(record.contains("SIGTERM"), "{record}");
}

/// Every path under `dir` (not following links, not into `skip`), relative.
fn tree(dir: &Path, skip: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in std::fs::read_dir(&at).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            out.insert(rel.clone());
            if entry.file_type().unwrap().is_dir() && rel != skip {
                todo.push(path);
            }
        }
    }
    out
}

#[test]
fn a_jailed_vmm_root_holds_only_its_runtime_directory_and_its_proc() {
    let jailed = Jailed::start("root", &[]);
    let pid = jailed.vmm_pid();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let run = jailed.run_dir();
    let run_rel = run.strip_prefix("/").unwrap().to_path_buf();
    let found = tree(&root, Path::new("proc"));
    let mut want: BTreeSet<PathBuf> = run_rel.ancestors().map(Path::to_path_buf).collect();
    want.remove(Path::new(""));
    want.insert("proc".into());
    for file in ["console.log", "console.sock", "control.sock"] {
        want.insert(run_rel.join(file));
    }
    assert_eq!(found, want, "the jailed VMM's whole root");
    for host_file in ["etc/passwd", "dev/kvm", "usr", "sys"] {
        assert!(!root.join(host_file).exists(), "{host_file} is visible");
    }
    // Its /proc shows its own PID namespace only: pid 1 is the VMM.
    let procs: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    assert_eq!(procs, ["1"]);
    // The root itself is read-only; the runtime directory belongs to the guest's uid.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .unwrap()
            .starts_with("ro"),
        "{root_mount}"
    );
    let owner = std::fs::metadata(&run).unwrap().uid();
    assert_eq!(
        owner.to_string(),
        status_field(pid, "Uid")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
    );
}

#[test]
fn a_jailed_vmm_sits_in_its_own_cgroup_with_memory_and_pids_limits() {
    let name = format!("cg-{}", std::process::id());
    let mut jailed = Jailed::start(&name, &["--cpus", "2"]);
    let pid = jailed.vmm_pid();
    let group = cgroup::Hierarchy::detect().unwrap().guest(&name).unwrap();
    let procs = group.processes().unwrap();
    assert!(procs.contains(&pid), "{procs:?} lacks the VMM {pid}");
    assert!(
        !procs.contains(&jailed.child.id()),
        "the waiting parent stays outside"
    );
    let usage = group.usage();
    assert_eq!(
        usage.memory_limit,
        Some(Some(jail::memory_limit(32 << 20, 2))),
        "guest RAM plus the VMM's budget"
    );
    assert_eq!(usage.pids_limit, Some(Some(jail::pids_limit(2, 0))));
    assert!(usage.memory_bytes.unwrap() > 0);
    assert!(
        usage.pids.unwrap() >= 3,
        "main and two vCPU threads at least"
    );
    // SAFETY: our own child.
    unsafe { libc::kill(jailed.child.id() as i32, libc::SIGINT) };
    let (status, err) = jailed.wait_exit();
    assert_eq!(status, 0, "{err}");
    for (_, _, path) in group.paths() {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn a_jailed_vmm_dies_with_the_process_that_was_started() {
    let mut jailed = Jailed::start("pdeath", &[]);
    let pid = jailed.vmm_pid();
    jailed.child.kill().unwrap();
    jailed.child.wait().unwrap();
    wait_for(
        || status_field(pid, "State").is_none_or(|s| s.starts_with('Z')),
        "the VMM to end after its parent",
    );
}

#[test]
fn a_jailed_vmm_with_virtio_console_keeps_every_thread_jailed() {
    let jailed = Jailed::start("virtio", &["--console", "virtio", "--rng"]);
    let pid = jailed.vmm_pid();
    let threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        threads.len() >= 4,
        "main, vCPU, signals, console, control..."
    );
    for task in threads {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        for line in [
            "CapEff:\t0000000000000000",
            "CapBnd:\t0000000000000000",
            "NoNewPrivs:\t1",
        ] {
            assert!(status.contains(line), "{line} missing: {status}");
        }
    }
}

#[test]
fn a_jailed_vmm_joins_the_network_namespace_its_guest_names() {
    let ns = format!("fvjail{}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(added.success(), "ip netns add {ns}");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _remove = Remove(ns.clone());
    let jailed = Jailed::start("netns", &["--netns", &ns]);
    let pid = jailed.vmm_pid();
    let inode = std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino();
    assert_eq!(ns_of(pid, "net"), format!("net:[{inode}]"));
    assert_ne!(ns_of(pid, "net"), ns_of(std::process::id(), "net"));
}

#[test]
fn a_missing_network_namespace_is_one_line_and_nothing_runs() {
    let dir = scratch("nons");
    let kernel = busy_guest();
    let out = ferrovisor(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--jail",
        dir.join("jail").to_str().unwrap(),
        "--netns",
        "fv-no-such-ns",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("network namespace \"fv-no-such-ns\""), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
