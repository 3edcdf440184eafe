//! The control daemon on the host's KVM: `ferrovisor daemon` in a fresh
//! state directory, tiny guests, the HTTP/JSON API (every response checked
//! against docs/api/openapi.json) and the CLI.

mod common;
mod control;

use std::io::{Read, Write};
use std::time::Instant;

use control::{echo_description, TestDaemon, LIMIT};
use serde_json::{json, Value};

/// Every action on a guest, and whether it is allowed in `state`.
fn allowed(action: &str, state: &str) -> bool {
    match action {
        "start" => matches!(state, "created" | "stopped" | "crashed"),
        "pause" => state == "running",
        "resume" => state == "paused",
        "stop" | "kill" => matches!(state, "running" | "paused"),
        _ => unreachable!(),
    }
}

/// Every action not allowed in `state` is refused with 409 and changes
/// nothing.
fn refused_in(d: &TestDaemon, name: &str, state: &str) {
    for action in ["start", "pause", "resume", "stop", "kill"] {
        if allowed(action, state) {
            continue;
        }
        let (status, body) = d.call("POST", &format!("/guests/{name}/{action}"), None);
        assert_eq!(status, 409, "{action} in {state}: {body}");
        let message = body["error"].as_str().unwrap_or("");
        assert!(message.contains(state), "{action}: {message}");
        assert_eq!(d.info(name)["state"], state, "{action} changed the state");
    }
    if matches!(state, "running" | "paused") {
        let (status, _) = d.call("DELETE", &format!("/guests/{name}"), None);
        assert_eq!(status, 409, "delete in {state}");
    }
}

#[test]
fn every_transition_is_allowed_or_refused_with_409() {
    let d = TestDaemon::start();
    let created = d.create_echo("one", false);
    assert_eq!(created["state"], "created");
    assert_eq!(created["vcpus"], 1);
    assert_eq!(created["memory_bytes"], 32 << 20);
    refused_in(&d, "one", "created");

    let started = d.expect("POST", "/guests/one/start", None, 200);
    assert_eq!(started["state"], "running");
    d.wait_console("one", "ready");
    refused_in(&d, "one", "running");

    d.expect("POST", "/guests/one/pause", None, 200);
    assert_eq!(d.info("one")["state"], "paused");
    refused_in(&d, "one", "paused");

    d.expect("POST", "/guests/one/resume", None, 200);
    assert_eq!(d.info("one")["state"], "running");

    let killed = d.expect("POST", "/guests/one/kill", None, 200);
    assert_eq!(killed["state"], "stopped", "{killed}");
    refused_in(&d, "one", "stopped");

    // A stopped guest starts again.
    d.expect("POST", "/guests/one/start", None, 200);
    d.wait_state("one", "running");
    d.expect("POST", "/guests/one/kill", None, 200);

    let deleted = d.expect("DELETE", "/guests/one", None, 200);
    assert_eq!(deleted, json!({"name": "one", "state": "deleted"}));
    d.expect("GET", "/guests/one", None, 404);
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
}

#[test]
fn a_running_guest_reports_its_vcpu_threads_exits_and_cpu_time() {
    let d = TestDaemon::start();
    d.create_echo("busy", true);
    d.wait_console("busy", "ready");
    let info = d.info("busy");
    let pid = info["pid"].as_i64().expect("pid");
    let tids = info["vcpu_tids"].as_array().expect("vcpu tids");
    assert_eq!(tids.len(), 1, "{info}");
    let tid = tids[0].as_i64().expect("tid");
    assert!(
        std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
        "vCPU thread {tid} is not a thread of {pid}"
    );
    assert!(info["exits"].as_u64().expect("exits") > 0, "{info}");
    assert!(info["cpu_time_ms"].as_u64().is_some(), "{info}");
    assert!(info["uptime_ms"].as_u64().is_some(), "{info}");
    assert!(info["config"]
        .as_str()
        .expect("config")
        .contains("echo.elf"));
}

#[test]
fn cpu_features_in_a_description_reach_the_guest() {
    let d = TestDaemon::start();
    let config = format!("{}\n[cpu]\nfeatures = [\"-x2apic\"]\n", echo_description());
    let body = json!({ "name": "lean", "config": config, "start": true });
    d.expect("POST", "/guests", Some(body), 201);
    d.wait_console("lean", "ready");
    let info = d.info("lean");
    let stored = info["config"].as_str().expect("config");
    assert!(
        stored.contains("[cpu]\nfeatures = [\"-x2apic\"]"),
        "{stored}"
    );
    // A feature the host cannot give fails the start with the VMM's reason.
    let config = format!(
        "{}\n[cpu]\nfeatures = [\"+{}\"]\n",
        echo_description(),
        missing_feature()
    );
    let body = json!({ "name": "greedy", "config": config, "start": true });
    let (status, reply) = d.call("POST", "/guests", Some(body));
    assert_eq!(status, 500, "{reply}");
    let message = reply["error"].as_str().expect("error");
    assert!(
        message.contains("this host's KVM does not support that feature"),
        "{message}"
    );
}

/// A feature this host's KVM does not offer.
fn missing_feature() -> &'static str {
    let cpuid = vmm::cpu::open_host_cpuid().expect("the host's CPUID");
    vmm::cpu::FEATURES
        .iter()
        .find(|f| !f.present_in(cpuid.as_slice()))
        .expect("a feature this host lacks")
        .name
}

#[test]
fn two_guests_run_at_once_and_are_listed() {
    let d = TestDaemon::start();
    d.create_echo("left", true);
    d.create_echo("right", true);
    d.wait_console("left", "ready");
    d.wait_console("right", "ready");
    let list = d.expect("GET", "/guests", None, 200);
    let guests = list["guests"].as_array().expect("guests");
    let names: Vec<&str> = guests.iter().filter_map(|g| g["name"].as_str()).collect();
    assert_eq!(names, ["left", "right"]);
    assert!(guests.iter().all(|g| g["state"] == "running"), "{list}");
    assert_ne!(guests[0]["pid"], guests[1]["pid"]);
    // One guest's end leaves the other running.
    d.expect("POST", "/guests/left/kill", None, 200);
    assert_eq!(d.info("right")["state"], "running");
}

#[test]
fn a_guest_process_killed_from_outside_shows_crashed_with_its_reason() {
    let d = TestDaemon::start();
    d.create_echo("victim", true);
    d.wait_console("victim", "ready");
    let client = daemon::Client::new(&d.socket);
    let mut events = client.events().expect("subscribe");
    events
        .stream()
        .set_read_timeout(Some(LIMIT))
        .expect("timeout");
    let pid = d.info("victim")["pid"].as_i64().expect("pid") as i32;
    daemon::process::signal(pid, libc::SIGKILL);
    let info = d.wait_state("victim", "crashed");
    assert_eq!(info["exit"]["reason"], "killed by signal 9", "{info}");
    assert_eq!(info["pid"], Value::Null);
    let event = events.next_event().expect("event").expect("stream open");
    control::openapi::check_event(&event).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(event["event"], "crashed", "{event}");
    assert_eq!(event["reason"], "killed by signal 9", "{event}");
}

#[test]
fn concurrent_operations_on_one_guest_are_serialized() {
    let d = TestDaemon::start();
    d.create_echo("contended", true);
    d.wait_console("contended", "ready");
    let statuses = at_once(6, || d.call("POST", "/guests/contended/pause", None).0);
    assert_eq!(count(&statuses, 200), 1, "{statuses:?}");
    assert_eq!(count(&statuses, 409), 5, "{statuses:?}");
    assert_eq!(d.info("contended")["state"], "paused");
}

#[test]
fn a_restarted_daemon_readopts_running_guests_and_sees_those_that_died() {
    let mut d = TestDaemon::start();
    d.create_echo("stays", true);
    d.create_echo("dies", true);
    d.create_echo("idle", false);
    d.create_echo("frozen", true);
    d.wait_console("stays", "ready");
    d.wait_console("dies", "ready");
    d.wait_console("frozen", "ready");
    d.expect("POST", "/guests/frozen/pause", None, 200);
    let stays_pid = d.info("stays")["pid"].clone();
    let dies_pid = d.info("dies")["pid"].as_i64().expect("pid") as i32;
    // Each guest was given its own SMBIOS UUID at create.
    let uuid = |d: &TestDaemon, name: &str| -> String {
        let info = d.info(name);
        let config = info["config"].as_str().expect("config");
        config
            .lines()
            .find_map(|l| l.strip_prefix("uuid = "))
            .unwrap_or_else(|| panic!("no uuid in {config}"))
            .to_string()
    };
    let idle_uuid = uuid(&d, "idle");
    assert_ne!(idle_uuid, uuid(&d, "stays"));

    d.kill_daemon();
    daemon::process::signal(dies_pid, libc::SIGKILL);
    d.spawn();
    assert_eq!(uuid(&d, "idle"), idle_uuid, "the UUID survives a restart");

    let stays = d.info("stays");
    assert_eq!(stays["state"], "running", "{stays}");
    assert_eq!(stays["pid"], stays_pid);
    let dies = d.wait_state("dies", "crashed");
    // The jailed VMM's waiting parent recorded how it ended.
    assert_eq!(dies["exit"]["reason"], "killed by signal 9");
    assert_eq!(d.info("idle")["state"], "created");
    assert_eq!(d.info("frozen")["state"], "paused");
    d.expect("POST", "/guests/frozen/resume", None, 200);
    assert_eq!(d.info("frozen")["state"], "running");

    // The adopted guest is under control: pause, resume, and its end is seen.
    d.expect("POST", "/guests/stays/pause", None, 200);
    assert_eq!(d.info("stays")["state"], "paused");
    d.expect("POST", "/guests/stays/resume", None, 200);
    d.wait_console("stays", "ready");
    let killed = d.expect("POST", "/guests/stays/kill", None, 200);
    assert_eq!(killed["state"], "stopped", "{killed}");
    assert_eq!(killed["exit"]["reason"], "killed on request");
}

#[test]
fn an_adopted_guest_that_dies_later_shows_crashed() {
    let mut d = TestDaemon::start();
    d.create_echo("later", true);
    d.wait_console("later", "ready");
    let pid = d.info("later")["pid"].as_i64().expect("pid") as i32;
    d.kill_daemon();
    d.spawn();
    assert_eq!(d.info("later")["state"], "running");
    daemon::process::signal(pid, libc::SIGKILL);
    let info = d.wait_state("later", "crashed");
    // The jailed VMM's waiting parent recorded how it ended.
    assert_eq!(info["exit"]["reason"], "killed by signal 9");
}

#[test]
fn stop_falls_back_to_stopping_the_vmm_when_the_guest_ignores_ctrl_alt_del() {
    let d = TestDaemon::start();
    d.create_echo("stubborn", true);
    d.wait_console("stubborn", "ready");
    let stopped = d.expect("POST", "/guests/stubborn/stop?timeout=1", None, 200);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_ne!(stopped["stopped_by"], "shutdown", "{stopped}");
    assert!(stopped["exit"]["reason"].is_string(), "{stopped}");
    // A paused guest is stopped the same way.
    d.expect("POST", "/guests/stubborn/start", None, 200);
    d.wait_state("stubborn", "running");
    d.expect("POST", "/guests/stubborn/pause", None, 200);
    let stopped = d.expect("POST", "/guests/stubborn/stop?timeout=0", None, 200);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
}

#[test]
fn bad_descriptions_and_bodies_get_400_and_change_nothing() {
    let d = TestDaemon::start();
    d.create_echo("keep", false);
    let before = d.expect("GET", "/guests", None, 200);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "x", "config": "cpus = 2\n"}), "kernel"),
        (
            json!({"name": "x", "config": format!("{}memory = \"12X\"\n", "kernel = \"/k\"\n")}),
            "memory",
        ),
        (
            json!({"name": "x", "config": "kernel = \"/k\"\ncpus = 999\n"}),
            "cpus",
        ),
        (
            json!({"name": "x", "config": "kernel = \"/k\"\nbogus = 1\n"}),
            "bogus",
        ),
        (json!({"name": "x", "config": "kernel = [\n"}), "line"),
        (
            json!({"name": "x", "config": "kernel = \"/k\"\n[cpu]\nfeatures = [\"+warp\"]\n"}),
            "cpu.features: 'warp' is not a CPU feature",
        ),
        (
            json!({"name": "Bad Name", "config": echo_description()}),
            "'Bad Name' is not a guest name (1 to 32 characters: a-z, 0-9 and -)",
        ),
        (
            json!({"name": "../x", "config": echo_description()}),
            "'../x' is not a guest name (1 to 32 characters: a-z, 0-9 and -)",
        ),
        (json!({"config": echo_description()}), "name"),
        (
            json!({"name": "x", "config": echo_description(), "extra": 1}),
            "extra",
        ),
        (json!({"name": "x", "config": 5}), "config"),
        (json!([1, 2]), "body"),
    ];
    for (body, word) in cases {
        let (status, reply) = d.call("POST", "/guests", Some(body.clone()));
        assert_eq!(status, 400, "{body}: {reply}");
        let message = reply["error"].as_str().expect("error message");
        assert!(message.contains(word), "{body}: {message}");
        assert!(!message.contains('\n'), "{message}");
    }
    // Not JSON at all.
    let reply = d.raw_exchange(b"POST /guests HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // A bad stop timeout.
    d.expect("POST", "/guests/keep/stop?timeout=soon", None, 400);
    assert_eq!(d.expect("GET", "/guests", None, 200), before);
    assert_eq!(d.guest_dirs(), ["keep"]);
    // A name taken already is a conflict.
    let (status, reply) = d.call(
        "POST",
        "/guests",
        Some(json!({"name": "keep", "config": echo_description()})),
    );
    assert_eq!(status, 409, "{reply}");
}

#[test]
fn an_unknown_guest_is_404_everywhere() {
    let d = TestDaemon::start();
    d.expect("GET", "/guests/ghost", None, 404);
    d.expect("DELETE", "/guests/ghost", None, 404);
    d.expect("GET", "/guests/ghost/console", None, 404);
    for action in ["start", "pause", "resume", "stop", "kill"] {
        let reply = d.expect("POST", &format!("/guests/ghost/{action}"), None, 404);
        assert!(reply["error"].as_str().expect("error").contains("ghost"));
    }
    let client = daemon::Client::new(&d.socket);
    match client.attach("ghost") {
        Err(daemon::ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("attach to an unknown guest: {other:?}"),
    }
}

#[test]
fn malformed_http_gets_an_error_and_the_daemon_carries_on() {
    let d = TestDaemon::start();
    for garbage in [
        &b"NONSENSE\r\n\r\n"[..],
        b"GET /guests HTTP/9.9\r\n\r\n",
        b"GET /guests HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /guests HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /guests HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"\xff\xfe\r\n\r\n",
    ] {
        let reply = d.raw_exchange(garbage);
        assert!(reply.starts_with("HTTP/1.1 400"), "{garbage:?}: {reply}");
    }
    let reply = d.raw_exchange(b"POST /guests HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // A client that goes away mid-body leaves no guest behind.
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    let body = json!({"name": "half", "config": echo_description()}).to_string();
    let head = format!(
        "POST /guests HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(&body.as_bytes()[..body.len() / 2])
        .expect("send");
    drop(s);
    d.expect("GET", "/guests/half", None, 404);
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
    // Wrong method and unknown path.
    d.expect("PUT", "/guests", None, 405);
    d.expect("POST", "/guests/x/dance", None, 404);
    // Still serving.
    d.create_echo("after", false);
}

#[test]
fn concurrent_creates_of_one_name_make_one_guest() {
    let d = TestDaemon::start();
    let statuses = at_once(8, || {
        let body = json!({"name": "race", "config": echo_description()});
        d.call("POST", "/guests", Some(body)).0
    });
    assert_eq!(count(&statuses, 201), 1, "{statuses:?}");
    assert_eq!(count(&statuses, 409), 7, "{statuses:?}");
    assert_eq!(d.guest_dirs(), ["race"]);
}

#[test]
fn the_event_stream_shows_each_transition() {
    let d = TestDaemon::start();
    let client = daemon::Client::new(&d.socket);
    let mut events = client.events().expect("subscribe");
    events
        .stream()
        .set_read_timeout(Some(LIMIT))
        .expect("timeout");
    d.create_echo("watched", true);
    d.wait_console("watched", "ready");
    d.expect("POST", "/guests/watched/pause", None, 200);
    d.expect("POST", "/guests/watched/resume", None, 200);
    d.expect("POST", "/guests/watched/kill", None, 200);
    d.expect("DELETE", "/guests/watched", None, 200);
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("deleted") {
        let event = events.next_event().expect("event").expect("stream open");
        control::openapi::check_event(&event).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(event["guest"], "watched");
        seen.push(event["event"].as_str().expect("event").to_string());
    }
    assert_eq!(
        seen,
        ["created", "started", "paused", "resumed", "stopped", "deleted"]
    );
}

#[test]
fn console_log_and_attach_carry_the_guest_console() {
    let d = TestDaemon::start();
    d.create_echo("chatty", true);
    d.wait_console("chatty", "ready");
    let client = daemon::Client::new(&d.socket);
    let (mut from, mut to) = client.attach("chatty").expect("attach");
    from.get_ref()
        .set_read_timeout(Some(LIMIT))
        .expect("timeout");
    to.write_all(b"ping!").expect("send");
    let mut got = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while !String::from_utf8_lossy(&got).contains("ping!") {
        assert!(Instant::now() < deadline, "no echo: {got:?}");
        let mut buf = [0u8; 64];
        let n = from.read(&mut buf).expect("read");
        assert!(n > 0, "console closed: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    drop((from, to));
    // Detaching leaves the guest running; the echo is in the log.
    assert_eq!(d.info("chatty")["state"], "running");
    d.wait_console("chatty", "ping!");
    let tail = client.console_log("chatty", Some(3)).expect("tail");
    assert_eq!(tail, b"ng!");
    d.expect("GET", "/guests/chatty/console?tail=lots", None, 400);
    // Attaching needs the upgrade headers.
    let reply = d.expect("GET", "/guests/chatty/console/attach", None, 400);
    assert!(reply["error"].as_str().expect("error").contains("Upgrade"));
    // No console to attach to once the guest has stopped.
    d.expect("POST", "/guests/chatty/kill", None, 200);
    match client.attach("chatty") {
        Err(daemon::ClientError::Api { status, .. }) => assert_eq!(status, 409),
        other => panic!("attach to a stopped guest: {other:?}"),
    }
}

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_cli_drives_the_daemon_and_its_json_parses() {
    let d = TestDaemon::start();
    let file = d.dir.join("cli-guest.toml");
    std::fs::write(&file, echo_description()).expect("write");
    let file = file.to_str().expect("utf-8");
    let created = stdout_json(&d.cli(&["create", file, "--name", "cli", "--json"]));
    assert_eq!(created["state"], "created");
    let out = d.cli(&["start", "cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_console("cli", "ready");
    let list = stdout_json(&d.cli(&["list", "--json"]));
    assert_eq!(list["guests"][0]["state"], "running");
    let info = stdout_json(&d.cli(&["info", "cli", "--json"]));
    assert_eq!(info["name"], "cli");
    let top = stdout_json(&d.cli(&["top", "--once", "--json"]));
    assert_eq!(top["guests"][0]["name"], "cli");
    assert!(top["guests"][0]["cpu_percent"].is_number(), "{top}");
    assert!(top["guests"][0]["exits_per_sec"].is_number(), "{top}");
    let table = d.cli(&["list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("cli"));
    let log = d.cli(&["console", "cli", "--log"]);
    assert!(String::from_utf8_lossy(&log.stdout).contains("ready"));
    // Errors are one line and a non-zero status.
    for args in [
        &["pause", "nobody"][..],
        &["delete", "cli"],
        &["create", "/nonexistent.toml"],
        &["info"],
    ] {
        let out = d.cli(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let out = d.cli(&["kill", "cli", "--json"]);
    assert_eq!(stdout_json(&out)["state"], "stopped");
}

#[test]
fn up_creates_a_system_and_starts_the_guests_marked_for_boot() {
    let d = TestDaemon::start();
    let guest = d.dir.join("echo.toml");
    std::fs::write(&guest, echo_description()).expect("write");
    let system = d.dir.join("system.toml");
    std::fs::write(
        &system,
        "[guests.first]\nfile = \"echo.toml\"\n\n[guests.second]\nfile = \"echo.toml\"\nstart = \"held\"\n",
    )
    .expect("write");
    let out = d.cli(&["up", system.to_str().expect("utf-8"), "--json"]);
    let up = stdout_json(&out);
    assert_eq!(up["guests"].as_array().expect("guests").len(), 2);
    d.wait_console("first", "ready");
    assert_eq!(d.info("first")["state"], "running");
    assert_eq!(d.info("second")["state"], "created");
    // Up again: nothing is created twice; a stopped boot guest starts.
    d.expect("POST", "/guests/first/kill", None, 200);
    let again = stdout_json(&d.cli(&["up", system.to_str().expect("utf-8"), "--json"]));
    assert_eq!(again["guests"][0]["state"], "running", "{again}");
    assert_eq!(again["guests"][1]["state"], "created", "{again}");
    assert_eq!(d.guest_dirs(), ["first", "second"]);
    // A system with a bad guest creates nothing.
    let bad = d.dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[guests.third]\nfile = \"echo.toml\"\n\n[guests.fourth]\nkernel = \"/k\"\ncpus = 0\n",
    )
    .expect("write");
    let out = d.cli(&["up", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpus"));
    d.expect("GET", "/guests/third", None, 404);
}

/// The ports of switch `name` as the daemon shows them.
fn ports(d: &TestDaemon, name: &str) -> Vec<Value> {
    let shown = d.expect("GET", &format!("/switches/{name}"), None, 200);
    shown["ports"].as_array().cloned().unwrap_or_default()
}

/// Waits until `ok` holds for switch `name`'s ports.
fn wait_ports(d: &TestDaemon, name: &str, what: &str, ok: impl Fn(&[Value]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = ports(d, name);
        if ok(&now) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {what}: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn up_runs_a_systems_switch_and_each_switched_guest_gets_a_port_that_goes_with_it() {
    let mut d = TestDaemon::start();
    let guest = format!(
        "{}\n[[net]]\nswitch = \"lan\"\nvlan = 10\n",
        echo_description()
    );
    std::fs::write(d.dir.join("switched.toml"), guest).expect("write");
    let system = d.dir.join("system.toml");
    std::fs::write(
        &system,
        "[switches.lan]\nmode = \"bridge\"\n\n[guests.sw]\nfile = \"switched.toml\"\n",
    )
    .expect("write");
    let out = d.cli(&["up", system.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("switch lan: bridge"));
    d.wait_console("sw", "ready");
    // The VMM connected to its port: a vhost-user frontend on guest RAM
    // shared with the switch process.
    wait_ports(&d, "lan", "connected", |p| {
        p.len() == 1 && p[0]["port"] == "sw-0" && p[0]["connected"] == true
    });
    let port = &ports(&d, "lan")[0];
    assert_eq!(port["vlan"], json!({"access": 10}));
    assert!(
        port["mac"].as_str().is_some_and(|m| m.len() == 17),
        "{port}"
    );
    let info = d.info("sw");
    assert_eq!(info["switch_ports"][0]["switch"], "lan", "{info}");
    assert_eq!(info["memory"]["backing"], "memfd", "{info}");
    let table = d.cli(&["switch", "show", "lan"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("sw-0"));
    // The same switch again is fine; another mode is a conflict.
    d.expect("PUT", "/switches/lan", Some(json!({"mode": "bridge"})), 200);
    d.expect("PUT", "/switches/lan", Some(json!({"mode": "hub"})), 409);
    // The daemon restarts: the switch process and the guest's connection to
    // it live on, and the new daemon takes the switch over.
    d.kill_daemon();
    d.spawn();
    let port = &ports(&d, "lan")[0];
    assert_eq!(
        (&port["port"], &port["connected"]),
        (&json!("sw-0"), &json!(true))
    );
    d.expect("PUT", "/switches/lan", Some(json!({"mode": "bridge"})), 200);
    // The port goes with its guest, adopted by the restarted daemon.
    d.expect("POST", "/guests/sw/kill", None, 200);
    wait_ports(&d, "lan", "empty", |p| p.is_empty());
    // A guest on a switch the system does not declare: one line, nothing made.
    let undeclared = d.dir.join("undeclared.toml");
    std::fs::write(&undeclared, "[guests.other]\nfile = \"switched.toml\"\n").expect("write");
    let out = d.cli(&["up", undeclared.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no switch 'lan' is declared"), "{err}");
    d.expect("GET", "/guests/other", None, 404);
    let out = d.cli(&["switch", "show", "nope"]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    // Deleting the switch stops its process.
    let control = d.state_dir.join("switches/lan/control.sock");
    assert!(std::os::unix::net::UnixStream::connect(&control).is_ok());
    let out = d.cli(&["switch", "delete", "lan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.expect("GET", "/switches/lan", None, 404);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::os::unix::net::UnixStream::connect(&control).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the switch still answers"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A pseudo-terminal: the master end for the test, the slave for the CLI.
fn open_pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: both pointers are valid for writes; a null name, termios and
    // window size are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: openpty returned two fresh descriptors that we now own.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Whether the terminal is in canonical (line) mode.
fn canonical(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero termios is valid storage for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open terminal and `t` valid storage.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ICANON != 0
}

#[test]
fn the_console_command_is_raw_while_attached_and_ctrl_bracket_detaches() {
    let d = TestDaemon::start();
    d.create_echo("tty", true);
    d.wait_console("tty", "ready");
    let (mut master, slave) = open_pty();
    assert!(canonical(&slave));
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["console", "tty", "--socket"])
        .arg(&d.socket)
        .stdin(std::process::Stdio::from(slave.try_clone().expect("dup")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ferrovisor console");
    let mut err = cli.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("attached") {
        let mut b = [0u8; 1];
        assert_eq!(err.read(&mut b).expect("read"), 1, "{seen:?}");
        seen.push(b[0]);
    }
    assert!(
        !canonical(&slave),
        "the terminal should be raw while attached"
    );
    // Keys without a newline reach the guest at once; its echo comes back.
    master.write_all(b"hi!").expect("type");
    let mut out = cli.stdout.take().expect("stdout");
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hi!") {
        let mut buf = [0u8; 64];
        let n = out.read(&mut buf).expect("read");
        assert!(n > 0, "console output ended: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    master.write_all(&[0x1d]).expect("Ctrl-]");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = cli.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "Ctrl-] did not detach");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(canonical(&slave), "the terminal should be restored");
    assert_eq!(d.info("tty")["state"], "running");
}

#[test]
fn the_daemon_skips_broken_guest_directories_and_owns_its_state_alone() {
    let mut d = TestDaemon::start();
    d.create_echo("fine", false);
    // A second daemon on the same state directory is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .arg("daemon")
        .arg("--socket")
        .arg(d.dir.join("other.sock"))
        .arg("--state-dir")
        .arg(&d.state_dir)
        .output()
        .expect("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another daemon"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    d.kill_daemon();
    let guests = d.state_dir.join("guests");
    std::fs::create_dir_all(guests.join("junk")).expect("junk");
    std::fs::write(guests.join("junk/state.json"), "not json").expect("junk");
    std::fs::create_dir_all(guests.join(".new-half-1")).expect("leftover");
    d.spawn();
    let list = d.expect("GET", "/guests", None, 200);
    assert_eq!(list["guests"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["guests"][0]["name"], "fine");
    assert!(d.log().contains("skipping guest 'junk'"), "{}", d.log());
    assert!(!guests.join(".new-half-1").exists());
}

/// A stop of the echo guest (which ignores Ctrl-Alt-Del) holds its lock
/// for about `secs` seconds; returns the thread running it.
fn slow_stop<'s, 'e>(
    s: &'s std::thread::Scope<'s, 'e>,
    d: &'e TestDaemon,
    name: &'e str,
    secs: u32,
) -> std::thread::ScopedJoinHandle<'s, u16> {
    let stop = s.spawn(move || {
        d.call("POST", &format!("/guests/{name}/stop?timeout={secs}"), None)
            .0
    });
    // Give the stop time to take the lock (it holds it for seconds).
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop
}

#[test]
fn racing_deletes_give_one_200_and_one_404() {
    let d = TestDaemon::start();
    d.create_echo("twice", true);
    d.wait_console("twice", "ready");
    let (stop, deletes) = std::thread::scope(|s| {
        let stop = slow_stop(s, &d, "twice", 2);
        let deletes: Vec<_> = (0..2)
            .map(|_| s.spawn(|| d.call("DELETE", "/guests/twice", None)))
            .collect();
        let deletes: Vec<(u16, Value)> = deletes
            .into_iter()
            .map(|t| t.join().expect("delete"))
            .collect();
        (stop.join().expect("stop"), deletes)
    });
    assert_eq!(stop, 200);
    let mut statuses: Vec<u16> = deletes.iter().map(|(s, _)| *s).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 404], "{deletes:?}");
    let lost = deletes.iter().find(|(s, _)| *s == 404).expect("404");
    assert_eq!(lost.1["error"], "no guest named 'twice'");
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
    d.create_echo("twice", false);
}

#[test]
fn an_operation_queued_behind_a_delete_finds_no_guest_and_leaves_nothing() {
    let d = &TestDaemon::start();
    d.create_echo("doomed", true);
    d.wait_console("doomed", "ready");
    let (delete, start) = std::thread::scope(|s| {
        let stop = slow_stop(s, d, "doomed", 2);
        let delete = s.spawn(|| d.call("DELETE", "/guests/doomed", None).0);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let start = s.spawn(|| d.call("POST", "/guests/doomed/start", None));
        assert_eq!(stop.join().expect("stop"), 200);
        (delete.join().expect("delete"), start.join().expect("start"))
    });
    if delete == 200 {
        // The delete went first: the start must not bring back a directory.
        assert_eq!(start.0, 404, "{}", start.1);
        assert_eq!(start.1["error"], "no guest named 'doomed'");
        assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
        d.create_echo("doomed", false);
    } else {
        // The start went first: the delete was refused, the guest runs.
        assert_eq!(delete, 409);
        assert_eq!(start.0, 200, "{}", start.1);
        assert_eq!(d.info("doomed")["state"], "running");
        d.expect("POST", "/guests/doomed/kill", None, 200);
    }
    // Every other operation on a deleted guest is refused the same way.
    let ops = std::thread::scope(|s| {
        d.expect("POST", "/guests/doomed/start", None, 200);
        d.wait_console("doomed", "ready");
        let stop = slow_stop(s, d, "doomed", 2);
        let delete = s.spawn(|| d.call("DELETE", "/guests/doomed", None).0);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let ops: Vec<_> = ["pause", "resume", "kill", "stop"]
            .into_iter()
            .map(|op| {
                s.spawn(move || (op, d.call("POST", &format!("/guests/doomed/{op}"), None).0))
            })
            .collect();
        assert_eq!(stop.join().expect("stop"), 200);
        assert_eq!(delete.join().expect("delete"), 200);
        ops.into_iter()
            .map(|t| t.join().expect("op"))
            .collect::<Vec<_>>()
    });
    // Each queued operation found the guest gone, or (had it run before
    // the delete) found it stopped.
    for (op, status) in ops {
        assert!(matches!(status, 404 | 409), "{op}: {status}");
    }
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
}

#[test]
fn a_guest_that_cannot_boot_is_refused_at_create_or_start() {
    let d = TestDaemon::start();
    // Files that are not there: 400 at create, naming the field.
    let missing = d.dir.join("nonexistent/vmlinuz");
    let (status, reply) = d.call(
        "POST",
        "/guests",
        Some(
            json!({"name": "nokernel", "config": format!("kernel = \"{}\"\n", missing.display())}),
        ),
    );
    assert_eq!(status, 400, "{reply}");
    assert_eq!(
        reply["error"],
        format!(
            "bad guest description: kernel: {}: No such file or directory",
            missing.display()
        )
    );
    let disk = format!(
        "{}[[disk]]\npath = \"{}/disk.img\"\n",
        echo_description(),
        d.dir.display()
    );
    let (status, reply) = d.call(
        "POST",
        "/guests",
        Some(json!({"name": "nodisk", "config": disk})),
    );
    assert_eq!(status, 400, "{reply}");
    let want = format!(
        "disk[0].path: {}/disk.img: No such file or directory",
        d.dir.display()
    );
    assert!(
        reply["error"].as_str().expect("error").ends_with(&want),
        "{reply}"
    );
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());

    // A file that is not a kernel: the VMM ends at once; start says why.
    let junk = d.dir.join("junk.bin");
    std::fs::write(&junk, b"not a kernel").expect("write");
    let config = format!("kernel = \"{}\"\n", junk.display());
    d.expect(
        "POST",
        "/guests",
        Some(json!({"name": "junk", "config": config})),
        201,
    );
    let reply = d.expect("POST", "/guests/junk/start", None, 500);
    let message = reply["error"].as_str().expect("error");
    assert!(
        message.starts_with("guest 'junk' did not start: ") && message.contains("is not a kernel"),
        "{message}"
    );
    let info = d.info("junk");
    assert_eq!(info["state"], "crashed", "{info}");
    assert!(info["exit"]["reason"]
        .as_str()
        .expect("reason")
        .contains("is not a kernel"));
    // The CLI fails with that line.
    let out = d.cli(&["start", "junk"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("did not start") && err.contains("is not a kernel"),
        "{err}"
    );

    // A kernel that is not one, with create and start in one call: the
    // same, and create with start is all or nothing, so a corrected retry
    // succeeds.
    let huge = format!("kernel = \"{}\"\n", junk.display());
    let (status, reply) = d.call(
        "POST",
        "/guests",
        Some(json!({"name": "big", "config": huge, "start": true})),
    );
    assert_eq!(status, 500, "{reply}");
    let message = reply["error"].as_str().expect("error");
    assert!(
        message.starts_with("guest 'big' did not start: "),
        "{message}"
    );
    assert!(
        message.ends_with("; the guest was not created"),
        "{message}"
    );
    d.expect("GET", "/guests/big", None, 404);
    assert_eq!(d.guest_dirs(), ["junk"]);
    let retried = d.create_echo("big", true);
    assert_eq!(retried["state"], "running", "{retried}");
}

/// Waits until every thread of `pid` is stopped (a SIGSTOP takes effect
/// on each thread as it next runs).
fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
        let all_stopped = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            matches!(state, Some("T" | "t"))
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "{pid} never stopped");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_stalled_vmm_shows_its_last_facts_marked_stale() {
    let d = TestDaemon::start();
    d.create_echo("stalled", true);
    d.create_echo("lively", true);
    d.wait_console("stalled", "ready");
    d.wait_console("lively", "ready");
    let before = d.info("stalled");
    assert_eq!(before["stale"], false, "{before}");
    let tids = before["vcpu_tids"].clone();
    assert!(tids.is_array(), "{before}");
    let pid = before["pid"].as_i64().expect("pid") as i32;
    daemon::process::signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let list = d.expect("GET", "/guests", None, 200);
    let table = d.cli(&["list"]);
    daemon::process::signal(pid, libc::SIGCONT);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("stalled "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" running* "), "{table}");
    assert!(table.contains("did not answer in time"), "{table}");
    let guests = list["guests"].as_array().expect("guests");
    let stalled = guests
        .iter()
        .find(|g| g["name"] == "stalled")
        .expect("stalled");
    let lively = guests
        .iter()
        .find(|g| g["name"] == "lively")
        .expect("lively");
    assert_eq!(stalled["stale"], true, "{stalled}");
    assert_eq!(stalled["state"], "running", "{stalled}");
    assert_eq!(stalled["vcpu_tids"], tids, "{stalled}");
    assert!(stalled["exits"].is_u64(), "{stalled}");
    assert_eq!(lively["stale"], false, "{lively}");
    // Once it answers again, the facts are fresh.
    let deadline = Instant::now() + LIMIT;
    while d.info("stalled")["stale"] != false {
        assert!(Instant::now() < deadline, "never fresh again");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_request_body_with_a_repeated_key_is_refused() {
    let d = TestDaemon::start();
    let body = format!(
        "{{\"name\":\"a\",\"name\":\"b\",\"config\":{}}}",
        Value::from(echo_description())
    );
    let request = format!(
        "POST /guests HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let reply = d.raw_exchange(request.as_bytes());
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("name: given twice"), "{reply}");
    assert!(d.guest_dirs().is_empty(), "{:?}", d.guest_dirs());
}

#[test]
fn the_cli_checks_names_and_timeouts_before_asking() {
    let d = TestDaemon::start();
    for (args, want) in [
        (
            &["start", "../x"][..],
            "ferrovisor start: '../x' is not a guest name (1 to 32 characters: a-z, 0-9 and -)",
        ),
        (
            &["info", "a?b"],
            "ferrovisor info: 'a?b' is not a guest name (1 to 32 characters: a-z, 0-9 and -)",
        ),
        (
            &["stop", "web", "--timeout", "5&x=1"],
            "ferrovisor stop: --timeout: '5&x=1' is not a number of seconds",
        ),
        (
            &["console", "a/b", "--log"],
            "ferrovisor console: 'a/b' is not a guest name (1 to 32 characters: a-z, 0-9 and -)",
        ),
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).trim_end(), want);
    }
}

#[test]
fn connections_beyond_the_limit_get_503_and_the_daemon_recovers() {
    let d = TestDaemon::start();
    // Idle connections that have not sent their request yet hold a slot;
    // one uid has MAX_CONNECTIONS_PER_UID of them.
    let held: Vec<_> = (0..daemon::server::MAX_CONNECTIONS_PER_UID)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.socket).expect("connect"))
        .collect();
    let mut extra = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    extra.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut reply = Vec::new();
    let _ = extra.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    for (method, path) in [("GET", "/guests"), ("POST", "/guests/a/start")] {
        control::openapi::check_response(method, path, 503, body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    drop(held);
    let deadline = Instant::now() + LIMIT;
    loop {
        let client = daemon::Client::new(&d.socket);
        match client.raw("GET", "/guests", None) {
            Ok(r) if r.status == 200 => break,
            other => assert!(Instant::now() < deadline, "no recovery: {other:?}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs `call` on `n` threads at once and returns each one's status.
fn at_once(n: usize, call: impl Fn() -> u16 + Sync) -> Vec<u16> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..n).map(|_| s.spawn(&call)).collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    })
}

/// How many of `statuses` are `status`.
fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}
