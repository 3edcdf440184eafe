//! Scheduling under the daemon: the guest's cgroup and its vCPU threads get
//! the description's policy at start, a change at run time, and both again
//! after the daemon is restarted; real-time admission refuses an
//! overcommitted set and changes nothing.

#![allow(clippy::unwrap_used)]

mod common;
mod control;

use std::path::PathBuf;

use common::*;
use control::{echo_description, TestDaemon};
use serde_json::{json, Value};

/// A guest that idles (halts with interrupts on): a reservation costs
/// nothing while it holds it.
fn idle_description() -> String {
    let kernel = write_temp(
        "idle.elf",
        &multiboot_kernel(0x10_0000, &[], &[0xfb, 0xf4, 0xeb, 0xfd], 0),
    );
    format!(
        "kernel = \"{}\"\nmemory = \"32M\"\ncpus = 1\n",
        kernel.display()
    )
}

/// The guest's v1 cpu group, as the daemon (in the root group) makes it.
fn cpu_group(name: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/cgroup/cpu/ferrovisor/{name}"))
}

fn shares(name: &str) -> String {
    std::fs::read_to_string(cpu_group(name).join("cpu.shares"))
        .unwrap()
        .trim()
        .to_string()
}

fn tid_of(info: &Value) -> i32 {
    info["vcpu_tids"][0].as_i64().unwrap() as i32
}

/// Runs `attempt` again while it fails because the kernel has not yet
/// freed the real-time bandwidth of deadline threads that just ended (it
/// frees it a period after a thread ends, and this host runs other tests),
/// for at most 10 s; returns the last outcome.
fn while_bandwidth_taken(mut attempt: impl FnMut() -> (u16, Value)) -> (u16, Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, body) = attempt();
        let taken = body["error"]
            .as_str()
            .is_some_and(|e| e.contains("deadline reservations hold"));
        if !taken || std::time::Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `ferrovisor up` of system file `text`, then waits for guest `name`.
fn up_and_wait(d: &TestDaemon, text: &str, name: &str) {
    let system = d.dir.join("system.toml");
    std::fs::write(&system, text).unwrap();
    let (status, body) = while_bandwidth_taken(|| {
        let out = d.cli(&["up", system.to_str().unwrap()]);
        let error = String::from_utf8_lossy(&out.stderr).into_owned();
        (u16::from(!out.status.success()), json!({ "error": error }))
    });
    assert_eq!(status, 0, "{body}");
    d.wait_console(name, "ready");
}

fn create(d: &TestDaemon, name: &str, description: String) -> (u16, Value) {
    let body = json!({ "name": name, "config": description, "start": true });
    d.call("POST", "/guests", Some(body))
}

/// The two parts reserve real-time bandwidth, which the kernel shares
/// between deadline threads and real-time groups and frees a period after
/// a thread ends: they run one after the other, the small reservations first.
#[test]
fn scheduling_under_the_daemon() {
    a_pool_of_a_system_file_confines_its_guests_to_its_cpus();
    a_running_guest_moves_into_a_partition_pool_and_out();
    the_policy_reaches_group_and_threads_at_start_after_a_change_and_after_a_restart();
    admission_refuses_an_overcommitted_real_time_set_and_changes_nothing();
}

fn a_pool_of_a_system_file_confines_its_guests_to_its_cpus() {
    let d = TestDaemon::start();
    let name = format!("pooled-{}", std::process::id());
    let text = format!(
        "[pools.rt]\ncpus = \"1\"\npolicy = \"rt\"\n\n[pools.solo]\ncpus = \"0\"\npolicy = \"null\"\n\n\
         [guests.{name}]\n{}[guests.{name}.sched]\npool = \"rt\"\npriority = 7\n",
        echo_description()
    );
    up_and_wait(&d, &text, &name);
    let info = d.info(&name);
    let cpuset = format!("/sys/fs/cgroup/cpuset/ferrovisor/{name}/cpuset.cpus");
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "1");
    let pid = info["pid"].as_i64().unwrap();
    let tid = tid_of(&info);
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(allowed, "1", "the vCPU thread runs only on the pool's CPU");
    let (policy, priority, _, _) = kernel_policy(tid);
    assert_eq!((policy, priority), (1, 7), "SCHED_FIFO 7");
    // Moved at run time into the null pool: the group's cpuset follows and
    // the vCPU is pinned to the pool's free CPU; the class stays.
    let out = d.cli(&["sched", &name, "--pool", "solo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "0");
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    assert!(status.contains("Cpus_allowed_list:\t0\n"), "{status}");
    assert_eq!(kernel_policy(tid).0, 1);
    assert_eq!(d.info(&name)["sched"]["vcpus"][0]["affinity"], "0");
    // A deadline reservation cannot be pinned: refused, and nothing moves.
    let out = d.cli(&["sched", &name, "--pool", "rt", "--rt", "1ms/10ms"]);
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "0");
    // And back into the rt pool: unpinned, on that pool's CPU.
    let out = d.cli(&["sched", &name, "--pool", "rt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "1");
    assert_eq!(d.info(&name)["sched"]["vcpus"][0]["affinity"], "1");
    assert_eq!(kernel_policy(tid).0, 1);
    // A pool nobody defined: one line, and the guest stays where it is.
    let out = d.cli(&["sched", &name, "--pool", "nowhere"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no pool 'nowhere'"), "{err}");
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "1");
    d.expect("POST", &format!("/guests/{name}/kill"), None, 200);
}

fn a_running_guest_moves_into_a_partition_pool_and_out() {
    let d = TestDaemon::start();
    let name = format!("parted-{}", std::process::id());
    let text = format!(
        "[pools.frame]\ncpus = \"0\"\npolicy = \"partition\"\nframe = \"20ms\"\n\n\
         [pools.rt]\ncpus = \"1\"\npolicy = \"rt\"\n\n\
         [guests.{name}]\n{}[guests.{name}.sched]\npool = \"rt\"\npriority = 7\n",
        echo_description()
    );
    up_and_wait(&d, &text, &name);
    assert!(d.info(&name)["sched"]["partition"].is_null());
    let cpuset = format!("/sys/fs/cgroup/cpuset/ferrovisor/{name}/cpuset.cpus");
    // Into the partition pool, with no windows: one line, nothing moves.
    let out = d.cli(&["sched", &name, "--pool", "frame"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("windows:"), "{err}");
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "1");
    // With windows past the frame: the same.
    let out = d.cli(&["sched", &name, "--pool", "frame", "--windows", "15ms+10ms"]);
    assert!(!out.status.success());
    // With a window in its frame: on the pool's CPU, gated to 5 ms in 20.
    let out = d.cli(&["sched", &name, "--pool", "frame", "--windows", "5ms+5ms"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "0");
    let partition = d.info(&name)["sched"]["partition"].clone();
    assert_eq!(partition["share"], 0.25, "{partition}");
    assert_eq!(partition["frame_ns"], 20_000_000, "{partition}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.info(&name)["sched"]["partition"]["windows"]
        .as_u64()
        .unwrap_or(0)
        < 20
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the gate opened no window"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Back into the rt pool: its windows end.
    let out = d.cli(&["sched", &name, "--pool", "rt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.info(&name)["sched"]["partition"].is_null());
    assert_eq!(std::fs::read_to_string(&cpuset).unwrap().trim(), "1");
    d.expect("POST", &format!("/guests/{name}/kill"), None, 200);
}

fn the_policy_reaches_group_and_threads_at_start_after_a_change_and_after_a_restart() {
    let mut d = TestDaemon::start();
    let name = format!("sc-{}", std::process::id());
    let description = format!(
        "{}[sched]\nweight = 300\nrt = \"1ms/10ms\"\n",
        echo_description()
    );
    let (status, body) = create(&d, &name, description);
    assert_eq!(status, 201, "{body}");
    d.wait_console(&name, "ready");
    let info = d.info(&name);
    let pid = info["pid"].as_i64().unwrap();
    let procs = std::fs::read_to_string(cpu_group(&name).join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l == pid.to_string()),
        "VMM {pid} in {procs}"
    );
    assert_eq!(shares(&name), "3072");
    assert_eq!(
        kernel_policy(tid_of(&info)),
        (SCHED_DEADLINE, 0, 1_000_000, 10_000_000)
    );
    assert_eq!(
        info["sched"]["vcpus"][0]["kernel_policy"], "deadline 1ms/10ms",
        "{info}"
    );

    // top shows what the policy promises beside what the vCPU received.
    let out = d.cli(&["top", "--once", "--json"]);
    let top: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = top["guests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name.as_str())
        .cloned()
        .unwrap();
    assert_eq!(row["promised_percent"], 10.0, "{row}");
    assert!(row["vcpu_percent"].is_number(), "{row}");
    assert!(row["overruns"].is_u64(), "{row}");
    assert!(row["deadline_misses"].is_u64(), "{row}");

    let change = json!({ "weight": 500, "priority": 5, "policy": "rr" });
    let path = format!("/guests/{name}/sched");
    let (status, body) = while_bandwidth_taken(|| d.call("POST", &path, Some(change.clone())));
    assert_eq!(status, 200, "{body}");
    assert_eq!(shares(&name), "5120");
    assert_eq!(kernel_policy(tid_of(&info)).0, SCHED_RR);

    let (status, body) = d.call(
        "POST",
        &format!("/guests/{name}/sched"),
        Some(json!({ "rt": "20ms/10ms" })),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request body: rt: "),
        "{body}"
    );
    let (status, body) = d.call(
        "POST",
        &format!("/guests/{name}/sched"),
        Some(json!({ "weight": 0 })),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request body: weight: "),
        "{body}"
    );
    assert_eq!(
        shares(&name),
        "5120",
        "a refused change leaves the old policy"
    );
    assert_eq!(kernel_policy(tid_of(&info)).1, 5);

    // The CLI: a change, and a bad value refused in one line naming it.
    let out = d.cli(&["sched", &name, "--weight", "500"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("vcpu 0") && shown.contains("rr:5"),
        "{shown}"
    );
    let out = d.cli(&["sched", &name, "--cap", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cap: 0 is not a per cent"), "{err}");

    // While no daemon runs, something else resets the group and the thread;
    // the restarted daemon gives them their policy again.
    d.kill_daemon();
    std::fs::write(cpu_group(&name).join("cpu.shares"), "1024").unwrap();
    let attr = [48u64 | (u64::from(SCHED_OTHER) << 32), 0, 0, 0, 0, 0];
    // SAFETY: `attr` is a valid 48-byte sched_attr.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid_of(&info), attr.as_ptr(), 0u32) };
    assert_eq!(rc, 0);
    d.spawn();
    let again = d.wait_state(&name, "running");
    assert_eq!(shares(&name), "5120", "{again}");
    let (policy, priority, _, _) = kernel_policy(tid_of(&info));
    assert_eq!((policy, priority), (SCHED_RR, 5));

    d.expect("POST", &format!("/guests/{name}/kill"), None, 200);
    assert!(!cpu_group(&name).exists(), "the group goes with the VMM");
    let (status, _) = d.call(
        "POST",
        &format!("/guests/{name}/sched"),
        Some(json!({ "weight": 5 })),
    );
    assert_eq!(status, 409, "a stopped guest has no scheduling to change");
}

fn admission_refuses_an_overcommitted_real_time_set_and_changes_nothing() {
    let d = TestDaemon::start();
    let tag = std::process::id();
    let (big, small, late) = (
        format!("big-{tag}"),
        format!("small-{tag}"),
        format!("late-{tag}"),
    );
    let (status, body) = create(
        &d,
        &big,
        format!("{}[sched]\nrt = \"95ms/100ms\"\n", idle_description()),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = create(
        &d,
        &small,
        format!("{}[sched]\nrt = \"10ms/100ms\"\n", idle_description()),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        vmm::vcpu::available_host_cpus().len(),
        2,
        "this test assumes a 2-CPU host"
    );

    // A third guest would take the set past the host's capacity.
    let (status, body) = create(
        &d,
        &late,
        format!("{}[sched]\nrt = \"90ms/100ms\"\n", idle_description()),
    );
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("this host admits"), "{error}");
    for guest in [&big, &small, &late] {
        assert!(error.contains(guest.as_str()), "{guest} not named: {error}");
    }
    assert!(
        error.contains("0.95") && error.contains("0.10") && error.contains("0.90"),
        "{error}"
    );
    assert!(error.ends_with("; the guest was not created"), "{error}");
    d.expect("GET", &format!("/guests/{late}"), None, 404);
    assert!(!cpu_group(&late).exists(), "a refused guest gets no group");

    // Growing a running reservation past it is refused the same way.
    let tid = tid_of(&d.info(&small));
    let (status, body) = d.call(
        "POST",
        &format!("/guests/{small}/sched"),
        Some(json!({ "rt": "99ms/100ms" })),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the old policy stays"),
        "{body}"
    );
    assert_eq!(
        kernel_policy(tid),
        (SCHED_DEADLINE, 0, 10_000_000, 100_000_000)
    );
    let tid_big = tid_of(&d.info(&big));
    assert_eq!(
        kernel_policy(tid_big),
        (SCHED_DEADLINE, 0, 95_000_000, 100_000_000)
    );

    // Once the big one stops, the third fits.
    d.expect("POST", &format!("/guests/{big}/kill"), None, 200);
    let late_description = format!("{}[sched]\nrt = \"90ms/100ms\"\n", idle_description());
    let (status, body) = create(&d, &late, late_description);
    assert_eq!(status, 201, "{body}");
    for guest in [&small, &late] {
        d.expect("POST", &format!("/guests/{guest}/kill"), None, 200);
    }
}
