//! Host KVM tests of seccomp: every thread of a running VMM is filtered
//! (and none with `--seccomp off`), a call outside a thread's filter ends
//! the VMM with status 148 and a line naming the call, and the daemon shows
//! such a guest as crashed with that line as the reason.
//!
//! The calls outside the filters come from a hook compiled only into test
//! builds (`FERROVISOR_TEST_SECCOMP_VIOLATION=KIND`): the first thread of
//! that kind calls `personality(0xffffffff)` right after its filter is in.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "control/mod.rs"]
mod control;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use control::{echo_kernel, TestDaemon};

const HOOK: &str = "FERROVISOR_TEST_SECCOMP_VIOLATION";
const LIMIT: Duration = Duration::from_secs(60);

/// A runtime directory of its own (short: socket paths are short).
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/fvsc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The echo guest under `--runtime-dir`, with a virtio console and an rng
/// so that device threads exist too; `extra` flags and `env` added.
fn spawn(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--kernel", echo_kernel().to_str().unwrap()])
        .args(["--memory", "32M", "--console", "virtio", "--rng"])
        .arg("--runtime-dir")
        .arg(dir)
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to end within [`LIMIT`], killing it if it does not.
fn wait(mut child: Child) -> Output {
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the VMM did not end: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// One field of a `/proc/.../status` file.
fn status_field(path: &Path, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

/// Every thread of `pid`: its name and its `Seccomp` and
/// `Seccomp_filters` fields.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = entry.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = task.join("status");
        let mode = status_field(&status, "Seccomp").unwrap_or_default();
        let filters = status_field(&status, "Seccomp_filters").unwrap_or_default();
        out.push((name.trim().to_string(), mode, filters));
    }
    out.sort();
    out
}

/// Starts the guest and waits until its threads all show seccomp `mode`
/// (the main thread installs its filter just after the vCPUs start), then
/// returns them and stops the VMM.
fn running_threads(name: &str, extra: &[&str], mode: &str) -> Vec<(String, String, String)> {
    let dir = scratch(name);
    let mut child = spawn(&dir, extra, &[]);
    let deadline = Instant::now() + LIMIT;
    let seen = loop {
        let seen = threads(child.id());
        // virtio-console's output thread starts when the guest activates
        // the device (through the launcher, filtered); this guest does not.
        let expected = ["vcpu", "control", "console"];
        let started = expected.iter().all(|n| seen.iter().any(|t| t.0 == *n));
        if started && seen.iter().all(|t| t.1 == mode) {
            break seen;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("threads never all showed Seccomp {mode}: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_by_default() {
    let seen = running_threads("on", &[], "2");
    let main_pid_name = "ferrovisor";
    for kind in [main_pid_name, "vcpu", "signals", "control", "console"] {
        assert!(
            seen.iter().any(|t| t.0 == kind),
            "no {kind} thread: {seen:?}"
        );
    }
    // Device threads start from the launcher when the guest activates a
    // device (this guest activates none), and narrow its filter at once.
    let by_name: BTreeMap<&str, &str> = seen.iter().map(|t| (t.0.as_str(), t.2.as_str())).collect();
    assert_eq!(by_name["device-launcher"], "1", "{seen:?}");
    assert_eq!(by_name["vcpu"], "1", "{seen:?}");
    assert_eq!(by_name[main_pid_name], "1", "{seen:?}");
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let seen = running_threads("off", &["--seccomp", "off"], "0");
    assert!(seen.iter().all(|t| t.2 == "0"), "{seen:?}");
    assert!(
        !seen.iter().any(|t| t.0 == "device-launcher"),
        "no launcher without filters: {seen:?}"
    );
}

/// The hook set for `kind`: the VMM ends with 148 and the line naming the
/// call and the thread.
fn blocked(kind: &str, line_kind: &str) {
    let dir = scratch(&format!("hook-{}", kind));
    let out = wait(spawn(&dir, &[], &[(HOOK, kind)]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(148), "{kind}: {err}");
    let line =
        format!("ferrovisor: seccomp blocked syscall personality (135) in a {line_kind} thread\n");
    assert!(err.ends_with(&line), "{kind}: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_call_outside_a_vcpu_filter_ends_the_vmm_with_status_148_naming_it() {
    blocked("vcpu", "vcpu");
}

#[test]
fn a_call_outside_the_main_filter_ends_the_vmm() {
    blocked("main", "main");
}

#[test]
fn a_call_outside_a_device_worker_filter_ends_the_vmm() {
    blocked("worker", "device worker");
}

#[test]
fn a_call_outside_the_launcher_filter_ends_the_vmm() {
    blocked("launcher", "device launcher");
}

#[test]
fn a_call_outside_the_control_or_console_filters_ends_the_vmm() {
    blocked("control", "control");
    blocked("console", "console");
}

/// A guest that writes 0x10 to the debug-exit port: status 0x21.
fn exiting_guest_run(mode: &str) -> Output {
    let code = Asm::default().debug_exit(0x10).finish();
    let kernel = write_temp("sc-exit.elf", &multiboot_kernel(0x10_0000, &[], &code, 0));
    let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--seccomp", mode, "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .env(HOOK, "vcpu")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(child)
}

#[test]
fn without_filters_or_in_log_mode_the_same_call_goes_through() {
    for mode in ["off", "log"] {
        let out = exiting_guest_run(mode);
        assert_eq!(out.status.code(), Some(0x21), "{mode}: {}", stderr(&out));
        assert!(!stderr(&out).contains("seccomp blocked"), "{mode}");
    }
    let out = exiting_guest_run("on");
    assert_eq!(out.status.code(), Some(148), "{}", stderr(&out));
}

#[test]
fn the_daemon_shows_a_guest_that_seccomp_ended_as_crashed_with_the_call() {
    let d = TestDaemon::start_with_env(&[(HOOK, "vcpu")]);
    d.create_echo("victim", false);
    // The start may see the VMM end before it answers; either way the
    // guest ends crashed.
    let _ = d.call("POST", "/guests/victim/start", None);
    let info = d.wait_state("victim", "crashed");
    let reason = "seccomp blocked syscall personality (135) in a vcpu thread";
    assert_eq!(info["exit"]["reason"], reason, "{info}");
    assert_eq!(info["exit"]["status"], 148, "{info}");
    let out = d.cli(&["info", "victim"]);
    let text = stdout(&out);
    assert!(text.contains("crashed"), "{text}");
    assert!(text.contains(reason), "{text}");
}
