//! The daemon's default jail: every guest's VMM runs confined, with a uid
//! of its own from the daemon's range kept across restarts, in its own
//! cgroup, and `info` shows the VMM as the host sees it.

mod common;
mod control;

use control::{echo_description, TestDaemon};
use serde_json::json;

/// A `status` field of /proc/PID/status.
fn status_field(pid: i64, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

fn uid_of(pid: i64) -> u32 {
    status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .expect("uid")
}

fn recorded_uid(d: &TestDaemon, name: &str) -> Option<u64> {
    let path = d.state_dir.join("guests").join(name).join("state.json");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("record")).expect("json");
    record["uid"].as_u64()
}

#[test]
fn the_daemon_starts_every_guest_jailed_by_default() {
    let d = TestDaemon::start();
    d.create_echo("jailed-a", true);
    d.create_echo("jailed-b", true);
    d.wait_console("jailed-a", "ready");
    d.wait_console("jailed-b", "ready");
    let info = d.info("jailed-a");
    let pid = info["pid"].as_i64().expect("pid");
    // The VMM itself, not the waiting parent: pid 1 of its own namespace.
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1")
    );
    let uid = uid_of(pid);
    assert!((100_000..=165_535).contains(&uid), "uid {uid}");
    assert_eq!(recorded_uid(&d, "jailed-a"), Some(u64::from(uid)));
    for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let other = uid_of(d.info("jailed-b")["pid"].as_i64().expect("pid"));
    assert_ne!(uid, other, "each guest has a uid of its own");
    // Host thread ids: each vCPU thread is a task of the VMM.
    let tids = info["vcpu_tids"].as_array().expect("tids");
    assert_eq!(tids.len(), 1, "{info}");
    let tid = tids[0].as_i64().expect("tid");
    assert!(std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists());
    assert!(info["cpu_time_ms"].as_u64().is_some(), "{info}");
    // Its own cgroup, with the limits for 32 MiB and one vCPU.
    let group = cgroup::Hierarchy::detect()
        .and_then(|h| h.guest("jailed-a"))
        .expect("group");
    assert!(group.processes().expect("procs").contains(&(pid as u32)));
    let usage = group.usage();
    assert_eq!(
        usage.memory_limit,
        Some(Some(jail::memory_limit(32 << 20, 1)))
    );
    assert_eq!(usage.pids_limit, Some(Some(jail::pids_limit(1, 0))));
    d.expect("POST", "/guests/jailed-a/kill", None, 200);
    for (_, _, path) in group.paths() {
        assert!(
            !path.exists(),
            "{} left after the VMM ended",
            path.display()
        );
    }
}

#[test]
fn a_guest_keeps_its_uid_across_runs_and_daemon_restarts() {
    let mut d = TestDaemon::start_with(&["--uid-range", "150000-150009"]);
    d.create_echo("keeper", false);
    d.create_echo("second", false);
    assert_eq!(recorded_uid(&d, "keeper"), Some(150_000));
    assert_eq!(recorded_uid(&d, "second"), Some(150_001));
    d.expect("POST", "/guests/keeper/start", None, 200);
    d.wait_console("keeper", "ready");
    let first = uid_of(d.info("keeper")["pid"].as_i64().expect("pid"));
    assert_eq!(first, 150_000);
    d.expect("POST", "/guests/keeper/kill", None, 200);
    d.kill_daemon();
    d.spawn();
    d.expect("POST", "/guests/keeper/start", None, 200);
    d.wait_console("keeper", "ready");
    let again = uid_of(d.info("keeper")["pid"].as_i64().expect("pid"));
    assert_eq!(again, first, "the same uid after a daemon restart");
    // A deleted guest's uid is free for the next one.
    d.expect("POST", "/guests/keeper/kill", None, 200);
    d.expect("DELETE", "/guests/keeper", None, 200);
    d.expect(
        "POST",
        "/guests",
        Some(json!({"name": "third", "config": echo_description()})),
        201,
    );
    assert_eq!(recorded_uid(&d, "third"), Some(150_000));
}

#[test]
fn no_jail_runs_the_vmm_unconfined_for_debugging() {
    let d = TestDaemon::start_with(&["--no-jail"]);
    d.create_echo("loose", true);
    d.wait_console("loose", "ready");
    let pid = d.info("loose")["pid"].as_i64().expect("pid");
    assert_eq!(uid_of(pid), 0);
    assert_ne!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(recorded_uid(&d, "loose"), None);
}

#[test]
fn a_bad_uid_range_is_one_line_and_no_daemon() {
    let out = common::ferrovisor(&[
        "daemon",
        "--uid-range",
        "0-10",
        "--socket",
        "/tmp/fv-none.sock",
    ]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim(),
        "ferrovisor daemon: --uid-range: '0-10' is not a range FIRST-LAST of uids above 0"
    );
}
